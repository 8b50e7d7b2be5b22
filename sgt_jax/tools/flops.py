"""The FLOP model of the SGT train step and the peak FLOP/s it is measured against (MFU, see benchmarks/README.md).

It counts *model* FLOPs — what the maths needs, not what remat recomputes — split into the frozen bf16 base
(forward passes + backward to the inputs only) and the fp32 cloak (forward + backward with weight gradients),
each measured against its own dtype's peak.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.models.config import DecoderConfig

# Dense peak FLOP/s per device kind: (bf16, fp32). H100/H200 SXM: 989 TFLOP/s bf16 tensor-core dense, 67 TFLOP/s
# fp32 (non-tensor-core; the cloak must run in single precision, so TF32's 494 is not used). TPU: the f32 entry
# is the bf16 peak because XLA's default matmul precision runs f32 dots as one bf16 pass on the MXU.
PEAK_FLOPS = {
    "H100": (989e12, 67e12),
    "H200": (989e12, 67e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v5": (459e12, 459e12),
}


def layer_flops_per_token(config: DecoderConfig, seq: int) -> tuple[int, int]:
    """Forward FLOPs of one decoder layer per token: (dense matmuls, attention scores + values).

    dense = 2·(D·H·hd + 2·D·K·hd + H·hd·D + 3·D·F)  (q, k, v, o projections, SwiGLU gate/up/down)
    attention = 4·S·H·hd  (Q·Kᵀ and P·V over the full S×S square: the XLA kernel skips no causal blocks)."""
    d, h, kv, hd, f = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                       config.intermediate_size)
    dense = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f)
    return dense, 4 * seq * h * hd


def flop_model(config: DecoderConfig, *, batch: int, seq: int, base_layers: int, estimator_layers: int,
               objective: str = "ssl") -> dict[str, int]:
    """Model FLOPs of one optimizer step (all micro-batches), split base / cloak.

    Base (frozen): one forward per pass it runs — ssl and distill run a clean and a transformed pass, lm only
    the transformed one — plus the backward *to the inputs only*: dense layers need dX = dY·Wᵀ only (1× their
    forward, no dW), attention needs dQ, dK, dV (2× its forward); lm/distill add the LM head (2·D·V per token
    forward, 1× backward). Cloak (fp32, trained): two estimators of E layers + a D×D head each, forward +
    backward with weight gradients = 3× forward. Norms, softmax, RoPE and the optimizer are not counted."""
    tokens = batch * seq
    dense, attention = layer_flops_per_token(config, seq)
    head = 2 * config.hidden_size * config.vocab_size if objective in ("lm", "distill") else 0
    forward = base_layers * (dense + attention) + head
    backward = base_layers * (dense + 2 * attention) + head
    passes = 1 if objective == "lm" else 2
    base = tokens * (passes * forward + backward)
    estimator = estimator_layers * (dense + attention) + 2 * config.hidden_size * config.hidden_size
    cloak = tokens * 3 * 2 * estimator
    return {"base": int(base), "cloak": int(cloak), "total": int(base + cloak)}


_CPU_PEAK: dict[str, float] = {}


def measured_matmul_flops(dtype: str, n: int = 1024, repeats: int = 5) -> float:
    """Best achieved FLOP/s of an n×n×n matmul on the default device (the CPU's stand-in for a peak)."""
    if dtype not in _CPU_PEAK:
        a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
        f = jax.jit(lambda x, y: x @ y)
        f(a, a).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        _CPU_PEAK[dtype] = 2 * n**3 / best
    return _CPU_PEAK[dtype]


def peak_flops(device: jax.Device, base_dtype: str) -> dict[str, Any]:
    kind = device.device_kind
    for name, (bf16, fp32) in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            base = bf16 if base_dtype == "bfloat16" else fp32
            return {"base": base, "cloak": fp32, "source": f"table: {name} (bf16 {bf16:.3g}, fp32 {fp32:.3g})"}
    base = measured_matmul_flops(base_dtype)
    fp32 = measured_matmul_flops("float32")
    return {"base": base, "cloak": fp32,
            "source": f"measured 1024^3 matmul on {device.platform} ({base_dtype} {base:.3g}, float32 {fp32:.3g})"}
