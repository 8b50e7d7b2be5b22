"""The privacy–utility frontier of several trained SGTs: ``python -m sgt_jax.attack --frontier RUN_DIR ...``.

One point per run. Privacy comes from the run's attack report (``python -m sgt_jax.attack --sgt RUN_DIR``):
the strongest learned attack's top-1 recovery (lower = more private), and the mutual-information estimate.
Utility comes from the run's evaluation report (``python -m sgt_jax.evaluate``) when there is one, else from
the last validation of training in its TensorBoard logs: top-1 next-token agreement, the utility loss and
ROUGE-L. Writes the PNG (two panels: recovery vs top-1 agreement, MI vs utility loss), the plotted
coordinates as JSON beside it (``<png>.json``), and TensorBoard scalars ``frontier/...`` under
``<png's folder>/tensorboard`` (one step per point, in order of alpha).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from sgt_jax import tracking
from sgt_jax.inference.artifact import ArtifactError

__all__ = ["frontier_point", "frontier"]

_UTILITY_TAGS = {"top1_agreement": "val/top1_agreement", "utility_loss": "val/utility_loss",
                 "rougeL_fmeasure": "val/rougeL_fmeasure"}


def _utility(run_dir: Path) -> dict[str, float]:
    """Utility numbers of a run: its eval report, else its last validation in TensorBoard (NaN when absent)."""
    out = {k: math.nan for k in _UTILITY_TAGS}
    eval_report = run_dir / "eval_report.json"
    if eval_report.is_file():
        report = json.loads(eval_report.read_text())
        out["top1_agreement"] = report.get("forward", {}).get("top1_agreement", math.nan)
        out["rougeL_fmeasure"] = report.get("generation", {}).get("rougeL_fmeasure", math.nan)
    if (run_dir / "tensorboard").is_dir():
        events = tracking.read_events(run_dir / "tensorboard")
        for key, tag in _UTILITY_TAGS.items():
            if math.isnan(out[key]) and events.get(tag):
                out[key] = float(max(events[tag], key=lambda e: e[0])[1])
    return out


def frontier_point(run_dir) -> dict[str, Any]:
    """The frontier coordinates of one run (see the module docstring)."""
    run_dir = Path(run_dir)
    report_path = run_dir / "attack_report.json"
    if not report_path.is_file():
        raise ArtifactError(f"--frontier {str(run_dir)!r} has no attack_report.json; run "
                            f"`python -m sgt_jax.attack --sgt {run_dir}` first.")
    report = json.loads(report_path.read_text())
    attacks = report["attacks"]
    learned = [a for a in ("mlp", "transformer") if a in attacks]
    best = max(learned, key=lambda a: attacks[a]["top1"]) if learned else None
    mi = report.get("mutual_information") or {}
    return {
        "run": str(run_dir), "alpha": (report.get("objective") or {}).get("alpha"),
        "attack": best, "recovery_top1": attacks[best]["top1"] if best else math.nan,
        "nn_cosine_top1": attacks.get("nn_cosine", {}).get("top1", math.nan),
        "mi_bits": mi.get("bits", math.nan), "mi_max_bits": mi.get("max_bits", math.nan),
        **_utility(run_dir),
    }


def _plot(points: list[dict[str, Any]], out: Path) -> None:
    import matplotlib  # imported here: slow to import, and only plotting needs it

    matplotlib.use("Agg")  # writes a file; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    panels = (("recovery_top1", "top1_agreement", "learned-attack top-1 recovery (%)", "top-1 agreement"),
              ("mi_bits", "utility_loss", "mutual information (bits / token)", "utility loss"))
    for ax, (x, y, xlabel, ylabel) in zip(axes, panels):
        xs, ys = [p[x] for p in points], [p[y] for p in points]
        ax.plot(xs, ys, "o-", color="tab:blue")
        for p, xv, yv in zip(points, xs, ys):
            ax.annotate(f"alpha={p['alpha']}" if p["alpha"] is not None else Path(p["run"]).name, (xv, yv),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle("SGT privacy–utility frontier (one point per run)")
    fig.savefig(out, dpi=120)
    plt.close(fig)


def frontier(run_dirs: Sequence[str], *, out="frontier.png") -> list[dict[str, Any]]:
    """Plot the frontier of ``run_dirs`` to ``out`` (PNG) and ``out + '.json'``; returns the points."""
    points = sorted((frontier_point(r) for r in run_dirs), key=lambda p: (p["alpha"] is None, p["alpha"] or 0.0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _plot(points, out)
    Path(f"{out}.json").write_text(json.dumps({"png": str(out), "points": points}, indent=2))
    with tracking.Tracker(out.parent, tensorboard=True) as tracker:
        for i, p in enumerate(points):
            tracker.scalars(i, {f"frontier/{k}": v for k, v in p.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None})
    print(tracking.summary_table({f"{Path(p['run']).name} (alpha={p['alpha']})":
                                  f"recovery {p['recovery_top1']:.1f}%  MI {p['mi_bits']:.2f} bits  "
                                  f"top-1 agreement {p['top1_agreement']:.4f}" for p in points},
                                 title=f"privacy–utility frontier -> {out}"), flush=True)
    return points
