"""Privacy of a trained SGT against the attackers of :mod:`sgt_jax.evaluation.threat_models` (lookup, white box,
server): the report behind ``python -m sgt_jax.attack``, the end-of-training summary and ``sgt_jax.evaluate``.

Attackers that learn train on the transformed prompts of a public split (the run's training split, or
``--train-data``) with fresh noise per example and epoch, and are scored on held-out prompts (the run's
validation split, or ``--eval-data``) that never occur in their training data. The report has one section per
threat model (every attack's top-1 / top-5 recovery of the noised tokens, per-prompt quantiles, the
clean-embedding ceiling, the strongest attack and the largest Barber–Agakov leakage bound), the majority-token
baseline and the report's largest leakage figure in bits per noised token. Written as JSON (default
``<run or artifact>/attack_report.json``), TensorBoard scalars ``attack/...`` and a printed table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping, Any, Optional, Sequence

import jax
import numpy as np

from sgt_jax import tracking
from sgt_jax.data import build_datasets
from sgt_jax.data.errors import DataError
from sgt_jax.errors import SGTError
from sgt_jax.evaluation.inversion import PromptSet, majority_baseline
from sgt_jax.evaluation.threat_models import SERVER_ATTACKS, THREAT_MODELS, lookup, server, white_box
from sgt_jax.inference.artifact import StainedGlassTransform, resolve_sgt_path, transform_embeddings
from sgt_jax.inference.generate import prompts_from_batch
from sgt_jax.models import CausalLM
from sgt_jax.models.hf import resolve_model_path
from sgt_jax.transform.inverters import INVERTER_KINDS

log = logging.getLogger("sgt_jax.attack")

__all__ = ["HIGH_RECOVERY", "REPORT_NAME", "privacy_verdict", "summary_verdict", "sgt_transform", "load_prompt_sets",
           "attack", "strongest_leakage", "report_scalars", "threat_model_lines", "quick_attack_summary",
           "summary_attack_lines"]

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


RECOVERY_KEYS = ("recovery_white_box",)


def summary_verdict(summary: Mapping[str, Any], threshold: float = HIGH_RECOVERY) -> Optional[str]:
    """:func:`privacy_verdict` of the white-box learned-attack recovery an end-of-training summary carries (the
    quick ``mlp`` attack), or None when it carries none."""
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


PRIVACY_SWITCHES = ("adversary", "adversary_weight", "adversary_reset_every", "adversary_reset_steps",
                    "posterior_weight")


def _training_section(training) -> dict:
    """What the report says of the SGT's training: its objective weights, length and the privacy switches
    (docs/privacy_objectives.md; off unless set)."""
    objective = training.get("objective") or {}
    return {**{k: objective.get(k) for k in ("alpha", "transform_variance_priority", *PRIVACY_SWITCHES)},
            "max_steps": (training.get("train") or {}).get("max_steps"),
            "mean_bound": (training.get("cloak") or {}).get("mean_bound")}


def attack(sgt_path, *, threat_models: Sequence[str] = THREAT_MODELS, train_data: Optional[str] = None,
           eval_data: Optional[str] = None, attacks: Sequence[str] = INVERTER_KINDS,
           server_attacks: Sequence[str] = SERVER_ATTACKS, transfer_sgt=None, steps: int = 1500,
           batch_size: int = 32, seed: int = 0, ceiling: bool = True, exact_positions: int = 256,
           exact_candidates: int = 32, max_eval: Optional[int] = 256, max_train: Optional[int] = None,
           out: Optional[str] = None, overrides: Sequence[str] = (), progress: bool = True,
           print_table: bool = True) -> dict[str, Any]:
    """Attack the SGT at ``sgt_path`` (run dir or artifact) under ``threat_models``; returns the report (also
    written to ``out``). ``attacks``: the learned inverters (white box, and the server's transfer attack);
    ``transfer_sgt``: the attacker's own SGT for the transfer attack (trained by ``python -m sgt_jax.attack``
    when it runs the server threat model without one)."""
    unknown = [t for t in threat_models if t not in THREAT_MODELS] + [
        a for a in attacks if a not in INVERTER_KINDS] + [a for a in server_attacks if a not in SERVER_ATTACKS]
    if unknown:
        raise DataError(f"{unknown[0]!r} is unknown: threat models are {', '.join(THREAT_MODELS)}, inverters "
                        f"{', '.join(INVERTER_KINDS)}, server attacks {', '.join(SERVER_ATTACKS)}.")
    if steps < 1:
        raise DataError(f"--steps {steps} must be at least 1.")
    empty = [t for t, chosen in (("white-box", attacks), ("server", server_attacks)) if t in threat_models and not chosen]
    if empty:
        raise DataError(f"the {empty[0]} threat model has no attack to run; name at least one (--attacks, "
                        "--server-attacks) or leave the threat model out.")
    artifact_dir, run_dir = resolve_sgt_path(sgt_path)
    if transfer_sgt is not None and "server" in threat_models and "transfer" in server_attacks:
        transfer_sgt = _transfer_artifact(transfer_sgt)
    sgt = StainedGlassTransform.load(artifact_dir)
    train, held_out = load_prompt_sets(sgt, train_data=train_data, eval_data=eval_data, overrides=overrides,
                                       max_train=max_train, max_eval=max_eval)
    key = jax.random.key(seed)
    learned = len(attacks) * ((2 if ceiling else 1) * ("white-box" in threat_models)
                              + ("transfer" in server_attacks and "server" in threat_models))
    bar = tracking.ProgressBar(steps * learned, enabled=progress and learned > 0, desc="attack")
    done = {"steps": 0}

    def on_step(name, step, loss):
        done["steps"] += 1
        bar.update(done["steps"], loss=float(loss) if step % 50 == 0 else None)

    ctx = _Context(sgt, train, held_out, key, attacks, steps, batch_size, ceiling, on_step)
    sections = {}
    try:
        for threat in threat_models:
            log.info("threat model %s", threat)
            if threat == "lookup":
                sections[threat] = lookup(ctx.transform, sgt.embedding_table, train, held_out, key=key,
                                          ceiling=ceiling)
            elif threat == "white-box":
                sections[threat] = white_box(ctx.transform, sgt.cloak, sgt.embedding_table, train, held_out,
                                             inverters=attacks, steps=steps, batch_size=batch_size, key=key,
                                             ceiling=ceiling, on_step=on_step, exact_positions=exact_positions,
                                             exact_candidates=exact_candidates)
            else:
                sections[threat] = _server(ctx, server_attacks, transfer_sgt, overrides)
    finally:
        bar.close()
    training = sgt.meta.get("training_config") or {}
    report = {
        "sgt": str(artifact_dir), "run_dir": str(run_dir) if run_dir else None, "seed": seed,
        "settings": {"threat_models": list(threat_models), "attacks": list(attacks),
                     "server_attacks": list(server_attacks), "steps": steps, "batch_size": batch_size,
                     "ceiling": ceiling, "train_data": train_data or "the run's training split",
                     "eval_data": eval_data or "the run's validation split"},
        "training": _training_section(training),
        "data": {"train_prompts": len(train), "eval_prompts": len(held_out), "train_eval_overlap": 0},
        "majority_baseline": majority_baseline(train, held_out), "threat_models": sections,
        "leakage": strongest_leakage(sections),
    }
    out_path = Path(out) if out else (run_dir or artifact_dir) / REPORT_NAME
    _publish(report, out_path, run_dir, int((training.get("train") or {}).get("max_steps") or 0), print_table)
    return report


class _Context:
    """What every threat model reads: the victim's SGT and transform, the prompt sets, the attack settings."""

    def __init__(self, sgt, train, held_out, key, inverters, steps, batch_size, ceiling, on_step):
        self.sgt, self.train, self.held_out, self.key = sgt, train, held_out, key
        self.transform = sgt_transform(sgt)
        self.inverters, self.steps, self.batch_size, self.ceiling, self.on_step = (
            inverters, steps, batch_size, ceiling, on_step)


