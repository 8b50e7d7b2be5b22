"""Vocabulary-chunked cross-entropy (objective.vocab_chunk_size): the same losses and gradients as the full
logits, and the (B, S, V) float32 logits never exist in the compiled step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.config import ObjectiveConfig
from sgt_jax.models.decoder import CausalLM, DecoderConfig
from sgt_jax.transform.objective import (chunked_distill_loss, chunked_lm_loss, distill_loss, lm_loss, make_loss_fn,
                               local_denominators)

B, S, D, V = 2, 6, 16, 389  # V prime: the last chunk is padded


def _data(seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    clean = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)) * 0.5, jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, size=(B, S)))
    attn = jnp.asarray([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    loss_mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1]])
    return hidden, clean, head, ids, attn, loss_mask


@pytest.mark.parametrize("chunk", [1, 64, 100, V, 4096])
def test_chunked_lm_loss_matches_full_logits_with_gradients(chunk):
    hidden, _, head, ids, attn, loss_mask = _data()

    def full(h):
        return lm_loss(jnp.dot(h, head, preferred_element_type=jnp.float32), ids, attn, loss_mask)

    def chunked(h):
        return chunked_lm_loss(h, head, ids, attn, loss_mask, chunk_size=chunk)

    (v_full, g_full), (v_chunk, g_chunk) = jax.value_and_grad(full)(hidden), jax.value_and_grad(chunked)(hidden)
    np.testing.assert_allclose(float(v_chunk), float(v_full), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_chunk), np.asarray(g_full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 100, 4096])
def test_chunked_distill_loss_matches_full_logits_with_gradients(chunk):
    hidden, clean, head, _, attn, _ = _data(1)
    logits = lambda h: jnp.dot(h, head, preferred_element_type=jnp.float32)  # noqa: E731

    full = lambda h: distill_loss(logits(clean), logits(h), attn)  # noqa: E731
    chunked = lambda h: chunked_distill_loss(clean, h, head, attn, chunk_size=chunk)  # noqa: E731
    (v_full, g_full), (v_chunk, g_chunk) = jax.value_and_grad(full)(hidden), jax.value_and_grad(chunked)(hidden)
    np.testing.assert_allclose(float(v_chunk), float(v_full), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_chunk), np.asarray(g_full), rtol=1e-5, atol=1e-5)
    # the clean side is a target: no gradient into it
    g_clean = jax.grad(lambda c: chunked_distill_loss(c, hidden, head, attn, chunk_size=chunk))(clean)
    assert float(jnp.abs(g_clean).max()) == 0.0


def _setup(tmp_path, tied=False):
    import json

    from sgt_jax.models.hf import hf_config_dict
    from sgt_jax.transform.cloak import TransformerCloak

    config = DecoderConfig(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
                           rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64, sliding_window=None,
                           attention_bias=False, tie_word_embeddings=tied)
    base = CausalLM(config, dtype="float32", rngs=nnx.Rngs(0))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(config)))
    cloak = TransformerCloak(config_path=str(tmp_path), num_hidden_layers=1, seed=0, rngs=nnx.Rngs(0))
    _, _, _, ids, attn, loss_mask = _data(2)
    batch = dict(input_ids=ids, attention_mask=attn, noise_mask=jnp.ones_like(attn), loss_mask=loss_mask)
    return base, cloak, batch


@pytest.mark.slow
@pytest.mark.parametrize("mode,tied", [("lm", False), ("distill", False), ("lm", True)])
def test_objective_with_vocab_chunks_equals_unchunked_including_cloak_gradients(mode, tied, tmp_path):
    base, cloak, batch = _setup(tmp_path, tied)
    graphdef, params = nnx.split(cloak)
    keys = jax.random.split(jax.random.key(3), B)
    den = local_denominators(batch, D)

    def run(chunk):
        loss_fn = make_loss_fn(ObjectiveConfig(mode=mode, vocab_chunk_size=chunk))
        f = lambda p: loss_fn(nnx.merge(graphdef, p), base, batch, keys, den, True)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (loss_full, m_full), g_full = run(0)
    (loss_chunk, m_chunk), g_chunk = run(50)
    np.testing.assert_allclose(float(loss_chunk), float(loss_full), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m_chunk["utility_loss"]), float(m_full["utility_loss"]), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _vocab_arrays(hlo: str):
    """f32 arrays with a vocabulary-sized last axis and at least 3 dims: (B, S, V)-like logits."""
    return [m for m in re.findall(r"f32\[([0-9,]+)\]", hlo)
            if len(m.split(",")) >= 3 and int(m.split(",")[-1]) >= V]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lm", "distill"])
def test_chunked_objective_never_materialises_full_logits(mode, tmp_path):
    base, cloak, batch = _setup(tmp_path)
    graphdef, params = nnx.split(cloak)
    keys = jax.random.split(jax.random.key(3), B)
    den = local_denominators(batch, D)

    def compiled(chunk):
        loss_fn = make_loss_fn(ObjectiveConfig(mode=mode, vocab_chunk_size=chunk))
        f = lambda p: loss_fn(nnx.merge(graphdef, p), base, batch, keys, den, False)[0]  # noqa: E731
        return jax.jit(jax.grad(f)).lower(params).compile()

    full, chunked = compiled(0), compiled(64)
    assert _vocab_arrays(full.as_text()), "the check must see the logits of the unchunked step"
    assert _vocab_arrays(chunked.as_text()) == []
    mem_full, mem_chunk = full.memory_analysis(), chunked.memory_analysis()
    if mem_full is not None and mem_chunk is not None:
        assert mem_chunk.temp_size_in_bytes < mem_full.temp_size_in_bytes
