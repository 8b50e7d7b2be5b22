"""Forward and obfuscation metrics.

Device-side functions return *sums and counts* so that they can be added over batches, micro-batches and
devices and divided once at the end; host-side helpers turn per-sequence values into summaries.

- perplexity of the base model (next-token, labels shifted by one, padding ignored);
- top-1 / top-5 next-token agreement between the clean and the transformed input;
- obfuscation: the vocabulary token whose embedding is nearest to each transformed embedding (cosine and
  L2), the percentage of transformed tokens whose nearest token is not the true one per sequence, and the
  rank of the true token among all vocabulary tokens (0 = it is still the nearest).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def next_token_nll_sums(
    logits: jax.Array, input_ids: jax.Array, target_mask: jax.Array, context_mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Sum of -log p(token n+1 | tokens <= n) over targets with mask 1, and their count.

    ``target_mask`` is per *token* (B, S): position n+1 counts when target_mask[:, n+1] is set (pass the
    attention mask for perplexity ignoring padding, or attention & loss mask for response-only) and its
    context token n is real (``context_mask``, default ``target_mask``): the first real token after left
    padding is never scored as predicted from a pad.
    """
    context_mask = target_mask if context_mask is None else context_mask
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    mask = (target_mask[:, 1:].astype(bool) & context_mask[:, :-1].astype(bool)).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask), jnp.sum(mask)


# Positions per chunk of the chunked LM head: the (rows, chunk, vocab) float32 logits exist one chunk at a time,
# 125 MiB a row at Llama 3's 128k vocabulary instead of 500 MiB a row of 1024 tokens (clean and transformed each).
POSITION_CHUNK = 256


def _shifted_targets(input_ids, target_mask, context_mask):
    """Targets and their mask aligned with the predicting position (B, S): position n predicts token n+1; the
    last position predicts nothing."""
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    pairs = target_mask[:, 1:].astype(bool) & context_mask[:, :-1].astype(bool)
    return targets, jnp.pad(pairs, ((0, 0), (0, 1)))


