"""The server's decoder with the base model as a language-model prior (after BeamClean, arXiv 2505.13758).

The server sees the transformed prompt: clean template tokens, whose ids it reads off the embedding table,
and transformed positions. It does not hold the SGT. It

1. fits a noise model from the transformed embeddings alone: every transformed position is read as
   x_t = e_T + shift + sigma * eps with one diagonal Gaussian (per-feature ``shift`` and ``sigma``) shared by
   all positions, fitted by EM over the vocabulary as a mixture (:func:`fit_noise_model`; the mixture
   weights are fitted too but not used afterwards: the language model is the prior);
2. decodes each prompt left to right with a beam search whose score is the noise log-likelihood of every
   transformed position plus the base model's log-probability of the whole token sequence, template tokens
   included (:func:`beam_decode`).

Against noise that does not depend on the input this is the noise channel's Bayes decoder under the model's
prior; against an SGT whose mean depends on the token, the shared shift is the best a server can assume
without the SGT.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.evaluation import metrics as metrics_lib
from sgt_jax.evaluation.inversion import PromptSet, Transform
from sgt_jax.models.decoder import KVCache

__all__ = ["NoiseModel", "fit_noise_model", "beam_decode", "lm_prior_attack"]


@dataclasses.dataclass
class NoiseModel:
    shift: jax.Array  # (D,)
    sigma: jax.Array  # (D,)


def _scaled(table, shift, sigma, x):
    """Noise log-likelihood (N, V) of every token for observations x (N, D), up to a per-row constant."""
    inv = 1.0 / sigma
    z = (x - shift) * inv
    scaled = table * inv
    return z @ scaled.T - 0.5 * jnp.sum(scaled * scaled, axis=-1)[None]


@functools.partial(jax.jit, static_argnames=("iters",))
def _em(x, table, iters: int):
    vocab = table.shape[0]
    nearest = jnp.argmax(2.0 * x @ table.T - jnp.sum(table * table, axis=-1)[None], axis=-1)
    residual = x - table[nearest]
    shift = jnp.mean(residual, axis=0)
    sigma = jnp.sqrt(jnp.mean(jnp.square(residual - shift), axis=0)) + 1e-6
    log_weights = jnp.full((vocab,), -jnp.log(vocab))

    def body(_, carry):
        shift, sigma, log_weights = carry
        resp = jax.nn.softmax(_scaled(table, shift, sigma, x) + log_weights, axis=-1)  # (N, V)
        expected = resp @ table
        shift = jnp.mean(x - expected, axis=0)
        centred = x - shift
        var = jnp.mean(centred * centred - 2.0 * centred * expected + resp @ (table * table), axis=0)
        sigma = jnp.sqrt(jnp.maximum(var, 1e-12))
        log_weights = jnp.log(jnp.mean(resp, axis=0) + 1e-3 / vocab)
        return shift, sigma, log_weights - jax.nn.logsumexp(log_weights)

    shift, sigma, _ = jax.lax.fori_loop(0, iters, body, (shift, sigma, log_weights))
    return shift, sigma


def fit_noise_model(x_t, table, *, iters: int = 50) -> NoiseModel:
    """EM fit of x_t = e_T + shift + sigma * eps on transformed embeddings x_t (N, D) alone."""
    shift, sigma = _em(jnp.asarray(x_t, jnp.float32), jnp.asarray(table, jnp.float32), iters)
    return NoiseModel(shift, sigma)


@functools.partial(jax.jit, static_argnames=("graphdef", "beam"))
def _beam_decode(graphdef, state, table, shift, sigma, clean_ids, attention_mask, targets, x_t, noise_weight, *,
                 beam: int):
    model = nnx.merge(graphdef, state)
    n, length = clean_ids.shape
    vocab = table.shape[0]
    rows = jnp.arange(n)
    mask_full = jnp.repeat(attention_mask.astype(jnp.int32), beam, axis=0)
    scores = jnp.tile(jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf)[None], (n, 1))
    carry = (model.init_cache(n * beam, length), scores, jnp.zeros((n, beam, length), jnp.int32),
             jnp.zeros((n, beam, vocab), jnp.float32))

    def step(carry, slot):
        cache, scores, tokens, log_p = carry
        real = attention_mask[:, slot].astype(bool)
        # The language model's log-probability of this slot's token exists only after a real token.
        after_real = real & (attention_mask[:, jnp.maximum(slot - 1, 0)].astype(bool)) & (slot > 0)
        log_p = jnp.where(after_real[:, None, None] & jnp.isfinite(log_p), log_p, 0.0)
        noise = noise_weight * _scaled(table, shift, sigma, x_t[:, slot])  # (n, V)
        top, index = jax.lax.top_k((scores[..., None] + noise[:, None] + log_p).reshape(n, beam * vocab), beam)
        forced = clean_ids[:, slot]
        forced_scores = scores + jnp.take_along_axis(log_p, jnp.broadcast_to(forced[:, None, None], (n, beam, 1)),
                                                     axis=-1)[..., 0]
        is_target = targets[:, slot][:, None]
        parent = jnp.where(is_target, index // vocab, jnp.arange(beam)[None])
        token = jnp.where(is_target, index % vocab, forced[:, None])
        scores = jnp.where(is_target, top, forced_scores)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1).at[:, :, slot].set(token)
        flat = (rows[:, None] * beam + parent).reshape(-1)
        cache = KVCache(cache.k[:, flat], cache.v[:, flat])
        mask = mask_full * (jnp.arange(length)[None] <= slot)
        logits, cache = model(token.reshape(-1, 1), attention_mask=mask, cache=cache, cache_index=slot)
        log_p = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1).reshape(n, beam, vocab)
        return (cache, scores, tokens, log_p), None

    (_, scores, tokens, _), _ = jax.lax.scan(step, carry, jnp.arange(length))
    return tokens[rows, jnp.argmax(scores, axis=1)]


def beam_decode(model, table, noise: NoiseModel, clean_ids, attention_mask, targets, x_t, *, beam: int = 4,
                batch_size: int = 32, noise_weight: float = 1.0) -> np.ndarray:
    """The decoded token ids (N, S) of left-padded prompts: ``clean_ids`` holds the ids of the clean positions
    (anything at the transformed ones, which are never read), ``targets`` (N, S) marks the transformed positions
    and ``x_t`` (N, S, D) their embeddings. ``noise_weight`` 0 ignores x_t: the language model alone."""
    graphdef, state = nnx.split(model)
    table = jnp.asarray(table, jnp.float32)
    clean_ids = np.where(targets, 0, clean_ids).astype(np.int32)
    out = []
    for start in range(0, len(clean_ids), batch_size):
        rows = np.arange(start, start + batch_size) % len(clean_ids)  # one compiled shape: wrap the last batch
        decoded = _beam_decode(graphdef, state, table, noise.shift, noise.sigma, jnp.asarray(clean_ids[rows]),
                               jnp.asarray(attention_mask[rows]), jnp.asarray(targets[rows]),
                               jnp.asarray(x_t[rows]), jnp.float32(noise_weight), beam=beam)
        out.append(np.asarray(decoded)[: len(clean_ids) - start])
    return np.concatenate(out)


def lm_prior_attack(model, transform: Transform, table, held_out: PromptSet, *, key, beam: int = 4,
                    em_iters: int = 50, batch_size: int = 32, prior_baseline: bool = True) -> dict:
    """Token recovery (%) of :func:`beam_decode` on the held-out prompts under ``transform``, with the fitted
    noise model's mean sigma and shift (what the server believes the noise is) and, with ``prior_baseline``,
    the recovery of the language model alone (the same beam search ignoring x_t: what the prior gives with no
    information from the transformed embeddings, the baseline this attack is read against)."""
    targets = held_out.targets
    x_t, _ = transform(jnp.asarray(held_out.input_ids), jnp.asarray(held_out.attention_mask),
                       jnp.asarray(held_out.noise_mask), key)
    x_t = np.asarray(x_t)
    noise = fit_noise_model(x_t[targets], table, iters=em_iters)
    decode = functools.partial(beam_decode, model, table, noise, held_out.input_ids, held_out.attention_mask,
                               targets, x_t, beam=beam, batch_size=batch_size)
    hit = (decode() == held_out.input_ids) & targets
    with np.errstate(invalid="ignore", divide="ignore"):
        per_seq = 100.0 * hit.sum(-1) / targets.sum(-1)
    prior_only = (decode(noise_weight=0.0) == held_out.input_ids) & targets if prior_baseline else None
    return {"top1": 100.0 * float(hit.sum()) / float(targets.sum()), "positions": int(targets.sum()),
            "per_sequence_top1": metrics_lib.summarize(per_seq),
            "language_model_alone": None if prior_only is None else {
                "top1": 100.0 * float(prior_only.sum()) / float(targets.sum())},
            "noise_model": {"mean_sigma": float(jnp.mean(noise.sigma)), "mean_abs_shift": float(jnp.mean(
                jnp.abs(noise.shift))), "beam": beam}}
