"""XLA:CPU against PyTorch on the GEMMs of the SGT train step: where the CPU step's time goes once the shapes stop
being bound by per-op overhead.

    python benchmarks/gemm_cpu.py --shape small --rows 512 1024 2048 --torch-threads 2 \
        --out benchmarks/results/gemm_cpu_small.json

For each row count M (batch x sequence) it times, in float32, the three kinds of matmul a layer of the step runs
for every weight matrix W of shape (K, N) of the shape's layers (q/k/v/o: D x D, or D x kv for GQA; gate/up:
D x F; down: F x D): the forward ``X @ W`` (M x K by K x N), the input gradient ``dY @ W.T`` and the weight
gradient ``X.T @ dY`` (the last only in the cloak, whose weights train). Each GEMM is jitted alone in JAX (inputs
already on the device, ``block_until_ready``) and run with ``torch.matmul`` (``torch.set_num_threads``), median of
``--reps`` after ``--warmup``; it reports GFLOP/s (2·M·K·N per product) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: do not probe for a TPU when libtpu is installed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgt_jax.tools.benchmark import SHAPES  # noqa: E402


def gemms(shape: dict, rows: int) -> list[tuple[str, tuple[int, int], tuple[int, int], bool, bool]]:
    """(name, lhs shape, rhs shape, transpose lhs, transpose rhs) for one layer's distinct products at M rows."""
    d, f = shape["hidden"], shape["intermediate"]
    kv = shape["kv_heads"] * (d // shape["heads"])
    out = []
    for name, (k, n) in {"qo (DxD)": (d, d), "kv (Dxkv)": (d, kv), "gate/up (DxF)": (d, f),
                         "down (FxD)": (f, d)}.items():
        if name.startswith("kv") and kv == d:
            continue
        out.append((f"{name} fwd X@W", (rows, k), (k, n), False, False))
        out.append((f"{name} dX dY@W.T", (rows, n), (n, k), False, True))
        out.append((f"{name} dW X.T@dY", (k, rows), (rows, n), True, False))
    return out


def _median_seconds(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_jax(lhs_shape, rhs_shape, t_lhs: bool, t_rhs: bool, reps: int, warmup: int) -> float:
    # The operands are stored as the step stores them (W as (K, N), activations as (M, K)); the transposes are
    # part of the product, as in the step's backward pass, so XLA chooses how to feed its GEMM.
    rng = np.random.default_rng(0)
    a_store = lhs_shape[::-1] if t_lhs else lhs_shape
    b_store = rhs_shape[::-1] if t_rhs else rhs_shape
    a = jnp.asarray(rng.standard_normal(a_store, dtype=np.float32))
    b = jnp.asarray(rng.standard_normal(b_store, dtype=np.float32))
    fn = jax.jit(lambda x, y: (x.T if t_lhs else x) @ (y.T if t_rhs else y))
    return _median_seconds(lambda: fn(a, b).block_until_ready(), reps, warmup)


def time_torch(lhs_shape, rhs_shape, t_lhs: bool, t_rhs: bool, reps: int, warmup: int) -> float:
    gen = torch.Generator().manual_seed(0)
    a_store = lhs_shape[::-1] if t_lhs else lhs_shape
    b_store = rhs_shape[::-1] if t_rhs else rhs_shape
    a = torch.randn(a_store, generator=gen)
    b = torch.randn(b_store, generator=gen)

    def run():
        with torch.no_grad():
            torch.matmul(a.T if t_lhs else a, b.T if t_rhs else b)

    return _median_seconds(run, reps, warmup)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--rows", type=int, nargs="+", default=[512, 1024, 2048], help="M = batch x sequence")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.torch_threads)
    shape = dict(SHAPES[a.shape])
    result = {"shape": shape, "args": vars(a), "torch_threads": torch.get_num_threads(),
              "jax": jax.__version__, "torch_version": torch.__version__, "cpus": os.cpu_count(),
              "load_average_before": os.getloadavg()[0], "gemms": []}
    print(f"{'M':>5} {'GEMM':<24} {'XLA GFLOP/s':>12} {'torch GFLOP/s':>14} {'XLA/torch':>10}")
    for rows in a.rows:
        for name, lhs, rhs, t_lhs, t_rhs in gemms(shape, rows):
            flops = 2 * lhs[0] * lhs[1] * rhs[1]
            ours = time_jax(lhs, rhs, t_lhs, t_rhs, a.reps, a.warmup)
            ref = time_torch(lhs, rhs, t_lhs, t_rhs, a.reps, a.warmup)
            row = {"rows": rows, "gemm": name, "m_k_n": [lhs[0], lhs[1], rhs[1]], "xla_s": ours, "torch_s": ref,
                   "xla_gflops": flops / ours / 1e9, "torch_gflops": flops / ref / 1e9, "ratio_xla_over_torch": ref / ours}
            result["gemms"].append(row)
            print(f"{rows:>5} {name:<24} {row['xla_gflops']:>12.1f} {row['torch_gflops']:>14.1f} "
                  f"{row['ratio_xla_over_torch']:>9.2f}x", flush=True)
    # FLOP-weighted over every product of a layer: what the step as a whole would see from its matmuls.
    for rows in a.rows:
        picked = [g for g in result["gemms"] if g["rows"] == rows]
        flops = sum(2 * np.prod(g["m_k_n"]) for g in picked)
        result.setdefault("per_rows", {})[str(rows)] = {
            "xla_gflops": float(flops / sum(g["xla_s"] for g in picked) / 1e9),
            "torch_gflops": float(flops / sum(g["torch_s"] for g in picked) / 1e9),
            "ratio_xla_over_torch": float(sum(g["torch_s"] for g in picked) / sum(g["xla_s"] for g in picked))}
        s = result["per_rows"][str(rows)]
        print(f"{rows:>5} {'all of a layer':<24} {s['xla_gflops']:>12.1f} {s['torch_gflops']:>14.1f} "
              f"{s['ratio_xla_over_torch']:>9.2f}x")
    result["load_average_after"] = os.getloadavg()[0]
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
