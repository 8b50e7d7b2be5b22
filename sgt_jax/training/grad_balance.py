"""How strongly each objective term pulls on the cloak: the global gradient norm of each weighted term.

The train step clips the *sum* of the terms' gradients to a global norm (1.0). When one term's gradient
norm is orders of magnitude above the others, the clip shrinks everything by that factor and training
follows that term alone (the failure of the 7B recipe's (1e-8, 1.0) scale before the sigma gradient was
bounded). Logging the per-term norms at step 0 makes such an imbalance visible before a run is wasted.
"""

from __future__ import annotations

import logging
from typing import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sgt_jax.training.step import example_keys, step_key
from sgt_jax.transform.objective import make_loss_fn

log = logging.getLogger("sgt_jax.train")

TERMS = ("utility_term", "stochasticity_term", "similarity_term")


def term_gradient_norms(loss_fn, cloak_graphdef, params, base, batch: Mapping[str, jax.Array],
                        keys: jax.Array) -> dict[str, jax.Array]:
    """``{"grad_norm/<term>": ||d term / d params||}`` for each weighted term of the objective, on one
    (micro-)batch, with dropout on as in training. One forward pass, one backward pass per term."""

    def terms(p):
        cloak = nnx.merge(cloak_graphdef, p)
        _, metrics = loss_fn(cloak, base, batch, keys, None, False)
        return jnp.stack([metrics[t] for t in TERMS])

    values, pull = jax.vjp(terms, params)
    out = {}
    for i, name in enumerate(TERMS):
        (grads,) = pull(jnp.zeros_like(values).at[i].set(1.0))
        out[f"grad_norm/{name}"] = optax.tree.norm(grads)
    return out


def _norms_fn(loss_fn, cloak_graphdef, base_graphdef):
    @jax.jit
    def norms(params, base_state, batch, run_key_data):
        batch = {k: v[0] for k, v in batch.items()}  # the first micro-batch, sliced inside jit (multi-host safe)
        keys = example_keys(step_key(run_key_data, jnp.zeros((), jnp.int32)), batch["example_index"])
        base = nnx.merge(base_graphdef, base_state)
        return term_gradient_norms(loss_fn, cloak_graphdef, params, base, batch, keys)

    return norms


def first_step_gradient_norms(trainer, state, host_batch) -> dict[str, float]:
    """:func:`term_gradient_norms` of a :class:`~sgt_jax.training.trainer.Trainer`'s state on ``host_batch`` (the whole
    first micro-batch, the step-0 noise keys), as floats for logging."""
    batch = trainer.global_batch(host_batch, trainer.accum_steps)
    norms = _norms_fn(make_loss_fn(trainer.cfg.objective), trainer.cloak_graphdef, trainer.base_graphdef)(
        state.params, trainer.base_state, batch, state.run_key)
    return {k: float(v) for k, v in jax.device_get(norms).items()}


def log_first_gradient_norms(trainer, state, host_batch, tracker) -> dict[str, float]:
    """Log (and return) :func:`first_step_gradient_norms` at step 0."""
    norms = first_step_gradient_norms(trainer, state, host_batch)
    tracker.scalars(0, {f"train/{k}": v for k, v in norms.items()})
    log.info("gradient norms of the objective's terms at step 0 (clipped together at the global norm): %s",
             ", ".join(f"{k.split('/')[-1]}={v:.3g}" for k, v in norms.items()))
    return norms
