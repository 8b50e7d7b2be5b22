"""Batched generation with a KV cache for the frozen base model, from token ids or from (SGT-protected) prompt
embeddings.

One jitted program per (model, shapes, ``max_new_tokens``, ``do_sample``, ``renormalize_logits``):
the left-padded prompt is prefilled into a KV cache of ``prompt_len + max_new_tokens`` slots once, then a
``lax.while_loop`` runs one decode step per new token and stops as soon as every row has produced an eos.
Temperature, top-k, top-p, the repetition penalty and the eos/pad ids are traced, so changing them does not recompile.

Logits processors follow Hugging Face's order and semantics: repetition penalty (also in greedy mode), then,
when sampling, temperature, top-k and top-p, then ``log_softmax`` when ``renormalize_logits``. Defaults are the
recommended generation settings (sampling, temperature 0.6, top-k 5000, top-p 0.9, repetition penalty 1.0,
renormalised logits).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.data.batching import collate_left_padded
from sgt_jax.transform.entropy import fresh_key


class GenerationOutput(NamedTuple):
    """``sequences`` (B, max_new_tokens) int32: the new tokens only, each row padded with ``pad_token_id`` after
    its first eos (the eos kept); ``lengths`` (B,) int32: new tokens per row up to and including that eos."""

    sequences: jax.Array
    lengths: jax.Array


# ------------------------------------------------------------------------------------------ logits processors


def apply_repetition_penalty(logits, seen, penalty):
    """HF ``RepetitionPenaltyLogitsProcessor``: logits of tokens already seen (``seen`` (B, V) bool) are divided
    by ``penalty`` when positive and multiplied by it when negative."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def apply_temperature(logits, temperature):
    """HF ``TemperatureLogitsWarper``."""
    return logits / temperature


def apply_top_k(logits, top_k, min_tokens_to_keep: int = 1):
    """HF ``TopKLogitsWarper``: logits below the k-th largest become -inf (ties with it are kept); ``top_k`` may
    be traced, 0 disables it (HF does not add the warper), k above the vocabulary keeps everything."""
    vocab = logits.shape[-1]
    k = jnp.clip(jnp.asarray(top_k, jnp.int32), min_tokens_to_keep, vocab)
    kth = jnp.take(jnp.sort(logits, axis=-1), vocab - k, axis=-1)[..., None]
    return jnp.where((logits < kth) & (top_k > 0), -jnp.inf, logits)


def apply_top_p(logits, top_p, min_tokens_to_keep: int = 1):
    """HF ``TopPLogitsWarper``: sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p,
    always keeping the ``min_tokens_to_keep`` most likely; a no-op at top_p >= 1 (HF does not add the warper)."""
    order = jnp.argsort(logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted = remove_sorted.at[..., -min_tokens_to_keep:].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove & (top_p < 1.0), -jnp.inf, logits)


def process_logits(logits, seen, *, do_sample: bool, temperature, top_k, top_p, repetition_penalty,
                   renormalize_logits: bool):
    """(B, V) next-token logits -> scores, in HF's order: repetition penalty, [temperature, top-k, top-p when
    sampling], log_softmax when ``renormalize_logits``. ``top_k`` 0 disables top-k; all but the two flags may be
    traced."""
    scores = apply_repetition_penalty(logits.astype(jnp.float32), seen, repetition_penalty)
    if do_sample:
        scores = apply_temperature(scores, temperature)
        scores = apply_top_k(scores, top_k)
        scores = apply_top_p(scores, top_p)
    if renormalize_logits:
        scores = jax.nn.log_softmax(scores, axis=-1)
    return scores


