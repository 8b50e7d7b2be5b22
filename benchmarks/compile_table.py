"""Markdown table of the --compile-only reports in benchmarks/results/compile/ (see compile_recipes.sh)."""

import json
import sys
from pathlib import Path

GiB = 1 << 30


def row(path: Path) -> str:
    r = json.loads(path.read_text())
    train = r["train_step"]
    per_step = len(train["collectives"])
    in_loops = train["collectives_in_loops"]
    # Roofline estimates (reports written before the roofline carry none: n/a).
    est, mfu = r.get("roofline_step_seconds"), r.get("roofline_mfu")
    recipe = path.stem[: -len(r["topology"].replace(":", "_")) - 1]  # <recipe>_<topology>.json
    return (f"| {recipe} | {r['topology']} | {r['mesh']['data']}/{r['mesh']['fsdp']}/"
            f"{r['mesh']['tensor']} | {r['needed_bytes_per_device'] / GiB:.2f} of {r['hbm_bytes_per_device'] / GiB:.0f}"
            f" GiB | {'yes' if r['fits'] else 'no'} | {train['memory']['total'] / GiB:.2f} | "
            f"{r['eval_step']['memory']['total'] / GiB if r['eval_step'] else float('nan'):.2f} | {per_step} "
            f"({in_loops} in loops) | {f'{est:.3f} s' if est else 'n/a'} | {f'{mfu:.0%}' if mfu else 'n/a'} | "
            f"{train['compile_seconds']:.0f} + {r['eval_step']['compile_seconds'] if r['eval_step'] else 0:.0f} s |")


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/compile")
    print("| recipe | topology | data/fsdp/tensor | needed per chip | fits (10% free) | train step GiB | "
          "eval step GiB | collectives in the train step | roofline bound (est.) | MFU at the bound (est.) | "
          "compile (train + eval) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(folder.glob("*.json")):
        print(row(path))
