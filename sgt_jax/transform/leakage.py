"""How much of a noised token a transformed embedding gives away, in bits: one core for every figure.

**The Barber–Agakov bound.** For any attacker q(t | x_t) (a learned inverter, a decoder, a Bayes posterior),

    I(T; X_t) >= H(T) - CE(q) = E[ log2 q(T | X_t) - log2 p(T) ],

where p is the distribution the noised tokens T are drawn from. :func:`barber_agakov` estimates it from the
attacker's log-probability of the true token at scored positions: the mean of the per-position terms
``log2 q(t_i | x_i) - log2 p(t_i)`` with its standard error. The reference p is the empirical distribution of
the noised tokens themselves (the positions scored, or a larger set of the same prompts), not the uniform
distribution over the vocabulary: prompts are not uniform, and against log2 V an attacker who only knows the
token frequencies would show log2 V - H(T) bits (2-3 bits on the embedded corpus) read out of nothing. The
plug-in entropy of a finite sample is biased low by about (types - 1) / (2 n ln 2) bits, so the bound errs
low by that much, never high.

**The candidate-mean posterior.** A transform x_t = x + mu(x) + sigma(x) * eps whose mean depends on the token
must be read with each candidate token's *own* transformed mean: substituting token c at a position moves
that position's mean to e_c + mu(x with c) and its noise to sigma(x with c). For a set of candidate tokens
per position, :func:`candidate_transformed_means` runs the transform once per (position, candidate) with the
candidate substituted, and :func:`candidate_log_posterior` is the posterior over the candidates under the
diagonal Gaussian of each. With a token-independent mu (every candidate shares the position's mu and sigma)
it is the Gaussian-mixture posterior of a fixed shift. Restricting the posterior to a candidate set that holds
the true token can only raise the true token's posterior, and the context is taken as known, so the figure
derived from it errs toward *more* leakage than a real attacker gets.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["barber_agakov", "token_entropy_bits", "gaussian_log_likelihood", "candidate_log_posterior",
           "shared_mean_candidates", "candidate_transformed_means", "candidate_figure", "sample_positions",
           "posterior_mass"]

LN2 = math.log(2.0)
MuSigmaFn = Callable[[jax.Array, jax.Array, jax.Array], tuple]


def _frequencies(token_ids: np.ndarray, reference_ids: Optional[np.ndarray]) -> np.ndarray:
    """p(t_i) of each scored token under the reference sample's empirical distribution."""
    reference = token_ids if reference_ids is None else np.asarray(reference_ids).ravel()
    counts = np.bincount(reference, minlength=int(max(token_ids.max(), reference.max())) + 1)
    p = counts[token_ids] / reference.size
    if np.any(p == 0):
        raise ValueError("every scored token must occur in reference_ids (the sample the entropy is taken of).")
    return p


def token_entropy_bits(token_ids) -> float:
    """Plug-in entropy (bits) of the empirical distribution of ``token_ids``."""
    ids = np.asarray(token_ids).ravel()
    p = np.bincount(ids)[np.unique(ids)] / ids.size
    return float(-(p * np.log2(p)).sum())


