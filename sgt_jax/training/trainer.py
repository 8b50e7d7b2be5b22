"""The pieces of a training run, built once from the configuration: the mesh, the frozen base model, the
data, the cloak and its optimizer, the jitted train and eval steps, validation, and the artifact.

``sgt_jax.train`` drives a :class:`Trainer` through its loop; tests and notebooks can drive it step by step.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sgt_jax import config as config_lib
from sgt_jax.config import SGTConfig
from sgt_jax.data import build_datasets, load_tokenizer
from sgt_jax.evaluation.rouge import generation_rouge
from sgt_jax.evaluation.validation import ValidationTotals
from sgt_jax.evaluation.inversion import PromptSet
from sgt_jax.evaluation.threat_models import exact_channel
from sgt_jax.inference import artifact
from sgt_jax.inference.artifact import transform_embeddings
from sgt_jax.inference.generate import prompts_from_source
from sgt_jax.models import CausalLM, DecoderConfig
from sgt_jax.models.fingerprint import model_fingerprint
from sgt_jax.models.hf import resolve_model_path
from sgt_jax.training import builder, parallel
from sgt_jax.training import step as step_lib
from sgt_jax.training.checkpoint import check_compatible
from sgt_jax.transform.cloak import TransformerCloak
from sgt_jax.transform.entropy import fresh_key

log = logging.getLogger("sgt_jax.train")


def fresh_run_key_data(seed: Optional[int]) -> np.ndarray:
    """The run key: from ``cloak.seed`` when it is an int (reproducible, debug only), else OS entropy."""
    return np.array(jax.random.key_data(fresh_key(seed)))


class Trainer:
    """A training run's wiring: the data, the loaded base and initial cloak handed to the one experiment builder
    (:func:`sgt_jax.training.builder.build`, which ``--compile-only`` and the benchmark call too), validation,
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
        self._eval_batch = e.jit_eval_step()
        self._full_on_host = None  # the untruncated model's state in host memory, loaded at the first validation
        self._run_key_data = fresh_run_key_data(cfg.cloak.seed)  # replaced by the saved one on resume
        self._untransformed_batches = 0

        self.saved_config = config_lib.to_dict(cfg)
        self.saved_config["base_model_fingerprint"] = model_fingerprint(self.model_dir)

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

    @contextlib.contextmanager
    def full_model_on_devices(self):
        """The untruncated base model for perplexity, agreement and generation, on the devices only while a
        validation runs. Training needs only layers 0..k; the whole model (3-4 GiB per chip for a 7B base on
        4-way FSDP) waits in host memory (``pinned_host``) between validations and is copied in for each one:
        a host-to-device copy, not a read from disk. Yields None when validation does not need it, and the
        training model itself when that is not truncated."""
        if self.truncate_at_layer is None:
            yield self.base
            return
        v = self.cfg.validation
        if not (v.perplexity or v.generation_examples > 0):
            yield None
            return
        if self._full_on_host is None:
            kinds = {m.kind for m in self.mesh.devices.flat[0].addressable_memories()}
            model = CausalLM.from_pretrained(
                self.model_dir, dtype=self.cfg.model.dtype, mesh=self.mesh, attention_impl=self.cfg.model.attention_impl,
                memory_kind="pinned_host" if "pinned_host" in kinds else None)
            self._full_on_host = nnx.state(model)
        host = self._full_on_host
        on_devices = jax.device_put(host, jax.tree.map(lambda x: x.sharding.with_memory_kind("device"), host))
        yield nnx.merge(self.experiment.full_graphdef, on_devices)  # freed with the last reference to it

    def validate(self, state, *, step: int, tracker=None, label: Optional[str] = None) -> dict[str, float]:
        """Forward metrics on (up to validation.max_batches of) the validation set, then generation metrics on
        its first validation.generation_examples prompts; logged and returned."""
        if self.val_data is None:
            return {}
        # A fixed key folded with the step: every host, rerun and resumed run draws the same noise for a
        # validation at a given step; validations at different steps draw different noise.
        key = jax.random.fold_in(jax.random.key(0x5EED), step)
        with self.full_model_on_devices() as full:
            totals = self._forward_validation(state, key, full if self.cfg.validation.perplexity else None)
            if totals.batches == 0:
                return {}
            result = totals.metrics()
            result.update(self.leakage_figure(state, jax.random.fold_in(key, 1)))
            # From the validation set itself, not this host's batches: every host generates the same prompts.
            prompts = prompts_from_source(self.val_data.source, self.cfg.validation.generation_examples)
            if prompts:
                rouge, generations = self.generation_metrics(state, prompts, key, full)
                result.update(rouge)
                for row, gen in zip(totals.table_rows, generations):
                    row.update(gen)
        if tracker is not None:
            tracker.scalars(step, {f"val/{k}": v for k, v in result.items()})
            tracker.histograms(step, {**totals.histograms(), **self.weight_histograms(state)})
            tracker.text_table(step, "val/reconstruction", totals.table_rows)
            tracker.flush()
        if label:
            log.info("validation (%s) at step %d: %s", label, step,
                     ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())))
        return result

    def _forward_validation(self, state, key, full: Optional[CausalLM]) -> "ValidationTotals":
        """The eval step over the validation batches (all hosts, in step), summed on the host; ``full``: the
        untruncated model for perplexity and agreement, or None."""
        full_state = None if full is None else nnx.state(full)
        totals = ValidationTotals()
        for i, host_batch in enumerate(iter(self.val_data)):
            if self.cfg.validation.max_batches is not None and i >= self.cfg.validation.max_batches:
                break
            global_batch = self.global_batch(host_batch, 1)
            batch = {k: v[0] for k, v in global_batch.items()}
            with jax.set_mesh(self.mesh):  # activations batch-sharded (FSDP); splash finds its mesh
                out = jax.device_get(self._eval_batch(state.params, self.base_state, full_state, batch,
                                                      jax.random.fold_in(key, i)))
            if not totals.add(out) or totals.table_rows:
                continue
            # The host's rows are one block of the global batch's rows (several blocks on several hosts).
            first = min(s.index[1].start or 0 for s in global_batch["input_ids"].addressable_shards)
            nearest = np.asarray(out["nearest"])[first:first + len(host_batch["input_ids"])]
            totals.table_rows = self._reconstruction_rows(host_batch, nearest)
        return totals

    def leakage_figure(self, state, key) -> dict[str, float]:
        """Bits per noised token a reader that knows this SGT gets from x_t, on the first validation prompts (the
        same on every host): each of validation.leakage_candidates tokens read with its own transformed mean at
        validation.leakage_positions positions (see sgt_jax.transform.leakage); it errs toward more leakage."""
        v = self.cfg.validation
        prompts = prompts_from_source(self.val_data.source, 64) if v.leakage_positions else []
        if not any(any(p["noise_mask"]) for p in prompts):
            return {}
        data = PromptSet.from_prompts(prompts, self.tokenizer.pad_token_id, "validation")
        cloak = nnx.merge(self.cloak_graphdef, self._replicated(state.params))
        table = jnp.asarray(jax.device_get(self._replicated(self.base.embedding_table)), jnp.float32)
        figure = exact_channel(cloak, lambda *args: transform_embeddings(cloak, table, *args), table, data, key=key,
                               positions=v.leakage_positions, candidates=v.leakage_candidates)
        if figure is None:  # percent_to_mask > 0: no Gaussian on the masked features
            return {}
        return {"leakage_bits": figure["bits"], "leakage_stderr_bits": figure["stderr_bits"],
                "token_entropy_bits": figure["entropy_bits"]}

    def generation_metrics(self, state, prompts: list[dict[str, list[int]]], key,
                           full: CausalLM) -> tuple[dict[str, float], list[dict[str, str]]]:
        """ROUGE of generations from SGT-protected prompts against the base model's generations of the same
        prompts (computed once per run and cached in <run_dir>/base_generations.json)."""
        cloak = nnx.merge(self.cloak_graphdef, state.params)
        table = self.base.embedding_table
        rouge, references, candidates = generation_rouge(
            full, lambda *batch: transform_embeddings(cloak, table, *batch)[0], self.tokenizer,
            self.cfg.generation, prompts, key, cache_path=Path(self.cfg.tracking.run_dir) / "base_generations.json",
            fingerprint=self.saved_config["base_model_fingerprint"])
        return rouge, [{"base generation": r, "SGT generation": c} for r, c in zip(references, candidates)]

    def _replicated(self, tree):
        """The cloak's parameters are sharded over fsdp; on several hosts a shard may live on another host, so
        read them back through one replicated copy (a collective every host joins)."""
        return jax.jit(lambda t: t, out_shardings=NamedSharding(self.mesh, P()))(tree)

    def weight_histograms(self, state) -> dict[str, np.ndarray]:
        heads = self._replicated({name: state.params[name]["kernel"][...] for name in ("mean_head", "std_head")})
        return {f"weights/{name}": np.asarray(jax.device_get(value)) for name, value in heads.items()}

    def _reconstruction_rows(self, host_batch, nearest: np.ndarray, limit: int = 4) -> list[dict[str, str]]:
        rows = []
        for b in range(min(limit, nearest.shape[0])):
            mask = host_batch["attention_mask"][b].astype(bool)
            if not mask.any():
                continue
            noise_mask = mask & host_batch["noise_mask"][b].astype(bool)
            ids = host_batch["input_ids"][b]
            recon = np.where(noise_mask, nearest[b], ids)[mask]
            rows.append({
                "prompt": self.tokenizer.decode(ids[mask], skip_special_tokens=False),
                "nearest-token reconstruction of x_t": self.tokenizer.decode(recon, skip_special_tokens=False),
            })
        return rows

    # -------------------------------------------------------------------------------------------- ending

    def save_artifact(self, state) -> Path:
        out = Path(self.cfg.train.artifact_dir or Path(self.cfg.tracking.run_dir) / "sgt")
        params = self._replicated(state.params)
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
