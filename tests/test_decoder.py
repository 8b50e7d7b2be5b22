"""Our decoder against the independent transformers PyTorch implementation, on left-padded batches."""

import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax.models import CausalLM, DecoderConfig, DecoderStack
from sgt_jax.models.decoder import ModelLoadError
from tiny_checkpoints import make_tiny_checkpoint

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
FAMILIES = {
    "llama": ("llama", {}),
    "llama3_rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "mistral_window4": ("mistral", {"sliding_window": 4}),
    "qwen2": ("qwen2", {}),
}
SEQ_LEN = 12
# Tied, large embeddings over small layers: top logits far apart, so bf16 argmax comparisons are not decided
# by near-ties, while every layer still changes the logits by far more than the 1e-4 fp32 tolerance.
WELL_SEPARATED = dict(tie_word_embeddings=True, init_std=0.05, embedding_std=0.3)


def left_padded_batch(vocab_size=128):
    rng = np.random.default_rng(0)
    input_ids = rng.integers(3, vocab_size, (3, SEQ_LEN))
    attention_mask = np.ones((3, SEQ_LEN), np.int64)
    attention_mask[0, :5] = 0  # different amounts of left padding per row
    attention_mask[1, :2] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


def torch_reference(path, input_ids, attention_mask):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    # HF forward does not derive positions from the mask; give it the same ones generate would.
    position_ids = np.maximum(attention_mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                    position_ids=torch.tensor(position_ids), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    model_type, overrides = FAMILIES[request.param]
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), model_type, **WELL_SEPARATED, **overrides)
    input_ids, attention_mask = left_padded_batch()
    logits, hidden_states = torch_reference(path, input_ids, attention_mask)
    return dict(name=request.param, path=path, input_ids=input_ids, attention_mask=attention_mask,
                logits=logits, hidden_states=hidden_states)


def test_fp32_logits_and_hidden_states_match_transformers(family):
    model = CausalLM.from_pretrained(family["path"], dtype="float32")
    ids, mask = jnp.asarray(family["input_ids"]), jnp.asarray(family["attention_mask"])
    real = family["attention_mask"].astype(bool)
    logits = np.asarray(model(ids, attention_mask=mask))
    assert logits.dtype == np.float32
    assert np.abs(logits - family["logits"])[real].max() < 1e-4
    for k in (0, 2):
        hidden = np.asarray(model(ids, attention_mask=mask, return_hidden_at=k))
        assert np.abs(hidden - family["hidden_states"][k + 1])[real].max() < 1e-4


def test_bf16_argmax_agrees_with_torch_fp32(family):
    model = CausalLM.from_pretrained(family["path"], dtype="bfloat16")
    logits = np.asarray(model(jnp.asarray(family["input_ids"]), attention_mask=jnp.asarray(family["attention_mask"])))
    real = family["attention_mask"].astype(bool)
    agreement = (logits.argmax(-1) == family["logits"].argmax(-1))[real].mean()
    assert agreement >= 0.99
    top2 = np.sort(family["logits"], -1)[..., -2:]
    assert np.median((top2[..., 1] - top2[..., 0])[real]) > 0.1  # the model really is well separated


def test_sliding_window_changes_the_output(tmp_path):
    """The mistral parity test above is only meaningful if the window of 4 actually masks something at 12."""
    ids, mask = left_padded_batch()
    windowed = make_tiny_checkpoint(tmp_path / "w", "mistral", sliding_window=4)
    full = make_tiny_checkpoint(tmp_path / "f", "mistral", sliding_window=None)
    a = CausalLM.from_pretrained(windowed, dtype="float32")(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    b = CausalLM.from_pretrained(full, dtype="float32")(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert np.abs(np.asarray(a - b))[:, -1].max() > 1e-2  # last token sees > 4 keys in every row
    assert np.abs(np.asarray(a - b))[2, :4].max() < 1e-5  # first 4 tokens of an unpadded row are unaffected


def tiny_config(**overrides):
    fields = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4,
                  rope_scaling=None, max_position_embeddings=64, sliding_window=None, attention_bias=False,
                  tie_word_embeddings=True)
    return DecoderConfig(**{**fields, **overrides})


@pytest.mark.slow
def test_remat_policies_and_tied_head_give_identical_outputs():
    from flax import nnx

    ids = jnp.asarray(left_padded_batch(32)[0][:, :6])
    outputs = [CausalLM(tiny_config(), dtype="float32", remat_policy=policy, rngs=nnx.Rngs(0))(ids)
               for policy in ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")]
    for out in outputs[1:]:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(outputs[0]))
    model = CausalLM(tiny_config(), dtype="float32", rngs=nnx.Rngs(0))
    assert model.lm_head is None and outputs[0].shape == (3, 6, 32)


def test_decoder_stack_bidirectional_and_padding():
    from flax import nnx

    stack = DecoderStack(tiny_config(), rngs=nnx.Rngs(1))
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 16)), jnp.float32)
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    causal, aux = stack(hidden, mask)
    bidirectional, _ = stack(hidden, mask, causal=False)
    assert float(aux) == 0.0 and aux.dtype == jnp.float32
    # Causal: the first real token is unaffected by later ones; bidirectional: it is.
    changed = hidden.at[:, -1].add(1.0)
    assert np.allclose(stack(changed, mask)[0][:, 2], causal[:, 2], atol=1e-6)
    assert not np.allclose(stack(changed, mask, causal=False)[0][:, 2], bidirectional[:, 2], atol=1e-3)
    # Padding is masked: changing a pad token's embedding changes no real token.
    repadded = hidden.at[0, 0].add(5.0)
    assert np.allclose(stack(repadded, mask, causal=False)[0][0, 2:], bidirectional[0, 2:], atol=1e-6)


