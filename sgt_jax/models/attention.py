"""Attention masks and the one switch between attention kernels (XLA everywhere, cuDNN flash, TPU splash).

Tensors are laid out (batch, seq, heads, head_dim). Masks follow Hugging Face semantics: the causal order and
the sliding window are over sequence *indices* (not position ids), padding is masked on the key side, and a
query at index i sees key j when ``j <= i`` and ``i - j < sliding_window``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from sgt_jax.config import ATTENTION_IMPLS, check_choice
from sgt_jax.errors import SGTError

# A finite large negative logit: fully masked rows (left-pad queries) give a uniform, NaN-free softmax.
_MASKED_LOGIT = -1e30


class AttentionConfigError(SGTError):
    """The requested attention kernel cannot run here; the message names model.attention_impl and the fix."""


def check_attention_impl(attention_impl: str, platform: str | None = None) -> None:
    """Refuse, in one line, a kernel the platform lacks (called at construction, outside jit). ``platform``: the
    backend the model is built for (an ahead-of-time compile's target); None: the local one."""
    check_choice(attention_impl, ATTENTION_IMPLS, "model.attention_impl", AttentionConfigError)
    backend = platform or jax.default_backend()
    needed = {"cudnn": "gpu", "splash": "tpu"}.get(attention_impl)
    if needed is not None and backend != needed:
        raise AttentionConfigError(
            f"model.attention_impl={attention_impl!r} needs a {needed.upper()} but the JAX backend is "
            f"{backend!r}; set model.attention_impl=xla (works everywhere)."
        )


def attention_mask_4d(attention_mask, *, causal: bool = True, sliding_window: int | None = None) -> jax.Array:
    """Boolean (B, 1, S, S) mask, True where query i may attend key j: padding + causal + sliding window."""
    seq_len = attention_mask.shape[-1]
    allowed = attention_mask.astype(bool)[:, None, None, :]
    query_index = jnp.arange(seq_len)[:, None]
    key_index = jnp.arange(seq_len)[None, :]
    structure = jnp.ones((seq_len, seq_len), bool)
    if causal:
        structure &= key_index <= query_index
    if sliding_window is not None:
        distance = query_index - key_index
        # HF: causal window keeps i - j < w; bidirectional window keeps |i - j| <= w.
        structure &= (distance < sliding_window) if causal else (jnp.abs(distance) <= sliding_window)
    return allowed & structure[None, None]


def cached_attention_mask(padding_mask, query_start, query_len: int, *, sliding_window: int | None = None) -> jax.Array:
    """Boolean (B, 1, T, M) mask for T queries at cache indices ``query_start .. query_start + T - 1`` over an
    M-slot KV cache: key j is seen when ``padding_mask[:, j]`` (1 for filled, real slots), ``j <= i`` and
    ``i - j < sliding_window`` (HF's causal window over sequence indices). ``query_start`` may be traced."""
    cache_len = padding_mask.shape[-1]
    allowed = padding_mask.astype(bool)[:, None, None, :]
    query_index = query_start + jnp.arange(query_len)[:, None]
    key_index = jnp.arange(cache_len)[None, :]
    structure = key_index <= query_index
    if sliding_window is not None:
        structure &= (query_index - key_index) < sliding_window
    return allowed & structure[None, None]


def cached_dot_product_attention(query, key_cache, value_cache, padding_mask, query_start, *, sliding_window=None,
                                 scale=None):
    """Causal attention of (B, T, H, D) queries at cache indices ``query_start..`` over a (B, M, K, D) KV cache
    whose slots are flagged by ``padding_mask`` (B, M). Always the XLA kernel: decode steps are one query long,
    where flash kernels gain nothing. Returns (B, T, H, D) in the value dtype."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    mask = cached_attention_mask(padding_mask, query_start, query.shape[1], sliding_window=sliding_window)
    return _xla_attention(query, key_cache, value_cache, mask, scale)


# Query blocks of the XLA kernel on long sequences: each block's (B, K, G, block, S) scores are recomputed in
# the backward instead of kept, so training holds one block's scores instead of S x S per head.
QUERY_BLOCK = 512


def _xla_attention(query, key, value, mask, scale):
    """Exact dot-product attention with the softmax in float32 (the reference kernel, also for the fp32 cloak).
    Sequences longer than ``QUERY_BLOCK`` run in blocks of queries, each over every key (no online softmax:
    the same arithmetic per query row), rematerialised in the backward."""
    q_len = query.shape[1]
    if q_len <= QUERY_BLOCK or q_len % QUERY_BLOCK or mask.shape[2] != q_len:
        return _attention_block(query, key, value, mask, scale)
    blocks = q_len // QUERY_BLOCK
    split = lambda x, axis: jnp.moveaxis(x.reshape(x.shape[:axis] + (blocks, QUERY_BLOCK) + x.shape[axis + 1:]),  # noqa: E731
                                         axis, 0)
    block = jax.checkpoint(lambda q, m: _attention_block(q, key, value, m, scale), prevent_cse=False)
    out = jax.lax.map(lambda qm: block(*qm), (split(query, 1), split(mask, 2)))
    return jnp.moveaxis(out, 0, 1).reshape(query.shape[:3] + (value.shape[-1],))


def _attention_block(query, key, value, mask, scale):
    num_heads, num_kv_heads = query.shape[2], key.shape[2]
    batch, q_len, _, head_dim = query.shape
    # Group queries by their shared kv head (GQA) instead of repeating k/v in memory.
    grouped = query.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", grouped, key, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, :, None], logits, _MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, value)
    return out.reshape(batch, q_len, num_heads, head_dim)


@functools.lru_cache(maxsize=16)
def _splash_kernel(seq_len: int, num_heads: int, causal: bool, sliding_window: int | None, interpret: bool = False):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (seq_len, seq_len)
    if sliding_window is not None:
        window = (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)
        head_mask = masks.LocalMask(shape, window_size=window, offset=0)
    elif causal:
        head_mask = masks.CausalMask(shape)
    else:
        head_mask = masks.FullMask(shape)
    # Cached across traces: its mask arrays must be concrete, not tracers of the trace that built it first.
    with jax.ensure_compile_time_eval():
        return kernel.make_splash_mha_single_device(mask=masks.MultiHeadMask([head_mask] * num_heads),
                                                    interpret=interpret)


def _kernel_layout(num_heads: int, batch: int):
    """The mesh axes a kernel's shard_map is manual over (every axis not manual already: neither a Mosaic kernel
    nor the cuDNN custom call can be partitioned automatically, the latter not inside a partly manual region),
    and which of them split the batch (data, fsdp) and the heads (tensor) — an axis that does not divide its
    dimension leaves it replicated. None without a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    free = [name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind != jax.sharding.AxisType.Manual]
    batch_axes = tuple(a for a in ("data", "fsdp") if a in free and mesh.shape[a] > 1)
    while batch_axes and batch % int(np.prod([mesh.shape[a] for a in batch_axes])):
        batch_axes = batch_axes[:-1]
    head_axis = "tensor" if "tensor" in free and mesh.shape["tensor"] > 1 and num_heads % mesh.shape["tensor"] == 0 \
        else None
    return set(free), (batch_axes or None), head_axis


