"""One training run, start to finish: build (trainer, checkpointer, tracker, data), loop, save (final
checkpoint, SGT artifact, end-of-run summary). ``python -m sgt_jax.train`` is its command line."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax

from sgt_jax import tracking
from sgt_jax.config import SGTConfig
from sgt_jax.evaluation.attack import summary_attack_lines, summary_verdict
from sgt_jax.training import checkpoint as ckpt_lib
from sgt_jax.training import loop, parallel
from sgt_jax.training.trainer import Trainer

log = logging.getLogger("sgt_jax.train")


def train(
    cfg: SGTConfig,
    *,
    clock: Optional[Callable[[], float]] = None,
    on_step: Optional[Callable[[int, Any], None]] = None,
) -> dict[str, Any]:
    """Run (or resume) training to the end; returns the end-of-run summary.

    ``clock``: the wall clock of the time-based checkpoint and validation intervals (injectable for tests;
    default ``time.monotonic``).
    ``on_step(step, state)``: called after each step's checkpoint decision (notebooks, tests, custom logging).
    """
    parallel.maybe_initialize_distributed(cfg.mesh)
    clock = time.monotonic if clock is None else clock
    trainer = Trainer(cfg)
    checkpointer = ckpt_lib.Checkpointer.from_config(cfg.checkpoint, Path(cfg.tracking.run_dir), clock=clock)
    tracker = tracking.Tracker.from_config(cfg.tracking, trainer.saved_config)
    data_iter = iter(trainer.train_data)
    state, data_state = _init_or_resume(trainer, checkpointer, data_iter)
    bar = tracking.ProgressBar.from_config(cfg.tracking, trainer.total_steps, initial=int(state.step))
    before = trainer.validate(state, step=0, tracker=tracker, label="before") if int(state.step) == 0 else None

    with _preemption_guard(cfg) as guard:
        schedule = loop.training_schedule(trainer, checkpointer=checkpointer, tracker=tracker, guard=guard, bar=bar,
                                          clock=clock, on_step=on_step)
        result = loop.run(trainer, state, data_iter, data_state, schedule=schedule, tracker=tracker)
    log.info("training stopped (%s) at step %d", result.stopped_by, int(result.state.step))
    bar.close()

    _final_checkpoint(checkpointer, trainer, result)
    summary: dict[str, Any] = {"stopped_by": result.stopped_by, "steps": int(result.state.step)}
    if result.stopped_by == "finished":
        summary.update(_finish(trainer, result, before, tracker))
    data_iter.close()
    tracker.close()
    return _report(summary)


def _init_or_resume(trainer: Trainer, checkpointer, data_iter):
    """(state, data position): the latest complete checkpoint's when checkpoint.resume and one exists."""
    state = trainer.init_state()
    if not (trainer.cfg.checkpoint.resume and checkpointer.latest_step() is not None):
        return state, data_iter.get_state()
    state, data_state = trainer.restore(checkpointer, state)
    data_iter.set_state(data_state)
    log.info("resumed from step %d in %s", int(state.step), checkpointer.directory)
    return state, data_state


def _preemption_guard(cfg: SGTConfig) -> ckpt_lib.PreemptionGuard:
    return ckpt_lib.PreemptionGuard(ckpt_lib.PreemptionGuard.SIGNALS if cfg.checkpoint.save_on_preemption else ())


def _final_checkpoint(checkpointer, trainer: Trainer, result: loop.LoopResult) -> None:
    """The state the loop stopped at, unless its losses went non-finite (the last good checkpoint stays the
    latest); forced after a preemption so the resumed run starts exactly there."""
    if result.stopped_by != "non-finite":
        checkpointer.save(int(result.state.step), result.state, data_state=result.data_state,
                          config=trainer.saved_config, force=result.stopped_by == "preempted")
    checkpointer.wait()
    checkpointer.close()


def _finish(trainer: Trainer, result: loop.LoopResult, before, tracker) -> dict[str, Any]:
    """A finished run's last validation, artifact and privacy–utility summary (with the learned attack)."""
    after = trainer.validate(result.state, step=int(result.state.step), tracker=tracker, label="after")
    artifact_dir = trainer.save_artifact(result.state)
    summary = trainer.summarize(before, after)
    summary.update({f"{k} (step 0)": v for k, v in result.first_grad_norms.items()})
    summary["artifact"] = str(artifact_dir)
    attack_steps = trainer.cfg.validation.attack_steps
    if attack_steps and jax.process_index() == 0:
        summary.update(summary_attack_lines(artifact_dir, steps=attack_steps))
    return summary


def _report(summary: dict[str, Any]) -> dict[str, Any]:
    verdict = summary_verdict(summary)  # says plainly when a learned attacker recovers the tokens
    if verdict:
        summary["privacy"] = verdict
    if jax.process_index() == 0:
        print(tracking.summary_table(summary, title="SGT training summary"), flush=True)
    return summary