def _nll_sum(logits, targets, mask):
    """Sum over mask of logsumexp(logits) - logits[target] (float32); masked positions never reach the sum."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0))


def _head_logits(hidden, head):
    return jnp.dot(hidden.astype(head.dtype), head, preferred_element_type=jnp.float32)


def _sum_over_position_chunks(body, arrays, chunk: int):
    """Apply ``body`` to position chunks (B, chunk, ...) of (B, S, ...) arrays, one after the other
    (``lax.map``), and sum its outputs. S is zero-padded up to a multiple of ``chunk``: the padding's masks are
    0, so ``body`` must ignore masked positions."""
    length = arrays[0].shape[1]
    chunk = max(1, min(int(chunk), length))
    pad = (-length) % chunk

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)

    outs = jax.lax.map(body, tuple(split(x) for x in arrays))
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), outs)


def chunked_forward_sums(
    clean_hidden: jax.Array, transformed_hidden: jax.Array, head: jax.Array, input_ids: jax.Array,
    mask: jax.Array, *, target_mask: jax.Array | None = None, ks: Sequence[int] = (1, 5),
    chunk: int = POSITION_CHUNK,
) -> dict[str, jax.Array]:
    """The forward validation's logit metrics in one pass over position chunks: next-token NLL sums of the clean
    and the transformed input (``clean_nll``, ``transformed_nll``, ``nll_count``) and the top-k agreement sums
    of :func:`topk_agreement_sums`, from final (normed) hidden states (B, S, D) and the (D, V) LM head, one chunk
    of float32 logits at a time: the (B, S, V) logits never exist whole.

    ``mask`` (B, S) marks the real tokens; the NLL scores token n+1 where ``target_mask`` (default ``mask``; e.g.
    the response tokens only) is set and its context token n is real, as :func:`next_token_nll_sums`."""
    targets, pairs = _shifted_targets(input_ids, mask if target_mask is None else target_mask, mask)

    def body(chunk_arrays):
        hc, ht, t, p, m = chunk_arrays
        clean, transformed = _head_logits(hc, head), _head_logits(ht, head)
        out = topk_agreement_sums(clean, transformed, m, ks)
        out["clean_nll"], out["transformed_nll"] = _nll_sum(clean, t, p), _nll_sum(transformed, t, p)
        return out

    sums = _sum_over_position_chunks(body, (clean_hidden, transformed_hidden, targets, pairs, mask), chunk)
    sums["nll_count"] = jnp.sum(pairs.astype(jnp.float32))
    return sums


def topk_agreement_sums(
    clean_logits: jax.Array, transformed_logits: jax.Array, mask: jax.Array, ks: Sequence[int] = (1, 5)
) -> dict[str, jax.Array]:
    """How often the clean model's top-1 next token is within the transformed model's top-k."""
    clean_top1 = jnp.argmax(clean_logits, axis=-1)
    k_max = min(max(ks), transformed_logits.shape[-1])
    _, transformed_topk = jax.lax.top_k(transformed_logits, k_max)
    mask = mask.astype(jnp.float32)
    out = {}
    for k in ks:
        hit = jnp.any(transformed_topk[..., : min(k, k_max)] == clean_top1[..., None], axis=-1)
        out[f"top{k}_agreement"] = jnp.sum(hit * mask)
    out["agreement_count"] = jnp.sum(mask)
    return out


def _similarity(x: jax.Array, table: jax.Array, metric: str) -> jax.Array:
    """(N, V) scores, larger = nearer."""
    if metric == "cosine":
        xn = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        tn = table / jnp.maximum(jnp.linalg.norm(table, axis=-1, keepdims=True), 1e-12)
        return xn @ tn.T
    if metric == "l2":
        # -||x - t||^2 up to the per-row constant ||x||^2, which does not change the ranking.
        return 2.0 * x @ table.T - jnp.sum(table * table, axis=-1)[None, :]
    raise ValueError(f"metric={metric!r} is unknown; use cosine or l2.")


def nearest_tokens(
    embeddings: jax.Array, embedding_table: jax.Array, *, metric: str = "cosine", true_ids: jax.Array | None = None,
    vocab_chunk: int = 8192,
) -> tuple[jax.Array, jax.Array | None]:
    """Nearest vocabulary token of each embedding (..., D) and, given ``true_ids``, the true token's rank.

    The vocabulary is walked in chunks so the (tokens × vocab) score matrix is never materialised whole.
    """
    lead = embeddings.shape[:-1]
    x = embeddings.reshape(-1, embeddings.shape[-1]).astype(jnp.float32)
    table = embedding_table.astype(jnp.float32)
    vocab = table.shape[0]
    chunk = min(vocab_chunk, vocab)
    pad = (-vocab) % chunk
    valid = jnp.arange(vocab + pad) < vocab
    table = jnp.pad(table, ((0, pad), (0, 0)))
    chunks = table.reshape(-1, chunk, table.shape[-1])
    valid = valid.reshape(-1, chunk)
    true_score = None
    if true_ids is not None:
        true_score = jnp.sum(
            _similarity_rows(x, embedding_table.astype(jnp.float32)[true_ids.reshape(-1)], metric), axis=-1
        )

    def body(carry, inputs):
        best_score, best_id, rank = carry
        index, rows, ok = inputs
        scores = jnp.where(ok[None, :], _similarity(x, rows, metric), -jnp.inf)
        local_best = jnp.argmax(scores, axis=-1)
        local_score = jnp.max(scores, axis=-1)
        better = local_score > best_score
        best_id = jnp.where(better, index * chunk + local_best, best_id)
        best_score = jnp.where(better, local_score, best_score)
        if true_score is not None:
            # A tolerance, because the true score comes from another reduction order than the matmul's.
            margin = 1e-5 * (1.0 + jnp.abs(true_score))
            rank = rank + jnp.sum(scores > (true_score + margin)[:, None], axis=-1)
        return (best_score, best_id, rank), None

    init = (jnp.full(x.shape[:1], -jnp.inf), jnp.zeros(x.shape[:1], jnp.int32), jnp.zeros(x.shape[:1], jnp.int32))
    (_, best_id, rank), _ = jax.lax.scan(body, init, (jnp.arange(chunks.shape[0]), chunks, valid))
    return best_id.reshape(lead), (rank.reshape(lead) if true_ids is not None else None)


def _similarity_rows(x: jax.Array, rows: jax.Array, metric: str) -> jax.Array:
    """Element-wise pieces whose sum over the last axis is the score of x[i] against rows[i]."""
    if metric == "cosine":
        xn = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        rn = rows / jnp.maximum(jnp.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
        return xn * rn
    return 2.0 * x * rows - rows * rows


def obfuscation_per_sequence(
    transformed: jax.Array, input_ids: jax.Array, noise_mask: jax.Array, embedding_table: jax.Array, *,
    metric: str = "cosine",
) -> dict[str, jax.Array]:
    """Per sequence: % of transformed tokens whose nearest vocabulary token is not the true one, and the
    mean reconstruction rank of the true token. Sequences with no transformed token give NaN."""
    nearest, rank = nearest_tokens(transformed, embedding_table, metric=metric, true_ids=input_ids)
    mask = noise_mask.astype(jnp.float32)
    count = jnp.sum(mask, axis=-1)
    changed = jnp.sum((nearest != input_ids) * mask, axis=-1)
    safe = jnp.where(count > 0, count, jnp.nan)
    return {
        "percent_changed": 100.0 * changed / safe,
        "mean_rank": jnp.sum(rank * mask, axis=-1) / safe,
        "nearest": nearest,
    }


def summarize(values: Sequence[float] | np.ndarray, quantiles: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)) -> dict[str, float]:
    """mean, min, max and quantiles of per-sequence values (NaNs, i.e. sequences with nothing to measure, dropped)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {}
    out = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    for q in quantiles:
        out[f"q{int(round(q * 100)):02d}"] = float(np.quantile(values, q))
    return out