def _call_sharded(local, layout, spec, query, key, value, padding_mask):
    """``local(query, key, value, padding_mask)`` per device in a shard_map over ``layout``'s axes (q, k, v split
    as ``spec`` says, the mask's rows as the batch), or directly when there is no mesh or no axis left. Untyped
    (check_vma off): neither kernel's custom VJP carries the varying-manual-axes types."""
    if layout is None or not layout[0]:
        return local(query, key, value, padding_mask)
    axes, batch_axes, _ = layout
    return jax.shard_map(local, in_specs=(spec, spec, spec, P(batch_axes, None)), out_specs=spec, axis_names=axes,
                         check_vma=False)(query, key, value, padding_mask)


def _cudnn_attention(query, key, value, padding_mask, scale, causal, sliding_window):
    """cuDNN flash attention in its own ``shard_map`` over the mesh in context, like splash: the cuDNN custom call's
    partitioner cannot handle a region that is manual over only some mesh axes (the train step's), so every axis
    not manual yet becomes manual here — batch over data and fsdp, heads over tensor (kv heads repeated when
    tensor does not divide them). Left padding is not expressible as cuDNN's (right-padded) sequence lengths: the
    whole mask (padding, causal order, window) goes in as an additive bias, built per device from its rows."""
    batch, _, num_heads, _ = query.shape

    def local(q, k, v, mask):
        allowed = attention_mask_4d(mask, causal=causal, sliding_window=sliding_window)
        bias = jnp.where(allowed, 0.0, _MASKED_LOGIT).astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="cudnn")

    layout = _kernel_layout(num_heads, batch)
    tensor = jax.sharding.get_abstract_mesh().shape.get("tensor", 1) if layout and "tensor" in layout[0] else 1
    if num_heads % tensor:
        raise AttentionConfigError(
            f"model.attention_impl='cudnn' splits the {num_heads} attention heads over mesh.tensor={tensor}, which "
            f"does not divide them; choose a mesh.tensor that divides {num_heads} or set model.attention_impl=xla.")
    if key.shape[2] % tensor:  # GQA with fewer kv heads than tensor devices: every device gets its own copies
        repeat = num_heads // key.shape[2]
        key, value = jnp.repeat(key, repeat, axis=2), jnp.repeat(value, repeat, axis=2)
    spec = layout and P(layout[1], None, layout[2], None)
    return _call_sharded(local, layout, spec, query, key, value, padding_mask)