def barber_agakov(log_q_true, token_ids, reference_ids=None) -> dict[str, float]:
    """The Barber–Agakov lower bound on I(T; X_t) in bits per noised token.

    ``log_q_true`` (N,): the attacker's natural-log probability of the true token at each scored position;
    ``token_ids`` (N,): the true tokens. ``reference_ids``: the sample whose empirical distribution is p(T)
    (default: ``token_ids``; pass all noised tokens of the same prompts when only some positions are scored, so
    that the figure is H(T) of them all minus the sample's CE). Returns ``bits`` (H(T) - CE), ``stderr_bits``
    (standard error of the mean of the per-position terms log2 q - log2 p),
    ``entropy_bits`` (H(T) of the reference), ``cross_entropy_bits`` and ``positions``."""
    ids = np.asarray(token_ids).ravel().astype(np.int64)
    log_q = np.asarray(log_q_true, np.float64).ravel()
    if ids.size != log_q.size or ids.size == 0:
        raise ValueError(f"need one log-probability per scored token (got {log_q.size} and {ids.size}).")
    p = _frequencies(ids, reference_ids)
    terms = (log_q - np.log(p)) / LN2
    n = ids.size
    entropy = token_entropy_bits(ids if reference_ids is None else reference_ids)
    cross_entropy = float(-log_q.mean() / LN2)
    # H(reference) - CE: with the scored tokens as the reference it is the mean of the per-position terms; with a
    # larger reference, every attacker scored on a sample of the same prompts is held against the same H(T).
    return {"bits": entropy - cross_entropy,
            "stderr_bits": float(terms.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
            "entropy_bits": entropy, "cross_entropy_bits": cross_entropy, "positions": int(n)}


def gaussian_log_likelihood(x: jax.Array, mean: jax.Array, sigma: jax.Array) -> jax.Array:
    """log N(x; mean, diag(sigma^2)) over the last axis (broadcasting), up to the constant -D/2 log(2 pi)."""
    z = (x - mean) / sigma
    return -0.5 * jnp.sum(z * z, axis=-1) - jnp.sum(jnp.log(sigma), axis=-1)


def candidate_log_posterior(x_t: jax.Array, means: jax.Array, sigmas: jax.Array,
                            log_prior: Optional[jax.Array] = None) -> jax.Array:
    """log p(c | x_t) over K candidates: x_t (..., D), each candidate's transformed mean and noise scale
    (..., K, D), an optional log prior (..., K) (default uniform over the candidates). Differentiable."""
    scores = gaussian_log_likelihood(x_t[..., None, :], means, sigmas)
    if log_prior is not None:
        scores = scores + log_prior
    return jax.nn.log_softmax(scores, axis=-1)


def shared_mean_candidates(table: jax.Array, x_t: jax.Array, mu: jax.Array, sigma: jax.Array,
                           true_ids: jax.Array, k: int) -> jax.Array:
    """(P, k) candidate ids per position, the true token first: it and the k - 1 other tokens most likely under
    the view that every token shares the position's own mu and sigma (x_t ~ N(e_c + mu, sigma^2)), i.e. the
    tokens a fixed-shift reading finds hardest to tell from the truth. x_t, mu, sigma (P, D), true_ids (P,)."""
    table = table.astype(jnp.float32)
    z_x = (x_t - mu) / sigma  # (P, D)
    inv = 1.0 / sigma
    # -1/2 ||(x_t - mu - e_c) / sigma||^2 up to a per-position constant, for every vocabulary token.
    scores = jnp.einsum("pd,vd->pv", z_x * inv, table) - 0.5 * jnp.einsum("pd,vd->pv", inv * inv, table * table)
    scores = jnp.where(jnp.arange(table.shape[0])[None] == true_ids[:, None], -jnp.inf, scores)
    _, others = jax.lax.top_k(scores, k - 1)
    return jnp.concatenate([true_ids[:, None], others], axis=1).astype(jnp.int32)


def candidate_transformed_means(mu_sigma_fn: MuSigmaFn, table: jax.Array, input_ids: jax.Array,
                                attention_mask: jax.Array, noise_mask: jax.Array, rows: jax.Array, cols: jax.Array,
                                candidates: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each candidate's transformed mean and noise scale at its position: (P, K, D) each.

    ``mu_sigma_fn(x, attention_mask, noise_mask) -> (mu, sigma)`` is the transform's deterministic part on
    embeddings x (B, S, D); position p is (rows[p], cols[p]) of the (B, S) batch; ``candidates`` (P, K) ids. The
    transform runs on P * K sequences, row rows[p] with token candidates[p, k] at cols[p]; the mean is
    e_c + mu at cols[p]."""
    num, k = candidates.shape
    seqs = jnp.repeat(input_ids[rows][:, None, :], k, axis=1)  # (P, K, S)
    seqs = seqs.at[jnp.arange(num)[:, None], jnp.arange(k)[None, :], cols[:, None]].set(candidates)
    flat = seqs.reshape(num * k, -1)
    repeat = lambda a: jnp.repeat(a[rows], k, axis=0)  # noqa: E731
    x = jnp.take(table, flat, axis=0).astype(jnp.float32)
    mu, sigma = mu_sigma_fn(x, repeat(attention_mask), repeat(noise_mask))
    at = jnp.repeat(cols, k)
    pick = lambda a: a[jnp.arange(num * k), at].reshape(num, k, -1)  # noqa: E731
    return jnp.take(table, candidates, axis=0).astype(jnp.float32) + pick(mu), pick(sigma)


def candidate_figure(mu_sigma_fn: MuSigmaFn, table: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                     noise_mask: jax.Array, x_t: jax.Array, rows: jax.Array, cols: jax.Array, *,
                     num_candidates: int) -> tuple[jax.Array, jax.Array]:
    """(log posterior of the true token (P,), candidates (P, K)) at positions (rows, cols) of a batch whose
    transformed embeddings are ``x_t`` (B, S, D): candidates from :func:`shared_mean_candidates`, each read with
    its own transformed mean (:func:`candidate_transformed_means`). Jit it with ``num_candidates`` static."""
    table = table.astype(jnp.float32)
    mu, sigma = mu_sigma_fn(jnp.take(table, input_ids, axis=0), attention_mask, noise_mask)
    observed = x_t[rows, cols]
    candidates = shared_mean_candidates(table, observed, mu[rows, cols], sigma[rows, cols], input_ids[rows, cols],
                                        min(num_candidates, table.shape[0]))
    means, sigmas = candidate_transformed_means(mu_sigma_fn, table, input_ids, attention_mask, noise_mask, rows, cols,
                                                candidates)
    return candidate_log_posterior(observed, means, sigmas)[:, 0], candidates


def sample_positions(keys: jax.Array, selected: jax.Array, per_row: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``per_row`` positions of each row drawn without replacement among its ``selected`` (B, S) ones, from the
    row's own key (``keys`` (B,)), so a row's draw does not depend on the batch it sits in. Returns (rows, cols,
    weight), each (B * per_row,): weight = the row's selected count / the positions drawn from it (an unbiased
    sum over all selected positions), 0 where a row has fewer selected positions than ``per_row``."""
    batch, seq = selected.shape
    per_row = min(per_row, seq)
    noise = jax.vmap(lambda k: jax.random.uniform(k, (seq,)))(keys)
    _, cols = jax.lax.top_k(jnp.where(selected, noise, -1.0), per_row)  # (B, per_row)
    valid = jnp.take_along_axis(selected, cols, axis=1)
    count = selected.sum(axis=1, keepdims=True).astype(jnp.float32)
    weight = jnp.where(valid, count / jnp.maximum(valid.sum(axis=1, keepdims=True), 1), 0.0)
    rows = jnp.repeat(jnp.arange(batch), per_row)
    return rows, cols.reshape(-1), weight.reshape(-1)


def posterior_mass(mu_sigma_fn: MuSigmaFn, table: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                   noise_mask: jax.Array, x_t: jax.Array, keys: jax.Array, *, positions_per_row: int,
                   num_candidates: int) -> jax.Array:
    """The objective's candidate-mean posterior penalty, as a sum: over ``positions_per_row`` sampled noised
    positions per row (:func:`sample_positions`, weighted to stand for all of the row's noised positions), the
    posterior mass on the true token among ``num_candidates`` candidates read with their own transformed means
    (:func:`candidate_figure`, the code behind the reported leakage figure). Divide by the number of noised
    tokens for the mean. Differentiable in x_t and through ``mu_sigma_fn``."""
    selected = attention_mask.astype(bool) & noise_mask.astype(bool)
    rows, cols, weight = sample_positions(keys, selected, positions_per_row)
    log_post, _ = candidate_figure(mu_sigma_fn, table, input_ids, attention_mask, noise_mask, x_t, rows, cols,
                                   num_candidates=num_candidates)
    return jnp.sum(jnp.exp(log_post) * weight)
