"""The training loop: one step after another, with its periodic work (logging, histograms, validation,
checkpoints) and its stops (preemption, non-finite losses, end of the data) decided once for all hosts.

Every control decision that could differ between hosts goes into one :func:`sgt_jax.training.parallel.agree` call
per step (a collective OR), so N hosts take the same branch at the same step: none enters a validation or
an Orbax save the others skip, and none stops while the others wait in the next step's collectives.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from sgt_jax.training import parallel
from sgt_jax.training.grad_balance import log_first_gradient_norms

log = logging.getLogger("sgt_jax.train")

# Test-only: "SCALE,OFFSET" makes the CLI's wall clock OFFSET + SCALE * time.monotonic(), so that the
# processes of a multi-process test have clocks that disagree. Never set it in a real run.
TEST_CLOCK_ENV = "SGT_TEST_CLOCK"


def clock_from_env(environ=None) -> Callable[[], float]:
    """``time.monotonic``, or the skewed test clock that :data:`TEST_CLOCK_ENV` describes (tests only)."""
    spec = (os.environ if environ is None else environ).get(TEST_CLOCK_ENV)
    if not spec:
        return time.monotonic
    scale, offset = (float(x) for x in spec.split(","))
    return lambda: offset + scale * time.monotonic()


class Cadence:
    """Due every ``every_steps`` steps, or once ``every_minutes`` of ``clock`` passed since the last
    :meth:`reset` (or construction). This is one host's view: agree it before acting on it."""

    def __init__(self, every_steps: Optional[int], every_minutes: Optional[float], clock: Callable[[], float]):
        self.every_steps, self.every_minutes, self._clock = every_steps, every_minutes, clock
        self._last = clock()

    def due(self, step: int) -> bool:
        by_steps = self.every_steps is not None and step % self.every_steps == 0
        by_time = self.every_minutes is not None and self._clock() - self._last >= 60.0 * self.every_minutes
        return bool(by_steps or by_time)

    def reset(self) -> None:
        self._last = self._clock()


@dataclasses.dataclass(frozen=True)
class Decisions:
    """What the loop does after a step; identical on every process."""

    validate: bool = False
    save: bool = False
    preempted: bool = False
    nonfinite: bool = False
    exhausted: bool = False


def decide(step: int, *, validation: Optional[Cadence], checkpointer, guard, nonfinite: bool,
           exhausted: bool) -> Decisions:
    """This host's answers to every question of the step, agreed over all hosts in one collective."""
    local = {
        "validate": validation is not None and validation.due(step),
        "save": checkpointer.save_due(step),
        "preempted": guard.stop_requested(step),
        "nonfinite": nonfinite,
        "exhausted": exhausted,
    }
    return Decisions(**parallel.agree(local))


class StepLogger:
    """Training scalars every ``tracking.log_every_steps`` (and at the last step), with tokens/s and step
    time over the window since the last log; the progress bar every step; head histograms on their cadence."""

    def __init__(self, cfg, tracker, bar, weight_histograms: Callable[[Any], dict], total: int):
        self.cfg, self.tracker, self.bar, self.total = cfg.tracking, tracker, bar, total
        self._weight_histograms = weight_histograms
        self._tokens, self._window_start = 0.0, time.perf_counter()

    def __call__(self, step: int, state, metrics, host_batch) -> None:
        self._tokens += float(host_batch["attention_mask"].sum()) * jax.process_count()
        if step % self.cfg.log_every_steps == 0 or step == self.total:
            metrics = jax.device_get(metrics)
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            scalars = {f"train/{k}": float(v) for k, v in metrics.items() if np.ndim(v) == 0}
            scalars["train/tokens_per_s"] = self._tokens / elapsed
            scalars["train/step_time_s"] = elapsed / self.cfg.log_every_steps
            self.tracker.scalars(step, scalars)
            self.bar.update(step, tokens_per_s=scalars["train/tokens_per_s"], loss=float(metrics["loss"]))
            self._tokens, self._window_start = 0.0, time.perf_counter()
        else:
            self.bar.update(step)
        if step % self.cfg.histogram_every_steps == 0:
            self.tracker.histograms(step, self._weight_histograms(state))


@dataclasses.dataclass
class LoopResult:
    state: Any
    stopped_by: str  # finished | preempted | non-finite
    data_state: Any  # the data iterator's position after the last trained batch
    first_grad_norms: dict = dataclasses.field(default_factory=dict)  # per objective term, at step 0


def log_global_batch(cfg) -> None:
    micro, accum = int(cfg.data.batch_size), int(cfg.optimizer.grad_accum_steps)
    log.info("global batch per optimizer step: %d examples (data.batch_size=%d x optimizer.grad_accum_steps=%d), "
             "%d per process on %d processes", micro * accum, micro, accum, micro * accum // jax.process_count(),
             jax.process_count())


def run(trainer, state, data_iter, data_state, *, checkpointer, tracker, guard, bar,
        clock: Callable[[], float], on_step=None) -> LoopResult:
    """Train from ``state`` to ``trainer.total_steps`` (or an agreed stop). ``data_state``: the iterator's
    position now (saved with a checkpoint of this very state)."""
    cfg = trainer.cfg
    step, total = int(state.step), trainer.total_steps
    validation = (Cadence(cfg.validation.every_steps, cfg.validation.every_minutes, clock)
                  if trainer.val_data is not None else None)
    step_log = StepLogger(cfg, tracker, bar, trainer.weight_histograms, total)
    log_global_batch(cfg)
    log.info("training from step %d to step %d", step, total)
    batch = next(data_iter, None) if step < total else None
    if parallel.agree({"exhausted": batch is None})["exhausted"]:
        return LoopResult(state, "finished", data_state)
    previous_streak = None
    first_grad_norms = {}
    if step == 0:  # before the first update: does one objective term swamp the others' gradients?
        first_grad_norms = log_first_gradient_norms(trainer, state, batch, tracker)
    while True:
        state, metrics = trainer.train_step(state, batch)
        step += 1
        data_state = data_iter.get_state()
        trained, batch = batch, (next(data_iter, None) if step < total else None)  # overlaps the running step
        step_log(step, state, metrics, trained)
        # The previous step's streak is ready by now: reading it costs no pipeline stall.
        streak = 0 if previous_streak is None else int(previous_streak)
        previous_streak = metrics["nonfinite_streak"]
        d = decide(step, validation=validation, checkpointer=checkpointer, guard=guard,
                   nonfinite=streak >= cfg.train.max_nonfinite_steps, exhausted=batch is None)
        if d.nonfinite:
            log.error("%d non-finite steps in a row (train.max_nonfinite_steps): stopping without saving over "
                      "the last good checkpoint; lower optimizer.learning_rate or check the data", streak)
            return LoopResult(state, "non-finite", data_state, first_grad_norms)
        if d.validate:
            log.info("validation at step %d", step)
            trainer.validate(state, step=step, tracker=tracker)
            validation.reset()
        if d.preempted:
            return LoopResult(state, "preempted", data_state, first_grad_norms)
        if d.save:
            checkpointer.save(step, state, data_state=data_state, config=trainer.saved_config)
        if on_step is not None:
            on_step(step, state)
        if d.exhausted:
            return LoopResult(state, "finished", data_state, first_grad_norms)
