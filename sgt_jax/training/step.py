"""The train and eval steps: pure functions, jitted with explicit shardings.

``train_step(state, base_params, batch) -> (state, metrics)``. The frozen base model's parameters are an
argument, never part of the trained state, never donated, never differentiated.

Gradient accumulation follows MaxText: the global batch arrives as ``(accum_steps, micro_batch, ...)`` and a
``lax.scan`` walks the micro-batches, inside a ``shard_map`` that is manual over the batch axes (data, fsdp).
Both models enter it sharded as they are stored. The frozen base's layers are all-gathered one at a time
inside the layer scan. The cloak's parameters are all-gathered for each micro-batch, and the transpose of
that gather reduce-scatters the micro-batch's gradient over fsdp straight into an accumulator that holds one
fsdp shard, like the optimizer state (ZeRO-2): accumulation costs a shard of memory, not a full fp32 copy of
the cloak's gradient. The parameters are cast to "device-varying" over the other batch axes so that JAX
inserts no other reduction in the loop, and the data axis (and the few parameters too small to shard) is
reduced once, after the scan: with ``mesh.fsdp=1`` that is the step's single gradient all-reduce.

Every loss is a token- (or element-) mean over the *whole* global batch: the denominators are counted
from the masks before the scan, so a micro-batch contributes ``partial_sum / global_count`` and the sums
over micro-batches and devices are the exact global means: accumulation changes nothing numerically.
Noise and dropout are drawn from per-example keys ``fold_in(fold_in(run_key, step), example_index)``, so
neither the micro-batching nor the sharding changes what an example sees, and a resumed run draws the same
noise as an uninterrupted one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from sgt_jax.training import optim, parallel
from sgt_jax.training.parallel import BATCH_AXES, batch_sharding, batch_shards
from sgt_jax.transform.entropy import example_keys
from sgt_jax.transform.objective import local_denominators


# loss_fn(cloak, base_model, micro_batch, keys, denominators, deterministic) -> (loss, metrics)
# where loss and every metric are partial sums already divided by the global denominators.
LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer steps taken (including skipped non-finite ones)
    params: Any  # the cloak's trainable nnx.State
    opt_state: Any
    run_key: jax.Array  # uint32 key data of the run key (plain array: checkpointable)
    nonfinite_streak: jax.Array  # consecutive skipped steps
    nonfinite_total: jax.Array
    # objective.adversary's inverter (sgt_jax.training.adversary.AdversaryState); None (no leaves) when it is off.
    adversary: Any = None


def init_train_state(params: Any, optimizer: optax.GradientTransformation, run_key: jax.Array) -> TrainState:
    if jnp.issubdtype(run_key.dtype, jax.dtypes.prng_key):
        run_key = jax.random.key_data(run_key)
    # Separate buffers: the state is donated, and one buffer may not be donated twice.
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    return TrainState(zero(), params, optimizer.init(params), jnp.array(run_key), zero(), zero())


def step_key(run_key_data: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(run_key_data), step)


def split_micro_batches(batch: Mapping[str, np.ndarray], accum_steps: int, first_index: int = 0,
                        index_stride: int = 1) -> dict[str, np.ndarray]:
    """Host arrays (B, ...) → (accum_steps, B // accum_steps, ...), in contiguous blocks, plus each row's
    ``example_index`` in the global batch: row r is example ``first_index + index_stride * r`` (the data
    pipeline gives host p of n the examples p, p + n, p + 2n, ... of each global batch)."""
    batch = dict(batch)
    rows = np.asarray(batch["input_ids"]).shape[0]
    if rows % accum_steps:
        raise ValueError(
            f"the batch of {rows} rows does not split into optimizer.grad_accum_steps={accum_steps} "
            "micro-batches; make data.batch_size a multiple of it."
        )
    batch["example_index"] = (first_index + index_stride * np.arange(rows)).astype(np.int32)
    return {
        name: np.asarray(value).reshape((accum_steps, rows // accum_steps) + np.asarray(value).shape[1:])
        for name, value in batch.items()
    }


def manual_batch_axes(mesh) -> tuple[str, ...]:
    """The batch axes (data, fsdp) larger than 1: what the accumulation's ``shard_map`` is manual over."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def _base_layout(base_state, mesh, axes):
    """How the frozen base enters the manual region: (in_specs, specs to gather before the scan, per-layer
    specs gathered inside the layer scan, whether the embedding table stays sharded). Parameters come in
    sharded over the FSDP axis as the logical-axis rules place them; the decoder layers are gathered one at a
    time inside the layer scan, the embedding table of a truncated model (no LM head reads it) is never
    gathered (see :func:`parallel.sharded_embedding_lookup`), and the small rest (norms, an LM head) is
    gathered once."""
    is_spec = lambda s: isinstance(s, P)  # noqa: E731
    shardings = parallel.param_shardings(base_state, mesh)
    in_specs = jax.tree.map(lambda s: parallel.manual_spec(s.spec, axes), shardings)
    paths = {path: optim.path_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(in_specs, is_leaf=is_spec)[0]}
    truncated = "lm_head" not in {names[0] for names in paths.values()}
    lookup = truncated and "fsdp" in axes

    def before_scan(path, spec):
        names = paths[path]
        skip = names[:2] == ("decoder", "layers") or (lookup and names[0] == "embed_tokens")
        return P() if skip else spec

    outer = jax.tree_util.tree_map_with_path(before_scan, in_specs, is_leaf=is_spec)
    layers = jax.tree.map(lambda spec: P(*spec[1:]), in_specs["decoder"]["layers"], is_leaf=is_spec)
    return in_specs, outer, layers, lookup


def sharded_base_access(base_state, mesh, axes):
    """(layer_gather, embed_lookup) the base needs inside the train step's region, where its parameters arrive
    as FSDP shards: constructor arguments of the model the step merges (:func:`sgt_jax.training.builder.build`)."""
    _, _, layer_specs, lookup = _base_layout(base_state, mesh, axes)
    layer_gather = functools.partial(_gather_leaves, specs=layer_specs, axes=axes)
    return layer_gather, parallel.sharded_embedding_lookup("fsdp") if lookup else None


def _gather_leaves(tree, specs, axes):
    leaves, treedef = jax.tree.flatten(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    return treedef.unflatten([parallel.gather_manual(x, s, axes) for x, s in zip(leaves, spec_leaves)])


def _metric_zeros(grad_fn, params, base_state, batch, key, varying_axes):
    first = jax.tree.map(lambda x: x[0], batch)
    metric_shapes = jax.eval_shape(
        lambda: grad_fn(params, base_state, first, example_keys(key, first["example_index"]))[0][1])
    metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    return jax.lax.pcast(metric_zeros, varying_axes, to="varying") if varying_axes else metric_zeros


def _cloak_specs(params, mesh, axes):
    """The manual part of each cloak parameter's sharding (its FSDP shard), as the train state holds it."""
    shardings = parallel.train_state_shardings(params, mesh)
    return jax.tree.map(lambda s: parallel.manual_spec(s.spec, axes), shardings)


def _sharded_over(spec, axes) -> set:
    return {name for entry in spec for name in parallel.manual_names(entry, axes)}


def _to_varying(tree, specs, axes):
    """Mark each leaf device-varying over the batch axes it is not sharded over (a shard already varies over its
    own axes), so that JAX inserts no reduction of its gradient inside the loop."""
    def vary(x, spec):
        missing = tuple(a for a in axes if a not in _sharded_over(spec, axes))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(vary, tree, specs, is_leaf=lambda s: isinstance(s, P))


def _reduce_rest(tree, specs, axes):
    """After the scan: sum each gradient over the batch axes its shard was not already reduced over (the
    reduce-scatter that the gather's transpose emits covers the axes it is sharded over)."""
    def reduce(x, spec):
        rest = tuple(a for a in axes if a not in _sharded_over(spec, axes))
        return jax.lax.psum(x, rest) if rest else x

    return jax.tree.map(reduce, tree, specs, is_leaf=lambda s: isinstance(s, P))


def _accumulate(loss_fn, graphdefs, params, base_state, batch, key, denominators, deterministic, mesh):
    """Sum of micro-batch gradients and metrics over the global batch.

    Both models enter the manual region sharded as the train state and the base's logical-axis rules place
    them. The cloak's parameters are all-gathered for each micro-batch's computation (XLA may hoist that out
    of the loop); the transpose of that gather reduce-scatters each micro-batch's gradient over FSDP, so the
    accumulator holds one FSDP shard of the cloak's gradient, like its optimizer state, never a full copy.
    What is left (the data axis, and the few parameters too small to shard) is reduced once, after the scan.
    """
    cloak_def, base_def, base_step_def = graphdefs
    axes = manual_batch_axes(mesh)
    base_specs, outer_specs, _, _ = _base_layout(base_state, mesh, axes) if axes else (P(),) * 3 + (0,)
    cloak_specs = _cloak_specs(params, mesh, axes) if axes else P()

    def micro_loss(p, local_base, micro, keys):
        whole = _gather_leaves(p, cloak_specs, axes) if axes else p
        base = nnx.merge(base_step_def if axes else base_def, local_base)
        return loss_fn(nnx.merge(cloak_def, whole), base, micro, keys, denominators, deterministic)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    # The splash and cuDNN kernels' custom VJPs do not carry the varying-manual-axes types, so with them the
    # region runs untyped: no automatic psum is inserted for the invariant parameters then (nothing to pcast),
    # and the reductions after the scan are the same either way.
    check_vma = nnx.merge(base_def, base_state).decoder.layers.attention.attention_impl not in ("splash", "cudnn")

    def local(params, base_state, batch):
        if axes and check_vma:
            params = _to_varying(params, cloak_specs, axes)
        if axes:
            base_state = _gather_leaves(base_state, outer_specs, axes)

        def body(carry, micro):
            grads_acc, metrics_acc = carry
            keys = example_keys(key, micro["example_index"])
            (_, metrics), grads = grad_fn(params, base_state, micro, keys)
            # Without the barrier the TPU compiler sinks the reduce-scatter out of the loop (one scatter of a
            # full-size accumulator: less traffic, a whole gradient more memory).
            grads = jax.lax.optimization_barrier(grads)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
            return (grads_acc, metrics_acc), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        metric_zeros = _metric_zeros(grad_fn, params, base_state, batch, key, axes if check_vma else ())
        (grads, metrics), _ = jax.lax.scan(body, (zeros, metric_zeros), batch)
        if axes:
            grads, metrics = _reduce_rest(grads, cloak_specs, axes), jax.lax.psum(metrics, axes)
        return grads, metrics

    if not axes:
        return local(params, base_state, batch)
    # The base enters sharded over the batch axes as its logical-axis rules place it (FSDP), never gathered
    # whole: its layers are gathered one at a time inside the layer scan.
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(cloak_specs, base_specs, P(None, axes)),
        out_specs=(cloak_specs, P()),
        axis_names=set(axes),
        check_vma=check_vma,
    )(params, base_state, batch)


def loss_denominators(batch: Mapping[str, jax.Array], hidden_size: int, batch_shards: int = 1) -> dict[str, jax.Array]:
    """Global counts every loss is averaged over (computed before the scan; see the module docstring): the
    objective's own counts over the whole (accum, micro, S) batch, with ``micro_batches`` = the (micro-batch,
    device) pieces a per-piece statistic (the MoE balance loss) is averaged over."""
    denominators = local_denominators(batch, hidden_size)
    denominators["micro_batches"] = jnp.asarray(batch["input_ids"].shape[0] * batch_shards, jnp.float32)
    return denominators


def make_train_step(
    *,
    loss_fn: LossFn,
    cloak_graphdef: Any,
    base_graphdef: Any,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    hidden_size: int,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    base_step_graphdef: Any = None,
) -> Callable[[TrainState, Any, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step; jit it with :func:`jit_train_step`. ``base_step_graphdef``: the base as the step's
    ``shard_map`` merges it, built with :func:`sharded_base_access` (required when the mesh shards the batch)."""
    if base_step_graphdef is None and manual_batch_axes(mesh):
        raise ValueError("a mesh that shards the batch needs base_step_graphdef (see sgt_jax.training.builder).")

    def train_step(state: TrainState, base_state: Any, batch: Mapping[str, jax.Array]):
        key = step_key(state.run_key, state.step)
        denominators = loss_denominators(batch, hidden_size, batch_shards(mesh))
        grads, metrics = _accumulate(
            loss_fn, (cloak_graphdef, base_graphdef, base_step_graphdef), state.params, base_state, batch, key,
            denominators, False, mesh
        )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # A non-finite step is skipped whole: parameters and optimizer moments stay as they were. Not
        # optax.apply_if_finite: it judges the gradient alone (a non-finite loss must skip too), lets an update
        # through after max_consecutive_errors, and its counters would change the optimizer state's layout (and
        # every checkpoint's), which TrainState already counts.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            nonfinite_streak=streak,
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        out = dict(metrics)
        out["grad_norm"] = grad_norm
        out["finite"] = finite
        out["nonfinite_streak"] = streak
        out["tokens"] = denominators["tokens"]
        if learning_rate_fn is not None:
            out["learning_rate"] = learning_rate_fn(state.step)
        return new_state, out

    return train_step


def jit_train_step(train_step, *, mesh, state_sharding, base_sharding, donate: bool = True):
    batch_in = batch_sharding(mesh, accumulated=True)
    replicated = NamedSharding(mesh, P())

    @functools.wraps(train_step)  # the compiled program keeps the name train_step
    def under_mesh(state, base_state, batch):  # traced with the mesh in context (as the eval step): the
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # attention kernels' shard_map finds it
            return train_step(state, base_state, batch)

    return jax.jit(
        under_mesh,
        in_shardings=(state_sharding, base_sharding, batch_in),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,) if donate else (),
    )