def perplexity(nll_sum: float, count: float) -> float:
    return float(np.exp(nll_sum / max(count, 1.0)))


def finalize_forward_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """Turn summed forward metrics (over a validation set) into perplexities and agreement rates."""
    out = {}
    if "clean_nll" in sums:
        out["perplexity_clean"] = perplexity(sums["clean_nll"], sums["nll_count"])
    if "transformed_nll" in sums:
        out["perplexity_transformed"] = perplexity(sums["transformed_nll"], sums["nll_count"])
    for key in ("top1_agreement", "top5_agreement"):
        if key in sums:
            out[key] = float(sums[key]) / max(float(sums["agreement_count"]), 1.0)
    return out


def forward_eval(cloak, full_model, embedding_table, batch: Mapping[str, jax.Array], keys: jax.Array, *,
                 obfuscation_metrics: tuple[str, ...] = ("cosine",), position_chunk: int = POSITION_CHUNK,
                 ) -> dict[str, Any]:
    """Forward validation of one (B, S) batch with dropout off, shared by training validation and evaluation.

    ``sums``: next-token NLL of the whole base model on clean and on transformed input and top-1/5 agreement
    (when ``full_model`` is given; padding ignored; the LM head runs over ``position_chunk`` positions at a
    time), and sigma/|mu| totals over transformed elements.
    ``obfuscation[metric]``: per-sequence % of transformed tokens whose nearest vocabulary token is not the
    true one, mean reconstruction rank, and the nearest tokens. ``sigma``/``mu``: NaN outside transformed
    positions (for histograms).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"].astype(bool)
    selected = mask & batch["noise_mask"].astype(bool)
    x = jnp.take(embedding_table, ids, axis=0)
    out = cloak(x.astype(jnp.float32), mask, batch["noise_mask"], key=keys, deterministic=True)
    sel = selected[..., None]
    sums = {
        "sigma_sum": jnp.sum(jnp.where(sel, out.sigma, 0.0)),
        "mu_abs_sum": jnp.sum(jnp.where(sel, jnp.abs(out.mu), 0.0)),
        "feature_count": jnp.sum(sel) * out.sigma.shape[-1],
    }
    if full_model is not None:
        # Final hidden states, and the head applied a chunk of positions at a time: the (B, S, V) float32 logits
        # (500 MiB a row at Llama 3's vocabulary and 1024 tokens, clean and transformed each) never exist whole.
        x_base = x.astype(full_model.dtype)
        clean_hidden = full_model.decoder(x_base, mask)[0]
        t_hidden = full_model.decoder(out.x_t.astype(x_base.dtype), mask)[0]
        sums.update(chunked_forward_sums(clean_hidden, t_hidden, full_model.head_matrix, ids, mask,
                                         chunk=position_chunk))
    obfuscation = {m: obfuscation_per_sequence(out.x_t, ids, selected, embedding_table, metric=m)
                   for m in obfuscation_metrics}
    return {
        "sums": sums,
        "obfuscation": obfuscation,
        "sigma": jnp.where(sel, out.sigma, jnp.nan),
        "mu": jnp.where(sel, out.mu, jnp.nan),
        "x_t": out.x_t,
    }