# ------------------------------------------------------------------------------------------------ generation


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "do_sample", "renormalize_logits"))
def _generate_jit(graphdef, state, prompt_ids, inputs_embeds, attention_mask, key, temperature, top_k, top_p,
                  repetition_penalty, eos_ids, pad_token_id, *, max_new_tokens: int, do_sample: bool,
                  renormalize_logits: bool):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = attention_mask.shape
    total = prompt_len + max_new_tokens
    cache_mask = jnp.concatenate(
        [attention_mask.astype(jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
    cache = model.init_cache(batch, total)
    if inputs_embeds is not None:
        logits, cache = model(inputs_embeds=inputs_embeds, attention_mask=cache_mask, cache=cache, cache_index=0,
                              last_logits_only=True)
    else:
        logits, cache = model(prompt_ids, attention_mask=cache_mask, cache=cache, cache_index=0,
                              last_logits_only=True)
    next_logits = logits[:, -1]
    vocab = next_logits.shape[-1]
    rows = jnp.arange(batch)
    seen = jnp.zeros((batch, vocab), bool)
    if prompt_ids is not None:
        # Like HF: every prompt id counts, left-pad ids included.
        seen = seen.at[rows[:, None], prompt_ids].set(True, mode="drop")
    pad = jnp.asarray(pad_token_id, jnp.int32)
    process = functools.partial(process_logits, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                top_p=top_p, repetition_penalty=repetition_penalty,
                                renormalize_logits=renormalize_logits)

    def cond(carry):
        step, finished = carry[0], carry[5]
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(carry):
        step, cache, cache_mask, next_logits, seen, finished, sequences, lengths, key = carry
        key, sample_key = jax.random.split(key)
        scores = process(next_logits, seen)
        if do_sample:
            token = jax.random.categorical(sample_key, scores, axis=-1).astype(jnp.int32)
        else:
            token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        token = jnp.where(finished, pad, token)
        lengths = lengths + (~finished).astype(jnp.int32)
        sequences = sequences.at[:, step].set(token)
        seen = seen.at[rows, token].set(True, mode="drop")
        finished = finished | jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
        cache_mask = cache_mask.at[:, prompt_len + step].set(1)

        def decode(operands):
            cache, cache_mask = operands
            logits, cache = model(token[:, None], attention_mask=cache_mask, cache=cache,
                                  cache_index=prompt_len + step)
            return logits[:, -1], cache

        # No decode after the last token or once every row is done.
        next_logits, cache = jax.lax.cond((step + 1 < max_new_tokens) & ~jnp.all(finished), decode,
                                          lambda operands: (next_logits, operands[0]), (cache, cache_mask))
        return step + 1, cache, cache_mask, next_logits, seen, finished, sequences, lengths, key

    carry = (jnp.zeros((), jnp.int32), cache, cache_mask, next_logits, seen, jnp.zeros((batch,), bool),
             jnp.full((batch, max_new_tokens), pad, jnp.int32), jnp.zeros((batch,), jnp.int32), key)
    carry = jax.lax.while_loop(cond, body, carry)
    return GenerationOutput(carry[6], carry[7])


def generate(model, *, input_ids=None, inputs_embeds=None, attention_mask=None, key: Optional[jax.Array] = None,
             max_new_tokens: int, do_sample: bool = True, temperature: float = 0.6, top_k: Optional[int] = 5000,
             top_p: float = 0.9, repetition_penalty: float = 1.0, renormalize_logits: bool = True,
             eos_token_id, pad_token_id: Optional[int], bos_token_id: Optional[int] = None) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens per row of a LEFT-padded prompt batch with ``model`` (a
    :class:`~sgt_jax.models.CausalLM`).

    The prompt is ``input_ids`` (B, S) or ``inputs_embeds`` (B, S, D) (e.g. an SGT's ``x_t``; cast to the
    model's dtype); with both, the embeddings feed the model and the ids the repetition penalty (as in HF).
    With neither, every row starts from ``bos_token_id``. ``attention_mask`` (B, S) defaults to all ones.
    ``eos_token_id`` is an id, a list of ids or None (never stop); ``pad_token_id`` None means the first eos.
    ``key`` seeds sampling (fresh OS entropy when None and ``do_sample``). ``top_k`` None/0 disables top-k.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling; use do_sample=False for greedy.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1].")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1.0 disables it).")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 or None disables it).")
    eos_ids = [] if eos_token_id is None else (
        [int(eos_token_id)] if np.ndim(eos_token_id) == 0 else [int(i) for i in eos_token_id])
    if pad_token_id is None:
        if not eos_ids:
            raise ValueError("set pad_token_id (or eos_token_id, whose first id then pads finished rows).")
        pad_token_id = eos_ids[0]
    if input_ids is None and inputs_embeds is None:
        if bos_token_id is None:
            raise ValueError("pass input_ids or inputs_embeds (or bos_token_id to start from BOS alone).")
        batch = 1 if attention_mask is None else np.shape(attention_mask)[0]
        input_ids, attention_mask = np.full((batch, 1), bos_token_id, np.int32), None
    prompt = inputs_embeds if inputs_embeds is not None else input_ids
    shape = np.shape(prompt)[:2]
    if input_ids is not None and inputs_embeds is not None and np.shape(input_ids) != shape:
        raise ValueError(f"input_ids {np.shape(input_ids)} and inputs_embeds {np.shape(inputs_embeds)[:2]} "
                         "describe different prompts; pass the ids that produced the embeddings.")
    attention_mask = np.ones(shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask {attention_mask.shape} does not match the prompt {shape}.")
    if not np.all(attention_mask[:, -1] == 1):
        raise ValueError("prompts must be LEFT-padded (every row's last token real); tokenize with "
                         "padding_side='left'.")
    if key is None:
        key = fresh_key() if do_sample else jax.random.key(0)
    graphdef, state = nnx.split(model)
    return _generate_jit(
        graphdef, state,
        None if input_ids is None else jnp.asarray(input_ids, jnp.int32),
        None if inputs_embeds is None else jnp.asarray(inputs_embeds),
        jnp.asarray(attention_mask), key,
        jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k or 0, jnp.int32), jnp.asarray(top_p, jnp.float32),
        jnp.asarray(repetition_penalty, jnp.float32), jnp.asarray(eos_ids, jnp.int32).reshape(-1),
        jnp.asarray(pad_token_id, jnp.int32),
        max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), renormalize_logits=bool(renormalize_logits))


