"""One training run, start to finish: build (trainer, checkpointer, tracker, data), loop, save (final
checkpoint, SGT artifact, end-of-run summary). ``python -m sgt_jax.train`` is its command line."""

from __future__ import annotations

import logging
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
    default ``time.monotonic``, or the test-only skewed clock of ``sgt_jax.training.loop.TEST_CLOCK_ENV``).
    ``on_step(step, state)``: called after each step's checkpoint decision (notebooks, tests, custom logging).
    """
    parallel.maybe_initialize_distributed(cfg.mesh)
    clock = loop.clock_from_env() if clock is None else clock
    trainer = Trainer(cfg)
    run_dir = Path(cfg.tracking.run_dir)
    checkpointer = ckpt_lib.Checkpointer.from_config(cfg.checkpoint, run_dir, clock=clock)
    tracker = tracking.Tracker.from_config(cfg.tracking, trainer.saved_config)
    data_iter = iter(trainer.train_data)
    data_state = data_iter.get_state()

    state = trainer.init_state()
    if cfg.checkpoint.resume and checkpointer.latest_step() is not None:
        state, data_state = trainer.restore(checkpointer, state)
        data_iter.set_state(data_state)
        log.info("resumed from step %d in %s", int(state.step), checkpointer.directory)

    start_step = int(state.step)
    bar = tracking.ProgressBar.from_config(cfg.tracking, trainer.total_steps, initial=start_step)
    before = trainer.validate(state, step=start_step, tracker=tracker, label="before") if start_step == 0 else None
    guard_signals = ckpt_lib.PreemptionGuard.SIGNALS if cfg.checkpoint.save_on_preemption else ()
    with ckpt_lib.PreemptionGuard(guard_signals) as guard:
        result = loop.run(trainer, state, data_iter, data_state, checkpointer=checkpointer, tracker=tracker,
                          guard=guard, bar=bar, clock=clock, on_step=on_step)
    state, stopped_by = result.state, result.stopped_by
    log.info("training stopped (%s) at step %d", stopped_by, int(state.step))

    bar.close()
    if stopped_by != "non-finite":
        checkpointer.save(int(state.step), state, data_state=result.data_state,
                          config=trainer.saved_config, force=stopped_by == "preempted")
    checkpointer.wait()
    checkpointer.close()
    summary: dict[str, Any] = {"stopped_by": stopped_by, "steps": int(state.step)}
    if stopped_by == "finished":
        after = trainer.validate(state, step=int(state.step), tracker=tracker, label="after")
        artifact_dir = trainer.save_artifact(state)
        summary.update(trainer.summarize(before, after))
        summary.update({f"{k} (step 0)": v for k, v in result.first_grad_norms.items()})
        summary["artifact"] = str(artifact_dir)
        if cfg.validation.attack_steps and jax.process_index() == 0:
            summary.update(summary_attack_lines(artifact_dir, steps=cfg.validation.attack_steps))
    data_iter.close()
    tracker.close()
    verdict = summary_verdict(summary)  # says plainly when a learned attacker recovers the tokens
    if verdict:
        summary["privacy"] = verdict
    if jax.process_index() == 0:
        print(tracking.summary_table(summary, title="SGT training summary"), flush=True)
    return summary
