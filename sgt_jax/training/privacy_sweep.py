"""The privacy–utility sweep of the adversarial objective: ``python -m sgt_jax.privacy_sweep``.

For each setting (a list of ``key=value`` overrides of the training config) it trains an SGT, attacks it with
``python -m sgt_jax.attack``'s learned per-token ``mlp`` attack (trained on transformed public prompts,
scored on held-out ones; its report is ``<run>/attack_report.json``) and reads the run's final top-1 agreement
and utility loss; it writes ``frontier.json`` and a frontier PNG (utility against learned-attack recovery,
one point per run, one marker per objective).

    python -m sgt_jax.privacy_sweep --out runs/sweep \\
        --setting objective.adversary=off --setting "objective.adversary=mlp objective.adversary_weight=1"

"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from sgt_jax import config as config_lib
from sgt_jax.errors import run_cli
from sgt_jax.evaluation import attack as attack_lib
from sgt_jax.training.run import train

log = logging.getLogger("sgt_jax.privacy_sweep")


def run_point(config_path, overrides: Sequence[str], run_dir: Path, *, attack_steps: int) -> dict[str, Any]:
    """Train one SGT (``overrides`` on ``config_path``, run dir ``run_dir``), attack its artifact, and write
    the point's report to ``run_dir/privacy_point.json``."""
    cfg = config_lib.load_config(config_path, [*overrides, f"tracking.run_dir={run_dir}"])
    summary = train(cfg)
    if summary.get("stopped_by") != "finished":
        raise RuntimeError(f"the run in {run_dir} stopped ({summary.get('stopped_by')}); no artifact to attack.")
    report = attack_lib.attack(run_dir, attacks=("nn", "mlp"), steps=attack_steps, ceiling=False, mi_samples=0,
                               progress=False, print_table=False)
    attack = {"mlp_recovery": report["attacks"]["mlp"]["top1"],
              "nn_recovery": report["attacks"]["nn_cosine"]["top1"], "attack_report": str(Path(run_dir) / "attack_report.json")}
    point = {
        "settings": list(overrides), "run_dir": str(run_dir),
        "objective": "adversarial" if cfg.objective.adversary != "off" else "recommendations",
        "top1_agreement": summary.get("top1_agreement (after)"), "utility_loss": summary.get("utility_loss (after)"),
        "sigma_over_spacing": summary.get("sigma_over_spacing (after)"), **attack,
    }
    (Path(run_dir) / "privacy_point.json").write_text(json.dumps(point, indent=2))
    return point


def _label(settings: Sequence[str]) -> str:
    """``objective.adversary_weight=0.05`` → ``adversary_weight=0.05``; no settings → ``default``."""
    parts = [f"{k.split('.')[-1]}={v}" for k, _, v in (s.partition("=") for s in settings)
             if k.split(".")[-1] != "adversary"]  # the marker shows the objective
    return " ".join(parts) or "default"


def plot_frontier(points: Sequence[Mapping[str, Any]], path: Path) -> np.ndarray:
    """PNG of top-1 agreement against learned-attack recovery, one marker per objective; returns the plotted
    (x, y) coordinates in the order of ``points``."""
    import matplotlib  # imported here: slow to import, and only plotting needs it

    matplotlib.use("Agg")  # writes a file; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    coords = np.zeros((len(points), 2))
    for objective, marker in (("recommendations", "o"), ("adversarial", "s")):
        idx = [i for i, p in enumerate(points) if p["objective"] == objective]
        if not idx:
            continue
        xy = np.array([[points[i]["mlp_recovery"], 100 * points[i]["top1_agreement"]] for i in idx])
        coll = ax.scatter(xy[:, 0], xy[:, 1], marker=marker, label=f"{objective} objective")
        coords[idx] = np.asarray(coll.get_offsets())
        for i, (x, y) in zip(idx, xy):
            ax.annotate(_label(points[i]["settings"]), (x, y), xytext=(-5, 3), textcoords="offset points",
                        ha="right", fontsize=6)
    ax.set_xlabel("learned MLP attack: recovery of transformed tokens (%)")
    ax.set_ylabel("top-1 agreement with the base model (%)")
    ax.set_xlim(0, 102)
    ax.set_title("SGT privacy-utility frontier (upper left is better)")
    ax.legend(loc="lower left")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return coords


def sweep(settings: Sequence[Sequence[str]], out: Path, *, config_path=None, attack_steps: int = 1500,
          common: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every setting trained and attacked (run dirs ``out/run_<i>``), then ``out/frontier.json`` and
    ``out/frontier.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = []
    for i, setting in enumerate(settings):
        log.info("sweep point %d/%d: %s", i + 1, len(settings), " ".join(setting) or "(defaults)")
        points.append(run_point(config_path, [*common, *setting], out / f"run_{i}", attack_steps=attack_steps))
    coords = plot_frontier(points, out / "frontier.png")
    for p, (x, y) in zip(points, coords):
        p["plotted"] = [float(x), float(y)]
    (out / "frontier.json").write_text(json.dumps(points, indent=2))
    return points


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgt_jax.privacy_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the runs, frontier.json and frontier.png")
    parser.add_argument("--setting", action="append", default=[],
                        help='one sweep point: space-separated key=value overrides (repeat the flag per point)')
    parser.add_argument("--config", help="training config (default: the embedded tiny run)")
    parser.add_argument("--attack-steps", type=int, default=1500, help="Adam steps of the MLP attacker")
    parser.add_argument("common", nargs="*", help="key=value overrides applied to every point")
    args = parser.parse_args(argv)
    settings = [shlex.split(s) for s in args.setting] or [[]]

    def go():
        points = sweep(settings, Path(args.out), config_path=args.config, attack_steps=args.attack_steps,
                       common=args.common)
        for p in points:
            print(f"{p['objective']:>15}  top1 {100 * p['top1_agreement']:5.1f}%  mlp recovery "
                  f"{p['mlp_recovery']:5.1f}%  {' '.join(p['settings'])}")
        return 0

    return run_cli(go)
