"""The logical-axis sharding rules: parameters carry *logical* axis names (``embed``, ``mlp``, ``heads``, ...)
as ``logical_axes`` metadata on their ``nnx.Param``; the one rule table below maps them to mesh axes (MaxText
style). A mesh axis whose size does not divide a dimension is dropped for that dimension (replicated) rather
than crashing. Loading a checkpoint onto a mesh and the train step's layouts both read it."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# The one logical -> mesh axis rule table. None: replicated along that dimension.
# Not NNX's out_sharding + nnx.logical_axis_rules: they only rename axes (no mesh axis dropped where it does not
# divide, no fsdp moved to a major dimension) and shard each Variable when created, so every model would need a mesh.
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
    return isinstance(x, nnx.Variable)


def param_shardings(abstract_state, mesh: Mesh):
    """NamedSharding per leaf of an nnx State (abstract or concrete), from each Param's ``logical_axes``."""

    def sharding_of(variable):
        if not _is_variable(variable):
            return NamedSharding(mesh, PartitionSpec())
        axes = variable.get_metadata().get("logical_axes")
        return variable.replace(logical_to_sharding(axes, mesh, variable.shape))

    return jax.tree.map(sharding_of, abstract_state, is_leaf=_is_variable)


def fsdp_on_major_dim(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """``spec`` with its ``fsdp`` sharding moved to the first dimension larger than 1 that the axis divides.

    For a trained parameter: its gradient is reduce-scattered over fsdp, and a reduce-scatter along a minor
    dimension is lowered as a full all-reduce plus a slice on TPU, which holds the whole gradient. Matrices
    without logical axes (the estimator heads) get sharded too. Other mesh axes keep their dimensions."""
    size = mesh.shape.get("fsdp", 1)
    entries = [entry if isinstance(entry, tuple) else (() if entry is None else (entry,)) for entry in spec]
    entries += [()] * (len(shape) - len(entries))
    entries = [tuple(a for a in entry if a != "fsdp") for entry in entries]
    if size > 1 and len(shape) >= 2:
        for dim, n in enumerate(shape):
            taken = math.prod(mesh.shape[a] for a in entries[dim])
            if n > 1 and n % (taken * size) == 0:
                entries[dim] = ("fsdp",) + entries[dim]
                break
    return PartitionSpec(*[None if not e else e[0] if len(e) == 1 else e for e in entries])


def train_state_shardings(abstract_state, mesh: Mesh):
    """Shardings of a train state: the cloak's parameters and every optimizer moment by their logical axes (the
    moments are nnx Variables that keep the parameter's metadata), with the fsdp axis on each matrix's major
    dimension (:func:`fsdp_on_major_dim`); counters and keys replicated."""
    def sharding_of(variable):
        if not _is_variable(variable):
            return NamedSharding(mesh, PartitionSpec())
        spec = logical_to_spec(variable.get_metadata().get("logical_axes"), mesh, variable.shape)
        return variable.replace(NamedSharding(mesh, fsdp_on_major_dim(spec, variable.shape, mesh)))

    return jax.tree.map(sharding_of, abstract_state, is_leaf=_is_variable)
