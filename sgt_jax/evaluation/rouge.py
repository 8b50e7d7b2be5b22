"""Generation metrics: ROUGE of SGT generations against base-model generations, and the cache of the latter.

The recommendations advise comparing generations made *with* the SGT to generations of the base model *without* it
for the same prompts (ideally better than dataset labels, which the base model may not reproduce). The base
generations depend only on the base model, the prompts and the generation settings, so they are computed
once and cached as JSON beside the run (:func:`cached_base_generations`).

ROUGE uses Google's maintained ``rouge-score`` package (the reference implementation): ROUGE-1/2/L
precision, recall and F-measure per (reference, candidate) pair, averaged over pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

__all__ = ["ROUGE_TYPES", "rouge_scores", "cached_base_generations", "generation_cache_key"]


def rouge_scores(references: Sequence[str], candidates: Sequence[str], *, rouge_types: Sequence[str] = ROUGE_TYPES,
                 use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE precision / recall / F over pairs: ``{"rouge1_precision": ..., "rougeL_fmeasure": ...}``.

    ``references``: the base model's generations (the targets); ``candidates``: the SGT's generations.
    Tokenisation is rouge-score's default (lower-cased alphanumeric words).
    """
    from rouge_score import rouge_scorer

    if len(references) != len(candidates):
        raise ValueError(f"rouge_scores needs as many references ({len(references)}) as candidates ({len(candidates)}).")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    totals = {f"{t}_{part}": 0.0 for t in rouge_types for part in ("precision", "recall", "fmeasure")}
    if not references:
        return {k: float("nan") for k in totals}
    for ref, cand in zip(references, candidates):
        scores = scorer.score(ref, cand)  # score(target, prediction)
        for t in rouge_types:
            totals[f"{t}_precision"] += scores[t].precision
            totals[f"{t}_recall"] += scores[t].recall
            totals[f"{t}_fmeasure"] += scores[t].fmeasure
    return {k: v / len(references) for k, v in totals.items()}


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
