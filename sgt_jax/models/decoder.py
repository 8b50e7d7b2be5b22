"""The Llama / Mistral / Qwen2 decoder family in Flax NNX: RMSNorm, RoPE, GQA attention, SwiGLU (or MoE) MLP,
layers stacked on a leading ``layers`` axis and run under ``lax.scan``, and the causal LM around them.

Every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (see :mod:`sgt_jax.training.parallel`).
Numerics follow Hugging Face's PyTorch implementations so that checkpoints reproduce their logits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.config import REMAT_POLICIES, check_choice
from sgt_jax.models.attention import cached_dot_product_attention, check_attention_impl, dot_product_attention
from sgt_jax.models.config import DecoderConfig, ModelLoadError, _as_dtype
from sgt_jax.models.hf import load_causal_lm
from sgt_jax.models.moe import MoeMLP


def _param(rngs: nnx.Rngs, shape, axes, param_dtype, std=0.02):
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(param_dtype), logical_axes=axes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel laid out (in, out) — the transpose of HF's ``weight``."""

    def __init__(self, in_features, out_features, axes, *, use_bias=False, dtype, param_dtype, rngs):
        self.dtype = dtype
        self.kernel = _param(rngs, (in_features, out_features), axes, param_dtype)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=axes[1:]) if use_bias else None

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """HF semantics: normalise in float32, cast back to the input dtype, then multiply by the scale."""

    def __init__(self, size, *, eps, param_dtype, rngs=None):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((size,), param_dtype), logical_axes=("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(config: DecoderConfig) -> np.ndarray:
    """Inverse frequencies (head_dim/2,), with HF's `_compute_llama3_parameters` when rope_scaling is llama3."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    scaling = config.rope_scaling_dict()
    if scaling is None:
        return inv_freq.astype(np.float32)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(position_ids, inv_freq):
    """(B, S, head_dim) cos and sin in float32, halves duplicated as in HF."""
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x (B, S, H, D); HF's rotate_half convention, computed in x's dtype."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, config: DecoderConfig, *, dtype, param_dtype, attention_impl, rngs):
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.sliding_window, self.attention_impl = config.sliding_window, attention_impl
        kw = dict(use_bias=config.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, self.num_heads * hd, ("embed", "heads"), **kw)
        self.k_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = Linear(self.num_heads * hd, d, ("heads", "embed"), dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)

    def __call__(self, x, attention_mask, cos, sin, causal=True, kv_cache=None, cache_index=None):
        """Without ``kv_cache``: self-attention over x, mask (B, S). With ``kv_cache`` = (k, v) of this layer,
        each (B, M, K, D): the new keys/values are written at cache slots ``cache_index..`` and the queries
        attend over the cache, ``attention_mask`` (B, M) flagging its real slots; returns (out, (k, v))."""
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).reshape(batch, seq_len, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            start = (0, cache_index, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            out = cached_dot_product_attention(q, k_cache, v_cache, attention_mask, cache_index,
                                               sliding_window=self.sliding_window).astype(x.dtype)
            return self.o_proj(out.reshape(batch, seq_len, self.num_heads * self.head_dim)), (k_cache, v_cache)
        out = dot_product_attention(q, k, v, attention_mask, attention_impl=self.attention_impl, causal=causal,
                                    sliding_window=self.sliding_window)
        return self.o_proj(out.reshape(batch, seq_len, self.num_heads * self.head_dim))


class SwiGLU(nnx.Module):
    def __init__(self, config: DecoderConfig, *, dtype, param_dtype, rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x, token_mask=None):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)), jnp.zeros((), jnp.float32)


class DecoderLayer(nnx.Module):
    def __init__(self, config: DecoderConfig, *, dtype, param_dtype, attention_impl, rngs):
        self.input_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.attention = Attention(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                   rngs=rngs)
        self.post_attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        if config.num_experts > 0:

            self.mlp = MoeMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = SwiGLU(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, hidden, attention_mask, cos, sin, causal=True, kv_cache=None, cache_index=None):
        if kv_cache is not None:
            attn_out, kv_cache = self.attention(self.input_norm(hidden), attention_mask, cos, sin, causal,
                                                kv_cache=kv_cache, cache_index=cache_index)
            # The new tokens' own mask: the cache mask's slots cache_index..cache_index + T - 1.
            token_mask = jax.lax.dynamic_slice_in_dim(attention_mask, cache_index, hidden.shape[1], axis=1)
        else:
            attn_out, token_mask = self.attention(self.input_norm(hidden), attention_mask, cos, sin, causal), \
                attention_mask
        hidden = hidden + attn_out
        mlp_out, aux_loss = self.mlp(self.post_attention_norm(hidden), token_mask.astype(bool))
        if kv_cache is not None:
            return hidden + mlp_out, jnp.asarray(aux_loss, jnp.float32), kv_cache
        return hidden + mlp_out, jnp.asarray(aux_loss, jnp.float32)


def _batch_sharded_activations():
    """Under an automatic (GSPMD) mesh context, keep the residual stream sharded over the batch axes: with
    parameters sharded over fsdp on their embed dimension the partitioner then gathers each layer's weights
    (FSDP) instead of all-reducing (B, S, D) activations over the contraction. Identity elsewhere (no mesh
    context, or inside a shard_map that is already manual over those axes)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return lambda x: x
    auto = {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind != jax.sharding.AxisType.Manual}
    axes = tuple(a for a in ("data", "fsdp") if a in auto and mesh.shape[a] > 1)
    if not axes:
        return lambda x: x
    return lambda x: jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def _remat(fn, remat_policy: str):
    if remat_policy == "none":
        return fn
    if remat_policy == "full":
        return jax.checkpoint(fn, prevent_cse=False)
    return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, remat_policy), prevent_cse=False)


