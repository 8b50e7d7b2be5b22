"""``python -m sgt_jax.attack --sgt RUN_OR_ARTIFACT [--train-data SRC] [--eval-data SRC] [--attacks nn,mlp,transformer]
[--steps N] [--out report.json]`` and ``python -m sgt_jax.attack --frontier RUN_DIR [RUN_DIR ...]``.

Privacy of a trained SGT measured against attackers who hold the artifact and the base model's embedding
table and can transform any public text as often as they like (so they train on (x_t, token) pairs):

- ``nn``: the nearest vocabulary embedding by cosine and by L2 (no training; the weakest attacker);
- ``mlp``: a per-position classifier from x_t to the token (one hidden layer of 512);
- ``transformer``: a small bidirectional transformer over the whole transformed prompt (uses context).

Learned attackers train on the transformed prompts of a public split (the run's training split, or
``--train-data``) with fresh noise per example and epoch, and are scored on held-out prompts (the run's
validation split, or ``--eval-data``) that never occur in their training data. Reported per attack:
top-1 / top-5 token recovery over noised positions, per-sequence recovery quantiles, and the same attack on
clean embeddings (the ceiling); next to them the majority-token baseline and the Monte-Carlo mutual
information of the SGT's Gaussian-mixture view (bits per noised token, against log2 of the vocabulary).
Writes a JSON report (default ``<run or artifact>/attack_report.json``), TensorBoard scalars ``attack/...``,
and prints a table. ``--frontier`` plots the privacy–utility frontier of several runs (see
:mod:`sgt_jax.evaluation.frontier`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Mapping, Any, Optional, Sequence

import jax
import numpy as np

from sgt_jax.data.errors import DataError
from sgt_jax.inference.artifact import StainedGlassTransform, resolve_sgt_path, transform_embeddings
from sgt_jax.evaluation.inversion import ATTACKS, PromptSet, run_attacks, sigma_at_targets
from sgt_jax import tracking
from sgt_jax.data import build_datasets
from sgt_jax.errors import SGTError, run_cli
from sgt_jax.evaluation.frontier import frontier
from sgt_jax.inference.generate import prompts_from_batch
from sgt_jax.transform.privacy_mi import gaussian_mixture_mi

log = logging.getLogger("sgt_jax.attack")

__all__ = ["HIGH_RECOVERY", "privacy_verdict", "summary_verdict", "sgt_transform", "load_prompt_sets", "attack",
           "report_scalars", "quick_attack_summary", "summary_attack_lines", "main"]

REPORT_NAME = "attack_report.json"


# Learned-attack recovery (% of transformed tokens) at and above which the summary says the SGT does not hide
# tokens: half the tokens of a prompt read back by an attacker who holds the artifact.
HIGH_RECOVERY = 50.0
NOT_HIDDEN = "this SGT does not hide tokens from a learned attacker"


def privacy_verdict(recovery_percent: Optional[float], threshold: float = HIGH_RECOVERY) -> Optional[str]:
    """The summary's privacy line from a learned attack's token recovery (in %, as ``sgt_jax.attack``
    reports it); None when the recovery is unknown."""
    if recovery_percent is None or not np.isfinite(recovery_percent):
        return None
    if recovery_percent >= threshold:
        return f"{NOT_HIDDEN}: it recovers {recovery_percent:.1f}% of transformed tokens"
    return f"a learned attacker recovers {recovery_percent:.1f}% of transformed tokens (below {threshold:.0f}%)"


RECOVERY_KEYS = ("attack_mlp_top1_recovery", "mlp_recovery")


def summary_verdict(summary: Mapping[str, Any], threshold: float = HIGH_RECOVERY) -> Optional[str]:
    """:func:`privacy_verdict` of the learned-attack recovery an end-of-training summary carries (the
    attack module's quick ``mlp`` attack), or None when it carries none."""
    for key in RECOVERY_KEYS:
        for name in (key, f"{key} (after)"):
            if summary.get(name) is not None:
                return privacy_verdict(float(summary[name]), threshold)
    return None


def sgt_transform(sgt):
    """The artifact's transform as ``fn(ids, attention_mask, noise_mask, key) -> (x_t, sigma)`` (dropout off)."""

    return lambda ids, am, nm, key: transform_embeddings(sgt.cloak, sgt.embedding_table, ids, am, nm, key)


def _prompts(pipeline, limit: Optional[int]) -> list:
    prompts: list = []
    for host_batch in iter(pipeline):
        prompts.extend(prompts_from_batch(host_batch))
        if limit is not None and len(prompts) >= limit:
            break
    if hasattr(pipeline, "close"):
        pipeline.close()
    return prompts[:limit] if limit is not None else prompts


def load_prompt_sets(sgt, *, train_data: Optional[str] = None, eval_data: Optional[str] = None,
                     overrides: Sequence[str] = (), max_train: Optional[int] = None,
                     max_eval: Optional[int] = 256) -> tuple[PromptSet, PromptSet]:
    """(public training prompts, held-out evaluation prompts) for the SGT's run configuration: by default the
    run's training split and its validation split; the evaluation prompts are removed from the training ones."""
    if sgt.tokenizer is None:
        raise DataError(f"{sgt.directory} has no tokenizer/; the attack needs it to tokenize public text.")
    base = list(overrides) + ["data.num_epochs=1", "data.num_workers=0"]
    train_cfg = sgt.run_config(base + ([f"data.source={train_data}"] if train_data else []))
    eval_cfg = sgt.run_config(base + ([f"data.validation_source={eval_data}"] if eval_data else []))
    train_pipe, _ = build_datasets(train_cfg.data, sgt.tokenizer, process_index=0, process_count=1)
    eval_train, eval_pipe = build_datasets(eval_cfg.data, sgt.tokenizer, process_index=0, process_count=1)
    if eval_pipe is None:
        raise DataError("the run has no validation split to attack; pass --eval-data with held-out prompts.")
    pad = sgt.tokenizer.pad_token_id
    held_out = PromptSet.from_prompts(_prompts(eval_pipe, max_eval), pad, "eval")
    train_all = PromptSet.from_prompts(_prompts(train_pipe, max_train), pad, "train")
    train = train_all.without(held_out)
    if len(train) < len(train_all):
        log.info("dropped %d training prompt(s) that are also evaluation prompts", len(train_all) - len(train))
    if len(train) == 0:
        raise DataError("every attack training prompt is also an evaluation prompt; pass a disjoint --train-data.")
    return train, held_out


def attack(sgt_path, *, train_data: Optional[str] = None, eval_data: Optional[str] = None,
           attacks: Sequence[str] = ATTACKS, steps: int = 1500, batch_size: int = 32, seed: int = 0,
           ceiling: bool = True, mi_samples: int = 2048, max_eval: Optional[int] = 256,
           max_train: Optional[int] = None, out: Optional[str] = None, overrides: Sequence[str] = (),
           progress: bool = True, print_table: bool = True) -> dict[str, Any]:
    """Attack the SGT at ``sgt_path`` (run dir or artifact); returns the report (also written to ``out``)."""
    artifact_dir, run_dir = resolve_sgt_path(sgt_path)
    sgt = StainedGlassTransform.load(artifact_dir)
    if steps < 1:
        raise DataError(f"--steps {steps} must be at least 1.")
    train, held_out = load_prompt_sets(sgt, train_data=train_data, eval_data=eval_data, overrides=overrides,
                                       max_train=max_train, max_eval=max_eval)
    transform = sgt_transform(sgt)
    key = jax.random.key(seed)
    learned = [a for a in attacks if a != "nn"]
    bar = tracking.ProgressBar(steps * len(learned) * (2 if ceiling else 1), enabled=progress and bool(learned),
                               desc="attack")
    done = {"steps": 0}

    def on_step(name, step, loss):
        done["steps"] += 1
        bar.update(done["steps"], loss=float(loss) if step % 50 == 0 else None)

    results = run_attacks(transform, sgt.embedding_table, train, held_out, attacks=attacks, steps=steps,
                          batch_size=batch_size, key=key, ceiling=ceiling, on_step=on_step)
    bar.close()
    sigmas = sigma_at_targets(transform, held_out, sgt.embedding_table, jax.random.fold_in(key, 7))
    mi = (gaussian_mixture_mi(sgt.embedding_table, sigmas, key=jax.random.fold_in(key, 11), samples=mi_samples)
          if mi_samples > 0 and len(sigmas) else None)
    training = sgt.meta.get("training_config") or {}
    report = {
        "sgt": str(artifact_dir), "run_dir": str(run_dir) if run_dir else None, "seed": seed,
        "settings": {"attacks": list(attacks), "steps": steps, "batch_size": batch_size, "ceiling": ceiling,
                     "train_data": train_data or "the run's training split",
                     "eval_data": eval_data or "the run's validation split"},
        "objective": {"alpha": (training.get("objective") or {}).get("alpha")},
        "data": {"train_prompts": len(train), "eval_prompts": len(held_out), "train_eval_overlap": 0},
        "attacks": results, "mutual_information": mi,
    }
    out_path = Path(out) if out else (run_dir or artifact_dir) / REPORT_NAME
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    scalars = report_scalars(report)
    step = int((training.get("train") or {}).get("max_steps") or 0)
    with tracking.Tracker(run_dir or out_path.parent, tensorboard=True) as tracker:
        tracker.scalars(step, {f"attack/{k}": v for k, v in scalars.items()})
    if print_table:
        print(tracking.summary_table({**scalars, "report": str(out_path)}, title="SGT attacks (token recovery %)"),
              flush=True)
    return report


def report_scalars(report: dict) -> dict[str, float]:
    """Flat ``name: value`` of the headline numbers of an attack report (table and TensorBoard)."""
    out: dict[str, float] = {}
    for name, res in report["attacks"].items():
        for k in ("top1", "top5"):
            out[f"{name}/{k}"] = res[k]
        if "clean" in res:
            out[f"{name}/clean_top1"] = res["clean"]["top1"]
        for q in ("q10", "q50", "q90"):
            if q in res.get("per_sequence_top1", {}):
                out[f"{name}/per_sequence_top1_{q}"] = res["per_sequence_top1"][q]
    mi = report.get("mutual_information")
    if mi:
        out["mi/bits"], out["mi/stderr_bits"], out["mi/max_bits"] = mi["bits"], mi["stderr_bits"], mi["max_bits"]
    return out


def quick_attack_summary(sgt_path, *, steps: int = 300, eval_data: Optional[str] = None,
                         overrides: Sequence[str] = (), seed: int = 0) -> dict[str, float]:
    """The learned ``mlp`` attack with quick settings (``steps`` Adam steps, no ceiling, no MI) next to
    nearest-neighbour recovery: the privacy lines of the training summary and of ``sgt_jax.evaluate``."""
    report = attack(sgt_path, attacks=("nn", "mlp"), steps=steps, ceiling=False, mi_samples=0, seed=seed,
                    eval_data=eval_data,
                    max_eval=128, max_train=1024, overrides=overrides, progress=False, print_table=False,
                    out=str(_quick_report_path(sgt_path)))
    res = report["attacks"]
    return {"attack_mlp_top1_recovery": res["mlp"]["top1"], "attack_mlp_top5_recovery": res["mlp"]["top5"],
            "attack_nn_cosine_top1_recovery": res["nn_cosine"]["top1"],
            "attack_majority_baseline_top1": res["majority_baseline"]["top1"]}


def summary_attack_lines(sgt_path, *, steps: int, **kwargs) -> dict[str, Any]:
    """:func:`quick_attack_summary` for a summary that must not fail after a long run: a user-caused problem
    (e.g. no validation split to attack) becomes a logged warning and an ``attack`` line saying why."""
    start = time.perf_counter()
    try:
        lines = quick_attack_summary(sgt_path, steps=steps, **kwargs)
        log.info("learned attack (%d mlp steps): %.1f s", steps, time.perf_counter() - start)
        return lines
    except SGTError as exc:
        log.warning("learned attack skipped: %s", exc)
        return {"attack": f"skipped: {exc}"}


def _quick_report_path(sgt_path) -> Path:
    artifact_dir, run_dir = resolve_sgt_path(sgt_path)
    return (run_dir or artifact_dir) / "attack_quick.json"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgt_jax.attack", description=__doc__.split("\n\n")[1])
    parser.add_argument("--sgt", help="a training run directory (with sgt/) or an SGT artifact")
    parser.add_argument("--frontier", nargs="+", metavar="RUN_DIR", help="plot the privacy–utility frontier of "
                        "these runs (each attacked before with --sgt) instead of attacking")
    parser.add_argument("--train-data", help="public data the attackers train on (default: the run's training split)")
    parser.add_argument("--eval-data", help="held-out prompts to attack (default: the run's validation split)")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated subset of {','.join(ATTACKS)}")
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps per learned attacker (default 1500)")
    parser.add_argument("--batch-size", type=int, default=32, help="attacker batch size in prompts (default 32)")
    parser.add_argument("--max-eval", type=int, default=256, help="held-out prompts to attack (default 256)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the clean-embedding ceiling (halves the time)")
    parser.add_argument("--mi-samples", type=int, default=2048, help="Monte-Carlo samples of the MI estimate (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="attacker initialisation and noise seed (default 0)")
    parser.add_argument("--out", help=f"report path (default <run or artifact dir>/{REPORT_NAME}; with --frontier: "
                        "the PNG, default frontier.png in the current directory)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides of the saved config (e.g. data.max_length=64)")
    args = parser.parse_args(argv)

    def body():
        if args.frontier:
            return frontier(args.frontier, out=args.out or "frontier.png")
        if not args.sgt:
            raise DataError("pass --sgt RUN_OR_ARTIFACT to attack an SGT, or --frontier RUN_DIR ... to plot runs.")
        attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
        return attack(args.sgt, train_data=args.train_data, eval_data=args.eval_data, attacks=attacks,
                      steps=args.steps, batch_size=args.batch_size, seed=args.seed, ceiling=not args.no_ceiling,
                      mi_samples=args.mi_samples, max_eval=args.max_eval, out=args.out, overrides=args.overrides)

    return run_cli(body)
