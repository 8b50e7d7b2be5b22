"""Generation metrics: ROUGE of SGT generations against base-model generations, and the cache of the latter.

The recommendations advise comparing generations made *with* the SGT to generations of the base model *without* it
for the same prompts (ideally better than dataset labels, which the base model may not reproduce). The base
generations depend only on the base model, the prompts and the generation settings, so they are computed
once and cached as JSON beside the run (:func:`cached_base_generations`).

ROUGE uses Google's maintained ``rouge-score`` package (the reference implementation): ROUGE-1/2/L
precision, recall and F-measure per (reference, candidate) pair, averaged over pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from sgt_jax.inference.generate import decode_texts, generate_from_config, left_pad

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

__all__ = ["ROUGE_TYPES", "rouge_scores", "cached_base_generations", "generation_cache_key", "generation_rouge"]


def rouge_scores(references: Sequence[str], candidates: Sequence[str], *, rouge_types: Sequence[str] = ROUGE_TYPES,
                 use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE precision / recall / F over pairs: ``{"rouge1_precision": ..., "rougeL_fmeasure": ...}``, and
    the standard error of each mean F (``rougeL_fmeasure_stderr``: sample std / sqrt(pairs); nan below 2 pairs),
    which says how many pairs a difference needs to be read.

    ``references``: the base model's generations (the targets); ``candidates``: the SGT's generations.
    Tokenisation is rouge-score's default (lower-cased alphanumeric words).
    """
    from rouge_score import rouge_scorer

    if len(references) != len(candidates):
        raise ValueError(f"rouge_scores needs as many references ({len(references)}) as candidates ({len(candidates)}).")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    parts = ("precision", "recall", "fmeasure")
    per_pair = {f"{t}_{part}": [] for t in rouge_types for part in parts}
    for ref, cand in zip(references, candidates):
        scores = scorer.score(ref, cand)  # score(target, prediction)
        for t in rouge_types:
            for part in parts:
                per_pair[f"{t}_{part}"].append(getattr(scores[t], part))
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in per_pair.items()}
    for t in rouge_types:
        f = np.asarray(per_pair[f"{t}_fmeasure"])
        out[f"{t}_fmeasure_stderr"] = float(f.std(ddof=1) / np.sqrt(len(f))) if len(f) > 1 else float("nan")
    return out


def generation_cache_key(fingerprint: str, prompts: Sequence[Any], settings: Mapping[str, Any]) -> str:
    """sha256 of (model fingerprint, prompts, generation settings): any change recomputes the generations."""
    def canonical(prompt):  # text, token ids, or {"input_ids": [...], ...} from generate.prompts_from_batch
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, Mapping):
            return list(map(int, prompt["input_ids"]))
        return list(map(int, prompt))

    payload = json.dumps({"fingerprint": fingerprint, "prompts": [canonical(p) for p in prompts],
                          "settings": dict(settings)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def cached_base_generations(cache_path, prompts: Sequence[Any], generate_fn: Callable[[Sequence[Any]], Sequence[str]],
                            fingerprint: str, settings: Optional[Mapping[str, Any]] = None) -> list[str]:
    """The base model's generations for ``prompts``, computed once with ``generate_fn(prompts)`` and cached.

    cache_path: a JSON file (e.g. ``<run_dir>/base_generations.json``). It holds one entry per cache key
    (:func:`generation_cache_key` of fingerprint + prompts + settings), so different prompt sets or settings
    coexist and a change of any of them recomputes. Written atomically (temp file + rename).
    Sampling is stochastic: a cached reference is *one* sample of the base model, reused so that successive
    validations compare against the same targets.
    """
    cache_path = Path(cache_path)
    settings = dict(settings or {})
    key = generation_cache_key(fingerprint, prompts, settings)
    entries: dict[str, Any] = {}
    if cache_path.is_file():
        try:
            entries = json.loads(cache_path.read_text())
        except (OSError, json.JSONDecodeError):
            entries = {}  # a corrupt cache is recomputed, never fatal
        hit = entries.get(key)
        if isinstance(hit, dict) and isinstance(hit.get("generations"), list) and len(hit["generations"]) == len(prompts):
            return list(hit["generations"])
    generations = [str(g) for g in generate_fn(prompts)]
    if len(generations) != len(prompts):
        raise ValueError(f"generate_fn returned {len(generations)} generations for {len(prompts)} prompts.")
    entries[key] = {"fingerprint": fingerprint, "settings": settings, "num_prompts": len(prompts),
                    "generations": generations}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(cache_path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(entries, indent=1, default=str))
    os.replace(tmp, cache_path)
    return generations


def generation_rouge(model, protect: Callable, tokenizer, gen_cfg, prompts: Sequence[Mapping[str, Any]], key, *,
                     cache_path, fingerprint: str,
                     batch_size: Optional[int] = None) -> tuple[dict[str, float], list[str], list[str]]:
    """(:func:`rouge_scores`, references, candidates): ``model``'s generations from SGT-protected ``prompts``
    (as :func:`sgt_jax.inference.generate.prompts_from_batch` returns them) against its own generations of the
    clean prompts, cached in ``cache_path`` (:func:`cached_base_generations`).

    ``protect(ids, attention_mask, noise_mask, key) -> x_t`` is the SGT; ``gen_cfg`` a
    :class:`~sgt_jax.config.GenerationConfig`. Prompts go ``batch_size`` at a time (all at once when None), each
    batch left-padded to the longest prompt of all, so that one compiled program serves every full batch. Both
    generations of a batch draw the same sampling key (and see the prompt ids for the repetition penalty): an
    identity transform reproduces the references, so ROUGE measures what the SGT changes, not sampling noise.
    """
    ids, mask, noise = left_pad(prompts, tokenizer.pad_token_id)
    size = batch_size or len(prompts)
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
               "bos_token_id": tokenizer.bos_token_id}

    def generate_all(protected: bool) -> list[str]:
        texts: list[str] = []
        for n, start in enumerate(range(0, len(prompts), size)):
            rows = slice(start, start + size)
            inputs = {"input_ids": ids[rows], "attention_mask": mask[rows]}
            if protected:
                transform_key = jax.random.fold_in(key, 2 * n + 1)
                inputs["inputs_embeds"] = protect(ids[rows], mask[rows], noise[rows], transform_key)
            res = generate_from_config(model, gen_cfg, key=jax.random.fold_in(key, 2 * n), **inputs, **special)
            texts += decode_texts(tokenizer, res.sequences, res.lengths)
        return texts

    references = cached_base_generations(cache_path, prompts, lambda _: generate_all(False), fingerprint,
                                         dataclasses.asdict(gen_cfg))
    candidates = generate_all(True)
    return rouge_scores(references, candidates), references, candidates