class KVCache(NamedTuple):
    """Per-layer stacked keys and values, each (layers, batch, max_len, kv_heads, head_dim); a pytree."""

    k: jax.Array
    v: jax.Array


def init_kv_cache(config: DecoderConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def position_ids_from_mask(attention_mask):
    """Like HF generate: count real tokens (left padding), pad positions clipped to 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class DecoderStack(nnx.Module):
    """The scanned layers (+ optional final norm). No embedding, no head. Used by the base model AND by the
    SGT's estimators (fp32). Layer parameters are stacked on a leading ``layers`` axis."""

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla",
                 remat_policy="none", final_norm=True, matmul_precision: str | None = None, platform: str | None = None,
                 layer_gather=None, rngs: nnx.Rngs):
        """``platform``: the backend the stack is built for (default: the local one), which must have the attention
        kernel. ``layer_gather``: inside a ``shard_map`` that is manual over the FSDP axis the stacked parameters
        arrive as shards, and this function (of one layer's parameters) gathers each layer as the scan reaches
        it (and again in the backward under remat), never the whole stack at once."""
        check_attention_impl(attention_impl, platform)
        check_choice(remat_policy, REMAT_POLICIES, "model.remat_policy")
        self.config, self.remat_policy, self.layer_gather = config, remat_policy, layer_gather
        # None: the backend's default. Set for the float32 cloak: every dot of the stack, and (the precision is
        # fixed on each dot when traced) every dot of its backward, runs at this precision.
        self.matmul_precision = matmul_precision
        self.dtype, param_dtype = _as_dtype(dtype), _as_dtype(param_dtype)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_layers(layer_rngs):
            return DecoderLayer(config, dtype=self.dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                rngs=layer_rngs)

        self.layers = make_layers(rngs)
        for _, variable in nnx.iter_graph(self.layers):
            if isinstance(variable, nnx.Variable) and variable.get_metadata().get("logical_axes") is not None:
                variable.set_metadata("logical_axes", ("layers", *variable.get_metadata()["logical_axes"]))
        self.final_norm = (RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
                           if final_norm else None)

    def __call__(self, hidden, attention_mask, *, position_ids=None, causal=True, last_layer: int | None = None,
                 cache: KVCache | None = None, cache_index=None):
        """Run layers 0..last_layer (default: all, then the final norm; with last_layer the raw residual stream
        after that layer is returned). Returns (hidden_out, summed MoE aux loss).

        With ``cache`` (a :class:`KVCache` of M slots) the T tokens in ``hidden`` are those at cache slots
        ``cache_index..cache_index + T - 1`` (``cache_index`` may be traced), ``attention_mask`` is (B, M) over
        the whole cache (1 for real, filled slots, the new tokens included), position ids default to the real
        tokens counted by that mask, and (hidden_out, aux loss, updated cache) is returned."""
        if self.matmul_precision is not None:
            with jax.default_matmul_precision(self.matmul_precision):
                return self._call(hidden, attention_mask, position_ids, causal, last_layer, cache, cache_index)
        return self._call(hidden, attention_mask, position_ids, causal, last_layer, cache, cache_index)

    def _call(self, hidden, attention_mask, position_ids, causal, last_layer, cache, cache_index):
        if cache is not None:
            return self._call_cached(hidden, attention_mask, position_ids, causal, last_layer, cache, cache_index)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        cos, sin = rope_cos_sin(position_ids, rope_inverse_frequencies(self.config))
        graphdef, layer_state = nnx.split(self.layers)
        if last_layer is not None:
            layer_state = jax.tree.map(lambda x: x[: last_layer + 1], layer_state)

        gather = self.layer_gather
        constrain = _batch_sharded_activations()

        def one_layer(carry, state):
            layer_hidden, aux_total = carry
            state = state if gather is None else gather(state)
            layer_hidden = constrain(layer_hidden)
            layer_hidden, aux = nnx.merge(graphdef, state)(layer_hidden, attention_mask, cos, sin, causal)
            return (layer_hidden, aux_total + aux), None

        carry = (hidden.astype(self.dtype), jnp.zeros((), jnp.float32))
        (hidden, aux_loss), _ = jax.lax.scan(_remat(one_layer, self.remat_policy), carry, layer_state)
        if self.final_norm is not None and last_layer is None:
            hidden = self.final_norm(hidden)
        return hidden, aux_loss

    def _call_cached(self, hidden, attention_mask, position_ids, causal, last_layer, cache, cache_index):
        if not causal or last_layer is not None:
            raise ValueError("a KV cache is for causal decoding of the full stack; drop causal=False / last_layer.")
        if cache.k.shape[0] != self.config.num_hidden_layers or cache.k.shape[2] != attention_mask.shape[-1]:
            raise ValueError(f"KV cache of shape {cache.k.shape} does not match {self.config.num_hidden_layers} layers "
                             f"and an attention mask over {attention_mask.shape[-1]} cache slots.")
        batch, seq_len = hidden.shape[:2]
        if cache_index is None:
            cache_index = 0
        if position_ids is None:
            position_ids = jax.lax.dynamic_slice_in_dim(position_ids_from_mask(attention_mask), cache_index, seq_len,
                                                        axis=1)
        cos, sin = rope_cos_sin(position_ids, rope_inverse_frequencies(self.config))
        graphdef, layer_state = nnx.split(self.layers)

        def one_layer(carry, scanned):
            layer_hidden, aux_total = carry
            state, k_cache, v_cache = scanned
            layer_hidden, aux, (k_cache, v_cache) = nnx.merge(graphdef, state)(
                layer_hidden, attention_mask, cos, sin, True, kv_cache=(k_cache, v_cache), cache_index=cache_index)
            return (layer_hidden, aux_total + aux), (k_cache, v_cache)

        carry = (hidden.astype(self.dtype), jnp.zeros((), jnp.float32))
        (hidden, aux_loss), (k, v) = jax.lax.scan(one_layer, carry, (layer_state, cache.k, cache.v))
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        return hidden, aux_loss, KVCache(k, v)


