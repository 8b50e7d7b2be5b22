"""The exported PyTorch SGT (transformers' decoder classes + the cloak's heads) reproduces the JAX cloak (mu, sigma,
x_t with the same eps) in float32."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sgt_jax.inference.artifact import ArtifactError, save_artifact
from sgt_jax.transform.cloak import TransformerCloak
from sgt_jax.config import CloakConfig
from sgt_jax.export.torch_export import export_torch
from readback import load_torch_sgt
from tiny_checkpoints import make_tiny_checkpoint

TINY_CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    # family, checkpoint overrides, cloak config
    "llama3rope-causal-clip-1layer": ("llama", {"rope_parameters": LLAMA3},
                                      dict(use_causal_mask=True, directly_learn_stds=True, scale=[1e-3, 1.0])),
    "mistral-window-bidirectional-tanh-2layers": ("mistral", {"sliding_window": 3},
                                                  dict(use_causal_mask=False, directly_learn_stds=False, shallow=2.0,
                                                       estimator_kwargs={"num_hidden_layers": 2})),
    "qwen2-bias-causal-moe-mask-2layers": ("qwen2", {},
                                           dict(use_causal_mask=True, directly_learn_stds=False, percent_to_mask=0.25,
                                                mean_num_experts=3, estimator_kwargs={"num_hidden_layers": 2})),
    # transformers' Llama biases o_proj as well: the export gives it a zero bias.
    "llama-qkv-bias-bidirectional-std-moe": ("llama", {"attention_bias": True},
                                             dict(use_causal_mask=False, directly_learn_stds=True, scale=[1e-3, 1.0],
                                                  std_num_experts=4)),
    "qwen2-window-causal-1layer": ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 0},
                                   dict(use_causal_mask=True, directly_learn_stds=False, mean_bound=0.5)),
}
ESTIMATOR_CLASSES = {"llama": transformers.LlamaModel, "mistral": transformers.MistralModel,
                     "qwen2": transformers.Qwen2Model}


def _perturbed_cloak(model_dir, cloak_cfg, seed=0):
    cloak = TransformerCloak.from_config(cloak_cfg, str(model_dir), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    d = cloak.hidden_size
    # Non-trivial heads: mu != 0 and sigma varying across tokens and features (both sides of the clip).
    cloak.mean_head.kernel[...] = jnp.asarray(rng.normal(0, 0.3, (d, d)), jnp.float32)
    cloak.mean_head.bias[...] = jnp.asarray(rng.normal(0, 0.1, (d,)), jnp.float32)
    cloak.std_head.kernel[...] = jnp.asarray(rng.normal(0, 0.2, (d, d)), jnp.float32)
    cloak.std_head.bias[...] = jnp.asarray(rng.normal(0, 0.2, (d,)), jnp.float32)
    for _, var in nnx.iter_graph(cloak):  # biases of qwen2's q/k/v are zero-initialised
        if isinstance(var, nnx.Param) and var.shape and var[...].ndim == 2 and not np.any(np.asarray(var[...])):
            var[...] = jnp.asarray(rng.normal(0, 0.1, var.shape), jnp.float32)
    return cloak


def _jax_eps(key, batch, seq, hidden):
    """The cloak's noise for ``key`` (same derivation as TransformerCloak.__call__)."""
    keys = jax.random.split(key, batch)
    noise_keys = jax.vmap(lambda k: jax.random.split(k, 3))(keys)[:, 0]
    return jax.vmap(lambda k: jax.random.normal(k, (seq, hidden), jnp.float32))(noise_keys)


