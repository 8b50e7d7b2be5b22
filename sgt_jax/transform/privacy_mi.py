"""Mutual information between a token and its transformed embedding, in the Gaussian-mixture view of an SGT.

For a noised position with noise scale sigma (D,), the SGT draws ``x_t ~ N(e_T + mu, diag(sigma^2))`` for the
token T whose embedding is e_T. Over a uniform prior on the V vocabulary tokens (the same mu and sigma for
every candidate token, as an attacker reading this position would assume) x_t follows a mixture of V Gaussians,
and

    I(T; x_t) = log V - H(T | x_t) = log V + E_{T, eps}[ log p(T | x_t) ],
    p(j | x_t) = softmax_j( -1/2 * || (e_T - e_j) / sigma + eps ||^2 ),   eps ~ N(0, I),

(mu cancels). :func:`gaussian_mixture_mi` estimates the expectation by Monte Carlo: an unbiased estimate in
bits with its standard error, between 0 (x_t says nothing about the token) and log2(V) (x_t identifies it).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["gaussian_mixture_mi"]


@partial(jax.jit, static_argnames=("vocab_chunk",))
def _log_posterior_of_true(table: jax.Array, true_ids: jax.Array, sigma: jax.Array, eps: jax.Array,
                           vocab_chunk: int) -> jax.Array:
    """log p(T | x_t) for N samples: true_ids (N,), sigma (N, D), eps (N, D). The squared distances are taken
    of differences (not expanded), so tiny sigmas do not lose the answer to cancellation."""
    vocab, dim = table.shape
    chunk = min(vocab_chunk, vocab)
    pad = (-vocab) % chunk
    valid = (jnp.arange(vocab + pad) < vocab).reshape(-1, chunk)
    chunks = jnp.pad(table, ((0, pad), (0, 0))).reshape(-1, chunk, dim)
    e_true = table[true_ids]
    inv = 1.0 / sigma

    def body(carry, inputs):
        rows, ok = inputs
        z = (e_true[:, None, :] - rows[None]) * inv[:, None, :] + eps[:, None, :]
        logits = jnp.where(ok[None], -0.5 * jnp.sum(z * z, axis=-1), -jnp.inf)
        return jnp.logaddexp(carry, jax.nn.logsumexp(logits, axis=-1)), None

    log_norm, _ = jax.lax.scan(body, jnp.full(true_ids.shape, -jnp.inf), (chunks, valid))
    return -0.5 * jnp.sum(eps * eps, axis=-1) - log_norm


def gaussian_mixture_mi(embedding_table, sigma, *, key: jax.Array, samples: int = 1024,
                        vocab_chunk: int = 1024, batch: int = 256) -> dict[str, float]:
    """Monte-Carlo estimate of I(T; x_t) in bits for a uniform prior over the rows of ``embedding_table`` (V, D).

    ``sigma``: a scalar, a (D,) vector, or (P, D) per-position noise scales (e.g. the SGT's sigma at P noised
    positions; each sample uses a random one of them, so the estimate is the mean over positions).
    Returns ``bits`` (the estimate), ``stderr_bits`` (its Monte-Carlo standard error), ``max_bits`` = log2(V),
    ``fraction`` = bits / max_bits and ``samples``.
    """
    table = jnp.asarray(embedding_table, jnp.float32)
    vocab, dim = table.shape
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (1, dim)) if jnp.ndim(sigma) < 2 else jnp.asarray(
        sigma, jnp.float32)
    if not bool(jnp.all(sigma > 0)):
        raise ValueError("sigma must be positive everywhere for the Gaussian-mixture MI estimate.")
    k_tok, k_pos, k_eps = jax.random.split(key, 3)
    true_ids = jax.random.randint(k_tok, (samples,), 0, vocab)
    positions = jax.random.randint(k_pos, (samples,), 0, sigma.shape[0])
    eps = jax.random.normal(k_eps, (samples, dim), jnp.float32)
    terms = []
    for start in range(0, samples, batch):
        sl = slice(start, start + batch)
        terms.append(np.asarray(_log_posterior_of_true(table, true_ids[sl], sigma[positions[sl]], eps[sl],
                                                       vocab_chunk=vocab_chunk)))
    # Per-sample information in nats: log V + log p(T | x_t), in [0, log V] up to rounding.
    info = (math.log(vocab) + np.concatenate(terms).astype(np.float64)) / math.log(2.0)
    bits = float(info.mean())
    stderr = float(info.std(ddof=1) / math.sqrt(samples)) if samples > 1 else float("nan")
    max_bits = math.log2(vocab)
    return {"bits": bits, "stderr_bits": stderr, "max_bits": max_bits, "fraction": bits / max_bits,
            "samples": int(samples)}
