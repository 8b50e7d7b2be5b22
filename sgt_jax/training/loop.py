"""The training loop: one step after another, then the step's periodic work and its stops, each registered
on a :class:`Schedule` with its cadence (:func:`training_schedule` lists them in the order they run).

On several hosts every entry's "is it due?" goes into one :func:`sgt_jax.training.parallel.agree` call per
step (a collective OR), so N hosts take the same branch at the same step: none enters a validation or an
Orbax save the others skip, and none stops while the others wait in the next step's collectives.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Optional, Union

import jax
import numpy as np

from sgt_jax.training import parallel
from sgt_jax.training.grad_balance import log_first_gradient_norms

log = logging.getLogger("sgt_jax.train")

class Cadence:
    """Due every ``every_steps`` steps (and at ``final_step``), or once ``every_minutes`` of ``clock`` passed
    since the last :meth:`reset` (or construction). This is one host's view: agree it before acting on it."""

    def __init__(self, every_steps: Optional[int] = None, every_minutes: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, *, final_step: Optional[int] = None):
        self.every_steps, self.every_minutes, self.final_step, self._clock = every_steps, every_minutes, final_step, clock
        self._last = clock()

    def due(self, step: int) -> bool:
        by_steps = bool(self.every_steps) and step % self.every_steps == 0
        by_time = self.every_minutes is not None and self._clock() - self._last >= 60.0 * self.every_minutes
        return bool(by_steps or by_time or step == self.final_step)

    def reset(self) -> None:
        self._last = self._clock()


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What the schedule's hooks and stop conditions see after a step."""

    step: int  # the step count after the update
    state: Any
    metrics: Any  # the step's metrics (device arrays: reading them waits for the step)
    batch: Mapping[str, np.ndarray]  # this host's share of the batch the step trained on
    data_state: Any  # the data iterator's position after that batch (saved with this state)
    nonfinite_streak: int = 0  # of the step before: reading this step's would stall the pipeline
    exhausted: bool = False  # no batch left for another step


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    due: Callable[[StepInfo], bool]
    action: Optional[Callable[[StepInfo], None]]
    fired: Callable[[], None]
    stops: bool


class Schedule:
    """The work after each step, in registration order: hooks (:meth:`add`) run when due; stops
    (:meth:`stop_when`) end the loop. Each entry's local answer is agreed over all hosts in one collective
    (true everywhere when true anywhere), so every host runs the same hooks and stops at the same step.

    ``agree``: that collective, :func:`sgt_jax.training.parallel.agree` (tests may simulate hosts with another).
    """

    def __init__(self, agree: Callable[[Mapping[str, bool]], Mapping[str, bool]] = parallel.agree) -> None:
        self._entries: list[_Entry] = []
        self._agree = agree

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self._entries]

    def _register(self, entry: _Entry) -> None:
        if entry.name in self.names:
            raise ValueError(f"a schedule entry named {entry.name!r} is already registered")
        self._entries.append(entry)

    def add(self, name: str, hook: Callable[[StepInfo], None], *, every: Union[int, Cadence, None] = None,
            when: Optional[Callable[[StepInfo], bool]] = None) -> None:
        """Run ``hook(info)`` when ``every`` (a step count or a :class:`Cadence`, whose time interval restarts
        once the hook ran) is due, or when ``when(info)`` holds (a policy kept elsewhere, e.g. the
        checkpointer's)."""
        if (every is None) == (when is None):
            raise ValueError(f"schedule entry {name!r}: give exactly one of every= and when=")
        cadence = Cadence(every_steps=every) if isinstance(every, int) else every
        due = when if cadence is None else (lambda info: cadence.due(info.step))
        fired = (lambda: None) if cadence is None else cadence.reset
        self._register(_Entry(name, due, hook, fired, stops=False))

    def stop_when(self, name: str, condition: Callable[[StepInfo], bool], *,
                  then: Optional[Callable[[StepInfo], None]] = None) -> None:
        """End the loop with ``stopped_by=name`` when ``condition(info)`` holds on any host (``then(info)``
        first). ``condition`` is called on every host at every step, whatever comes before it."""
        self._register(_Entry(name, condition, then, lambda: None, stops=True))

    def decide(self, info: StepInfo) -> dict[str, bool]:
        """Every entry's answer for this step, the same on every host."""
        return dict(self._agree({entry.name: bool(entry.due(info)) for entry in self._entries}))

    def after_step(self, info: StepInfo) -> Optional[str]:
        """Run the due hooks in order up to the first due stop; returns that stop's name (None: go on)."""
        due = self.decide(info)
        for entry in self._entries:
            if not due[entry.name]:
                continue
            if entry.action is not None:
                entry.action(info)
            entry.fired()
            if entry.stops:
                return entry.name
        return None


