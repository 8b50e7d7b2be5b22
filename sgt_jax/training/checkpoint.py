"""Orbax checkpoints of the train state: when to save, resume, compatibility, preemption.

A checkpoint step directory holds three Orbax items:

* ``state``      — the train state pytree (cloak params, optimizer state, step, run key data), restored onto
                   the shardings the caller asks for.
* ``data_state`` — the data iterator's position (JSON).
* ``config``     — the run configuration dict (JSON), checked by :func:`check_compatible` on resume.

The base model is referenced by the config (``model.path``), never saved.

When to save is Orbax's ``save_decision_policy``: every ``every_steps`` steps (``FixedIntervalPolicy``), at
JAX's preemption sync point (``PreemptionCheckpointingPolicy``), and ``every_minutes`` after the previous save
(``ContinuousCheckpointingPolicy``: the primary host makes the time decision and broadcasts it, so hosts whose
clocks disagree still take the same branch). Every process calls :meth:`Checkpointer.save_due` at the same
steps, and :meth:`~Checkpointer.save` / :meth:`~Checkpointer.restore` (Orbax saves are collective). Paths must
be on a file system all hosts share (e.g. GCS).

Completeness is Orbax's too: a step is written under a temporary name and renamed (on object stores: given a
``commit_success.txt``) once every item is on disk; only finalized steps are listed or restored.

Kept here, as Orbax has no equivalent: the check that a resumed run has the saved run's structure
(:func:`check_compatible`), a time interval counted from the last save or restore (:class:`_ClockedInterval`),
and SIGTERM/SIGINT turned into a stop that every host agrees on (:class:`PreemptionGuard`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from sgt_jax.errors import SGTError

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "PreemptionGuard",
    "check_compatible",
    "STRUCTURAL_SETTINGS",
]

logger = logging.getLogger(__name__)

# Settings that define what the saved parameters *are*: changing them between runs sharing a checkpoint
# directory would restore parameters that do not fit (or do not mean the same thing). Everything else
# (learning rate, schedule lengths, max_steps, tracking, validation, checkpoint intervals, data, ...)
# may change on resume.
STRUCTURAL_SETTINGS = (
    "model.path",
    "model.truncate_at_layer",
    "cloak.config_path",
    "cloak.transformer_type",
    "cloak.estimator_kwargs",
    "cloak.mean_num_experts",
    "cloak.std_num_experts",
    "cloak.directly_learn_stds",
    "cloak.scale",
    "cloak.shallow",
    "cloak.use_causal_mask",
    "cloak.percent_to_mask",
)
# Optional top-level key a caller may store (e.g. a hash of the base model's config + weights index).
FINGERPRINT_KEY = "base_model_fingerprint"


class CheckpointError(SGTError):
    """A checkpoint problem the user can fix (incompatible run directory, nothing to restore)."""


# -- Compatibility ---------------------------------------------------------------------------------


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _canonical(value: Any) -> str:
    # JSON round trips turn tuples into lists and may reorder nothing else; compare canonical JSON.
    return json.dumps(value, sort_keys=True, default=str)


def _effective(config: Mapping[str, Any], key: str) -> Any:
    value = _lookup(config, key)
    if key == "cloak.config_path" and value is None:
        value = _lookup(config, "model.path")  # None means "the base model's own directory"
    if key in ("model.path", "cloak.config_path") and isinstance(value, str) and not value.startswith(
        ("embedded:", "gs://", "s3://", "hf://")
    ):
        value = os.path.normpath(value)
    return value


def check_compatible(saved_config: Mapping[str, Any], current_config: Mapping[str, Any]) -> None:
    """Refuse to resume when the base model or the cloak's structure differ from the saved run's.

    Raises :class:`CheckpointError` with a one-line message naming the first differing setting.
    """
    keys = list(STRUCTURAL_SETTINGS)
    if FINGERPRINT_KEY in saved_config and FINGERPRINT_KEY in current_config:
        keys.insert(0, FINGERPRINT_KEY)
    for key in keys:
        saved, current = _effective(saved_config, key), _effective(current_config, key)
        if _canonical(saved) != _canonical(current):
            raise CheckpointError(
                f"checkpoint was saved with {key}={_canonical(saved)} but this run has {key}={_canonical(current)}; "
                "use another run directory (checkpoint.directory / tracking.run_dir) or the saved run's settings."
            )


# -- When to save ----------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class _ClockedInterval(policies.ContinuousCheckpointingPolicy):
    """Orbax's time-based policy, timed by ``clock`` from the last :meth:`restart` (construction, the last save
    or restore) rather than from the last checkpoint on disk, which would save at the first step of a fresh
    run (no checkpoint yet) and of a resumed one (its last checkpoint is old).

    ``CheckpointManager.should_save`` stamps the step with ``datetime.now()`` and the previous saves with the
    time Orbax wrote them; this re-stamps both with readings of ``clock`` (so ``Checkpointer(clock=...)`` can
    also be a simulated one) and leaves the decision itself to Orbax: the primary host decides and
    broadcasts, and does not start a time-based save while another is in flight.
    """

    clock: Callable[[], float]
    last_save: float = 0.0

    def restart(self) -> None:
        self.last_save = self.clock()

    def should_save(self, step: Any, previous_steps: Any, *, context: Any) -> bool:
        del previous_steps  # stamped by Orbax's wall clock, not ours
        now = dataclasses.replace(step, time=_as_datetime(self.clock()))
        last = dataclasses.replace(step, time=_as_datetime(self.last_save))
        return super().should_save(now, [last], context=context)


def _as_datetime(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(0, tz=datetime.UTC) + datetime.timedelta(seconds=seconds)


def _save_policy(every_steps: Optional[int], interval: Optional[_ClockedInterval]) -> Any:
    # Any of them. The time policy goes last: the ones before it answer the same on every host, so its
    # broadcast is reached by all hosts or by none.
    chosen: list = [policies.FixedIntervalPolicy(every_steps)] if every_steps else []
    chosen.append(policies.PreemptionCheckpointingPolicy())
    if interval is not None:
        chosen.append(interval)
    return policies.AnySavePolicy(chosen)


# -- Checkpointer ----------------------------------------------------------------------------------


class Checkpointer:
    """An Orbax ``CheckpointManager`` of the train state, the data position and the run config; the time
    interval runs on ``clock`` from construction, the last save or restore. ``save`` is async when
    ``async_save``; a step is complete (listed, restorable) once Orbax finalized it (:meth:`wait`)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every_minutes: Optional[float],
        every_steps: Optional[int] = None,
        keep: int = 3,
        async_save: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        directory = str(directory)
        if "://" not in directory:
            directory = str(Path(directory).expanduser().resolve())
        self.directory = directory
        self.every_minutes = every_minutes
        self.every_steps = every_steps
        self.keep = keep
        self.async_save = async_save
        self._interval = None
        if every_minutes is not None:
            self._interval = _ClockedInterval(minimum_interval_secs=60.0 * every_minutes, clock=clock)
            self._interval.restart()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # a killed run's half-written steps
            save_decision_policy=_save_policy(every_steps, self._interval),
        )
        self._manager = ocp.CheckpointManager(
            directory, options=options, item_names=("state", "data_state", "config")
        )

    @classmethod
    def from_config(cls, ckpt_cfg: Any, run_dir: str | os.PathLike, **kwargs: Any) -> "Checkpointer":
        """From a :class:`sgt_jax.config.CheckpointConfig`; ``directory`` None means ``<run_dir>/checkpoints``."""
        directory = ckpt_cfg.directory if ckpt_cfg.directory is not None else os.path.join(str(run_dir), "checkpoints")
        return cls(
            directory,
            every_minutes=ckpt_cfg.every_minutes,
            every_steps=ckpt_cfg.every_steps,
            keep=ckpt_cfg.keep,
            async_save=ckpt_cfg.async_save,
            **kwargs,
        )

    # -- policy ------------------------------------------------------------------------------------

    def save_due(self, step: int) -> bool:
        """Whether to save at ``step`` (the step count *after* the update), as Orbax's policy decides: the
        same answer on every process, and never at or below the latest saved step. Call it on every process
        at the same steps (the time decision is a collective)."""
        return bool(self._manager.should_save(int(step)))

    # -- saving ------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Any,
        config: Mapping[str, Any],
        force: bool = False,
    ) -> bool:
        """Save ``state`` at ``step`` (async when configured). Returns False if ``step`` is already saved.

        ``force`` overwrites an existing checkpoint of the same step. ``data_state`` must be JSON-serialisable.
        """
        step = int(step)
        if self._interval is not None:
            self._interval.restart()
        if step in self._manager.all_steps():
            if not force:
                logger.info("checkpoint of step %d already exists in %s; not saving again", step, self.directory)
                return False
            self._manager.wait_until_finished()
            self._manager.delete(step)
        # The data position is JSON, not Grain's Orbax handler (grain.checkpoint.CheckpointSave): that one
        # saves a live iterator's state at save time and sets it on restore, whereas the loop fetches the
        # next batch before it saves (so the position to keep is a snapshot from one batch earlier), and the
        # position must be checked against the saved config (check_compatible) before it is applied.
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(dict(config)),
        )
        self._manager.save(step, args=args, force=True)  # force: save_due already asked the policy
        return True

    def wait(self) -> None:
        """Block until the in-flight save is finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- resuming ----------------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Steps with a finalized checkpoint on disk, ascending (waits for an in-flight save)."""
        self._manager.wait_until_finished()
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        """The latest complete checkpoint's step, or None when there is none."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def restore(self, step: Optional[int] = None, *, abstract_state: Any) -> Tuple[Any, Any, Dict[str, Any]]:
        """Restore ``(state, data_state, config)`` of ``step`` (default: the latest complete one).

        ``abstract_state`` gives the structure, shapes, dtypes and shardings the state is restored into:
        ``jax.ShapeDtypeStruct(..., sharding=...)`` leaves (e.g. from ``jax.eval_shape``) or real arrays.
        """
        complete = self.complete_steps()
        if step is None:
            if not complete:
                raise CheckpointError(f"no complete checkpoint in {self.directory} to restore.")
            step = complete[-1]
        elif step not in complete:
            raise CheckpointError(
                f"step {step} has no complete checkpoint in {self.directory} (complete steps: {complete})."
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)),
                data_state=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        if self._interval is not None:
            self._interval.restart()
        return restored["state"], restored["data_state"], dict(restored["config"])


# -- Preemption ------------------------------------------------------------------------------------


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag the train loop polls, so it can save and exit 0 (Orbax only sees
    JAX's preemption sync service, which needs ``jax.distributed`` and a cluster that notifies it).

    Used as ``with PreemptionGuard() as guard:`` around the loop, which polls :meth:`stop_requested`. A second
    SIGINT (Ctrl-C twice) raises ``KeyboardInterrupt`` as usual. Previous handlers are restored on exit.
    Handlers can only be installed from the main thread; elsewhere the guard is inert (it warns).

    Multi-host: a signal may reach only some hosts, and every host must take the same branch (saving is
    collective). :meth:`stop_requested` therefore also consults JAX's preemption sync service
    (``multihost_utils.reached_preemption_sync_point``, available once ``jax.distributed`` is initialised;
    on Cloud TPU it is notified of maintenance events), and the loop's schedule agrees the local answers of
    all hosts (:func:`sgt_jax.training.parallel.agree`), so every host stops at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, signals: Tuple[int, ...] = SIGNALS):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_received: Optional[int] = None
        self._previous: Dict[int, Any] = {}
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user really wants out
        self.requested = True
        self.signal_received = signum
        logger.warning("received %s: saving a checkpoint and stopping at the end of this step",
                       signal.Signals(signum).name)

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionGuard used outside the main thread; SIGTERM/SIGINT are not intercepted")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            self._previous.clear()
            self._installed = False

    def stop_requested(self, step: int) -> bool:
        """This process's view: a signal arrived here, or the preemption sync service says stop at ``step``.
        Call it on every process at every step (the sync service counts the calls); agree the answer."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(int(step))) or self.requested
        except Exception:  # preemption service not initialised (e.g. GPU clusters without it)
            return self.requested
