"""One builder for an experiment: everything a run needs from (configuration, mesh), built the same way for
training, ``--compile-only`` (TPU and GPU), the benchmark and evaluation, so that what is compiled for a slice
is exactly what runs there.

:func:`build` returns an :class:`Experiment`: the frozen base model's graph definitions (the one the train
step merges inside its ``shard_map``, built with the FSDP gathers it needs as constructor arguments, and the
plain one validation and generation use), the base's state (loaded, random, or abstract
``ShapeDtypeStruct``\\ s carrying their shardings), the cloak's graph definition and initial parameters, the
optimizer and schedule, the train state's shardings, and the pure ``train_step`` / ``eval_step`` with their
jitted forms.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sgt_jax.config import SGTConfig
from sgt_jax.evaluation.validation import make_eval_step
from sgt_jax.models import CausalLM, DecoderConfig
from sgt_jax.models.hf import resolve_model_path
from sgt_jax.training import adversary as adversary_lib
from sgt_jax.training import optim, parallel
from sgt_jax.training import step as step_lib
from sgt_jax.transform import objective
from sgt_jax.transform.cloak import TransformerCloak


def default_truncation_layer(num_layers: int) -> int:
    """The recommendations' truncation layer index: 12 for a 32-layer model (13 layers kept), scaled for other
    depths."""
    return int(min(num_layers - 1, max(0, round(num_layers * 12 / 32))))


def truncation_layer(cfg: SGTConfig, num_layers: int) -> Optional[int]:
    """The last base layer the utility loss reads (ssl), or None: the whole model (lm, distill)."""
    if cfg.objective.mode != "ssl":
        return None
    return default_truncation_layer(num_layers) if cfg.model.truncate_at_layer is None else cfg.model.truncate_at_layer


@dataclasses.dataclass(frozen=True)
class Experiment:
    cfg: SGTConfig
    mesh: jax.sharding.Mesh
    model_config: DecoderConfig
    truncate_at_layer: Optional[int]
    base_graphdef: Any  # validation, generation, inference
    base_state: Any
    full_graphdef: Any  # the untruncated model validation reads; None when the base is untruncated
    cloak_graphdef: Any
    cloak_params: Any
    optimizer: Any
    schedule: Callable
    adversary: Any  # sgt_jax.training.adversary.Adversary, or None
    state_sharding: Any
    train_step: Callable  # (state, base_state, batch) -> (state, metrics)
    eval_step: Callable  # (params, base_state, full_state, batch, key) -> per-batch validation outputs

    @property
    def hidden_size(self) -> int:
        return self.model_config.hidden_size

    @property
    def base_sharding(self):
        return jax.tree.map(lambda x: x.sharding, self.base_state)

    def fresh_state(self, run_key_data) -> step_lib.TrainState:
        state = step_lib.init_train_state(self.cloak_params, self.optimizer, jnp.asarray(run_key_data))
        return state if self.adversary is None else state.replace(adversary=self.adversary.init_state())

    def abstract_state(self, run_key_data):
        """The train state as ``ShapeDtypeStruct``\\ s carrying their shardings (compile-only, restore)."""
        shapes = jax.eval_shape(self.fresh_state, run_key_data)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                            self.state_sharding)

    def jit_train_step(self):
        return step_lib.jit_train_step(self.train_step, mesh=self.mesh, state_sharding=self.state_sharding,
                                       base_sharding=self.base_sharding)

    def jit_eval_step(self):
        # Replicated outputs: read back on every host (device_get of a batch-sharded array fails when it spans
        # another process's devices).
        return jax.jit(self.eval_step, out_shardings=NamedSharding(self.mesh, P()))


def _with_shardings(state, mesh):
    shardings = parallel.param_shardings(state, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def abstract_model(cfg: SGTConfig, config: DecoderConfig, mesh, *, truncate_at_layer, platform=None,
                   layer_gather=None, embed_lookup=None):
    """(graphdef, abstract state with shardings) of the base model as ``cfg`` builds it; nothing is allocated."""
    model = nnx.eval_shape(lambda: CausalLM(
        config, dtype=cfg.model.dtype, truncate_at_layer=truncate_at_layer, attention_impl=cfg.model.attention_impl,
        remat_policy=cfg.model.remat_policy, platform=platform, layer_gather=layer_gather, embed_lookup=embed_lookup,
        rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, _with_shardings(state, mesh)


def _step_graphdef(cfg, config, mesh, k, base_state, platform):
    """The base's graph definition inside the train step's ``shard_map``: with the per-layer FSDP gather and
    the sharded embedding lookup it needs there, as constructor arguments."""
    axes = step_lib.manual_batch_axes(mesh)
    if not axes:
        return None
    layer_gather, embed_lookup = step_lib.sharded_base_access(base_state, mesh, axes)
    return abstract_model(cfg, config, mesh, truncate_at_layer=k, platform=platform, layer_gather=layer_gather,
                          embed_lookup=embed_lookup)[0]


def build(cfg: SGTConfig, mesh, *, total_steps: int, base: Optional[CausalLM] = None,
          cloak: Optional[TransformerCloak] = None, platform: Optional[str] = None) -> Experiment:
    """The experiment ``cfg`` describes on ``mesh``. ``base``: the loaded base model (None: abstract, shapes and
    shardings from ``config.json`` alone); ``cloak``: the initial cloak (None: abstract); ``platform``: the
    backend compiled for (None: the mesh devices')."""
    model_dir = resolve_model_path(cfg.model.path)
    config = DecoderConfig.from_hf(model_dir)
    platform = platform or mesh.devices.flat[0].platform
    k = truncation_layer(cfg, config.num_hidden_layers)
    if base is None:
        base_graphdef, base_state = abstract_model(cfg, config, mesh, truncate_at_layer=k, platform=platform)
    else:
        base_graphdef, base_state = nnx.split(base)
    full_graphdef = None
    if k is not None and (cfg.validation.perplexity or cfg.validation.generation_examples > 0):
        full_graphdef = abstract_model(cfg, config, mesh, truncate_at_layer=None, platform=platform)[0]
    if cloak is None:
        cloak = nnx.eval_shape(lambda: TransformerCloak.from_config(cfg.cloak, str(model_dir), rngs=nnx.Rngs(0)))
    cloak_graphdef, cloak_params = nnx.split(cloak)
    optimizer = optim.make_optimizer(cfg.optimizer, total_steps)
    schedule = optim.make_schedule(cfg.optimizer, total_steps)
    adversary = adversary_lib.from_trainer_config(cfg, cloak, config)
    step_kw = dict(loss_fn=objective.make_loss_fn(cfg.objective), base_graphdef=base_graphdef, optimizer=optimizer,
                   mesh=mesh, hidden_size=config.hidden_size, learning_rate_fn=schedule,
                   base_step_graphdef=_step_graphdef(cfg, config, mesh, k, base_state, platform))
    train_step = (step_lib.make_train_step(cloak_graphdef=cloak_graphdef, **step_kw) if adversary is None
                  else adversary.make_train_step(**step_kw))
    eval_step = make_eval_step(cfg.objective, cloak_graphdef, base_graphdef, full_graphdef, config.hidden_size)
    experiment = Experiment(cfg, mesh, config, k, base_graphdef, base_state, full_graphdef, cloak_graphdef,
                            cloak_params, optimizer, schedule, adversary, None, train_step, eval_step)
    abstract = jax.eval_shape(experiment.fresh_state, jax.random.key_data(jax.random.key(0)))
    return dataclasses.replace(experiment, state_sharding=parallel.train_state_shardings(abstract, mesh))


__all__ = ["Experiment", "abstract_model", "build", "default_truncation_layer", "truncation_layer"]
