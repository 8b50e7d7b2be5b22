"""``python -m sgt_jax.evaluate --sgt RUN_DIR_OR_ARTIFACT [--data SOURCE] [--format alpaca] [--max-batches N]
[--generation-examples N] [--out report.json] [key=value ...]``: evaluate a trained SGT.

On a dataset (default: the run's validation set; ``--data``: a whole file/directory/hub name) it computes

- forward metrics of the (whole) base model: perplexity on clean and on transformed input (padding ignored),
  top-1 / top-5 next-token agreement between the two;
- obfuscation: for each transformed token the nearest vocabulary token of ``x_t`` by cosine and by L2, the
  per-sequence % of tokens whose nearest token is not the true one (mean, min, quantiles) and the mean
  reconstruction rank of the true token; the mean sigma;
- generation metrics: ROUGE-1/2/L (P/R/F) of generations from SGT-protected prompts against the base model's
  generations of the same prompts, computed once and cached in ``base_generations.json`` beside the report
  (prompts = the examples up to their response; settings = the ``generation`` config section).

It writes a JSON report, TensorBoard scalars (``eval/...``) and a generation text table, and prints a table.
``key=value`` overrides apply to the run's saved configuration (e.g. ``model.dtype=float32``,
``generation.max_new_tokens=32``, ``data.batch_size=4``). Noise comes from ``--seed`` (default 0) so reports are
comparable between runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax import config as config_lib
from sgt_jax.evaluation import metrics as metrics_lib
from sgt_jax.inference.artifact import CONFIG_NAME, ArtifactError, StainedGlassTransform

log = logging.getLogger("sgt_jax.evaluate")

__all__ = ["resolve_sgt_path", "evaluate", "main"]


def resolve_sgt_path(path) -> tuple[Path, Optional[Path]]:
    """(artifact_dir, run_dir or None) for a run directory (with ``sgt/``) or an artifact directory."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        run_dir = path.parent if path.name == "sgt" and (path.parent / "tensorboard").exists() else None
        return path, run_dir
    if (path / "sgt" / CONFIG_NAME).is_file():
        return path / "sgt", path
    what = "does not exist" if not path.exists() else f"has no {CONFIG_NAME} (nor sgt/{CONFIG_NAME})"
    raise ArtifactError(f"--sgt {str(path)!r} {what}; pass a training run directory or its sgt/ artifact directory.")


def _config_for(sgt: StainedGlassTransform, overrides: Sequence[str]) -> config_lib.SGTConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    saved = dict(sgt.meta.get("training_config") or {})
    saved.pop("base_model_fingerprint", None)
    if not saved:
        saved = {"model": {"path": sgt.meta["base_model"]["path"]}}
    for item in overrides:
        if "=" not in item:
            raise config_lib.ConfigError(f"override {item!r} is not of the form key=value (e.g. model.dtype=float32).")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config_lib.SGTConfig), OmegaConf.create(saved),
                                 OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise config_lib.ConfigError(f"invalid configuration: {str(exc).strip().splitlines()[0]}") from None
    config_lib.validate(cfg)
    return cfg


@nnx.jit
def _forward_batch(cloak, base, table, batch, key):
    from sgt_jax.evaluation.metrics import forward_eval

    keys = jax.random.split(key, batch["input_ids"].shape[0])
    out = forward_eval(cloak, base, table, batch, keys, obfuscation_metrics=("cosine", "l2"))
    return out["sums"], {m: (o["percent_changed"], o["mean_rank"]) for m, o in out["obfuscation"].items()}