class MetricsLog:
    """Training scalars with tokens/s and step time over the window since the last write; the progress bar."""

    def __init__(self, tracker, bar):
        self.tracker, self.bar = tracker, bar
        self._tokens, self._steps, self._window_start = 0.0, 0, time.perf_counter()

    def count(self, info: StepInfo) -> None:
        """Every step: the tokens of the global batch (this host's share times the hosts) and the bar."""
        self._tokens += float(info.batch["attention_mask"].sum()) * jax.process_count()
        self._steps += 1
        self.bar.update(info.step)

    def write(self, info: StepInfo) -> None:
        metrics = jax.device_get(info.metrics)
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        scalars = {f"train/{k}": float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        scalars["train/tokens_per_s"] = self._tokens / elapsed
        scalars["train/step_time_s"] = elapsed / max(self._steps, 1)
        self.tracker.scalars(info.step, scalars)
        self.bar.update(info.step, tokens_per_s=scalars["train/tokens_per_s"], loss=float(metrics["loss"]))
        self._tokens, self._steps, self._window_start = 0.0, 0, time.perf_counter()


def training_schedule(trainer, *, checkpointer, tracker, guard, bar, clock: Callable[[], float],
                      on_step: Optional[Callable[[int, Any], None]] = None) -> Schedule:
    """A training run's work after each step and its stops, in the order they run."""
    cfg = trainer.cfg
    metrics_log = MetricsLog(tracker, bar)
    schedule = Schedule()
    schedule.add("progress", metrics_log.count, every=1)
    schedule.add("log", metrics_log.write, every=Cadence(cfg.tracking.log_every_steps, final_step=trainer.total_steps))
    schedule.add("histograms", lambda i: tracker.histograms(i.step, trainer.weight_histograms(i.state)),
                 every=cfg.tracking.histogram_every_steps)
    schedule.stop_when("non-finite", lambda i: i.nonfinite_streak >= cfg.train.max_nonfinite_steps,
                       then=_report_nonfinite)
    if trainer.val_data is not None:
        v = cfg.validation
        schedule.add("validate", lambda i: _validate(trainer, tracker, i),
                     every=Cadence(v.every_steps, v.every_minutes, clock))
    schedule.stop_when("preempted", lambda i: guard.stop_requested(i.step))  # saved by the caller, forced
    schedule.add("save", lambda i: checkpointer.save(i.step, i.state, data_state=i.data_state,
                                                     config=trainer.saved_config),
                 when=lambda i: checkpointer.save_due(i.step))
    if on_step is not None:
        schedule.add("on_step", lambda i: on_step(i.step, i.state), every=1)
    schedule.stop_when("finished", lambda i: i.exhausted)
    return schedule


def _validate(trainer, tracker, info: StepInfo) -> None:
    log.info("validation at step %d", info.step)
    trainer.validate(info.state, step=info.step, tracker=tracker)


def _report_nonfinite(info: StepInfo) -> None:
    log.error("%d non-finite steps in a row (train.max_nonfinite_steps): stopping without saving over the last "
              "good checkpoint; lower optimizer.learning_rate or check the data", info.nonfinite_streak)


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


def run(trainer, state, data_iter, data_state, *, schedule: Schedule, tracker) -> LoopResult:
    """Train from ``state`` to ``trainer.total_steps`` (or a stop of ``schedule``). ``data_state``: the
    iterator's position now (saved with a checkpoint of this very state)."""
    step, total = int(state.step), trainer.total_steps
    log_global_batch(trainer.cfg)
    log.info("training from step %d to step %d", step, total)
    batch = next(data_iter, None) if step < total else None
    if parallel.agree({"exhausted": batch is None})["exhausted"]:
        return LoopResult(state, "finished", data_state)
    # Before the first update: does one objective term swamp the others' gradients?
    first_grad_norms = log_first_gradient_norms(trainer, state, batch, tracker) if step == 0 else {}
    previous_streak = None
    while True:
        state, metrics = trainer.train_step(state, batch)
        step += 1
        data_state = data_iter.get_state()
        trained, batch = batch, (next(data_iter, None) if step < total else None)  # overlaps the running step
        # The previous step's streak is ready by now: reading it costs no pipeline stall.
        streak = 0 if previous_streak is None else int(previous_streak)
        previous_streak = metrics["nonfinite_streak"]
        stopped_by = schedule.after_step(StepInfo(step, state, metrics, trained, data_state,
                                                  nonfinite_streak=streak, exhausted=batch is None))
        if stopped_by is not None:
            return LoopResult(state, stopped_by, data_state, first_grad_norms)