def _splash_attention(query, key, value, padding_mask, scale, causal, sliding_window, interpret=False):
    """Splash attention (TPU Pallas) in its own ``shard_map`` over the mesh in context (batch over data and
    fsdp, heads over tensor); left padding as segment ids (pad and real tokens never attend each other), GQA by
    repeating the kv heads, the sliding window and bidirectional masks as splash masks."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    batch, seq_len, num_heads, _ = query.shape
    if seq_len % 128:
        raise AttentionConfigError(
            f"model.attention_impl='splash' needs sequence lengths that are multiples of 128 (got {seq_len}); "
            "set data.buckets to multiples of 128 or model.attention_impl=xla."
        )
    repeat = num_heads // key.shape[2]
    key, value = jnp.repeat(key, repeat, axis=2), jnp.repeat(value, repeat, axis=2)
    to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # (B, H, S, D)  # noqa: E731
    q, k, v = to_heads_first(query * scale), to_heads_first(key), to_heads_first(value)
    segments = padding_mask.astype(jnp.int32)

    def local(q, k, v, seg):
        kernel = _splash_kernel(seq_len, q.shape[1], causal, sliding_window, interpret)
        return jax.vmap(lambda *a: kernel(*a[:3], segment_ids=SegmentIds(q=a[3], kv=a[3])))(q, k, v, seg)

    layout = _kernel_layout(num_heads, batch)
    spec = layout and P(layout[1], layout[2], None, None)
    return to_heads_first(_call_sharded(local, layout, spec, q, k, v, segments))


def dot_product_attention(query, key, value, padding_mask, *, attention_impl="xla", causal=True,
                          sliding_window=None, scale=None, interpret=False):
    """Attention over (B, S, H, D) queries and (B, S, K, D) keys/values (GQA: H a multiple of K).

    padding_mask: (B, S), 1 for real tokens. Returns (B, S, H, D) in the value dtype.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if attention_impl == "splash":
        return _splash_attention(query, key, value, padding_mask, scale, causal, sliding_window, interpret)
    if attention_impl == "cudnn":
        return _cudnn_attention(query, key, value, padding_mask, scale, causal, sliding_window)
    mask = attention_mask_4d(padding_mask, causal=causal, sliding_window=sliding_window)
    return _xla_attention(query, key, value, mask, scale)


__all__ = ["AttentionConfigError", "attention_mask_4d", "cached_attention_mask",
           "cached_dot_product_attention", "check_attention_impl", "dot_product_attention"]
