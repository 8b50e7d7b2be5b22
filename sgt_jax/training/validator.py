"""In-training validation, one of the loop's cadences (``validate`` in :func:`sgt_jax.training.loop.training_schedule`):
the run's eval step (:func:`sgt_jax.evaluation.validation.make_eval_step`, built by the experiment builder) over
the validation batches, the exact-channel leakage figure, the generation metrics, and the histograms, logged and
returned. The untruncated base model waits in host memory between validations.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.evaluation.inversion import PromptSet
from sgt_jax.evaluation.rouge import generation_rouge
from sgt_jax.evaluation.threat_models import exact_channel
from sgt_jax.evaluation.validation import ValidationTotals
from sgt_jax.inference.artifact import transform_embeddings
from sgt_jax.inference.generate import prompts_from_source
from sgt_jax.models import CausalLM
from sgt_jax.training.parallel import replicated

log = logging.getLogger("sgt_jax.train")


class Validator:
    """Validation of a run: ``validate(state, step=...)``; built by the :class:`~sgt_jax.training.trainer.Trainer`
    from its pieces (``global_batch``: the trainer's host-to-global batch function)."""

    def __init__(self, cfg, *, mesh, experiment, base: CausalLM, model_dir, tokenizer, val_data, fingerprint: str,
                 truncate_at_layer: Optional[int], global_batch: Callable):
        self.cfg, self.mesh, self.experiment, self.base = cfg, mesh, experiment, base
        self.model_dir, self.tokenizer, self.val_data, self.fingerprint = model_dir, tokenizer, val_data, fingerprint
        self.truncate_at_layer, self.global_batch = truncate_at_layer, global_batch
        self.cloak_graphdef, self.base_state = experiment.cloak_graphdef, experiment.base_state
        self._eval_batch = experiment.jit_eval_step()
        self._full_on_host = None  # the untruncated model's state in host memory, loaded at the first validation

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
        cloak = nnx.merge(self.cloak_graphdef, replicated(self.mesh, state.params))
        table = jnp.asarray(jax.device_get(replicated(self.mesh, self.base.embedding_table)), jnp.float32)
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
            fingerprint=self.fingerprint)
        return rouge, [{"base generation": r, "SGT generation": c} for r, c in zip(references, candidates)]

    def weight_histograms(self, state) -> dict[str, np.ndarray]:
        heads = replicated(self.mesh, {name: state.params[name]["kernel"][...] for name in ("mean_head", "std_head")})
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
