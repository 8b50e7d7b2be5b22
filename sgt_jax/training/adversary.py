"""An adversary in the objective: a learned inverter trained alongside the cloak (``objective.adversary``).

Min–max in one backward pass. Each micro-batch's loss is

    L_cloak + adversary_weight · P  +  CE_inverter(sg(x_t))

where ``P = mean over transformed tokens of max(log p_inv(true token | x_t), -log V)`` is computed with the
inverter's parameters frozen (so only the cloak descends it: it lowers the inverter's confidence in the
true token, bounded below by the uniform guess so it cannot push forever), and the inverter's own
cross-entropy is computed on stop-gradient x_t (so only the inverter descends it). The inverter is the
attack module's (:mod:`sgt_jax.transform.inverters`). Its parameters and Adam state live in ``TrainState.adversary``
(None with the adversary off, which leaves the state and the train step exactly as without this module);
they are replicated like the cloak's, checkpointed with the state and resumed exactly.

**A fresh adversary** (``adversary_reset_every`` K > 0): an inverter co-trained one step per cloak step loses
to a fresh one, because the cloak outruns it (it moves its deterministic shift). Every K steps (steps 0, K,
2K, ...) the inverter is re-initialised from a key of the run key and the step, and trained
``adversary_reset_steps`` steps on the current cloak with fresh noise draws of the step's batch (the cloak held
fixed) before the step's cloak update, which is then penalised by a near-converged attacker on a noise draw it
never saw. In between it keeps co-training. The key derivation makes a resumed run re-initialise exactly as an
uninterrupted one.

The train step is :func:`sgt_jax.training.step.make_train_step` itself, run on the pair (cloak, inverter) with an
optimizer that updates each with its own rule; ``adversary_steps > 1`` adds inverter-only steps on fresh
noise after it. The logged ``loss`` is the cloak's (L_cloak + adversary term); ``grad_norm`` covers both.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sgt_jax.transform import inverters, objective
from sgt_jax.training import step as step_lib

__all__ = ["AdversaryState", "Adversary", "enabled", "true_token_logprob_penalty", "adversarial_loss_fn"]


RESET_STREAM = 0x5E5E7  # folded into the step key for the fresh adversary's draws (initialisation, noise)


class AdversaryState(flax.struct.PyTreeNode):
    params: Any  # the inverter's nnx.State
    opt_state: Any


def enabled(objective_cfg) -> bool:
    return str(getattr(objective_cfg, "adversary", "off")) != "off"


class _Pair(nnx.Module):
    """The cloak and the inverter as one module, so that one gradient reaches both."""

    def __init__(self, cloak: nnx.Module, inverter: nnx.Module):
        self.cloak = cloak
        self.inverter = inverter


def true_token_logprob_penalty(logits: jax.Array, token_ids: jax.Array, weights: jax.Array,
                               denominator: jax.Array) -> jax.Array:
    """sum over weighted positions of max(log softmax(logits)[true], -log V), / denominator: in [-log V, 0]
    per token; its gradient lowers the true token's probability until the inverter is no better than a
    uniform guess, then stops."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    true = jnp.take_along_axis(log_p, token_ids[..., None], axis=-1)[..., 0]
    floored = jnp.maximum(true, -math.log(logits.shape[-1]))
    return jnp.sum(floored * weights.astype(jnp.float32)) / denominator


def _cloak_output(cloak, base, batch, keys, deterministic):
    """The cloak's output on a micro-batch (the objective's draw: same keys) and its masks."""
    ids = batch["input_ids"]
    attention = batch["attention_mask"].astype(bool)
    selected = attention & batch["noise_mask"].astype(bool)
    x = jax.lax.stop_gradient(base.embed(ids)).astype(jnp.float32)
    out = cloak(x, attention, batch["noise_mask"], key=keys, deterministic=deterministic)
    return out, ids, selected, attention


def _transformed(cloak, base, batch, keys, deterministic):
    """x_t of a micro-batch, the same draw as the objective's (same keys), plus its masks."""
    out, ids, selected, attention = _cloak_output(cloak, base, batch, keys, deterministic)
    return out.x_t.astype(jnp.float32), ids, selected, attention


def adversarial_loss_fn(base_loss_fn: Callable[..., Any], objective_cfg) -> Callable[..., Any]:
    """The step's ``loss_fn`` for the (cloak, inverter) pair (see the module docstring)."""
    weight = float(objective_cfg.adversary_weight)

    def loss_fn(pair, base, micro, keys, denominators, deterministic):
        # One cloak forward (and backward) serves the objective and the inverter.
        out, ids, selected, attention = _cloak_output(pair.cloak, base, micro, keys, deterministic)
        loss, metrics = base_loss_fn(pair.cloak, base, micro, keys, denominators, deterministic, cloak_out=out)
        x_t = out.x_t.astype(jnp.float32)
        den = denominators["transformed_tokens"]
        share = jnp.sum(selected).astype(jnp.float32) / den  # a micro-batch mean → a global partial sum
        inv_ce, inv_top1 = inverters.inverter_loss(pair.inverter, jax.lax.stop_gradient(x_t), ids, selected,
                                                   attention)
        logits = inverters.inverter_logits(objective.frozen(pair.inverter), x_t, attention)
        penalty = true_token_logprob_penalty(logits, ids, selected, den)
        cloak_loss = loss + weight * penalty
        metrics = dict(metrics)
        metrics.update(loss=cloak_loss, adversary_penalty=penalty, adversary_term=weight * penalty,
                       adversary_ce=inv_ce * share, adversary_top1=inv_top1 * share)
        return cloak_loss + inv_ce * share, metrics

    return loss_fn