class CausalLM(nnx.Module):
    """Embedding + DecoderStack + LM head; with truncate_at_layer=k only embeddings and layers 0..k exist."""

    def __init__(self, config: DecoderConfig, *, dtype="bfloat16", param_dtype=None, truncate_at_layer=None,
                 attention_impl="xla", remat_policy="none", platform: str | None = None, layer_gather=None,
                 embed_lookup=None, rngs: nnx.Rngs):
        """``platform`` and ``layer_gather``: see :class:`DecoderStack`. ``embed_lookup(table, ids)``: the
        embedding lookup when the table arrives sharded (see ``sgt_jax.training.parallel``); None: a gather."""
        if truncate_at_layer is not None and not 0 <= truncate_at_layer < config.num_hidden_layers:
            raise ModelLoadError(
                f"model.truncate_at_layer={truncate_at_layer} is out of range for a {config.num_hidden_layers}-layer "
                f"model; use 0..{config.num_hidden_layers - 1} or null."
            )
        self.config, self.truncate_at_layer = config, truncate_at_layer
        self.dtype = _as_dtype(dtype)
        param_dtype = self.dtype if param_dtype is None else _as_dtype(param_dtype)
        truncated = truncate_at_layer is not None
        stack_config = dataclasses.replace(config, num_hidden_layers=truncate_at_layer + 1) if truncated else config
        self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), param_dtype)
        self.decoder = DecoderStack(stack_config, dtype=self.dtype, param_dtype=param_dtype,
                                    attention_impl=attention_impl, remat_policy=remat_policy, final_norm=not truncated,
                                    platform=platform, layer_gather=layer_gather, rngs=rngs)
        self.embed_lookup = embed_lookup
        has_head = not truncated and not config.tie_word_embeddings
        self.lm_head = Linear(config.hidden_size, config.vocab_size, ("embed", "vocab"), dtype=self.dtype,
                              param_dtype=param_dtype, rngs=rngs) if has_head else None

    @classmethod
    def from_pretrained(cls, path, dtype="bfloat16", truncate_at_layer=None, mesh=None, attention_impl="xla",
                        remat_policy="none", memory_kind=None) -> "CausalLM":
        return load_causal_lm(cls, path, dtype=dtype, truncate_at_layer=truncate_at_layer, mesh=mesh,
                              attention_impl=attention_impl, remat_policy=remat_policy, memory_kind=memory_kind)

    @property
    def num_layers(self) -> int:
        return self.decoder.config.num_hidden_layers

    @property
    def embedding_table(self) -> jax.Array:
        return self.embed_tokens[...]

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache of ``max_len`` slots for every layer (dtype: the model's compute dtype)."""
        return init_kv_cache(self.decoder.config, batch, max_len, self.dtype if dtype is None else dtype)

    def embed(self, input_ids) -> jax.Array:
        if self.embed_lookup is not None:
            return self.embed_lookup(self.embed_tokens[...], input_ids).astype(self.dtype)
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                 return_hidden_at: int | None = None, cache: KVCache | None = None, cache_index=None,
                 last_logits_only: bool = False):
        """Logits (B, S, V) float32; hidden state after layer k (B, S, D) when truncated at k or return_hidden_at=k.

        With ``cache`` (from :meth:`init_cache`): the S tokens go to cache slots ``cache_index..`` (default 0;
        may be traced), ``attention_mask`` is (B, max_len) over the whole cache (1 for filled real slots, the
        new tokens included) and (logits, updated cache) is returned. Prefill writes the prompt at index 0;
        each decode step then passes one token at the next index with its mask slot set to 1.
        ``last_logits_only``: logits (B, 1, V) of the last position only (a prefill never needs the (B, S, V)
        tensor)."""
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        if cache is not None:
            if self.truncate_at_layer is not None or return_hidden_at is not None:
                raise ValueError("a KV cache needs the full model with its LM head (no truncate_at_layer / "
                                 "return_hidden_at).")
            if attention_mask is None:
                raise ValueError("with a KV cache pass attention_mask (B, max_len) over all cache slots.")
            hidden, _, cache = self.decoder(hidden, attention_mask, position_ids=position_ids, cache=cache,
                                            cache_index=cache_index)
            return self._logits(hidden[:, -1:] if last_logits_only else hidden), cache
        if attention_mask is None:
            attention_mask = jnp.ones(hidden.shape[:2], jnp.int32)
        if return_hidden_at is not None:
            if not 0 <= return_hidden_at < self.num_layers:
                raise ValueError(f"return_hidden_at={return_hidden_at} is outside the model's layers "
                                 f"0..{self.num_layers - 1}.")
            return self.decoder(hidden, attention_mask, position_ids=position_ids, last_layer=return_hidden_at)[0]
        hidden, _ = self.decoder(hidden, attention_mask, position_ids=position_ids)
        if self.truncate_at_layer is not None:
            return hidden
        return self._logits(hidden)

    @property
    def head_matrix(self) -> jax.Array:
        """The (D, V) LM head in the compute dtype (the tied embedding's transpose when there is no head)."""
        head = self.embed_tokens[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return head.astype(self.dtype)

    def _logits(self, hidden) -> jax.Array:
        return jnp.dot(hidden, self.head_matrix, preferred_element_type=jnp.float32)


__all__ = ["CausalLM", "DecoderConfig", "DecoderStack", "KVCache", "ModelLoadError", "init_kv_cache",
           "position_ids_from_mask"]
