"""Learned inverters: networks that read transformed embeddings x_t and predict the tokens behind them.

They are the attacker of the privacy evaluation (``python -m sgt_jax.attack``) and can be reused as an
adversary inside a training objective: every function here is pure and jit-compatible, float32, and
imports nothing from the trainer.

- :class:`MLPInverter`: per position, x_t[b, s] -> logits over the vocabulary (a strong per-token
  inverter: it sees one embedding at a time, no context);
- :class:`TransformerInverter`: a small bidirectional transformer over the whole transformed sequence
  (uses the context, as a real attacker would), its width taken from the base model's;
- :func:`inverter_loss`: mean cross-entropy and top-1 accuracy over the masked positions;
- :func:`make_inverter` / :func:`inverter_update`: a factory by name and one pure optimizer step.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["MLPInverter", "TransformerInverter", "INVERTER_KINDS", "make_inverter", "inverter_loss",
           "inverter_logits", "inverter_update"]

INVERTER_KINDS = ("mlp", "transformer")


def _input_features(x_t: jax.Array) -> jax.Array:
    """(..., D + 1): x_t over its RMS (scale-free: transformed embeddings can be orders of magnitude larger
    than clean ones) and the log of that RMS (the scale itself still tells tokens apart, e.g. in few
    dimensions, so the attacker keeps it as a feature of its own)."""
    x_t = x_t.astype(jnp.float32)
    mean_square = jnp.mean(x_t * x_t, axis=-1, keepdims=True) + 1e-12
    return jnp.concatenate([x_t * jax.lax.rsqrt(mean_square), 0.5 * jnp.log(mean_square)], axis=-1)


class MLPInverter(nnx.Module):
    """Per-position classifier: (B, S, D) -> (B, S, V) logits; one hidden layer by default."""

    def __init__(self, hidden_size: int, vocab_size: int, hidden: int = 512, *, num_layers: int = 1,
                 rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(hidden_size + 1 if i == 0 else hidden, hidden, rngs=rngs)
                                for i in range(num_layers)])
        self.norm = nnx.LayerNorm(hidden_size + 1, use_bias=False, use_scale=True, rngs=rngs)
        self.out = nnx.Linear(hidden, vocab_size, rngs=rngs)

    def __call__(self, x_t: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        del mask  # per position: nothing to mask
        h = self.norm(_input_features(x_t))
        for layer in self.layers:
            h = jax.nn.gelu(layer(h))
        return self.out(h)


class _Block(nnx.Module):
    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=width, qkv_features=width,
                                           decode=False, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, h: jax.Array, attn_mask: jax.Array) -> jax.Array:
        h = h + self.attn(self.attn_norm(h), mask=attn_mask, deterministic=True)
        return h + self.down(jax.nn.gelu(self.up(self.mlp_norm(h))))


class TransformerInverter(nnx.Module):
    """A small bidirectional (non-causal) pre-norm transformer over the transformed sequence.

    ``width`` defaults to the base model's ``hidden_size`` (capped at 512 so a 7B model's width does not
    make the attacker itself a large model); ``max_length`` bounds the learned positions.
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, width: Optional[int] = None, num_layers: int = 2,
                 num_heads: int = 4, max_length: int = 2048, rngs: nnx.Rngs):
        width = width or min(hidden_size, 512)
        if width % num_heads:
            raise ValueError(f"TransformerInverter width {width} is not divisible by num_heads={num_heads}.")
        self.max_length = max_length
        self.inp_norm = nnx.LayerNorm(hidden_size + 1, use_bias=False, rngs=rngs)
        self.inp = nnx.Linear(hidden_size + 1, width, rngs=rngs)
        self.pos = nnx.Embed(max_length, width, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.blocks = nnx.List([_Block(width, num_heads, rngs=rngs) for _ in range(num_layers)])
        self.out_norm = nnx.LayerNorm(width, rngs=rngs)
        self.out = nnx.Linear(width, vocab_size, rngs=rngs)

    def __call__(self, x_t: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        seq = x_t.shape[1]
        if seq > self.max_length:
            raise ValueError(f"sequence length {seq} exceeds the inverter's max_length={self.max_length}.")
        mask = jnp.ones(x_t.shape[:2], bool) if mask is None else mask.astype(bool)
        h = self.inp(self.inp_norm(_input_features(x_t))) + self.pos(jnp.arange(seq))[None]
        # Keys are the real (unpadded) positions; a row with no real key attends uniformly (padding rows only).
        attn_mask = jnp.broadcast_to(mask[:, None, None, :], (x_t.shape[0], 1, seq, seq))
        for block in self.blocks:
            h = block(h, attn_mask)
        return self.out(self.out_norm(h))


def make_inverter(kind: str, hidden_size: int, vocab_size: int, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """An inverter by name: ``mlp`` or ``transformer`` (extra keyword arguments go to its constructor)."""
    if kind == "mlp":
        return MLPInverter(hidden_size, vocab_size, rngs=rngs, **kwargs)
    if kind == "transformer":
        return TransformerInverter(hidden_size, vocab_size, rngs=rngs, **kwargs)
    raise ValueError(f"inverter kind {kind!r} is unknown; use one of {', '.join(INVERTER_KINDS)}.")


def inverter_logits(model: nnx.Module, x_t: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """(B, S, V) float32 logits of ``model`` on x_t (B, S, D); ``attention_mask`` marks real positions."""
    return model(x_t.astype(jnp.float32), attention_mask).astype(jnp.float32)


def inverter_loss(model: nnx.Module, x_t: jax.Array, token_ids: jax.Array, mask: jax.Array,
                  attention_mask: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy, top-1 accuracy) of ``model`` predicting ``token_ids`` (B, S) from x_t (B, S, D),
    over positions where ``mask`` (B, S) is set (e.g. the noise mask). The transformer inverter attends over
    ``attention_mask`` (default: ``mask``). Differentiable in both the inverter and x_t (an adversary can push
    gradients into the transform through it)."""
    attention_mask = mask if attention_mask is None else attention_mask
    logits = inverter_logits(model, x_t, attention_mask)
    weights = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, token_ids)
    hit = (jnp.argmax(logits, axis=-1) == token_ids).astype(jnp.float32)
    return jnp.sum(ce * weights) / count, jnp.sum(hit * weights) / count


def inverter_update(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, params: nnx.State, opt_state,
                    x_t: jax.Array, token_ids: jax.Array, mask: jax.Array, attention_mask: jax.Array):
    """One ``tx`` step of the inverter (``graphdef``, ``params``) on a batch, pure (jit it with the first two
    arguments static): (params, opt_state, loss, accuracy), the last two before the update."""

    def loss_fn(p):
        return inverter_loss(nnx.merge(graphdef, p), x_t, token_ids, mask, attention_mask)

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc
