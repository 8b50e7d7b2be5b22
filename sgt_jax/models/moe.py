"""Mixture-of-experts MLP for the cloak's estimators (``mean_num_experts`` / ``std_num_experts`` > 0).

The original PyTorch engine needs DeepSpeed for this; here it is native JAX: ``num_experts`` SwiGLU experts shaped like
the decoder's dense MLP, a linear router, top-k routing (k = ``num_experts_per_tok``, 2 by default) with the
top-k gate weights renormalised to sum to 1, and the Switch/GShard load-balancing loss.

Dispatch is dense: every expert runs on every token and the combine weights are zero off the top-k. That
costs ``num_experts``× the dense MLP's FLOPs but has static shapes, no token dropping and no capacity
factor, which is the right trade for the small expert counts an SGT uses (the recommendations advise 0).
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from sgt_jax.models.config import DecoderConfig

__all__ = ["MoeMLP", "route_top_k", "load_balancing_loss"]


def route_top_k(router_logits: jax.Array, k: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(…, E) float32 logits → (router_probs (…, E), combine weights (…, E), expert indices (…, k)).

    The combine weights are softmax over the k largest logits (= the top-k router probabilities renormalised
    to sum to 1) scattered back to their experts, zero elsewhere.
    """
    probs = jax.nn.softmax(router_logits, axis=-1)
    top_logits, top_index = jax.lax.top_k(router_logits, k)
    top_gates = jax.nn.softmax(top_logits, axis=-1)
    one_hot = jax.nn.one_hot(top_index, router_logits.shape[-1], dtype=probs.dtype)  # (…, k, E)
    combine = jnp.einsum("...k,...ke->...e", top_gates, one_hot)
    return probs, combine, top_index


def load_balancing_loss(router_probs: jax.Array, top_index: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Switch/GShard auxiliary loss ``E * sum_e f_e * P_e`` over the real tokens (``token_mask``).

    f_e: fraction of the routed (token, slot) assignments that go to expert e (sums to 1 over experts);
    P_e: mean router probability of expert e. Perfectly balanced routing gives 1.0. (Hugging Face's
    Mixtral ``load_balancing_loss_func`` counts each of the k slots separately, i.e. k × this value.)
    """
    num_experts = router_probs.shape[-1]
    k = top_index.shape[-1]
    weight = token_mask.astype(jnp.float32)
    num_tokens = jnp.maximum(weight.sum(), 1.0)
    assignments = jax.nn.one_hot(top_index, num_experts, dtype=jnp.float32).sum(-2)  # (…, E), k ones per token
    fraction = jnp.einsum("...e,...->e", assignments, weight) / (num_tokens * k)
    mean_prob = jnp.einsum("...e,...->e", router_probs.astype(jnp.float32), weight) / num_tokens
    return num_experts * jnp.sum(fraction * mean_prob)


class MoeMLP(nnx.Module):
    """``config.num_experts`` SwiGLU experts + router; ``__call__(x, token_mask) -> (y, aux_loss)``."""

    def __init__(self, config: "DecoderConfig", *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        num_experts = int(config.num_experts)
        if num_experts < 1:
            raise ValueError(f"MoeMLP needs num_experts >= 1 (got {num_experts}); use the dense MLP for 0.")
        self.num_experts = num_experts
        self.top_k = min(int(config.num_experts_per_tok), num_experts)
        self.dtype = dtype
        hidden, inner = int(config.hidden_size), int(config.intermediate_size)
        init = nnx.initializers.normal(0.02)  # the dense layers' std; checkpoints overwrite it
        # Logical axis names for sgt_jax.training.parallel's sharding rules (same convention as the dense MLP).
        self.router = nnx.Param(init(rngs.params(), (hidden, num_experts), param_dtype),
                                logical_axes=("embed", "experts"))
        self.gate_proj = nnx.Param(init(rngs.params(), (num_experts, hidden, inner), param_dtype),
                                   logical_axes=("experts", "embed", "mlp"))
        self.up_proj = nnx.Param(init(rngs.params(), (num_experts, hidden, inner), param_dtype),
                                 logical_axes=("experts", "embed", "mlp"))
        self.down_proj = nnx.Param(init(rngs.params(), (num_experts, inner, hidden), param_dtype),
                                   logical_axes=("experts", "mlp", "embed"))

    def __call__(self, x: jax.Array, token_mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
        # Routing in float32 whatever the compute dtype: top-k ties and the aux loss are precision-sensitive.
        router_logits = jnp.dot(x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        probs, combine, top_index = route_top_k(router_logits, self.top_k)
        aux_loss = load_balancing_loss(probs, top_index, token_mask)

        h = x.astype(self.dtype)
        gate = jnp.einsum("bsd,edi->bsei", h, self.gate_proj[...].astype(self.dtype))
        up = jnp.einsum("bsd,edi->bsei", h, self.up_proj[...].astype(self.dtype))
        expert_out = jnp.einsum("bsei,eid->bsed", jax.nn.silu(gate) * up, self.down_proj[...].astype(self.dtype))
        y = jnp.einsum("bsed,bse->bsd", expert_out, combine.astype(self.dtype))
        return y, aux_loss
