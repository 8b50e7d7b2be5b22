"""``python -m sgt_jax.evaluate --sgt RUN_DIR_OR_ARTIFACT [--data SOURCE] [--format alpaca] [--max-batches N]
[--generation-examples N] [--out report.json] [key=value ...]``: evaluate a trained SGT.

On a dataset (default: the run's validation set; ``--data``: a whole file/directory/hub name) it computes

- forward metrics of the (whole) base model: perplexity on clean and on transformed input (padding ignored),
  top-1 / top-5 next-token agreement between the two;
- obfuscation: for each transformed token the nearest vocabulary token of ``x_t`` by cosine and by L2, the
  per-sequence % of tokens whose nearest token is not the true one (mean, min, quantiles) and the mean
  reconstruction rank of the true token; the mean sigma;
- privacy: one line per threat model (lookup, white box, server) with quick settings (``--attack-steps`` of the
  white box's inverter; the server's reader and LM-prior decoding; ``python -m sgt_jax.attack`` runs them all);
- generation metrics: ROUGE-1/2/L (P/R/F, and the standard error of each mean F) of generations from
  SGT-protected prompts against the base model's generations of the same prompts, computed once and cached in
  ``base_generations.json`` beside the report (prompts = the first ``--generation-examples`` examples up to
  their response, :data:`GENERATION_EXAMPLES` by default; settings = the ``generation`` config section).

It writes a JSON report, TensorBoard scalars (``eval/...``) and a generation text table, and prints a table.
Its settings are the ``evaluate`` section of the schema (``--help`` lists them; ``--seed 1`` and
``evaluate.seed=1`` are the same); other ``key=value`` overrides apply to the run's saved configuration (e.g. ``model.dtype=float32``,
``generation.max_new_tokens=32``, ``data.batch_size=4``). Noise comes from ``--seed`` (default 0) so reports are
comparable between runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sgt_jax import tracking
from sgt_jax.config import ConfigError
from sgt_jax.config.commands import EvaluateCommand, parse_command
from sgt_jax.data import build_datasets, load_tokenizer
from sgt_jax.errors import run_cli
from sgt_jax.evaluation import metrics as metrics_lib
from sgt_jax.evaluation.attack import summary_attack_lines
from sgt_jax.evaluation.rouge import generation_rouge
from sgt_jax.evaluation.validation import ValidationTotals, make_eval_step
from sgt_jax.inference.artifact import StainedGlassTransform, resolve_sgt_path, transform_embeddings
from sgt_jax.inference.generate import prompts_from_batch
from sgt_jax.models import CausalLM
from sgt_jax.models.fingerprint import model_fingerprint
from sgt_jax.models.hf import resolve_model_path

log = logging.getLogger("sgt_jax.evaluate")

__all__ = ["GENERATION_EXAMPLES", "evaluate", "main"]

# Prompts ROUGE is averaged over by default (the setting's help says why that many). Generating 64 pairs on the
# embedded default costs about 20 s of CPU, mostly compilation (4 pairs: 19 s).
GENERATION_EXAMPLES = EvaluateCommand.generation_examples
METRICS = ("cosine", "l2")


def _data_pass(sgt, base, dataset, key, max_batches: Optional[int], num_prompts: int
               ) -> tuple[ValidationTotals, list]:
    """Validation's eval step and totals (without objective losses; the artifact's embedding table, as a client
    reads it) on the first ``max_batches`` batches (None: all), and prompts from as many batches as it takes
    to gather ``num_prompts`` of them, so that the ROUGE sample does not depend on ``max_batches``."""
    (cloak_graphdef, params), (base_graphdef, base_state) = nnx.split(sgt.cloak), nnx.split(base)
    eval_step = jax.jit(make_eval_step(None, cloak_graphdef, base_graphdef, None, base.config.hidden_size,
                                       obfuscation_metrics=METRICS, histograms=False))
    totals, prompts = ValidationTotals(), []
    for i, host_batch in enumerate(iter(dataset)):
        forward = max_batches is None or i < max_batches
        if not forward and len(prompts) >= num_prompts:
            break
        if len(prompts) < num_prompts:
            prompts.extend(prompts_from_batch(host_batch)[: num_prompts - len(prompts)])
        if forward:
            # One process: example i of the batch is its example_index, as in a one-host validation.
            batch = {k: jnp.asarray(host_batch[k]) for k in ("input_ids", "attention_mask", "noise_mask")}
            batch["example_index"] = jnp.arange(batch["input_ids"].shape[0], dtype=jnp.int32)
            totals.add(jax.device_get(eval_step(params, base_state, base_state, batch, jax.random.fold_in(key, i),
                                                sgt.embedding_table)))
    if hasattr(dataset, "close"):
        dataset.close()
    if totals.batches == 0:
        raise ConfigError("the evaluation data has no examples; pass --data with a non-empty dataset.")
    return totals, prompts


def _forward_and_obfuscation(totals: ValidationTotals) -> tuple[dict[str, Any], dict[str, Any]]:
    sums = totals.sums
    forward = metrics_lib.finalize_forward_metrics(sums)
    forward["mean_sigma"] = sums["sigma_sum"] / max(sums["feature_count"], 1.0)
    forward["mean_abs_mu"] = sums["mu_abs_sum"] / max(sums["feature_count"], 1.0)
    forward["tokens"] = int(sums["nll_count"])
    obfuscation = {}
    for m in METRICS:
        changed, rank = totals.obfuscation(m)
        obfuscation[m] = {"percent_changed": changed, "reconstruction_rank_mean": rank.get("mean", float("nan"))}
    return forward, obfuscation


def _generation(sgt, base, tokenizer, cfg, prompts, key, cache_path, fingerprint) -> tuple[dict[str, Any], list]:
    """The generation section of the report and its text-table rows (prompt, base and SGT generation)."""
    if not prompts:
        return {"num_examples": 0}, []
    rouge, references, candidates = generation_rouge(
        base, lambda *batch: transform_embeddings(sgt.cloak, sgt.embedding_table, *batch)[0], tokenizer,
        cfg.generation, prompts, key, cache_path=cache_path, fingerprint=fingerprint,
        batch_size=cfg.data.batch_size)
    rows = [{"prompt": tokenizer.decode(p["input_ids"], skip_special_tokens=True), "base": r, "sgt": c}
            for p, r, c in zip(prompts, references, candidates)]
    generation = {"num_examples": len(prompts), **rouge, "settings": dataclasses.asdict(cfg.generation),
                  "examples": rows[:8]}
    return generation, rows


def _flatten(prefix: str, values: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    for k, v in values.items():
        if isinstance(v, dict):
            _flatten(f"{prefix}{k}/", v, out)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def _publish(report: dict[str, Any], out_path: Path, report_dir: Path, step: int, rows: list,
             print_table: bool) -> None:
    """The report as JSON at ``out_path``, its numbers as TensorBoard scalars ``eval/...`` (and the generations
    as a text table) in ``report_dir``, and a printed table."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, default=str))
    generation = {k: v for k, v in report["generation"].items() if k not in ("settings", "examples")}
    scalars = _flatten("", {"forward": report["forward"], "obfuscation": report["obfuscation"],
                            "privacy": report["privacy"], "generation": generation}, {})
    with tracking.Tracker(report_dir, tensorboard=True) as tracker:
        tracker.scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
        if rows:
            tracker.text_table(step, "eval/generations", rows)
    if print_table:
        lines = {k: v for k, v in report["privacy"].items() if isinstance(v, str)}
        print(tracking.summary_table({**scalars, **lines, "report": str(out_path)}, title="SGT evaluation"),
              flush=True)


