"""Noise measured against the local token spacing.

A mean sigma says nothing about privacy by itself: what hides a token is noise that is large *along the
directions that separate it from its neighbours in the vocabulary*, compared with how far those neighbours
are. For a transformed token with clean embedding e, its k nearest other vocabulary embeddings n_j (L2), the
unit directions u_j = (n_j - e) / |n_j - e| and the cloak's per-feature noise scale sigma (diagonal
Gaussian), the noise's standard deviation along u_j is sqrt(sum_d sigma_d^2 u_jd^2), and

    sigma_over_spacing = mean_j  std along u_j / |n_j - e|.

Around 0.5 and above the noise alone moves the embedding half-way to a neighbour in one standard deviation;
far below it, a learned attacker can tell the neighbours apart whatever the mean shift does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["spacing_sums", "finalize_spacing"]


def spacing_sums(sigma: jax.Array, ids: jax.Array, selected: jax.Array, table: jax.Array,
                 k: int = 4) -> dict[str, jax.Array]:
    """Sums over selected tokens of sigma_over_spacing (see the module docstring), of the indicator that it
    is >= 0.5, and the token count. ``sigma`` (B, S, D) (any value outside ``selected``), ``ids`` (B, S),
    ``table`` (V, D)."""
    table = table.astype(jnp.float32)
    e = jnp.take(table, ids, axis=0)  # (B, S, D)
    sq = jnp.sum(table * table, axis=-1)
    d2 = jnp.sum(e * e, axis=-1, keepdims=True) - 2.0 * jnp.einsum("bsd,vd->bsv", e, table) + sq
    d2 = jnp.where(jnp.arange(table.shape[0]) == ids[..., None], jnp.inf, d2)  # not the token itself
    _, nearest = jax.lax.top_k(-d2, k)  # (B, S, k)
    diff = jnp.take(table, nearest, axis=0) - e[..., None, :]  # (B, S, k, D)
    dist = jnp.maximum(jnp.linalg.norm(diff, axis=-1), 1e-12)
    u = diff / dist[..., None]
    sig = jnp.where(selected[..., None], sigma.astype(jnp.float32), 0.0)
    along = jnp.sqrt(jnp.sum(jnp.square(sig[..., None, :] * u), axis=-1))  # (B, S, k)
    ratio = jnp.mean(along / dist, axis=-1)
    w = selected.astype(jnp.float32)
    return {"spacing_ratio_sum": jnp.sum(ratio * w), "spacing_half_sum": jnp.sum((ratio >= 0.5) * w),
            "spacing_count": jnp.sum(w)}


def finalize_spacing(sums) -> dict[str, float]:
    """Validation metrics from summed :func:`spacing_sums`: the mean ratio and the share of tokens >= 0.5."""
    if "spacing_count" not in sums:
        return {}
    n = max(float(sums["spacing_count"]), 1.0)
    return {"sigma_over_spacing": float(sums["spacing_ratio_sum"]) / n,
            "sigma_over_spacing_ge_half": float(sums["spacing_half_sum"]) / n}