def _flatten(prefix: str, values: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    for k, v in values.items():
        if isinstance(v, dict):
            _flatten(f"{prefix}{k}/", v, out)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def evaluate(sgt_path, *, data: Optional[str] = None, data_format: Optional[str] = None,
             max_batches: Optional[int] = None, generation_examples: Optional[int] = None,
             out: Optional[str] = None, overrides: Sequence[str] = (), seed: int = 0,
             print_table: bool = True, attack_steps: Optional[int] = None) -> dict[str, Any]:
    """Evaluate the SGT at ``sgt_path`` (run dir or artifact); returns the report (also written to ``out``)."""
    from sgt_jax import tracking
    from sgt_jax.data import build_datasets, load_tokenizer
    from sgt_jax.inference.generate import decode_texts, generate_from_config, left_pad, prompts_from_batch
    from sgt_jax.evaluation.rouge import cached_base_generations, rouge_scores
    from sgt_jax.models import CausalLM
    from sgt_jax.models.hf import resolve_model_path
    from sgt_jax.models.fingerprint import model_fingerprint

    artifact_dir, run_dir = resolve_sgt_path(sgt_path)
    sgt = StainedGlassTransform.load(artifact_dir)
    extra = list(overrides)
    if data is not None:
        extra += [f"data.source={data}", f"data.validation_source={data}"]
    if data_format is not None:
        extra.append(f"data.format={data_format}")
    cfg = _config_for(sgt, extra)
    if max_batches is None:
        max_batches = cfg.validation.max_batches
    if generation_examples is None:
        generation_examples = cfg.validation.generation_examples
    out_path = Path(out) if out else (run_dir or artifact_dir) / "eval_report.json"
    report_dir = run_dir or out_path.parent

    model_dir = resolve_model_path(cfg.model.path)
    sgt.check_base(model_dir)  # one line, before any model is loaded, when the base differs by content
    fingerprint = model_fingerprint(model_dir)
    base = CausalLM.from_pretrained(model_dir, dtype=cfg.model.dtype, attention_impl=cfg.model.attention_impl)
    tokenizer = load_tokenizer(str(model_dir))
    train_data, val_data = build_datasets(cfg.data, tokenizer, process_index=0, process_count=1)
    dataset = val_data if val_data is not None else train_data
    table = sgt.embedding_table

    key = jax.random.key(seed)
    sums: dict[str, float] = {}
    changed: dict[str, list] = {"cosine": [], "l2": []}
    ranks: dict[str, list] = {"cosine": [], "l2": []}
    prompts: list[list[int]] = []
    num_batches = 0
    for i, host_batch in enumerate(iter(dataset)):
        if max_batches is not None and i >= max_batches:
            break
        real = host_batch["attention_mask"].any(axis=-1)
        if not real.any():
            continue
        num_batches += 1
        batch = {k: jnp.asarray(host_batch[k]) for k in ("input_ids", "attention_mask", "noise_mask")}
        batch_sums, obf = jax.device_get(_forward_batch(sgt.cloak, base, table, batch, jax.random.fold_in(key, i)))
        for k, v in batch_sums.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        for m, (pc, rk) in obf.items():
            changed[m].append(np.asarray(pc)[real])
            ranks[m].append(np.asarray(rk)[real])
        if len(prompts) < generation_examples:
            prompts.extend(prompts_from_batch(host_batch)[: generation_examples - len(prompts)])
    if hasattr(dataset, "close"):
        dataset.close()
    if num_batches == 0:
        raise config_lib.ConfigError("the evaluation data has no examples; pass --data with a non-empty dataset.")

    forward = metrics_lib.finalize_forward_metrics(sums)
    forward["mean_sigma"] = sums["sigma_sum"] / max(sums["feature_count"], 1.0)
    forward["mean_abs_mu"] = sums["mu_abs_sum"] / max(sums["feature_count"], 1.0)
    forward["tokens"] = int(sums["nll_count"])
    obfuscation: dict[str, Any] = {}
    for m in ("cosine", "l2"):
        obfuscation[m] = {
            "percent_changed": metrics_lib.summarize(np.concatenate(changed[m])),
            "reconstruction_rank_mean": metrics_lib.summarize(np.concatenate(ranks[m])).get("mean", float("nan")),
        }

    attack_steps = cfg.validation.attack_steps if attack_steps is None else attack_steps
    if attack_steps:  # a learned attacker next to the nearest-neighbour numbers (python -m sgt_jax.attack: all)
        from sgt_jax.evaluation.attack import summary_attack_lines

        obfuscation["learned_attack"] = summary_attack_lines(artifact_dir, steps=attack_steps, eval_data=data,
                                                             overrides=overrides, seed=seed)

    generation: dict[str, Any] = {"num_examples": len(prompts)}
    rows = []
    if prompts:
        gen_cfg = cfg.generation
        ids, mask, noise = left_pad(prompts, tokenizer.pad_token_id)
        ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
        gen_kw = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id)

        def base_generate(_prompts):
            res = generate_from_config(base, gen_cfg, input_ids=ids_j, attention_mask=mask_j,
                                       key=jax.random.fold_in(key, 1_000_001), **gen_kw)
            return decode_texts(tokenizer, res.sequences, res.lengths)

        references = cached_base_generations(report_dir / "base_generations.json", prompts, base_generate,
                                             fingerprint, dataclasses.asdict(gen_cfg))
        x_t = sgt.transform(ids, attention_mask=mask, noise_mask=noise,
                            key=jax.random.fold_in(key, 1_000_002))["inputs_embeds"]
        # The base generations' sampling key (and prompt ids for the repetition penalty): an identity
        # transform reproduces them, so ROUGE measures what the SGT changes, not sampling noise.
        res = generate_from_config(base, gen_cfg, inputs_embeds=x_t, input_ids=ids_j, attention_mask=mask_j,
                                   key=jax.random.fold_in(key, 1_000_001), **gen_kw)
        candidates = decode_texts(tokenizer, res.sequences, res.lengths)
        generation.update(rouge_scores(references, candidates))
        generation["settings"] = dataclasses.asdict(gen_cfg)
        rows = [{"prompt": tokenizer.decode(p["input_ids"], skip_special_tokens=True), "base": r, "sgt": c}
                for p, r, c in zip(prompts, references, candidates)]
        generation["examples"] = rows[:8]

    report = {
        "sgt": str(artifact_dir), "base_model": str(model_dir), "base_model_fingerprint": fingerprint,
        "data": {"source": cfg.data.validation_source or cfg.data.source, "format": cfg.data.format,
                 "batches": num_batches, "sequences": int(sum(len(c) for c in changed["cosine"]))},
        "seed": seed, "forward": forward, "obfuscation": obfuscation, "generation": generation,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, default=str))
    scalars = _flatten("", {"forward": forward, "obfuscation": obfuscation,
                            "generation": {k: v for k, v in generation.items() if k not in ("settings", "examples")}}, {})
    step = int((sgt.meta.get("training_config") or {}).get("train", {}).get("max_steps") or 0)
    with tracking.Tracker(report_dir, tensorboard=True) as tracker:
        tracker.scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
        if rows:
            tracker.text_table(step, "eval/generations", rows)
    if print_table:
        print(tracking.summary_table({**scalars, "report": str(out_path)}, title="SGT evaluation"), flush=True)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgt_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sgt", required=True, help="a training run directory (with sgt/) or an SGT artifact")
    parser.add_argument("--data", help="evaluation data (file, save_to_disk directory or hub name); default: the "
                        "run's validation set")
    parser.add_argument("--format", dest="data_format", help="data format (alpaca, openorca, chat, text)")
    parser.add_argument("--max-batches", type=int, help="forward batches to evaluate (default validation.max_batches)")
    parser.add_argument("--generation-examples", type=int, help="prompts for the generation metrics (0: none)")
    parser.add_argument("--out", help="report JSON path (default <run or artifact dir>/eval_report.json)")
    parser.add_argument("--seed", type=int, default=0, help="noise / sampling seed (default 0)")
    parser.add_argument("--attack-steps", type=int, help="Adam steps of the learned mlp attack reported next to "
                        "obfuscation (default validation.attack_steps; 0: off)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the saved config")
    args = parser.parse_args(argv)
    from sgt_jax.errors import run_cli

    return run_cli(lambda: evaluate(args.sgt, data=args.data, data_format=args.data_format,
                                    max_batches=args.max_batches, generation_examples=args.generation_examples,
                                    out=args.out, overrides=args.overrides, seed=args.seed,
                                    attack_steps=args.attack_steps))