def _server(ctx: _Context, server_attacks, transfer_sgt, overrides) -> dict:
    sgt = ctx.sgt
    cfg = sgt.run_config(list(overrides))
    model_dir = resolve_model_path(cfg.model.path)
    base = None
    if {"reader", "lm_prior"} & set(server_attacks):
        sgt.check_base(model_dir)
        base = CausalLM.from_pretrained(model_dir, dtype=cfg.model.dtype, attention_impl=cfg.model.attention_impl)
    attacker = attacker_train = None
    overlap = None
    if "transfer" in server_attacks:
        if transfer_sgt is None:
            raise DataError("the server's transfer attack needs the attacker's own SGT: pass --transfer-sgt DIR, or "
                            "run python -m sgt_jax.attack, which trains one with the same recipe.")
        attacker = StainedGlassTransform.load(transfer_sgt)
        attacker_train, _ = load_prompt_sets(attacker, max_eval=1)
        victim_train, _ = load_prompt_sets(sgt, max_eval=1)
        overlap = len(attacker_train.keys() & victim_train.keys())
        if overlap:
            raise DataError(f"the attacker's SGT at {transfer_sgt} was trained on {overlap} prompt(s) of the "
                            "victim's training data; train it on disjoint public data.")
    out = server(ctx.transform, sgt.embedding_table, ctx.train, ctx.held_out, key=jax.random.fold_in(ctx.key, 3),
                 attacks=server_attacks, base_model=base, tokenizer=sgt.tokenizer, data_format=cfg.data.format,
                 attacker_transform=None if attacker is None else sgt_transform(attacker),
                 attacker_train=attacker_train, inverters=ctx.inverters, steps=ctx.steps,
                 batch_size=ctx.batch_size, ceiling=ctx.ceiling, on_step=ctx.on_step)
    if attacker is not None:
        out["transfer_sgt"] = {"path": str(attacker.directory), "train_prompts": len(attacker_train),
                               "overlap_with_victim_training_prompts": overlap}
    return out