@pytest.mark.parametrize("case", list(CASES))
def test_exported_module_matches_jax(tmp_path, case):
    family, overrides, cloak_kw = CASES[case]
    model_dir = make_tiny_checkpoint(tmp_path / "model", family, **TINY, **overrides)
    cloak_cfg = CloakConfig(**cloak_kw)
    cloak = _perturbed_cloak(model_dir, cloak_cfg)
    artifact = save_artifact(tmp_path / "sgt", params=nnx.state(cloak, nnx.Param), cloak_config=cloak_cfg,
                             model_dir=model_dir, fingerprint="test")
    out = export_torch(artifact, tmp_path / "torch")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "sgt_torch.py"]
    module = load_torch_sgt(out)
    assert type(module.mean_estimator) is ESTIMATOR_CLASSES[family]
    assert type(module.std_estimator) is ESTIMATOR_CLASSES[family]

    batch, seq, d = 3, 7, cloak.hidden_size
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1.0, (batch, seq, d)).astype(np.float32)
    attention = np.ones((batch, seq), np.int32)
    attention[1, :3] = 0  # left padding
    attention[2, :6] = 0
    noise = attention.copy()
    noise[0, :2] = 0  # a few real tokens left clean
    key = jax.random.key(7)

    @nnx.jit
    def run(c, x, a, n, key):
        return c(x, a, n, key=key, deterministic=True)

    ref = jax.device_get(run(cloak, jnp.asarray(x), jnp.asarray(attention), jnp.asarray(noise), key))
    eps = np.array(_jax_eps(key, batch, seq, d))  # a writable copy for torch.from_numpy
    got = module(torch.from_numpy(x), torch.from_numpy(attention), torch.from_numpy(noise), eps=torch.from_numpy(eps))

    assert np.abs(np.asarray(ref.mu)).max() > 1e-2  # mu is non-trivial
    np.testing.assert_allclose(got.mu.numpy(), np.asarray(ref.mu), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got.sigma.numpy(), np.asarray(ref.sigma), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got.x_t.numpy(), np.asarray(ref.x_t), atol=1e-5, rtol=1e-5)
    expected = np.where(noise[..., None] & attention[..., None], x + got.mu.numpy() + got.sigma.numpy() * eps, x)
    if ref.feature_mask is None:
        assert got.feature_mask is None
        np.testing.assert_allclose(got.x_t.numpy(), expected, atol=1e-6)
    else:
        np.testing.assert_array_equal(got.feature_mask.numpy(), np.asarray(ref.feature_mask))
        np.testing.assert_allclose(got.x_t.numpy(), np.where(got.feature_mask.numpy(), got.mu.numpy(), expected),
                                   atol=1e-6)
    # Padding is never transformed.
    np.testing.assert_array_equal(got.x_t.numpy()[attention == 0], x[attention == 0])


def test_a_bias_transformers_class_lacks_is_refused(tmp_path):
    model_dir = make_tiny_checkpoint(tmp_path / "model", "mistral", **TINY)
    cloak_cfg = CloakConfig(estimator_kwargs={"attention_bias": True})
    cloak = TransformerCloak.from_config(cloak_cfg, str(model_dir), rngs=nnx.Rngs(0))
    artifact = save_artifact(tmp_path / "sgt", params=nnx.state(cloak, nnx.Param), cloak_config=cloak_cfg,
                             model_dir=model_dir, fingerprint="test")
    with pytest.raises(ArtifactError, match="q_proj bias that transformers' mistral attention lacks"):
        export_torch(artifact, tmp_path / "torch")


def test_noise_sources_and_standalone_use(tmp_path):
    model_dir = make_tiny_checkpoint(tmp_path / "model", "llama", **TINY)
    cloak_cfg = CloakConfig(scale=[1e-3, 1.0])
    cloak = _perturbed_cloak(model_dir, cloak_cfg)
    artifact = save_artifact(tmp_path / "sgt", params=nnx.state(cloak, nnx.Param), cloak_config=cloak_cfg,
                             model_dir=model_dir, fingerprint="test")
    out = export_torch(artifact, tmp_path / "torch")
    module = load_torch_sgt(out)
    x = torch.randn(2, 5, 32)
    a, b = module(x).x_t, module(x).x_t
    assert not torch.equal(a, b)  # fresh OS entropy per call
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(module(x, generator=g1).x_t, module(x, generator=g2).x_t)
    with pytest.raises(TypeError, match="float32"):
        module(x.double())
    # The exported directory is usable without sgt_jax or jax: a bare interpreter that blocks both imports.
    script = (
        "import sys; sys.modules['jax'] = None; sys.modules['sgt_jax'] = None; sys.path.insert(0, sys.argv[1])\n"
        "import torch; from sgt_torch import load_torch_sgt\n"
        "m = load_torch_sgt(sys.argv[1]); print(tuple(m(torch.zeros(1, 3, 32)).x_t.shape))\n"
    )
    res = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "(1, 3, 32)" in res.stdout


