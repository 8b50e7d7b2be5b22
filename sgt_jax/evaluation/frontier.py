"""The privacy–utility frontier of several trained SGTs: ``python -m sgt_jax.attack --frontier RUN_DIR ...`` and
``python -m sgt_jax.privacy_sweep``.

One point per run. Privacy comes from the run's attack report (``python -m sgt_jax.attack --sgt RUN_DIR``): each
threat model's strongest attack (top-1 recovery of the noised tokens; lower = more private) and the report's
leakage figure. Utility comes from the run's evaluation report (``python -m sgt_jax.evaluate``) when there is one,
else from the last validation of training in its TensorBoard logs: top-1 next-token agreement, the utility loss
and ROUGE-L. Writes the PNG (recovery against top-1 agreement and against the utility loss, one colour per threat
model, one marker per training length), the points with their plotted coordinates as JSON beside it
(``<png>.json``), and TensorBoard scalars ``frontier/...`` under ``<png's folder>/tensorboard``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from sgt_jax import tracking
from sgt_jax.inference.artifact import ArtifactError

__all__ = ["frontier_point", "plot_frontier", "frontier"]

_UTILITY_TAGS = {"top1_agreement": "val/top1_agreement", "utility_loss": "val/utility_loss",
                 "rougeL_fmeasure": "val/rougeL_fmeasure", "sigma_over_spacing": "val/sigma_over_spacing"}
COLOURS = {"lookup": "tab:gray", "white-box": "tab:red", "server": "tab:blue"}
MARKERS = ("o", "s", "^", "D", "v")


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
    sections = report["threat_models"]
    leak = report.get("leakage") or {}
    return {
        "run": str(run_dir), "training": report.get("training", {}), "attack_report": str(report_path),
        "recovery": {t: sec["recovery_top1"] for t, sec in sections.items()},
        "strongest": {t: sec["strongest"] for t, sec in sections.items()},
        "majority_baseline": report["majority_baseline"]["top1"],
        "leakage_bits": leak.get("bits", math.nan), "leakage_attack": leak.get("attack"),
        **_utility(run_dir),
    }


def _label(point) -> str:
    t = point.get("training") or {}
    return f"v{t.get('transform_variance_priority')} a{t.get('alpha')}" if t else Path(point["run"]).name


def plot_frontier(points: Sequence[dict[str, Any]], path) -> None:
    """The PNG at ``path``; stores each point's plotted coordinates in ``point["plotted"]``:
    ``{threat model: [recovery, top-1 agreement (%), utility loss]}``."""
    import matplotlib  # imported here: slow to import, and only plotting needs it

    matplotlib.use("Agg")  # writes a file; no display needed
    import matplotlib.pyplot as plt

    steps = sorted({(p.get("training") or {}).get("max_steps") or 0 for p in points})
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    for p in points:
        p["plotted"] = {}
    for threat, colour in COLOURS.items():
        for j, n in enumerate(steps):
            chosen = [p for p in points if threat in p["recovery"] and ((p.get("training") or {}).get("max_steps")
                                                                        or 0) == n]
            for ax, column in zip(axes, ("top1_agreement", "utility_loss")):
                scale = 100.0 if column == "top1_agreement" else 1.0
                xy = [(p["recovery"][threat], scale * p[column]) for p in chosen]
                if not xy:
                    continue
                coll = ax.scatter(*zip(*xy), c=colour, marker=MARKERS[j % len(MARKERS)], s=28, alpha=0.85,
                                  label=f"{threat}, {n} steps" if n else threat)
                for p, (x, y) in zip(chosen, coll.get_offsets()):
                    p["plotted"].setdefault(threat, [float(x)]).append(float(y))
                    if threat == "white-box":
                        ax.annotate(_label(p), (x, y), xytext=(3, 2), textcoords="offset points", fontsize=5)
    for ax, ylabel in zip(axes, ("top-1 next-token agreement (%)", "utility loss (1 - cos at the truncation layer)")):
        ax.set_xlabel("strongest attack of the threat model: recovery of noised tokens (%)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("SGT privacy–utility frontier (one point per run and threat model; left: up and left is better)")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def frontier(run_dirs: Sequence[str], *, out="frontier.png") -> list[dict[str, Any]]:
    """Plot the frontier of ``run_dirs`` to ``out`` (PNG) and ``out + '.json'``; returns the points."""
    points = [frontier_point(r) for r in run_dirs]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_frontier(points, out)
    Path(f"{out}.json").write_text(json.dumps({"png": str(out), "points": points}, indent=2))
    with tracking.Tracker(out.parent, tensorboard=True) as tracker:
        for i, p in enumerate(points):
            tracker.scalars(i, {f"frontier/{t}/recovery": v for t, v in p["recovery"].items()}
                            | {f"frontier/{k}": p[k] for k in ("top1_agreement", "utility_loss", "leakage_bits")})
    print(tracking.summary_table({Path(p["run"]).name: "  ".join(f"{t} {v:.1f}%" for t, v in p["recovery"].items())
                                  + f"  top-1 agreement {p['top1_agreement']:.4f}" for p in points},
                                 title=f"privacy–utility frontier -> {out}"), flush=True)
    return points