def test_config_errors_are_one_line():
    base = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4)
    with pytest.raises(ModelLoadError, match="rope_type='yarn'") as err:
        DecoderConfig.from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="num_layerz") as err:
        DecoderConfig.from_hf(base, num_layerz=1)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="max_window_layers"):
        DecoderConfig.from_hf({**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4,
                               "max_window_layers": 1})
    assert DecoderConfig.from_hf(base, num_hidden_layers=1).num_hidden_layers == 1
    legacy = DecoderConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": LLAMA3_ROPE})
    assert legacy.rope_theta == 5e5 and dict(legacy.rope_scaling)["factor"] == 8.0


@pytest.mark.parametrize("impl", ["cudnn", "splash", "flash"])
def test_missing_attention_kernel_is_a_one_line_error(impl):
    import jax
    from flax import nnx

    from sgt_jax.models.attention import AttentionConfigError

    if impl == "cudnn" and jax.default_backend() == "gpu" or impl == "splash" and jax.default_backend() == "tpu":
        pytest.skip("the kernel exists on this backend")
    with pytest.raises(AttentionConfigError, match=f"model.attention_impl='{impl}'") as err:
        DecoderStack(tiny_config(), attention_impl=impl, rngs=nnx.Rngs(0))
    assert "\n" not in str(err.value) and "xla" in str(err.value)


def test_unknown_remat_policy_is_a_one_line_error():
    from flax import nnx

    from sgt_jax.errors import SGTError

    with pytest.raises(SGTError, match="model.remat_policy='sometimes' is not one of none, full") as err:
        DecoderStack(tiny_config(), remat_policy="sometimes", rngs=nnx.Rngs(0))
    assert "\n" not in str(err.value)


def test_query_blocked_attention_equals_xla_reference_forward_and_backward(monkeypatch):
    """Sequences longer than QUERY_BLOCK run the XLA kernel in rematerialised query blocks: output and input
    gradients equal jax.nn.dot_product_attention (XLA's own implementation, with the same mask as a bias) in
    float32 at HIGHEST precision — left padding, causal, sliding window, GQA."""
    import jax

    from sgt_jax.models import attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", 64)  # the same code path as 512 at 1,024 tokens, faster
    batch, seq, heads, kv_heads, dim = 2, 4 * attention.QUERY_BLOCK, 4, 2, 8
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, seq, h, dim)), jnp.float32) for h in (heads, kv_heads, kv_heads))
    padding = np.ones((batch, seq), np.int32)
    padding[1, :37] = 0
    for window in (None, 100):
        mask = attention.attention_mask_4d(jnp.asarray(padding), causal=True, sliding_window=window)

        def ours(q, k, v):
            return attention.dot_product_attention(q, k, v, jnp.asarray(padding), sliding_window=window)

        def reference(q, k, v):
            bias = jnp.where(mask, 0.0, -1e30).astype(jnp.float32)
            kk, vv = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
            return jax.nn.dot_product_attention(q, kk, vv, bias=bias, implementation="xla")

        with jax.default_matmul_precision("highest"):
            real = padding.astype(bool)[:, :, None, None]
            np.testing.assert_allclose(np.where(real, ours(q, k, v), 0), np.where(real, reference(q, k, v), 0),
                                       atol=2e-6)
            loss = lambda f: lambda *a: jnp.sum(jnp.where(real, f(*a), 0) * jnp.cos(jnp.arange(dim)))  # noqa: E731
            for a, b in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v), jax.grad(loss(reference), (0, 1, 2))(q, k, v)):
                np.testing.assert_allclose(a, b, atol=2e-5)