def test_pytorch_client_generates_what_the_jax_artifact_generates(tmp_path):
    """The client path end to end: the artifact of the default run's setup (embedded tiny Llama, alpaca format)
    exported with ``python -m sgt_jax.export_torch``, loaded in PyTorch, the protected prompt fed as
    ``inputs_embeds`` to transformers' greedy ``generate`` on the same base weights; the same noise (the eps
    JAX drew for the transform key) is handed to the torch module, so the tokens must be equal."""
    import transformers

    from sgt_jax.inference.artifact import StainedGlassTransform
    from sgt_jax.config import load_config
    from sgt_jax.data import load_tokenizer
    from sgt_jax.models import CausalLM
    from sgt_jax.models.hf import resolve_model_path

    cfg = load_config(TINY_CONFIG)
    model_dir = resolve_model_path(cfg.model.path)
    cloak = TransformerCloak.from_config(cfg.cloak, str(model_dir), rngs=nnx.Rngs(0))
    d = cloak.hidden_size
    rng = np.random.default_rng(0)
    cloak.mean_head.kernel[...] = jnp.asarray(rng.normal(0, 0.02, (d, d)), jnp.float32)
    cloak.std_head.bias[...] = jnp.full((d,), 0.02, jnp.float32)
    artifact = save_artifact(tmp_path / "sgt", params=nnx.state(cloak, nnx.Param), cloak_config=cfg.cloak,
                             model_dir=model_dir, fingerprint="test", tokenizer=load_tokenizer(str(model_dir)),
                             data_config=cfg.data)
    res = subprocess.run([sys.executable, "-m", "sgt_jax.export_torch", str(artifact), str(tmp_path / "torch")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    module = load_torch_sgt(tmp_path / "torch")

    sgt = StainedGlassTransform.load(artifact)
    prompts = ["Name three colors.", "Give the opposite of the word cold."]
    key, new_tokens = jax.random.key(4), 8
    jax_texts = sgt.generate(prompts, base_model=CausalLM.from_pretrained(model_dir, dtype="float32"), key=key,
                             do_sample=False, max_new_tokens=new_tokens)

    enc = sgt.encode(prompts)  # the client's prompt and noise mask (what generate() protects)
    ids, mask, noise = (torch.from_numpy(np.asarray(enc[k], np.int64)) for k in ("input_ids", "attention_mask",
                                                                                  "noise_mask"))
    eps = np.array(_jax_eps(jax.random.split(key)[0], *ids.shape, d))  # generate()'s transform key
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        x = model.get_input_embeddings()(ids)
        x_t = module(x, mask, noise, eps=torch.from_numpy(eps)).x_t
        out = model.generate(inputs_embeds=x_t, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             eos_token_id=sgt.tokenizer.eos_token_id, pad_token_id=sgt.tokenizer.pad_token_id,
                             output_scores=True, return_dict_in_generate=True)
    top2 = [torch.topk(s, 2).values for s in out.scores]
    assert min(float((t[:, 0] - t[:, 1]).min()) for t in top2) > 1e-3  # no near-tie decides a token
    torch_texts = sgt.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
    assert torch_texts == jax_texts and all(t.strip() for t in torch_texts)
    # The protection is real: the transformed prompt is not the clean one, and BOS / template stay clean.
    changed = (x_t != x).any(-1)
    assert torch.equal(changed, noise.bool()) and noise.sum() > 0
