"""The pieces of a training run, wired once from the configuration: the mesh, the frozen base model, the
data, the cloak, the experiment the builder makes of them (optimizer, jitted train and eval steps), the
:class:`~sgt_jax.training.validator.Validator`, and the artifact.

``sgt_jax.train`` drives a :class:`Trainer` through its loop; tests and notebooks can drive it step by step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax import nnx

from sgt_jax import config as config_lib
from sgt_jax.config import SGTConfig
from sgt_jax.data import build_datasets, load_tokenizer
from sgt_jax.inference import artifact
from sgt_jax.models import CausalLM, DecoderConfig
from sgt_jax.models.fingerprint import model_fingerprint
from sgt_jax.models.hf import resolve_model_path
from sgt_jax.training import builder, parallel
from sgt_jax.training import step as step_lib
from sgt_jax.training.checkpoint import check_compatible
from sgt_jax.training.validator import Validator
from sgt_jax.transform.cloak import TransformerCloak
from sgt_jax.transform.entropy import fresh_key

log = logging.getLogger("sgt_jax.train")


def fresh_run_key_data(seed: Optional[int]) -> np.ndarray:
    """The run key: from ``cloak.seed`` when it is an int (reproducible, debug only), else OS entropy."""
    return np.array(jax.random.key_data(fresh_key(seed)))


class Trainer:
    """A training run's wiring: the data, the loaded base and initial cloak handed to the one experiment builder
    (:func:`sgt_jax.training.builder.build`, which ``--compile-only`` and the benchmark call too), the validator,
    and the artifact."""

    def __init__(self, cfg: SGTConfig):
        self.cfg = cfg
        self.model_dir = resolve_model_path(cfg.model.path)
        self.mesh = parallel.make_mesh(cfg.mesh)
        self.tokenizer = load_tokenizer(str(self.model_dir))
        # A training batch is one optimizer step's: data.batch_size (the global micro-batch) x grad_accum_steps.
        self.accum_steps = cfg.optimizer.grad_accum_steps
        self.train_data, self.val_data = build_datasets(cfg.data, self.tokenizer, grad_accum_steps=self.accum_steps)
        self.total_steps = self._total_steps()

        config = DecoderConfig.from_hf(self.model_dir)
        self.truncate_at_layer = builder.truncation_layer(cfg, config.num_hidden_layers)
        self.base = CausalLM.from_pretrained(
            self.model_dir, dtype=cfg.model.dtype, truncate_at_layer=self.truncate_at_layer, mesh=self.mesh,
            attention_impl=cfg.model.attention_impl, remat_policy=cfg.model.remat_policy,
        )
        cloak = TransformerCloak.from_config(cfg.cloak, str(self.model_dir), rngs=nnx.Rngs(cfg.train.seed))
        self.experiment = builder.build(cfg, self.mesh, total_steps=self.total_steps, base=self.base, cloak=cloak)
        e = self.experiment
        self.base_graphdef, self.base_state, self.base_sharding = e.base_graphdef, e.base_state, e.base_sharding
        self.cloak_graphdef, self.hidden_size, self.adversary = e.cloak_graphdef, e.hidden_size, e.adversary
        self.optimizer, self.schedule, self.state_sharding = e.optimizer, e.schedule, e.state_sharding
        self.jitted_train_step = e.jit_train_step()
        self._run_key_data = fresh_run_key_data(cfg.cloak.seed)  # replaced by the saved one on resume
        self._untransformed_batches = 0

        self.saved_config = config_lib.to_dict(cfg)
        self.saved_config["base_model_fingerprint"] = model_fingerprint(self.model_dir)
        self.validator = Validator(cfg, mesh=self.mesh, experiment=e, base=self.base, model_dir=self.model_dir,
                                   tokenizer=self.tokenizer, val_data=self.val_data,
                                   fingerprint=self.saved_config["base_model_fingerprint"],
                                   truncate_at_layer=self.truncate_at_layer, global_batch=self.global_batch)

    # ------------------------------------------------------------------------------------------- state

    def _total_steps(self) -> int:
        if self.cfg.train.max_steps is not None:
            return int(self.cfg.train.max_steps)
        if self.train_data.num_batches is None:
            raise config_lib.ConfigError("data.num_epochs <= 0 repeats forever: set train.max_steps.")
        # One pipeline batch per optimizer step (it holds all the step's micro-batches): num_epochs of data.
        return max(1, self.train_data.num_batches)

    def init_state(self) -> step_lib.TrainState:
        # Fresh buffers: on one device device_put would alias the initial parameters, and the train step donates
        # the state, which would delete them (a second init_state() would then fail).
        return jax.device_put(self.experiment.fresh_state(self._run_key_data), self.state_sharding, may_alias=False)

    def restore(self, checkpointer, state: step_lib.TrainState):
        step = checkpointer.latest_step()
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, self.state_sharding
        )
        restored, data_state, saved_config = checkpointer.restore(step, abstract_state=abstract)
        check_compatible(saved_config, self.saved_config)
        return restored, data_state

    # ------------------------------------------------------------------------------------------ stepping

    def global_batch(self, host_batch: Mapping[str, np.ndarray], accum_steps: int) -> dict[str, jax.Array]:
        # The pipeline shards each global batch host-strided (host p reads examples p, p + n, ...): index
        # rows by their example's position in the global batch, so the per-example noise and dropout keys
        # do not depend on the number of hosts.
        micro = step_lib.split_micro_batches(host_batch, accum_steps, first_index=jax.process_index(),
                                             index_stride=jax.process_count())
        return parallel.host_batch_to_global(micro, self.mesh, parallel.batch_sharding(self.mesh, accumulated=True))

    def train_step(self, state, host_batch):
        if not host_batch["noise_mask"].any():
            self._untransformed_batches += 1
            if self._untransformed_batches == 1:
                log.warning("a training batch has no transformed token (noise_mask all 0): the cloak learns nothing "
                            "from it; if this repeats, raise data.max_length (prompts may be truncated away) or set "
                            "data.transform_all_tokens=true")
        return self.jitted_train_step(state, self.base_state, self.global_batch(host_batch, self.accum_steps))

    # ---------------------------------------------------------------------------------------- validation

    def validate(self, state, *, step: int, tracker=None, label: Optional[str] = None) -> dict[str, float]:
        return self.validator.validate(state, step=step, tracker=tracker, label=label)

    def weight_histograms(self, state) -> dict[str, np.ndarray]:
        return self.validator.weight_histograms(state)

    # -------------------------------------------------------------------------------------------- ending

    def save_artifact(self, state) -> Path:
        out = Path(self.cfg.train.artifact_dir or Path(self.cfg.tracking.run_dir) / "sgt")
        params = parallel.replicated(self.mesh, state.params)
        if jax.process_index() == 0:
            artifact.save_artifact(
                out, params=jax.device_get(params), cloak_config=self.cfg.cloak,
                model_dir=self.model_dir, fingerprint=self.saved_config["base_model_fingerprint"],
                tokenizer=self.tokenizer, training_config=self.saved_config, data_config=self.cfg.data,
            )
        return out

    def summarize(self, before: Optional[Mapping[str, float]], after: Mapping[str, float]) -> dict[str, Any]:
        """The privacy–utility summary: obfuscation and utility before and after training, and whether the
        final utility loss is within train.max_utility_loss."""
        keys = ("obfuscation_mean", "obfuscation_min", "utility_loss", "mean_sigma", "sigma_over_spacing",
                "leakage_bits", "perplexity_clean", "perplexity_transformed", "top1_agreement", "loss")
        out: dict[str, Any] = {}
        for k in keys:
            if before and k in before:
                out[f"{k} (before)"] = before[k]
            if k in after:
                out[f"{k} (after)"] = after[k]
        bound = self.cfg.train.max_utility_loss
        if bound is not None and "utility_loss" in after:
            out["utility_within_bound"] = bool(after["utility_loss"] <= bound)
        return out
