"""Markdown table of the --compile-only reports in benchmarks/results/compile/ (see compile_recipes.sh): per recipe
and target, the memory a chip needs as written against what it has, the largest micro-batch per chip that fits
(--max-tokens: rows of data.max_length tokens; the next size tried did not fit), and the roofline estimate of the
step (a lower bound on its time, so an upper bound on MFU; docs/roofline.md)."""

import json
import sys
from pathlib import Path

GiB = 1 << 30


def row(path: Path) -> str:
    r = json.loads(path.read_text())
    train, evaluate, cap = r["train_step"], r["eval_step"], r.get("capacity")
    est, mfu = r.get("roofline_step_seconds"), r.get("roofline_mfu")
    recipe = path.stem[: -len(r["topology"].replace(":", "_")) - 1]  # <recipe>_<topology>.json
    m = r["mesh"]
    if cap and cap.get("rows_per_device"):
        above = (f"{cap['first_row_fails']} rows do not fit" if cap["first_row_fails"] is not None
                 else f"at least: no size tried in {cap['compiles']} compiles failed")
        fits_most = f"{cap['tokens_per_device']:,} ({cap['rows_per_device']} x {cap['seq_len']}; {above})"
    else:
        fits_most = "not searched" if not cap else "none"
    compile_s = train["compile_seconds"] + (evaluate["compile_seconds"] if evaluate else 0)
    return (f"| {recipe} | {r['topology']} | {m['data']}/{m['fsdp']}/{m['tensor']} | "
            f"{r['needed_bytes_per_device'] / GiB:.2f} of {r['hbm_bytes_per_device'] / GiB:.1f} | "
            f"{'yes' if r['fits'] else 'no'} | {fits_most} | {f'{est:.3f} s' if est else 'n/a'} | "
            f"{f'{mfu:.0%}' if mfu else 'n/a'} | {compile_s:.0f} s |")


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/compile")
    print("| recipe | target | data/fsdp/tensor | GiB per chip needed (as written) of available | fits (10% kept free) "
          "| largest tokens per chip that fit | roofline step time (est., lower bound) | MFU at the bound (est.) "
          "| compile, train + eval (first size) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sorted(folder.glob("*.json")):
        print(row(path))
