"""The one evaluator: the per-batch eval step and the sums it is reduced to on the host, run by in-training
validation (:class:`sgt_jax.training.validator.Validator`) and by ``python -m sgt_jax.evaluate`` alike.

``make_eval_step`` gives the pure ``eval_step(params, base_state, full_state, batch, key)``: the objective's
losses (deterministic: no dropout), forward metrics of the untruncated model (perplexity and next-token
agreement on clean and transformed input), obfuscation (the nearest vocabulary token of each transformed
token) and the noise-to-spacing sums, with per-example noise keys ``fold_in(key, example_index)`` — the same
convention as the train step, so an example's noise does not depend on how the batch is split. Both callers
pass batch i the key ``fold_in(key, i)``: on the same SGT, data and key they report the same numbers.
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


def make_eval_step(objective_cfg, cloak_graphdef, base_graphdef, full_graphdef, hidden_size: int, *,
                   obfuscation_metrics: tuple[str, ...] = ("cosine",), histograms: bool = True):
    """The pure eval step of a run (``full_graphdef``: the untruncated model's, or None when validation reads
    the training model itself or no perplexity). ``objective_cfg`` None: no objective losses (``evaluate``, whose
    base is the whole model); ``obfuscation_metrics``: the nearest-token metrics (the first one gives
    ``nearest``); ``histograms``: also return sigma and mu per element. ``eval_step(..., table)`` reads the
    prompts' embeddings from ``table`` instead of the base's own (``evaluate``: the artifact's, as a client)."""
    loss_fn = None if objective_cfg is None else objective.make_loss_fn(objective_cfg)

    def eval_step(params, base_state, full_state, batch, key, table=None):
        cloak = nnx.merge(cloak_graphdef, params)
        base = nnx.merge(base_graphdef, base_state)
        table = base.embedding_table if table is None else table
        keys = example_keys(key, batch["example_index"])
        losses = {}
        if loss_fn is not None:
            _, losses = loss_fn(cloak, base, batch, keys, objective.local_denominators(batch, hidden_size), True)
        full = None if full_state is None else nnx.merge(full_graphdef or base_graphdef, full_state)
        out = metrics_lib.forward_eval(cloak, full, table, batch, keys, obfuscation_metrics=obfuscation_metrics)
        # The positions the transform adds noise to: real tokens the batch marks for noise.
        noise_mask = batch["attention_mask"].astype(bool) & batch["noise_mask"].astype(bool)
        spacing = noise_spacing.spacing_sums(out["sigma"], batch["input_ids"], noise_mask, table)
        result = {
            "losses": losses,
            "sums": {**out["sums"], **spacing},
            "obfuscation": {m: (o["percent_changed"], o["mean_rank"]) for m, o in out["obfuscation"].items()},
            "nearest": out["obfuscation"][obfuscation_metrics[0]]["nearest"],
            "real_rows": jnp.any(batch["attention_mask"].astype(bool), axis=-1),
        }
        return {**result, "sigma": out["sigma"], "mu": out["mu"]} if histograms else result

    return eval_step


@dataclasses.dataclass
class ValidationTotals:
    """Sums over the validation batches of the eval step's outputs, and the per-row / per-token values the
    summaries and histograms need; batches without a real row (padding on this host) are skipped."""

    batches: int = 0
    loss_sums: dict[str, float] = dataclasses.field(default_factory=dict)
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    changed: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)  # by obfuscation metric
    ranks: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
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
        for m, (changed, rank) in out["obfuscation"].items():
            self.changed.setdefault(m, []).append(np.asarray(changed)[real])
            self.ranks.setdefault(m, []).append(np.asarray(rank)[real])
        if "sigma" in out:
            self.sigmas.append(np.asarray(out["sigma"]).ravel())
            self.mus.append(np.asarray(out["mu"]).ravel())
        return True

    def obfuscation(self, metric: str) -> tuple[dict[str, float], dict[str, float]]:
        """(summary of the per-sequence % of tokens changed, of the mean reconstruction rank) under ``metric``."""
        return (metrics_lib.summarize(np.concatenate(self.changed[metric])),
                metrics_lib.summarize(np.concatenate(self.ranks[metric])))

    def metrics(self) -> dict[str, float]:
        result = {k: v / self.batches for k, v in self.loss_sums.items()}
        result.update(metrics_lib.finalize_forward_metrics(self.sums))
        result.update(noise_spacing.finalize_spacing(self.sums))
        obf, rank = self.obfuscation("cosine")
        result.update({f"obfuscation_{k}": v for k, v in obf.items()})
        if rank:
            result["reconstruction_rank_mean"] = rank["mean"]
        return result

    def histograms(self) -> dict[str, np.ndarray]:
        return {"val/sigma": np.concatenate(self.sigmas), "val/mu": np.concatenate(self.mus)}
