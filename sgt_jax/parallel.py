"""Device mesh, the logical-axis sharding rules, multi-host start-up and agreement, and host batches -> global
arrays.

Parameters carry *logical* axis names (``embed``, ``mlp``, ``heads``, ...) as ``logical_axes`` metadata on
their ``nnx.Param``; the one rule table below maps them to mesh axes (MaxText style). A mesh axis whose size
does not divide a dimension is dropped for that dimension (replicated) rather than crashing.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from sgt_jax.errors import SGTError

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# The one logical -> mesh axis rule table. None: replicated along that dimension.
LOGICAL_AXIS_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "sequence": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "experts": None,
    "layers": None,
    "norm": None,
}


class MeshConfigError(SGTError):
    """A mesh that cannot be built on these devices; the message names the mesh.* settings and the fix."""


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one axis may be -1 to take the devices the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
    described = ", ".join(f"mesh.{name}={size}" for name, size in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise MeshConfigError(f"{described} is invalid: give positive sizes, at most one of them -1.")
    known = math.prod(size for size in sizes if size != -1)
    if len(devices) % known:
        raise MeshConfigError(
            f"{described} needs a multiple of {known} devices but {len(devices)} are available; "
            f"choose sizes whose product divides {len(devices)}."
        )
    sizes = [len(devices) // known if size == -1 else size for size in sizes]
    if math.prod(sizes) != len(devices):
        raise MeshConfigError(
            f"{described} uses {math.prod(sizes)} devices but {len(devices)} are available; "
            "make the product equal the device count or set one axis to -1."
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None] | None, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for logical axis names; with ``shape``, mesh axes that don't divide a dim are dropped."""
    if not logical_axes:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        rule = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        mesh_axes = [rule] if isinstance(rule, str) else list(rule or ())
        # A mesh axis shards at most one dimension, and only where it is larger than 1.
        mesh_axes = [axis for axis in mesh_axes if axis not in used and mesh.shape[axis] > 1]
        if shape is not None and mesh_axes:
            while mesh_axes and shape[dim] % math.prod(mesh.shape[a] for a in mesh_axes):
                dropped = mesh_axes.pop()
                logger.debug("dim %d (%s) of size %d not divisible along mesh axis %r: replicated there",
                             dim, name, shape[dim], dropped)
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*spec)


def logical_to_sharding(logical_axes, mesh: Mesh, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, shape))


def _is_variable(x) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def param_shardings(abstract_state, mesh: Mesh):
    """NamedSharding per leaf of an nnx State (abstract or concrete), from each Param's ``logical_axes``."""

    def sharding_of(variable):
        if not _is_variable(variable):
            return NamedSharding(mesh, PartitionSpec())
        axes = variable.get_metadata().get("logical_axes")
        return variable.replace(logical_to_sharding(axes, mesh, variable.shape))

    return jax.tree.map(sharding_of, abstract_state, is_leaf=_is_variable)


def shard_params(state_or_model, mesh: Mesh):
    """Place a model (in place, returned) or an nnx State (a new one) on the mesh by its logical axes."""
    from flax import nnx

    if isinstance(state_or_model, nnx.Module):
        graphdef, state = nnx.split(state_or_model)
        nnx.update(state_or_model, shard_params(state, mesh))
        return state_or_model
    shardings = param_shardings(state_or_model, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), state_or_model, shardings)


def train_state_shardings(abstract_state, mesh: Mesh):
    """Shardings of a train state: the cloak's parameters and every optimizer moment by their logical axes (the
    moments are nnx Variables that keep the parameter's metadata), counters and keys replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    by_rule = param_shardings(abstract_state, mesh)
    return jax.tree.map(lambda s: s if isinstance(s, NamedSharding) else replicated, by_rule)


def _manual_names(entry, manual_axes) -> tuple[str, ...]:
    names = entry if isinstance(entry, tuple) else () if entry is None else (entry,)
    return tuple(name for name in names if name in manual_axes)


def manual_spec(spec: PartitionSpec, manual_axes) -> PartitionSpec:
    """The part of ``spec`` over the mesh axes a ``shard_map`` is manual in (the others stay automatic)."""
    kept = [_manual_names(entry, manual_axes) for entry in spec]
    return PartitionSpec(*[None if not k else k[0] if len(k) == 1 else k for k in kept])


def gather_manual(tree, specs, manual_axes):
    """Inside a ``shard_map``: all-gather each leaf of ``tree`` along the dimensions its ``spec`` (a tree of
    PartitionSpecs, same structure) shards over manual axes, giving the whole parameter back."""

    def gather(x, spec):
        for dim, entry in enumerate(spec):
            names = _manual_names(entry, manual_axes)
            if names:
                x = jax.lax.all_gather(x, names, axis=dim, tiled=True)
        return x

    return jax.tree.map(gather, tree, specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def sharded_embedding_lookup(axis: str):
    """Inside a ``shard_map`` manual over ``axis``, for a (vocab, embed) table sharded over ``axis`` on its embed
    dimension and ids sharded over it on the batch: every device looks up its columns for the ids of the whole
    ``axis`` group, and an all-to-all hands each device its own rows with all columns back. Moves (B, S, D)
    activations instead of gathering the table."""

    def lookup(table_shard, ids):
        group_ids = jax.lax.all_gather(ids, axis, axis=0, tiled=True)
        columns = jnp.take(table_shard, group_ids, axis=0)
        return jax.lax.all_to_all(columns, axis, split_axis=0, concat_axis=columns.ndim - 1, tiled=True)

    return lookup


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host numpy batch -> global arrays sharded over ("data", "fsdp") on the batch dimension."""
    return {
        name: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)), np.asarray(value))
        for name, value in batch.items()
    }


