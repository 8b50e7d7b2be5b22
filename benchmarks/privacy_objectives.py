"""The privacy switches (docs/privacy_objectives.md) against the recommendations' frontier on the embedded default.

Reads the recommendations' frontier (``benchmarks/privacy_frontier.json``: alpha x transform_variance_priority) and
every sweep point of the switches (``benchmarks/results/privacy_objectives/*/privacy_point.json``, written by
``python -m sgt_jax.privacy_sweep``). For each switch point, the recommendations' white-box recovery at the same
top-1 agreement is interpolated linearly between the measured points of their Pareto frontier (the points no other
point beats in both agreement and recovery) at the same training length; ``gap`` = that minus the point's own
recovery (positive: the switch hides more at that agreement); the same for the server's strongest attack
(``server_gap``, on the recommendations' Pareto frontier for the server). Writes ``benchmarks/privacy_objectives.png`` and
``.json`` and prints the Markdown table of ``benchmarks/privacy_objectives.md``.

    python benchmarks/privacy_objectives.py [--copy-from runs/privacy_objectives]

``--copy-from`` first copies each finished run's ``privacy_point.json`` and ``attack_report.json`` from a sweep's
``--out`` directory into ``benchmarks/results/privacy_objectives/<run>/``, the sweep directory's path in them
written as ``runs/privacy_objectives``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
POINTS = BENCH / "results" / "privacy_objectives"
SWITCHES = {"objective.adversary_reset_every": "fresh adversary", "objective.posterior_weight": "posterior penalty",
            "cloak.mean_bound": "bounded mean"}
WEIGHTS = {"fresh adversary": "objective.adversary_weight", "posterior penalty": "objective.posterior_weight",
           "bounded mean": "cloak.mean_bound"}
COLOURS = {"recommendations": "tab:gray", "fresh adversary": "tab:red", "posterior penalty": "tab:blue",
           "bounded mean": "tab:green"}


def settings_of(point) -> dict[str, str]:
    return dict(s.split("=", 1) for s in point["settings"])


def objective_of(point) -> str:
    settings = settings_of(point)
    on = [name for key, name in SWITCHES.items() if float(settings.get(key, 0) or 0) > 0]
    return on[0] if len(on) == 1 else ("recommendations" if not on else "+".join(on))


def pareto(points, threat: str = "white-box") -> list[tuple[float, float]]:
    """(agreement %, recovery %) under ``threat`` of the points no other point beats in both, by agreement."""
    xy = sorted({(100 * p["top1_agreement"], p["recovery"][threat]) for p in points})
    return [(a, r) for a, r in xy if not any(a2 >= a and r2 < r for a2, r2 in xy if (a2, r2) != (a, r))]


def frontier_recovery(front: list[tuple[float, float]], agreement: float) -> float:
    """The recommendations' recovery at ``agreement`` (%), interpolated on their Pareto frontier; NaN outside its
    measured range."""
    agreements, recoveries = zip(*front)
    if not agreements[0] <= agreement <= agreements[-1]:
        return math.nan
    return float(np.interp(agreement, agreements, recoveries))


def load():
    baseline = json.loads((BENCH / "privacy_frontier.json").read_text())
    points = [json.loads(p.read_text()) for p in sorted(POINTS.glob("*/privacy_point.json"))]
    rows = []
    for p in points:
        steps = int(settings_of(p).get("train.max_steps", 0))
        same = [b for b in baseline if b["training"]["max_steps"] == steps]
        agreement = 100 * p["top1_agreement"]
        reference, server = (frontier_recovery(pareto(same, t), agreement) if len(same) > 1 else math.nan
                             for t in ("white-box", "server"))
        objective = objective_of(p)
        rows.append({"run": Path(p["run_dir"]).name, "objective": objective, "steps": steps,
                     "weight": "+".join(settings_of(p).get(WEIGHTS.get(name, ""), "") for name in objective.split("+")),
                     "transform_variance_priority": settings_of(p).get("objective.transform_variance_priority"),
                     "top1_agreement": agreement, "utility_loss": p["utility_loss"],
                     "sigma_over_spacing": p.get("sigma_over_spacing"), "leakage_bits": p["leakage_bits"],
                     "recovery": p["recovery"], "strongest": p["strongest"],
                     "recommendations_white_box_at_agreement": reference,
                     "gap": reference - p["recovery"]["white-box"],
                     "recommendations_server_at_agreement": server,
                     "server_gap": server - p["recovery"]["server"]})
    return baseline, rows


def plot(baseline, rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    for ax, threat in zip(axes, ("white-box", "server")):
        for steps, marker in ((400, "o"), (1600, "s")):
            base = [b for b in baseline if b["training"]["max_steps"] == steps]
            ax.scatter([b["recovery"][threat] for b in base], [100 * b["top1_agreement"] for b in base],
                       c=COLOURS["recommendations"], marker=marker, s=20, alpha=0.6,
                       label=f"recommendations (alpha x tvp), {steps} steps")
            if threat == "white-box" and len(base) > 1:
                front = pareto(base)
                ax.plot([r for _, r in front], [a for a, _ in front], c=COLOURS["recommendations"], lw=1)
            for name in sorted({r["objective"] for r in rows}):
                chosen = [r for r in rows if r["objective"] == name and r["steps"] == steps]
                if not chosen:
                    continue
                ax.scatter([r["recovery"][threat] for r in chosen], [r["top1_agreement"] for r in chosen],
                           c=COLOURS.get(name, "tab:purple"), marker=marker, s=30, label=f"{name}, {steps} steps")
                for r in chosen:
                    ax.annotate(f"w{r['weight']} v{r['transform_variance_priority']}",
                                (r["recovery"][threat], r["top1_agreement"]), xytext=(3, 2),
                                textcoords="offset points", fontsize=5)
        ax.set_xlabel(f"{threat}: strongest attack's recovery of noised tokens (%)")
        ax.set_ylabel("top-1 next-token agreement (%)")
        ax.set_xlim(0, 102)
        ax.set_ylim(60, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="lower left")
    fig.suptitle("Privacy switches against the recommendations' frontier (embedded default; up and left is better)")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _percent(value) -> str:
    return "outside" if math.isnan(value) else f"{value:.1f}%"


def _signed(value) -> str:
    return "" if math.isnan(value) else f"{value:+.1f}"


def table(rows) -> str:
    head = ("| objective | weight | tvp | steps | top-1 agr. | utility loss | sigma / spacing | exact-channel bits "
            "| white box | recommendations at this agr. | gap | server (strongest) | recommendations' server | gap |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["objective"], r["steps"], -r["top1_agreement"])):
        ref, gap = _percent(r["recommendations_white_box_at_agreement"]), _signed(r["gap"])
        lines.append(f"| {r['objective']} | {r['weight']} | {r['transform_variance_priority']} | {r['steps']} | "
                     f"{r['top1_agreement']:.1f}% | {r['utility_loss']:.3f} | {r['sigma_over_spacing']:.2f} | "
                     f"{r['leakage_bits']:.2f} | {r['recovery']['white-box']:.1f}% | {ref} | {gap} | "
                     f"{r['recovery']['server']:.1f}% ({r['strongest']['server']}) | "
                     f"{_percent(r['recommendations_server_at_agreement'])} | {_signed(r['server_gap'])} |")
    return "\n".join(lines)


def copy_runs(sweep_dir: Path) -> None:
    for point in sorted(Path(sweep_dir).glob("*/privacy_point.json")):
        target = POINTS / point.parent.name
        target.mkdir(parents=True, exist_ok=True)
        for name in ("privacy_point.json", "attack_report.json"):
            text = (point.parent / name).read_text().replace(str(Path(sweep_dir).resolve()), "runs/privacy_objectives")
            (target / name).write_text(text)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copy-from", help="a privacy_sweep --out directory whose finished runs to copy first")
    args = parser.parse_args()
    if args.copy_from:
        copy_runs(Path(args.copy_from))
    baseline, rows = load()
    plot(baseline, rows, BENCH / "privacy_objectives.png")
    (BENCH / "privacy_objectives.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