def _transfer_artifact(path) -> Path:
    try:
        return resolve_sgt_path(path)[0]
    except SGTError:
        raise DataError(f"--transfer-sgt {str(path)!r} is neither an SGT artifact nor a run directory with one; "
                        "pass the server's own SGT, or leave the flag out to train it.") from None


def strongest_leakage(sections: Mapping[str, Any]) -> Optional[dict]:
    """The largest leakage figure of the report: learned attackers' Barber–Agakov bounds (what an attacker
    actually extracts) and the white box's exact-channel figure (which errs high), with where it comes from."""
    figures = []
    for threat, sec in sections.items():
        if sec.get("leakage"):
            figures.append({**sec["leakage"], "attack": f"{threat}/{sec['leakage']['attack']}"})
        if sec.get("exact_channel"):
            figures.append({**sec["exact_channel"], "attack": f"{threat}/exact_channel"})
    return max(figures, key=lambda f: f["bits"]) if figures else None


def _publish(report, out_path: Path, run_dir, step: int, print_table: bool) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    scalars = report_scalars(report)
    with tracking.Tracker(run_dir or out_path.parent, tensorboard=True) as tracker:
        tracker.scalars(step, {f"attack/{k}": v for k, v in scalars.items()})
    if print_table:
        print(tracking.summary_table({**scalars, **threat_model_lines(report), "report": str(out_path)},
                                     title="SGT attacks (recovery %, leakage bits per noised token)"), flush=True)


def report_scalars(report: dict) -> dict[str, float]:
    """Flat ``name: value`` of the headline numbers of an attack report (table and TensorBoard)."""
    out: dict[str, float] = {"majority_baseline/top1": report["majority_baseline"]["top1"]}
    for threat, sec in report["threat_models"].items():
        out[f"{threat}/recovery_top1"] = sec["recovery_top1"]
        for name, res in sec["attacks"].items():
            out[f"{threat}/{name}/top1"] = res["top1"]
            if "clean" in res:
                out[f"{threat}/{name}/clean_top1"] = res["clean"]["top1"]
            if res.get("leakage"):
                out[f"{threat}/{name}/leakage_bits"] = res["leakage"]["bits"]
        if sec.get("exact_channel"):
            out[f"{threat}/exact_channel_bits"] = sec["exact_channel"]["bits"]
    if report.get("leakage"):
        out["leakage_bits"], out["leakage_stderr_bits"] = report["leakage"]["bits"], report["leakage"]["stderr_bits"]
        out["token_entropy_bits"] = report["leakage"]["entropy_bits"]
    return out