def agree(flags: Mapping[str, bool]) -> dict[str, bool]:
    """The host-agreed value of each control flag: True on every process when it is True on *any* process
    (a collective OR: one small all-gather for all the flags together).

    Every decision that can differ between hosts (a local clock says "validate" or "save", a SIGTERM that
    reached one host, a non-finite loss, the end of the data) goes through here, so all processes take the
    same branch: a collective (a jitted step, an Orbax save) entered by only some of them hangs the run.
    Every process must call it at the same point with the same keys. One process: no communication.
    """
    names = sorted(flags)
    local = np.asarray([bool(flags[name]) for name in names], dtype=np.int32)
    if jax.process_count() > 1 and names:
        from jax.experimental import multihost_utils

        gathered = np.asarray(multihost_utils.process_allgather(local))
        local = gathered.reshape(jax.process_count(), len(names)).max(axis=0)
    return {name: bool(value) for name, value in zip(names, local)}


def maybe_initialize_distributed(mesh_cfg) -> bool:
    """Start jax.distributed for multi-host runs; returns True when it was initialised here."""
    mode = str(mesh_cfg.distributed).lower()
    if mode not in ("auto", "true", "false"):
        raise MeshConfigError(f"mesh.distributed={mode!r} is unknown; use auto, true or false.")
    explicit = mesh_cfg.coordinator_address is not None
    # Environments where jax.distributed.initialize() can discover the cluster by itself.
    # A TPU VM names its slice's workers; one name (e.g. "localhost", which the ahead-of-time compiler also
    # sets for a topology) is a single host.
    several_tpu_workers = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    cluster_env = several_tpu_workers or any(var in os.environ for var in (
        "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
        "MEGASCALE_COORDINATOR_ADDRESS"))
    if mode == "false" or (mode == "auto" and not (explicit or cluster_env)):
        return False
    kwargs = {}
    if explicit:
        kwargs = dict(coordinator_address=mesh_cfg.coordinator_address, num_processes=mesh_cfg.num_processes,
                      process_id=mesh_cfg.process_id)
    # CPU hosts have no cross-process collectives unless an implementation is chosen; the setting only
    # affects the CPU backend, so it is harmless on TPU and GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "MeshConfigError", "agree", "batch_sharding", "gather_manual",
           "host_batch_to_global", "logical_to_sharding", "logical_to_spec", "make_mesh", "manual_spec",
           "maybe_initialize_distributed", "param_shardings", "prefetch_to_device", "shard_params",
           "sharded_embedding_lookup", "train_state_shardings"]


def prefetch_to_device(iterator, size: int = 2, sharding_fn=None):
    """Yield the iterator's host batches as device arrays, converting up to ``size`` batches ahead in a
    background thread, so that the host-side work (the data loader, ``device_put``) overlaps the running step
    instead of sitting between steps. ``sharding_fn(host_batch) -> device batch`` (default ``jax.device_put``).
    An exception in the producer is re-raised here; closing the generator stops the thread."""
    import queue
    import threading

    convert = jax.device_put if sharding_fn is None else sharding_fn
    if size <= 0:
        for host in iterator:
            yield convert(host)
        return
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for host in iterator:
                if not put(convert(host)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_ProducerError(exc))
            return
        put(done)

    thread = threading.Thread(target=produce, name="prefetch_to_device", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, _ProducerError):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)


class _ProducerError:
    def __init__(self, exc: BaseException):
        self.exc = exc
