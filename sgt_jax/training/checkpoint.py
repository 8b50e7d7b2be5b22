"""Orbax checkpoints of the train state: save policies (time, steps, preemption), resume, compatibility.

A checkpoint step directory holds three Orbax items:

* ``state``      — the train state pytree (cloak params, optimizer state, step, run key). PRNG key arrays
                   are stored as their ``jax.random.key_data`` (uint32) and rewrapped on restore.
* ``data_state`` — the data iterator state (JSON; ``bytes`` are stored base64-encoded).
* ``config``     — the run configuration dict (JSON), checked by :func:`check_compatible` on resume.

The base model is referenced by the config (``model.path``), never saved.

Completeness. Orbax writes a step into ``<step>.orbax-checkpoint-tmp*`` and renames it on finalize, so a
process killed mid-save leaves a tmp directory that Orbax never lists as a step. On top of that (levanter
style, and for file systems where Orbax uses commit files instead of renames) process 0 writes our own
commit marker, :data:`COMMIT_MARKER`, into the step directory *after* ``wait_until_finished``; only steps
carrying the marker count as complete for :meth:`Checkpointer.latest_step` and :meth:`Checkpointer.restore`.

Multi-host. Every process calls :meth:`Checkpointer.should_save`, :meth:`~Checkpointer.save` and
:meth:`~Checkpointer.restore` (Orbax saves are collective). Clocks differ between hosts, so the decision is
agreed through :func:`sgt_jax.training.parallel.agree` (the training loop agrees :meth:`~Checkpointer.save_due`
together with its other decisions). Paths must be on a file system all hosts share (e.g. GCS).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from sgt_jax.errors import SGTError

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "PreemptionGuard",
    "check_compatible",
    "COMMIT_MARKER",
    "STRUCTURAL_SETTINGS",
]

logger = logging.getLogger(__name__)

# Written last, by process 0, once every item of the step is durably on disk.
COMMIT_MARKER = "SGT_COMMITTED"
_BYTES_KEY = "__bytes_b64__"

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


# ----------------------------------------------------------------------------------------------------
# Compatibility
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# PRNG keys and data state <-> storable forms
# ----------------------------------------------------------------------------------------------------


def _is_key_dtype(dtype: Any) -> bool:
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def _to_storable(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array) and _is_key_dtype(leaf.dtype):
        return jax.random.key_data(leaf)
    return leaf


def _key_data_sharding(sharding: Any, ndim: int) -> Any:
    """The sharding of key_data(keys): the keys' sharding plus a replicated trailing key dimension."""
    if sharding is None:
        return None
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim + 1 - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    # Anything else (positional shardings): replicate over the same devices.
    return jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(list(sharding.device_set)), ("_replica",)), jax.sharding.PartitionSpec()
    )


def _abstract_leaf(leaf: Any) -> Any:
    """Abstract storable form of a leaf of ``abstract_state`` (arrays or ShapeDtypeStructs)."""
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        return leaf
    sharding = getattr(leaf, "sharding", None)
    if _is_key_dtype(leaf.dtype):
        impl = leaf.dtype._impl  # the PRNGImpl (threefry, rbg, ...) of the key dtype
        shape = tuple(leaf.shape) + tuple(impl.key_shape)
        return jax.ShapeDtypeStruct(shape, np.dtype("uint32"), sharding=_key_data_sharding(sharding, len(leaf.shape)))
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _from_storable(restored: Any, abstract: Any) -> Any:
    if hasattr(abstract, "dtype") and _is_key_dtype(abstract.dtype):
        return jax.random.wrap_key_data(restored, impl=abstract.dtype._impl)
    return restored


def _encode_data_state(data_state: Any) -> Any:
    if isinstance(data_state, (bytes, bytearray)):
        return {_BYTES_KEY: base64.b64encode(bytes(data_state)).decode("ascii")}
    return data_state


def _decode_data_state(stored: Any) -> Any:
    if isinstance(stored, dict) and set(stored) == {_BYTES_KEY}:
        return base64.b64decode(stored[_BYTES_KEY])
    return stored


# ----------------------------------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------------------------------


