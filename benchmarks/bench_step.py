"""Thin wrapper: ``python benchmarks/bench_step.py ARGS`` == ``python -m sgt_jax.bench ARGS`` (see its --help).

``--summarize results/*.json`` prints one table row per result file instead of running a benchmark."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgt_jax.tools.benchmark import main  # noqa: E402


def summarize(paths):
    print("| run | step s (median) | CPU s/step | tokens/s | MFU | compile s | peak bytes (source) | temp bytes | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        r = json.loads(Path(path).read_text())
        fmt = lambda k, f="{:.3f}": f.format(r[k]) if k in r else "-"  # noqa: E731
        temp = r.get("memory_analysis", {}).get("temp_size_in_bytes", "-")
        source = "allocator" if "memory_stats" in r.get("peak_memory_source", "") else "compiled"
        load = r.get("load_average") or ["-"]
        print(f"| {Path(path).stem} | {fmt('step_s_median')} | {fmt('step_cpu_s_median')} | {fmt('tokens_per_s', '{:.0f}')} "
              f"| {fmt('mfu', '{:.3f}')} | {fmt('compile_s', '{:.1f}')} | {r.get('peak_memory_bytes', '-'):,} ({source}) "
              f"| {temp:,} | {load[0]:.1f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summarize"]:
        summarize(sys.argv[2:])
    else:
        main()
