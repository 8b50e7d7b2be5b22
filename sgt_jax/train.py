"""``python -m sgt_jax.train [--config configs/X.yaml] [key=value ...]``: train a Stained Glass Transform.

Build (config → mesh → frozen base model → data → cloak + optimizer → checkpoints), loop (train step,
validation, checkpoints, tracking), save (final checkpoint, SGT artifact, summary). Details live in the
modules; this file should read like a table of contents.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from sgt_jax import config as config_lib
from sgt_jax.config import SGTConfig

log = logging.getLogger("sgt_jax.train")

# The run `python -m sgt_jax.train` does with no --config: the embedded tiny model and synthetic corpus.
# Shipped inside the package so it works from an installed wheel; configs/tiny.yaml links to it.
DEFAULT_CONFIG = Path(__file__).parent / "assets" / "tiny.yaml"


def parse_args(argv: Optional[Sequence[str]] = None) -> SGTConfig:
    parser = argparse.ArgumentParser(
        prog="python -m sgt_jax.train",
        description="Train a Stained Glass Transform for a frozen decoder LLM. With no arguments: the embedded "
        "tiny model and synthetic corpus (configs/tiny.yaml defaults).",
    )
    parser.add_argument("--config", help="YAML file (e.g. configs/llama2_7b.yaml) over the schema defaults; "
                        f"default: the embedded tiny run ({DEFAULT_CONFIG.name}, also configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.learning_rate=1e-4")
    args = parser.parse_args(argv)
    return config_lib.load_config(args.config or DEFAULT_CONFIG, args.overrides)


def train(
    cfg: SGTConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    on_step: Optional[Callable[[int, Any], None]] = None,
) -> dict[str, Any]:
    """Run (or resume) training to the end; returns the end-of-run summary.

    ``clock``: the wall clock of the time-based checkpoint and validation intervals (injectable for tests).
    ``on_step(step, state)``: called after each step's checkpoint decision (notebooks, tests, custom logging).
    """
    from sgt_jax import checkpoint as ckpt_lib
    from sgt_jax import parallel, tracking
    from sgt_jax.trainer import Trainer

    parallel.maybe_initialize_distributed(cfg.mesh)
    trainer = Trainer(cfg)
    run_dir = Path(cfg.tracking.run_dir)
    checkpointer = ckpt_lib.Checkpointer.from_config(cfg.checkpoint, run_dir, clock=clock)
    tracker = tracking.Tracker.from_config(cfg.tracking, trainer.saved_config)
    data_iter = iter(trainer.train_data)

    state = trainer.init_state()
    if cfg.checkpoint.resume and checkpointer.latest_step() is not None:
        state, data_state = trainer.restore(checkpointer, state)
        data_iter.set_state(data_state)
        log.info("resumed from step %d in %s", int(state.step), checkpointer.directory)

    start_step = int(state.step)
    total = trainer.total_steps
    bar = tracking.ProgressBar.from_config(cfg.tracking, total, initial=start_step)
    before = trainer.validate(state, step=start_step, tracker=tracker, label="before") if start_step == 0 else None
    last_validation = clock()
    stopped_by = "finished"
    metrics = {}
    previous_streak = None
    tokens_seen, window_start = 0.0, time.perf_counter()

    guard_signals = ckpt_lib.PreemptionGuard.SIGNALS if cfg.checkpoint.save_on_preemption else ()
    with ckpt_lib.PreemptionGuard(guard_signals) as guard:
        step = start_step
        while step < total:
            try:
                host_batch = next(data_iter)
            except StopIteration:
                break
            state, metrics = trainer.train_step(state, host_batch)
            step += 1
            tokens_seen += float(host_batch["attention_mask"].sum()) * jax.process_count()
            # The previous step's streak is ready by now: checking it every step costs no pipeline stall.
            if previous_streak is not None and int(previous_streak) >= cfg.train.max_nonfinite_steps:
                log.error("%d non-finite steps in a row (train.max_nonfinite_steps): stopping without saving over "
                          "the last good checkpoint; lower optimizer.learning_rate or check the data",
                          int(previous_streak))
                stopped_by = "non-finite"
                break
            previous_streak = metrics["nonfinite_streak"]

            if step % cfg.tracking.log_every_steps == 0 or step == total:
                metrics = jax.device_get(metrics)
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                scalars = {f"train/{k}": float(v) for k, v in metrics.items() if np.ndim(v) == 0}
                scalars["train/tokens_per_s"] = tokens_seen / elapsed
                scalars["train/step_time_s"] = elapsed / cfg.tracking.log_every_steps
                tracker.scalars(step, scalars)
                bar.update(step, tokens_per_s=scalars["train/tokens_per_s"], loss=float(metrics["loss"]))
                tokens_seen, window_start = 0.0, time.perf_counter()
            else:
                bar.update(step)
            if step % cfg.tracking.histogram_every_steps == 0:
                tracker.histograms(step, trainer.weight_histograms(state))

            if trainer.validation_due(step, clock() - last_validation):
                trainer.validate(state, step=step, tracker=tracker)
                last_validation = clock()
            if guard.should_stop(step):
                stopped_by = "preempted"
                break
            if checkpointer.should_save(step):
                checkpointer.save(step, state, data_state=data_iter.get_state(),
                                  config=trainer.saved_config)
            if on_step is not None:
                on_step(step, state)

    bar.close()
    if stopped_by != "non-finite":
        checkpointer.save(int(state.step), state, data_state=data_iter.get_state(),
                          config=trainer.saved_config, force=stopped_by == "preempted")
    checkpointer.wait()
    checkpointer.close()
    summary: dict[str, Any] = {"stopped_by": stopped_by, "steps": int(state.step)}
    if stopped_by == "finished":
        after = trainer.validate(state, step=int(state.step), tracker=tracker, label="after")
        artifact_dir = trainer.save_artifact(state)
        summary.update(trainer.summarize(before, after))
        summary["artifact"] = str(artifact_dir)
        if cfg.validation.attack_steps and jax.process_index() == 0:
            from sgt_jax.attack import summary_attack_lines

            summary.update(summary_attack_lines(artifact_dir, steps=cfg.validation.attack_steps))
    data_iter.close()
    tracker.close()
    from sgt_jax.privacy_sweep import summary_verdict

    verdict = summary_verdict(summary)  # says plainly when a learned attacker recovers the tokens
    if verdict:
        summary["privacy"] = verdict
    if jax.process_index() == 0:
        print(tracking.summary_table(summary, title="SGT training summary"), flush=True)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sgt_jax.errors import run_cli

    return run_cli(lambda: train(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
