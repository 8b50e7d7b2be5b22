"""The SGT objective (docs/recipe.md, "The objective")::

    L = (1 - alpha) * weight * L_M + alpha * (transform_variance_priority * L_N + transform_strength_priority * L_S)
        (+ moe_aux_loss_weight * aux when the estimators have experts)

L_M (utility) is ``ssl`` (cosine to the clean hidden state at the truncation layer, recommended), ``lm``
(next-token cross-entropy on the transformed input, labels shifted by one) or ``distill`` (KL from the clean
to the transformed next-token distribution). L_N = -mean(log(sigma / max_scale)) pushes sigma up;
L_S = mean(|cos(x, x_t)|) pushes x_t away from x.

The utility loss of ``ssl`` and ``distill`` is a mean over the *affected* positions only: real tokens at
or after the first transformed token of their row. The base model is causal, so a position before that
(BOS, a template preamble) has exactly the clean hidden state whatever the SGT does; counting it would only
dilute L_M by a factor that depends on the prompt format's length, and with it the effective strength of
``objective.weight``. (``lm`` averages over its targets, the response tokens, which all come after the prompt.)

Every mean is ``masked sum / denominator``. With ``denominator=None`` a function averages over its own
mask; the train step (``sgt_jax.training.step``) passes the *global* counts instead, so that micro-batch partial
results add up to the exact global mean (then every returned metric is such a partial sum too).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from sgt_jax.transform import leakage

__all__ = [
    "stochasticity_loss",
    "semantic_similarity_loss",
    "ssl_loss",
    "lm_loss",
    "distill_loss",
    "chunked_lm_loss",
    "chunked_distill_loss",
    "composite",
    "local_denominators",
    "affected_mask",
    "objective_terms",
    "make_loss_fn",
]

_COS_EPS = 1e-8
POSTERIOR_STREAM = 0x9057  # folded into each example's key for the posterior penalty's position draw


def _mean(total: jax.Array, weights: jax.Array, denominator: Optional[jax.Array]) -> jax.Array:
    if denominator is None:
        denominator = jnp.maximum(weights.astype(jnp.float32).sum(), 1.0)
    return total / denominator


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity over the last axis in float32 (each norm clamped like torch's cosine_similarity)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    norm_a = jnp.maximum(jnp.linalg.norm(a, axis=-1), _COS_EPS)
    norm_b = jnp.maximum(jnp.linalg.norm(b, axis=-1), _COS_EPS)
    return jnp.sum(a * b, axis=-1) / (norm_a * norm_b)


# ------------------------------------------------------------------------------------------ components


def stochasticity_loss(sigma, transform_mask, max_scale: float, *, feature_mask=None, denominator=None):
    """L_N = -mean(log(sigma / max_scale)) over transformed elements (token in ``transform_mask`` and, with
    percent_to_mask, feature not replaced by mu — those carry no noise). ≥ 0 since sigma ≤ max_scale."""
    weights = jnp.broadcast_to(transform_mask.astype(bool)[..., None], sigma.shape)
    if feature_mask is not None:
        weights = weights & ~feature_mask
    weights = weights.astype(jnp.float32)
    # log of a masked-out sigma is still computed: where() keeps its value out of the sum and the gradient.
    neg_log = -jnp.log(jnp.where(weights > 0, sigma.astype(jnp.float32), max_scale) / max_scale)
    return _mean(jnp.sum(neg_log * weights), weights, denominator)


def semantic_similarity_loss(x, x_t, transform_mask, *, denominator=None):
    """L_S = mean over transformed tokens of |cos(x, x_t)|."""
    weights = transform_mask.astype(jnp.float32)
    return _mean(jnp.sum(jnp.abs(_cosine(x, x_t)) * weights), weights, denominator)


def ssl_loss(hidden_t, hidden_clean, valid_mask, *, relative_l2_weight: float = 0.0, denominator=None):
    """L_M (ssl) = mean over valid tokens of 1 - cos(h_k(x_t), sg(h_k(x)))
    (+ relative_l2_weight · ||h_k(x_t) - h_k(x)|| / ||h_k(x)||)."""
    target = jax.lax.stop_gradient(hidden_clean).astype(jnp.float32)
    hidden_t = hidden_t.astype(jnp.float32)
    per_token = 1.0 - _cosine(hidden_t, target)
    if relative_l2_weight:
        relative = jnp.linalg.norm(hidden_t - target, axis=-1) / jnp.maximum(jnp.linalg.norm(target, axis=-1), _COS_EPS)
        per_token = per_token + relative_l2_weight * relative
    weights = valid_mask.astype(jnp.float32)
    return _mean(jnp.sum(per_token * weights), weights, denominator)


def lm_target_mask(attention_mask, loss_mask):
    """(..., S-1): position n's logits predict token n+1, which counts when it is real (not pad) and in loss_mask.
    Any leading shape (a step's (accum, micro, S) batch too)."""
    return attention_mask.astype(bool)[..., 1:] & loss_mask.astype(bool)[..., 1:]


def lm_loss(logits, input_ids, attention_mask, loss_mask, *, denominator=None):
    """Next-token cross-entropy: logits at n score token n+1 (the shift the recommendations warn about), counted where
    the *target* token has loss_mask = 1 and is not padding."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    weights = lm_target_mask(attention_mask, loss_mask).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return _mean(jnp.sum((log_z - target_logit) * weights), weights, denominator)


def distill_loss(clean_logits, transformed_logits, valid_mask, *, denominator=None):
    """KL(p(·|x) ‖ p(·|x_t)) of the next-token distributions, mean over valid positions."""
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(clean_logits).astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(transformed_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    weights = valid_mask.astype(jnp.float32)
    return _mean(jnp.sum(kl * weights), weights, denominator)


# ------------------------------------------------------------------------ vocabulary-chunked cross-entropy
#
# With a large vocabulary the (B, S, V) float32 logits dominate a step's memory (Llama-2: 32000 × 4 bytes per
# token, more than all 13 truncated layers' activations at seq 2048). The chunked forms take the final hidden
# state (B, S, D) and the (D, V) head and only ever build (B, S, chunk) logits: a scan over vocabulary chunks
# whose body is rematerialised, so the backward pass recomputes each chunk's logits instead of saving them.
# What crosses chunks is (B, S)-sized: per-chunk log-sum-exps (combined afterwards) and running sums.


def _vocab_chunks(head: jax.Array, chunk_size: int) -> Tuple[jax.Array, int]:
    """(D, V) → (n, D, chunk) with V zero-padded to a multiple of chunk (padded columns are masked later)."""
    vocab = head.shape[-1]
    chunk = max(1, min(int(chunk_size), vocab))
    n = -(-vocab // chunk)
    padded = jnp.pad(head, ((0, 0), (0, n * chunk - vocab)))
    return padded.reshape(head.shape[0], n, chunk).transpose(1, 0, 2), chunk


def _chunk_logits(hidden, head_chunk, index, chunk, vocab):
    logits = jnp.dot(hidden, head_chunk, preferred_element_type=jnp.float32)
    column = index * chunk + jnp.arange(chunk)
    return jnp.where(column < vocab, logits, -jnp.inf), column < vocab


def _chunked_logsumexp(hidden, head, chunk_size):
    """logsumexp over the vocabulary of hidden @ head, (B, S) float32, never building (B, S, V)."""
    vocab = head.shape[-1]
    chunks, chunk = _vocab_chunks(head, chunk_size)

    @jax.checkpoint
    def body(_, xs):
        index, head_chunk = xs
        logits, _ = _chunk_logits(hidden, head_chunk, index, chunk, vocab)
        return None, jax.nn.logsumexp(logits, axis=-1)

    _, per_chunk = jax.lax.scan(body, None, (jnp.arange(chunks.shape[0]), chunks))
    return jax.nn.logsumexp(per_chunk, axis=0)


def chunked_lm_loss(hidden, head, input_ids, attention_mask, loss_mask, *, chunk_size: int, denominator=None):
    """:func:`lm_loss` of ``logits = hidden @ head`` (hidden (B, S, D) final-normed, head (D, V)), computed over
    vocabulary chunks of ``chunk_size``: same value and gradient, no (B, S, V) array."""
    hidden = hidden[:, :-1]
    targets = input_ids[:, 1:]
    weights = lm_target_mask(attention_mask, loss_mask).astype(jnp.float32)
    log_z = _chunked_logsumexp(hidden, head, chunk_size)
    # The target's logit directly: its head column gathered, (B, S-1, D), not a (B, S-1, V) one-hot.
    target_columns = jnp.take(head.T, targets, axis=0)
    target_logit = jnp.einsum("bsd,bsd->bs", hidden, target_columns, preferred_element_type=jnp.float32)
    return _mean(jnp.sum((log_z - target_logit) * weights), weights, denominator)


def chunked_distill_loss(clean_hidden, transformed_hidden, head, valid_mask, *, chunk_size: int, denominator=None):
    """:func:`distill_loss` of the logits ``hidden @ head`` over vocabulary chunks. With z the clean and y the
    transformed logits, KL(p‖q) = Σ_v p_v (z_v - y_v) - lse(z) + lse(y), p = softmax(z): two chunked passes
    (the log-sum-exps, then the p-weighted difference), each (B, S, chunk) at a time."""
    clean_hidden = jax.lax.stop_gradient(clean_hidden)
    vocab = head.shape[-1]
    lse_clean = jax.lax.stop_gradient(_chunked_logsumexp(clean_hidden, head, chunk_size))
    lse_t = _chunked_logsumexp(transformed_hidden, head, chunk_size)
    chunks, chunk = _vocab_chunks(head, chunk_size)

    @jax.checkpoint
    def body(total, xs):
        index, head_chunk = xs
        z, valid = _chunk_logits(clean_hidden, head_chunk, index, chunk, vocab)
        y, _ = _chunk_logits(transformed_hidden, head_chunk, index, chunk, vocab)
        p = jnp.exp(z - lse_clean[..., None])  # 0 on padded columns
        return total + jnp.sum(p * jnp.where(valid, z - y, 0.0), axis=-1), None

    zeros = jnp.zeros(transformed_hidden.shape[:-1], jnp.float32)
    cross, _ = jax.lax.scan(body, zeros, (jnp.arange(chunks.shape[0]), chunks))
    kl = cross - lse_clean + lse_t
    weights = valid_mask.astype(jnp.float32)
    return _mean(jnp.sum(kl * weights), weights, denominator)


def _final_hidden(base, inputs_embeds, attention_mask):
    """The final-normed hidden state of an untruncated CausalLM (what its LM head multiplies)."""
    hidden, _ = base.decoder(inputs_embeds.astype(base.dtype), attention_mask)
    return hidden


def _lm_head_kernel(base) -> jax.Array:
    """The (D, V) head in the model dtype (the transposed embedding when tied)."""
    head = base.embed_tokens[...].T if base.lm_head is None else base.lm_head.kernel[...]
    return head.astype(base.dtype)


def composite(utility_loss, stochasticity, similarity, objective_cfg, *, moe_aux_loss=None,
              extra: Optional[Mapping[str, jax.Array]] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """(1-alpha)·weight·L_M + alpha·(tvp·L_N + tsp·L_S) (+ moe_aux_loss_weight·aux); every component and its
    weighted term in the metrics."""
    c = objective_cfg
    utility_term = (1.0 - c.alpha) * c.weight * utility_loss
    stochasticity_term = c.alpha * c.transform_variance_priority * stochasticity
    similarity_term = c.alpha * c.transform_strength_priority * similarity
    aux = jnp.zeros((), jnp.float32) if moe_aux_loss is None else jnp.asarray(moe_aux_loss, jnp.float32)
    moe_aux_term = c.moe_aux_loss_weight * aux
    loss = utility_term + stochasticity_term + similarity_term + moe_aux_term
    metrics = {
        "loss": loss,
        "utility_loss": utility_loss,
        "utility_term": utility_term,
        "stochasticity_loss": stochasticity,
        "stochasticity_term": stochasticity_term,
        "similarity_loss": similarity,
        "similarity_term": similarity_term,
        "moe_aux_loss": aux,
        "moe_aux_term": moe_aux_term,
    }
    if extra:
        metrics.update(extra)
    return loss, metrics


# ------------------------------------------------------------------------------------------ end to end


def affected_mask(attention_mask, noise_mask) -> jax.Array:
    """(..., S) bool: real tokens at or after the first transformed token of their row, i.e. the positions whose
    hidden state in a causal model can differ between clean and transformed input."""
    valid = attention_mask.astype(bool)
    transformed = (valid & noise_mask.astype(bool)).astype(jnp.int32)
    return valid & (jnp.cumsum(transformed, axis=-1) > 0)


def local_denominators(batch: Mapping[str, jax.Array], hidden_size: int) -> Dict[str, jax.Array]:
    """The counts each mean divides by, from this batch alone (same keys as ``sgt_jax.training.step``'s global ones)."""
    valid = batch["attention_mask"].astype(bool)
    transformed = valid & batch["noise_mask"].astype(bool)
    count = lambda m: jnp.maximum(m.sum(), 1).astype(jnp.float32)  # noqa: E731
    return {
        "tokens": count(valid),
        "affected_tokens": count(affected_mask(batch["attention_mask"], batch["noise_mask"])),
        "transformed_tokens": count(transformed),
        "transformed_elements": count(transformed) * hidden_size,
        "lm_targets": count(lm_target_mask(batch["attention_mask"], batch["loss_mask"])),
        "micro_batches": jnp.ones((), jnp.float32),
    }


def frozen(module: nnx.Module) -> nnx.Module:
    """The same module with stop_gradient on every state leaf: the base model can never receive gradient."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))


def objective_terms(cloak, base_model, batch: Mapping[str, jax.Array], *, key, objective_cfg,
                    denominators: Optional[Mapping[str, jax.Array]] = None, deterministic: bool = False,
                    ssl_layer: Optional[int] = None, cloak_out=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Loss and metrics of one (micro-)batch ``dict(input_ids, attention_mask, noise_mask, loss_mask)``: means
    over it, or with global ``denominators`` additive partial sums. ``key``: one PRNG key or one per example.
    ``ssl_layer``: for ssl on an untruncated model, the layer whose hidden state is compared (default: the
    last). The base model is frozen (stop_gradient on its state). ``cloak_out``: the cloak's output on this
    batch with these keys when the caller already computed it (the adversarial objective shares it with its
    inverter), so the cloak runs once."""
    mode = objective_cfg.mode  # ssl, lm or distill: checked by the schema
    base = frozen(base_model)
    input_ids = batch["input_ids"]
    attention_mask = batch["attention_mask"].astype(bool)
    transform_mask = attention_mask & batch["noise_mask"].astype(bool)
    affected = affected_mask(attention_mask, batch["noise_mask"])  # where L_M has signal (module docstring)
    base_dtype = getattr(base, "dtype", jnp.float32)
    chunk_size = int(getattr(objective_cfg, "vocab_chunk_size", 0) or 0)

    x_base = jax.lax.stop_gradient(base.embed(input_ids))
    x = x_base.astype(jnp.float32)  # the cloak is float32 whatever the base dtype
    out = cloak_out if cloak_out is not None else cloak(x, attention_mask, batch["noise_mask"], key=key,
                                                       deterministic=deterministic)
    x_t_base = out.x_t.astype(base_dtype)  # the one cast at the boundary
    hidden_size = x.shape[-1]
    den = dict(local_denominators(batch, hidden_size) if denominators is None else denominators)

    if mode == "ssl":
        truncated = getattr(base, "truncate_at_layer", None) is not None
        if truncated:
            run = lambda e: base(inputs_embeds=e, attention_mask=attention_mask)  # noqa: E731
        else:
            layer = base.num_layers - 1 if ssl_layer is None else ssl_layer
            run = lambda e: base(inputs_embeds=e, attention_mask=attention_mask, return_hidden_at=layer)  # noqa: E731
        clean = jax.lax.stop_gradient(run(x_base))
        utility = ssl_loss(run(x_t_base), clean, affected,
                           relative_l2_weight=objective_cfg.ssl_relative_l2_weight, denominator=den["affected_tokens"])
    elif mode == "lm" and chunk_size > 0:
        utility = chunked_lm_loss(_final_hidden(base, x_t_base, attention_mask), _lm_head_kernel(base), input_ids,
                                  attention_mask, batch["loss_mask"], chunk_size=chunk_size,
                                  denominator=den["lm_targets"])
    elif mode == "lm":
        logits = base(inputs_embeds=x_t_base, attention_mask=attention_mask)
        utility = lm_loss(logits, input_ids, attention_mask, batch["loss_mask"], denominator=den["lm_targets"])
    elif chunk_size > 0:
        clean_hidden = jax.lax.stop_gradient(_final_hidden(base, x_base, attention_mask))
        utility = chunked_distill_loss(clean_hidden, _final_hidden(base, x_t_base, attention_mask),
                                       _lm_head_kernel(base), affected, chunk_size=chunk_size,
                                       denominator=den["affected_tokens"])
    else:
        clean_logits = jax.lax.stop_gradient(base(inputs_embeds=x_base, attention_mask=attention_mask))
        logits = base(inputs_embeds=x_t_base, attention_mask=attention_mask)
        utility = distill_loss(clean_logits, logits, affected, denominator=den["affected_tokens"])

    # Elements with noise: the percent_to_mask-replaced features carry none, so they are not counted.
    masked_per_token = getattr(cloak, "num_masked_features", 0) if out.feature_mask is not None else 0
    noisy_elements = den["transformed_tokens"] * max(hidden_size - masked_per_token, 1)
    stochasticity = stochasticity_loss(out.sigma, transform_mask, cloak.max_scale, feature_mask=out.feature_mask,
                                       denominator=noisy_elements)
    similarity = semantic_similarity_loss(x, out.x_t, transform_mask, denominator=den["transformed_tokens"])
    element_weights = transform_mask[..., None].astype(jnp.float32)
    extra = {
        "mean_sigma": jnp.sum(out.sigma * element_weights) / den["transformed_elements"],
        "mean_abs_mu": jnp.sum(jnp.abs(out.mu) * element_weights) / den["transformed_elements"],
    }
    # The balance loss is a per-batch statistic: average it over the micro-batches.
    aux = out.aux_loss / den["micro_batches"]
    loss, metrics = composite(utility, stochasticity, similarity, objective_cfg, moe_aux_loss=aux, extra=extra)
    return _with_posterior_penalty(loss, metrics, cloak, base, batch, out.x_t, key, objective_cfg, den)


def _with_posterior_penalty(loss, metrics, cloak, base, batch, x_t, key, objective_cfg, den):
    """loss + posterior_weight x the mean over noised tokens of the true token's posterior mass under each
    candidate's own transformed mean (:func:`sgt_jax.transform.leakage.posterior_mass`, estimated at sampled
    positions): what an attacker who knows the transform reads. The candidates' means come from the cloak without
    dropout; x_t is the step's own draw. Unchanged with the weight 0."""
    weight = float(objective_cfg.posterior_weight)
    if weight <= 0:
        return loss, metrics
    if getattr(base, "embed_lookup", None) is not None:
        raise ValueError("objective.posterior_weight > 0 needs the whole embedding table on each device; "
                         "it is not supported with mesh.fsdp > 1 yet (use data parallelism).")
    input_ids = batch["input_ids"]
    keys = cloak.per_example_keys(key, input_ids.shape[0], x_t)  # the cloak's own reading of `key`
    keys = jax.vmap(lambda k: jax.random.fold_in(k, POSTERIOR_STREAM))(keys)
    mu_sigma = lambda x, a, n: cloak(x, a, n, key=keys[0], deterministic=True)[1:3]  # noqa: E731
    penalty = leakage.posterior_mass(mu_sigma, jax.lax.stop_gradient(base.embed_tokens[...]), input_ids,
                                     batch["attention_mask"], batch["noise_mask"], x_t, keys,
                                     positions_per_row=int(objective_cfg.posterior_positions),
                                     num_candidates=int(objective_cfg.posterior_candidates))
    penalty = penalty / den["transformed_tokens"]
    loss = loss + weight * penalty
    return loss, {**metrics, "loss": loss, "posterior_penalty": penalty, "posterior_term": weight * penalty}



def make_loss_fn(objective_cfg, *, ssl_layer: Optional[int] = None) -> Callable[..., Any]:
    """The ``loss_fn(cloak, base, micro_batch, keys, denominators, deterministic)`` of ``sgt_jax.training.step``."""

    def loss_fn(cloak, base_model, micro_batch, keys, denominators, deterministic, cloak_out=None):
        return objective_terms(cloak, base_model, micro_batch, key=keys, objective_cfg=objective_cfg,
                               denominators=denominators, deterministic=deterministic, ssl_layer=ssl_layer,
                               cloak_out=cloak_out)

    return loss_fn