def generate_from_config(model, gen_cfg, *, eos_token_id, pad_token_id, bos_token_id=None, key=None,
                         **inputs_and_overrides) -> GenerationOutput:
    """:func:`generate` with the settings of a :class:`~sgt_jax.config.GenerationConfig`; keyword arguments
    (input_ids / inputs_embeds / attention_mask, or any setting) override it."""
    settings = dataclasses.asdict(gen_cfg)
    settings.update(inputs_and_overrides)
    return generate(model, key=key, eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                    **settings)


def decode_texts(tokenizer, sequences, lengths=None, *, skip_special_tokens: bool = True) -> list[str]:
    """Texts of generated ``sequences`` (B, N), each cut at its length (when given) and without special tokens
    (pad, eos) unless ``skip_special_tokens`` is False."""
    sequences = np.asarray(sequences)
    lengths = [sequences.shape[1]] * len(sequences) if lengths is None else np.asarray(lengths).tolist()
    return [tokenizer.decode(row[:n].tolist(), skip_special_tokens=skip_special_tokens)
            for row, n in zip(sequences, lengths)]


def prompts_from_batch(host_batch) -> list[dict[str, list[int]]]:
    """The prompt of each real row of a data batch: its tokens before the first response (loss_mask) token,
    with their noise mask (so the SGT protects exactly what it was trained to protect)."""
    prompts = []
    for ids, mask, noise, loss in zip(host_batch["input_ids"], host_batch["attention_mask"],
                                      host_batch["noise_mask"], host_batch["loss_mask"]):
        mask = np.asarray(mask).astype(bool)
        if not mask.any():
            continue
        ids, noise, loss = np.asarray(ids)[mask], np.asarray(noise)[mask], np.asarray(loss)[mask].astype(bool)
        end = int(np.argmax(loss)) if loss.any() else len(ids)
        if end > 0:
            prompts.append({"input_ids": [int(t) for t in ids[:end]], "noise_mask": [int(t) for t in noise[:end]]})
    return prompts


def prompts_from_source(source, limit: int) -> list[dict[str, list[int]]]:
    """The prompts of the first examples of a data source (``source[i]``: input_ids, noise_mask, loss_mask),
    up to ``limit``; examples with no prompt token are skipped. The same list on every host, unlike the
    prompts of a host's batches (each holds only its share of the global batch)."""
    prompts: list[dict[str, list[int]]] = []
    for i in range(len(source)):
        if len(prompts) >= limit:
            break
        example = source[i]
        ids = np.asarray(example["input_ids"])
        row = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int32),
               "noise_mask": np.asarray(example["noise_mask"])[None], "loss_mask": np.asarray(example["loss_mask"])[None]}
        prompts.extend(prompts_from_batch(row))
    return prompts


def left_pad(prompts, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, noise_mask) int32 (B, longest), left-padded, for prompts as returned by
    :func:`prompts_from_batch` (or plain id lists, then every token is to be transformed)."""
    prompts = [p if isinstance(p, dict) else {"input_ids": list(p), "noise_mask": [1] * len(p)} for p in prompts]
    batch = collate_left_padded(prompts, max(len(p["input_ids"]) for p in prompts), pad_id, fields=("noise_mask",))
    return batch["input_ids"], batch["attention_mask"], batch["noise_mask"]


__all__ = ["GenerationOutput", "apply_repetition_penalty", "apply_temperature", "apply_top_k", "apply_top_p",
           "decode_texts", "generate", "generate_from_config", "left_pad", "process_logits", "prompts_from_batch",
           "prompts_from_source"]