class Checkpointer:
    """Orbax ``CheckpointManager`` with levanter-style save policies and commit markers.

    ``should_save(step)`` is true every ``every_steps`` steps and whenever ``every_minutes`` of wall-clock
    (per ``clock``) passed since the last save (or construction). ``save`` is async when ``async_save``;
    a step becomes *complete* (visible to :meth:`latest_step` / :meth:`restore`) once its commit marker is
    written, which happens at the next :meth:`save`, :meth:`wait`, :meth:`close` or :meth:`latest_step`.
    """

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
        if keep < 1:
            raise CheckpointError(f"checkpoint.keep={keep} must be >= 1.")
        if every_steps is not None and every_steps < 1:
            raise CheckpointError(f"checkpoint.every_steps={every_steps} must be >= 1 (or null).")
        directory = str(directory)
        if "://" not in directory:
            directory = str(Path(directory).expanduser().resolve())
        self.directory = directory
        self.every_minutes = every_minutes
        self.every_steps = every_steps
        self.keep = keep
        self.async_save = async_save
        self._clock = clock
        self._last_save_time = clock()
        self._last_saved_step: Optional[int] = None
        self._pending_step: Optional[int] = None  # saved through Orbax, marker not yet written
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Half-written tmp directories of a killed run are removed when the manager starts.
            cleanup_tmp_directories=True,
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
        """This process's view of whether to save at ``step`` (the step count *after* the update); clocks
        differ between hosts, so agree it (:meth:`should_save`, or :func:`sgt_jax.training.parallel.agree`)."""
        if step == self._last_saved_step:
            return False
        if self.every_steps and step > 0 and step % self.every_steps == 0:
            return True
        return self.every_minutes is not None and self._clock() - self._last_save_time >= 60.0 * self.every_minutes

    def should_save(self, step: int) -> bool:
        """Whether to save at ``step``: :meth:`save_due` agreed over all processes (same answer everywhere)."""
        from sgt_jax.training.parallel import agree

        return agree({"save": self.save_due(step)})["save"]

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
        """Save ``state`` at ``step`` (async when configured). Returns False if ``step`` is already complete.

        ``force`` overwrites an existing complete checkpoint of the same step.
        """
        step = int(step)
        self._commit_pending()
        if step in self._manager.all_steps():
            if self._is_committed(step) and not force:
                logger.info("checkpoint of step %d already exists in %s; not saving again", step, self.directory)
                self._last_saved_step, self._last_save_time = step, self._clock()
                return False
            # Orbax-finalized but never committed (killed in between), or forced: replace it.
            self._manager.delete(step)
        storable = jax.tree_util.tree_map(_to_storable, state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(storable),
            data_state=ocp.args.JsonSave(_encode_data_state(data_state)),
            config=ocp.args.JsonSave(dict(config)),
        )
        self._manager.save(step, args=args, force=True)
        self._pending_step = step
        self._last_saved_step, self._last_save_time = step, self._clock()
        if not self.async_save:
            self._commit_pending()
        return True

    def _marker_path(self, step: int) -> Path:
        return Path(str(self._manager.directory)) / self._step_dir_name(step) / COMMIT_MARKER

    def _step_dir_name(self, step: int) -> str:
        # Orbax's default step naming (no prefix, no fixed length) is the bare integer.
        return str(step)

    def _commit_pending(self) -> None:
        if self._pending_step is None:
            return
        self._manager.wait_until_finished()  # Orbax finalize (rename) is done once this returns
        step, self._pending_step = self._pending_step, None
        if jax.process_index() == 0:
            marker = self._marker_path(step)
            if marker.parent.is_dir():
                tmp = marker.with_name(COMMIT_MARKER + ".tmp")
                tmp.write_text(json.dumps({"step": step, "time": time.time()}))
                os.replace(tmp, marker)  # atomic: the marker is either absent or whole
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"sgt_checkpoint_commit_{step}")

    def _is_committed(self, step: int) -> bool:
        return self._marker_path(step).is_file()

    def wait(self) -> None:
        """Block until the in-flight save is on disk and committed."""
        self._commit_pending()

    def close(self) -> None:
        self._commit_pending()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- resuming ----------------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Steps with a complete (committed) checkpoint, ascending."""
        self._commit_pending()
        self._manager.reload()
        return sorted(s for s in self._manager.all_steps() if self._is_committed(s))

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
        abstract_storable = jax.tree_util.tree_map(_abstract_leaf, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_storable),
                data_state=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        state = jax.tree_util.tree_map(_from_storable, restored["state"], abstract_state)
        self._last_saved_step, self._last_save_time = step, self._clock()
        return state, _decode_data_state(restored["data_state"]), dict(restored["config"])


# ----------------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------------


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag the train loop polls, so it can save and exit 0.

    Usage::

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.should_stop(step):
                    checkpointer.save(step, ..., force=True); checkpointer.wait(); break

    A second SIGINT (Ctrl-C twice) raises ``KeyboardInterrupt`` as usual. Previous handlers are restored
    on exit. Handlers can only be installed from the main thread; elsewhere the guard is inert (it warns).

    Multi-host: a signal may reach only some hosts, and every host must take the same branch (saving is
    collective). :meth:`stop_requested` therefore also consults JAX's preemption sync service
    (``multihost_utils.reached_preemption_sync_point``, available once ``jax.distributed`` is initialised;
    on Cloud TPU it is notified of maintenance events), and :meth:`should_stop` agrees the local answers of
    all hosts (:func:`sgt_jax.training.parallel.agree`), so every host returns the same answer at the same step. On
    one host it is a plain flag read.
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

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save and stop after ``step``: :meth:`stop_requested` agreed over all
        processes (identical on every process)."""
        from sgt_jax.training.parallel import agree

        stop = agree({"preempted": self.stop_requested(step)})["preempted"]
        if stop:
            self.requested = True
        return stop