def _data_overrides(data: Optional[str], data_format: Optional[str]) -> list[str]:
    extra = [] if data is None else [f"data.source={data}", f"data.validation_source={data}"]
    return extra + ([] if data_format is None else [f"data.format={data_format}"])


def evaluate(sgt_path, *, data: Optional[str] = None, data_format: Optional[str] = None,
             max_batches: Optional[int] = None, generation_examples: int = GENERATION_EXAMPLES,
             out: Optional[str] = None, overrides: Sequence[str] = (), seed: int = 0,
             print_table: bool = True, attack_steps: Optional[int] = None) -> dict[str, Any]:
    """Evaluate the SGT at ``sgt_path`` (run dir or artifact); returns the report (also written to ``out``)."""
    artifact_dir, run_dir = resolve_sgt_path(sgt_path)
    sgt = StainedGlassTransform.load(artifact_dir)
    cfg = sgt.run_config([*overrides, *_data_overrides(data, data_format)])
    out_path = Path(out) if out else (run_dir or artifact_dir) / "eval_report.json"
    report_dir = run_dir or out_path.parent

    model_dir = resolve_model_path(cfg.model.path)
    sgt.check_base(model_dir)  # one line, before any model is loaded, when the base differs by content
    fingerprint = model_fingerprint(model_dir)
    base = CausalLM.from_pretrained(model_dir, dtype=cfg.model.dtype, attention_impl=cfg.model.attention_impl)
    tokenizer = load_tokenizer(str(model_dir))
    train_data, val_data = build_datasets(cfg.data, tokenizer, process_index=0, process_count=1)
    key = jax.random.key(seed)
    totals, prompts = _data_pass(sgt, base, val_data if val_data is not None else train_data, key,
                          cfg.validation.max_batches if max_batches is None else max_batches, generation_examples)
    forward, obfuscation = _forward_and_obfuscation(totals)
    attack_steps = cfg.validation.attack_steps if attack_steps is None else attack_steps
    # Every threat model next to the nearest-neighbour numbers, quick settings (python -m sgt_jax.attack: all).
    privacy = summary_attack_lines(artifact_dir, steps=attack_steps, eval_data=data, overrides=overrides,
                                   seed=seed) if attack_steps else {}
    generation, rows = _generation(sgt, base, tokenizer, cfg, prompts, jax.random.fold_in(key, 1_000_000),
                                   report_dir / "base_generations.json", fingerprint)
    report = {
        "sgt": str(artifact_dir), "base_model": str(model_dir), "base_model_fingerprint": fingerprint,
        "data": {"source": cfg.data.validation_source or cfg.data.source, "format": cfg.data.format,
                 "batches": totals.batches, "sequences": int(sum(len(c) for c in totals.changed["cosine"]))},
        "seed": seed, "forward": forward, "obfuscation": obfuscation, "privacy": privacy, "generation": generation,
    }
    step = int((sgt.meta.get("training_config") or {}).get("train", {}).get("max_steps") or 0)
    _publish(report, out_path, report_dir, step, rows, print_table)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    def body():
        args, overrides = parse_command("evaluate", sys.argv[1:] if argv is None else argv,
                                        prog="python -m sgt_jax.evaluate", doc=__doc__)
        if not args.sgt:
            raise ConfigError("pass --sgt RUN_DIR_OR_ARTIFACT (evaluate.sgt), the SGT to evaluate.")
        return evaluate(args.sgt, data=args.data, data_format=args.format, max_batches=args.max_batches,
                        generation_examples=args.generation_examples, out=args.out, overrides=overrides,
                        seed=args.seed, attack_steps=args.attack_steps)

    return run_cli(body)