def _pair_optimizer(cloak_opt: optax.GradientTransformation,
                    inverter_opt: optax.GradientTransformation) -> optax.GradientTransformation:
    """Each half of the pair with its own optimizer; the state is (cloak's, inverter's)."""
    # Not optax.partition (multi_transform): its states are each optimizer over the whole pair with MaskedNode
    # holes, where the train state keeps the cloak's own optimizer state (the same with the adversary off).

    def init(params):
        return cloak_opt.init(params["cloak"]), inverter_opt.init(params["inverter"])

    def update(grads, state, params=None):
        uc, sc = cloak_opt.update(grads["cloak"], state[0], None if params is None else params["cloak"])
        ui, si = inverter_opt.update(grads["inverter"], state[1], None if params is None else params["inverter"])
        return nnx.State({"cloak": uc, "inverter": ui}), (sc, si)

    return optax.GradientTransformation(init, update)


class Adversary:
    """Builds the inverter, its state in the train state, and the adversarial train step."""

    def __init__(self, objective_cfg, *, cloak: nnx.Module, hidden_size: int, vocab_size: int, seed: int,
                 max_length: int = 2048):
        self.cfg = objective_cfg
        kwargs = {"max_length": max_length} if objective_cfg.adversary == "transformer" else {}
        self._make = lambda rngs: inverters.make_inverter(objective_cfg.adversary, hidden_size, vocab_size,  # noqa: E731
                                                          rngs=rngs, **kwargs)
        inverter = self._make(nnx.Rngs(seed + 1))
        self.inverter_graphdef, self._init_params = nnx.split(inverter)
        self.pair_graphdef, _ = nnx.split(_Pair(cloak, inverter))
        # A non-finite inverter step leaves its parameters and moments as they were, however many come in a row.
        self.optimizer = optax.apply_if_finite(optax.adam(objective_cfg.adversary_learning_rate),
                                               max_consecutive_errors=np.iinfo(np.int32).max)

    def init_state(self) -> AdversaryState:
        params = jax.tree.map(jnp.array, self._init_params)  # own buffers: the state is donated
        return AdversaryState(params, self.optimizer.init(params))

    def make_train_step(self, *, loss_fn, base_graphdef, optimizer, mesh, hidden_size, learning_rate_fn=None,
                        base_step_graphdef=None):
        pair_step = step_lib.make_train_step(
            loss_fn=adversarial_loss_fn(loss_fn, self.cfg), cloak_graphdef=self.pair_graphdef,
            base_graphdef=base_graphdef, optimizer=_pair_optimizer(optimizer, self.optimizer), mesh=mesh,
            hidden_size=hidden_size, learning_rate_fn=learning_rate_fn, base_step_graphdef=base_step_graphdef)
        extra_steps = int(self.cfg.adversary_steps) - 1
        reset_every = int(self.cfg.adversary_reset_every)

        def train_step(state, base_state, batch):
            adv = state.adversary
            if reset_every > 0:
                key = jax.random.fold_in(step_lib.step_key(state.run_key, state.step), RESET_STREAM)
                adv = jax.lax.cond(state.step % reset_every == 0,
                                   lambda: self.refresh(state.params, base_state, base_graphdef, batch, key),
                                   lambda: adv)
            pair = state.replace(params=nnx.State({"cloak": state.params, "inverter": adv.params}),
                                 opt_state=(state.opt_state, adv.opt_state), adversary=None)
            new, metrics = pair_step(pair, base_state, batch)
            adv = AdversaryState(new.params["inverter"], new.opt_state[1])
            for i in range(extra_steps):
                adv = self._inverter_step(adv, new.params["cloak"], base_state, base_graphdef, batch,
                                          jax.random.fold_in(step_lib.step_key(state.run_key, state.step), i + 1))
            return new.replace(params=new.params["cloak"], opt_state=new.opt_state[0], adversary=adv), metrics

        return train_step

    def refresh(self, cloak_params, base_state, base_graphdef, batch, key) -> AdversaryState:
        """A freshly initialised inverter (parameters from ``key``, new optimizer state) trained
        ``adversary_reset_steps`` inverter-only steps on ``batch`` with fresh noise (key ``fold_in(key, i + 1)``)."""
        params = nnx.state(self._make(nnx.Rngs(key)))
        fresh = AdversaryState(params, self.optimizer.init(params))
        return jax.lax.fori_loop(
            0, int(self.cfg.adversary_reset_steps),
            lambda i, a: self._inverter_step(a, cloak_params, base_state, base_graphdef, batch,
                                             jax.random.fold_in(key, i + 1)), fresh)

    def _inverter_step(self, adv: AdversaryState, cloak_params, base_state, base_graphdef, batch, key):
        """One inverter-only update on the whole step batch with fresh noise (the cloak held fixed)."""
        flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
        pair = nnx.merge(self.pair_graphdef, nnx.State({"cloak": cloak_params, "inverter": adv.params}))
        base = nnx.merge(base_graphdef, base_state)
        keys = step_lib.example_keys(key, flat["example_index"])
        x_t, ids, selected, attention = _transformed(pair.cloak, base, flat, keys, False)
        params, opt_state, _, _ = inverters.inverter_update(self.inverter_graphdef, self.optimizer, adv.params,
                                                           adv.opt_state, jax.lax.stop_gradient(x_t), ids,
                                                           selected, attention)
        return AdversaryState(params, opt_state)


def from_trainer_config(cfg, cloak: nnx.Module, model_config) -> "Adversary | None":
    """The run's adversary (None when ``objective.adversary`` is off)."""
    if not enabled(cfg.objective):
        return None
    return Adversary(cfg.objective, cloak=cloak, hidden_size=model_config.hidden_size,
                     vocab_size=model_config.vocab_size, seed=cfg.train.seed, max_length=max(cfg.data.buckets))