_NAMES = {"nn_cosine": "nearest neighbour (cosine)", "nn_l2": "nearest neighbour (L2)", "mlp": "learned MLP",
          "transformer": "learned transformer", "transfer_mlp": "transfer MLP", "transfer_transformer":
          "transfer transformer", "reader": "base model as reader", "lm_prior": "LM-prior decoding"}


def _attack_phrase(name: str, res: Mapping[str, Any]) -> str:
    unit = " of words" if res.get("unit") == "word" else ""
    text = f"{_NAMES.get(name, name)} {res['top1']:.1f}%{unit}"
    if res.get("language_model_alone"):
        text += f" (the language model alone {res['language_model_alone']['top1']:.1f}%)"
    return text


def threat_model_lines(report: Mapping[str, Any]) -> dict[str, str]:
    """One line per threat model: every attack's recovery of noised tokens, strongest first, and the
    leakage bound where there is one."""
    lines = {}
    for threat, sec in report["threat_models"].items():
        attacks = sorted(sec["attacks"].items(), key=lambda item: -item[1]["top1"])
        text = ", ".join(_attack_phrase(name, res) for name, res in attacks)
        if sec.get("leakage"):
            leak = sec["leakage"]
            text += (f"; leakage >= {leak['bits']:.2f} ± {leak['stderr_bits']:.2f} of {leak['entropy_bits']:.2f} "
                     "bits per token")
        if threat == "server" and "transfer_mlp" not in sec["attacks"] and "transfer_transformer" not in sec["attacks"]:
            text += "; transfer attack not run (python -m sgt_jax.attack --threat-model server)"
        lines[f"privacy ({threat})"] = text
    return lines


def quick_attack_summary(sgt_path, *, steps: int = 300, eval_data: Optional[str] = None,
                         overrides: Sequence[str] = (), seed: int = 0) -> dict[str, Any]:
    """Every threat model with quick settings: lookup, the white box's ``mlp`` inverter (``steps`` Adam steps,
    no ceiling) and the server's reader and LM-prior decoding (its transfer attack needs a second SGT:
    ``python -m sgt_jax.attack``). The privacy lines of the training summary and of ``sgt_jax.evaluate``."""
    report = attack(sgt_path, attacks=("mlp",), server_attacks=("reader", "lm_prior"), steps=steps, ceiling=False,
                    exact_positions=0, seed=seed, eval_data=eval_data, max_eval=128, max_train=1024,
                    overrides=overrides, progress=False, print_table=False, out=str(_quick_report_path(sgt_path)))
    sections = report["threat_models"]
    out: dict[str, Any] = {f"recovery_{t.replace('-', '_')}": sec["recovery_top1"] for t, sec in sections.items()}
    out["majority_baseline_top1"] = report["majority_baseline"]["top1"]
    if report.get("leakage"):  # the largest learned attacker's Barber–Agakov bound (no exact-channel figure here)
        out["learned_leakage_bits"] = report["leakage"]["bits"]
    out.update(threat_model_lines(report))
    return out


def summary_attack_lines(sgt_path, *, steps: int, **kwargs) -> dict[str, Any]:
    """:func:`quick_attack_summary` for a summary that must not fail after a long run: a user-caused problem
    (e.g. no validation split to attack) becomes a logged warning and an ``attack`` line saying why."""
    start = time.perf_counter()
    try:
        lines = quick_attack_summary(sgt_path, steps=steps, **kwargs)
        log.info("quick attacks (%d mlp steps): %.1f s", steps, time.perf_counter() - start)
        return lines
    except SGTError as exc:
        log.warning("attacks skipped: %s", exc)
        return {"attack": f"skipped: {exc}"}


def _quick_report_path(sgt_path) -> Path:
    artifact_dir, run_dir = resolve_sgt_path(sgt_path)
    return (run_dir or artifact_dir) / "attack_quick.json"
