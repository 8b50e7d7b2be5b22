"""In-training validation's per-batch eval step and the sums it is reduced to on the host.

``make_eval_step`` gives the pure ``eval_step(params, base_state, full_state, batch, key)``: the objective's
losses (deterministic: no dropout), forward metrics of the untruncated model (perplexity and next-token
agreement on clean and transformed input), obfuscation (the nearest vocabulary token of each transformed
token) and the noise-to-spacing sums, with per-example noise keys ``fold_in(key, example_index)`` — the same
convention as the train step, so an example's noise does not depend on how the batch is split. Validation
passes batch i the key ``fold_in(key, i)``, and ``python -m sgt_jax.evaluate`` does the same: on the same SGT,
data and key both report the same numbers (both reduce :func:`sgt_jax.evaluation.metrics.forward_eval`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.evaluation import metrics as metrics_lib
from sgt_jax.transform import noise_spacing, objective
from sgt_jax.transform.entropy import example_keys


def make_eval_step(objective_cfg, cloak_graphdef, base_graphdef, full_graphdef, hidden_size: int):
    """The pure eval step of a run (``full_graphdef``: the untruncated model's, or None when validation reads
    the training model itself or no perplexity)."""
    loss_fn = objective.make_loss_fn(objective_cfg)

    def eval_step(params, base_state, full_state, batch, key):
        cloak = nnx.merge(cloak_graphdef, params)
        base = nnx.merge(base_graphdef, base_state)
        keys = example_keys(key, batch["example_index"])
        denominators = objective.local_denominators(batch, hidden_size)
        _, losses = loss_fn(cloak, base, batch, keys, denominators, True)
        full = None if full_state is None else nnx.merge(full_graphdef or base_graphdef, full_state)
        out = metrics_lib.forward_eval(cloak, full, base.embedding_table, batch, keys)
        obf = out["obfuscation"]["cosine"]
        # The positions the transform adds noise to: real tokens the batch marks for noise.
        noise_mask = batch["attention_mask"].astype(bool) & batch["noise_mask"].astype(bool)
        spacing = noise_spacing.spacing_sums(out["sigma"], batch["input_ids"], noise_mask, base.embedding_table)
        return {
            "losses": losses,
            "sums": {**out["sums"], **spacing},
            "percent_changed": obf["percent_changed"],
            "mean_rank": obf["mean_rank"],
            "nearest": obf["nearest"],
            "sigma": out["sigma"],
            "mu": out["mu"],
            "real_rows": jnp.any(batch["attention_mask"].astype(bool), axis=-1),
        }

    return eval_step


@dataclasses.dataclass
class ValidationTotals:
    """Sums over the validation batches of the eval step's outputs, and the per-row / per-token values the
    summaries and histograms need; batches without a real row (padding on this host) are skipped."""

    batches: int = 0
    loss_sums: dict[str, float] = dataclasses.field(default_factory=dict)
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    changed: list[np.ndarray] = dataclasses.field(default_factory=list)
    ranks: list[np.ndarray] = dataclasses.field(default_factory=list)
    sigmas: list[np.ndarray] = dataclasses.field(default_factory=list)
    mus: list[np.ndarray] = dataclasses.field(default_factory=list)
    table_rows: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def add(self, out: Mapping[str, Any]) -> bool:
        """Adds one eval-step output; False (nothing added) when the batch has no real row."""
        real = np.asarray(out["real_rows"])
        if not real.any():
            return False
        self.batches += 1
        for totals, values in ((self.loss_sums, out["losses"]), (self.sums, out["sums"])):
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        self.changed.append(np.asarray(out["percent_changed"])[real])
        self.ranks.append(np.asarray(out["mean_rank"])[real])
        self.sigmas.append(np.asarray(out["sigma"]).ravel())
        self.mus.append(np.asarray(out["mu"]).ravel())
        return True

    def metrics(self) -> dict[str, float]:
        result = {k: v / self.batches for k, v in self.loss_sums.items()}
        result.update(metrics_lib.finalize_forward_metrics(self.sums))
        result.update(noise_spacing.finalize_spacing(self.sums))
        obf = metrics_lib.summarize(np.concatenate(self.changed))
        result.update({f"obfuscation_{k}": v for k, v in obf.items()})
        rank = metrics_lib.summarize(np.concatenate(self.ranks))
        if rank:
            result["reconstruction_rank_mean"] = rank["mean"]
        return result

    def histograms(self) -> dict[str, np.ndarray]:
        return {"val/sigma": np.concatenate(self.sigmas), "val/mu": np.concatenate(self.mus)}
