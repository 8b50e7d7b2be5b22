"""Device mesh, multi-host start-up and agreement, manual-axis helpers of the train step, and host batches ->
global arrays. The logical-axis rule table lives in ``sgt_jax.models.sharding`` (re-exported here)."""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sgt_jax.errors import SGTError
from sgt_jax.models.sharding import (MESH_AXES, logical_to_sharding, logical_to_spec, param_shardings,
                                     train_state_shardings)

# The mesh axes a batch's rows are split over (each device of a "tensor" group sees the same rows).
BATCH_AXES = ("data", "fsdp")


class MeshConfigError(SGTError):
    """A mesh that cannot be built on these devices; the message names the mesh.* settings and the fix."""


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one axis may be -1 to take the devices the others leave. Devices are
    placed by JAX's topology-aware helpers: on a TPU slice the axes follow the ICI torus, and over several
    slices the data axis spans the slices (DCN) while fsdp and tensor stay inside each."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
    described = ", ".join(f"mesh.{name}={size}" for name, size in zip(MESH_AXES, sizes))  # sizes: checked by the schema
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
    auto = (AxisType.Auto,) * len(MESH_AXES)  # shardings come from the rule table, not the types
    slices = len({getattr(device, "slice_index", 0) or 0 for device in devices})
    if slices == 1:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)
    if sizes[0] % slices:
        raise MeshConfigError(f"{described} spans {slices} slices, and only the data axis crosses them; make "
                              f"mesh.data a multiple of {slices}.")
    grid = mesh_utils.create_hybrid_device_mesh([sizes[0] // slices, sizes[1], sizes[2]], [slices, 1, 1], devices)
    return Mesh(grid, MESH_AXES, axis_types=auto)


def manual_names(entry, manual_axes) -> tuple[str, ...]:
    names = entry if isinstance(entry, tuple) else () if entry is None else (entry,)
    return tuple(name for name in names if name in manual_axes)


def manual_spec(spec: PartitionSpec, manual_axes) -> PartitionSpec:
    """The part of ``spec`` over the mesh axes a ``shard_map`` is manual in (the others stay automatic)."""
    kept = [manual_names(entry, manual_axes) for entry in spec]
    return PartitionSpec(*[None if not k else k[0] if len(k) == 1 else k for k in kept])


def gather_manual(tree, specs, manual_axes):
    """Inside a ``shard_map``: all-gather each leaf of ``tree`` along the dimensions its ``spec`` (a tree of
    PartitionSpecs, same structure) shards over manual axes, giving the whole parameter back."""

    def gather(x, spec):
        for dim, entry in enumerate(spec):
            names = manual_names(entry, manual_axes)
            if names:
                # Leading size-1 dimensions (a one-layer stack) are dropped around the gather, so that its
                # transpose (the gradient's reduce-scatter) runs along the major dimension: TPU lowers a
                # reduce-scatter along any other as an all-reduce of the whole gradient plus a slice.
                lead = x.shape[:dim]
                if math.prod(lead) == 1:
                    x = jax.lax.all_gather(x.reshape(x.shape[dim:]), names, axis=0, tiled=True).reshape(lead + (-1,) + x.shape[dim + 1:])
                else:
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


def batch_sharding(mesh: Mesh, accumulated: bool = False) -> NamedSharding:
    """Rows split over the batch axes (``BATCH_AXES``), the other dimensions replicated; ``accumulated``: the
    arrays carry a leading micro-batch axis (accum_steps, rows, ...), which every device holds whole."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(None, axes) if accumulated else PartitionSpec(axes))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces a batch's rows are split into (the product of the batch axes' sizes)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
                         sharding: NamedSharding | None = None) -> dict[str, jax.Array]:
    """Per-host numpy batch -> global arrays, each host's rows its share: sharded over ("data", "fsdp") on the
    batch dimension, or as ``sharding`` says (e.g. micro-batches stacked on a leading axis)."""
    return {
        name: jax.make_array_from_process_local_data(sharding or batch_sharding(mesh),
                                                     np.asarray(value))
        for name, value in batch.items()
    }


def replicated(mesh: Mesh, tree):
    """``tree`` (e.g. the cloak's parameters, sharded over fsdp) as one replicated copy: on several hosts a shard
    may live on another host, so it is read back through this collective, which every host joins."""
    return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, PartitionSpec()))(tree)


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
    mode = str(mesh_cfg.distributed).lower()  # auto, true or false: checked by the schema
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


__all__ = ["BATCH_AXES", "MESH_AXES", "MeshConfigError", "agree", "batch_sharding", "batch_shards",
           "gather_manual", "host_batch_to_global", "manual_names", "logical_to_sharding", "logical_to_spec", "make_mesh",
           "manual_spec", "maybe_initialize_distributed", "param_shardings", "sharded_embedding_lookup",
           "train_state_shardings"]
