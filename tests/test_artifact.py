"""The SGT artifact: no pickle, load → transform equals the in-memory cloak, noise freshness and seeding, the
training noise rule at inference, no debug seed shipped."""

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.inference.artifact import ArtifactError, DebugSeedError, StainedGlassTransform, save_artifact
from sgt_jax.transform.cloak import TransformerCloak
from sgt_jax.config import CloakConfig
from sgt_jax.data import load_tokenizer
from tiny_checkpoints import make_tiny_model_dir

TEXTS = ["What is the capital of France?", "Add 2 and 3."]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifact")
    model_dir = make_tiny_model_dir(root / "model", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                    num_key_value_heads=2, corpus_examples=100)
    cfg = CloakConfig(scale=[1e-3, 1.0])
    cloak = TransformerCloak.from_config(cfg, str(model_dir), rngs=nnx.Rngs(0))
    d = cloak.hidden_size
    rng = np.random.default_rng(0)
    cloak.mean_head.kernel[...] = jnp.asarray(rng.normal(0, 0.2, (d, d)), jnp.float32)
    cloak.std_head.bias[...] = jnp.full((d,), 0.05, jnp.float32)
    out = save_artifact(root / "sgt", params=nnx.state(cloak, nnx.Param), cloak_config=cfg, model_dir=model_dir,
                        fingerprint="test", tokenizer=load_tokenizer(str(model_dir)))
    return out, cloak


def test_no_pickle_anywhere(artifact):
    directory, _ = artifact
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix not in (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".npy", ".npz"), path
        head = path.read_bytes()[:2]
        assert not (len(head) == 2 and head[0] == 0x80 and head[1] in range(2, 6)), f"{path} looks like a pickle"


@pytest.mark.slow
def test_load_transform_equals_in_memory_cloak(artifact):
    directory, cloak = artifact
    sgt = StainedGlassTransform.load(directory)
    key = jax.random.key(11)
    out = sgt.transform(TEXTS, key=key)
    ids, mask = np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])
    assert mask[:, -1].all() and not mask.all()  # left padded
    x = jnp.take(sgt.embedding_table, jnp.asarray(ids), axis=0)
    noise = np.asarray(out["noise_mask"])
    # The artifact's rule (no data config: plain text): every real token but BOS / special tokens is noised.
    np.testing.assert_array_equal(noise, mask * ~np.isin(ids, sgt.tokenizer.all_special_ids))
    run = nnx.jit(lambda c, x, m, n, k: c(x, m, n, key=k, deterministic=True).x_t)
    want = run(cloak, x, jnp.asarray(mask), jnp.asarray(noise), key)
    np.testing.assert_allclose(np.asarray(out["inputs_embeds"]), np.asarray(want), atol=1e-6)
    assert out["inputs_embeds"].dtype == jnp.float32
    real = noise.astype(bool)
    assert not np.allclose(np.asarray(out["inputs_embeds"])[real], np.asarray(x)[real])  # protected
    np.testing.assert_array_equal(np.asarray(out["inputs_embeds"])[~real], np.asarray(x)[~real])  # pads, BOS untouched


def test_noise_fresh_per_call_unless_key_or_seed(artifact):
    directory, _ = artifact
    sgt = StainedGlassTransform.load(directory)
    a = np.asarray(sgt.transform(TEXTS)["inputs_embeds"])
    b = np.asarray(sgt.transform(TEXTS)["inputs_embeds"])
    assert not np.allclose(a, b)  # fresh OS entropy on every call
    k1 = np.asarray(sgt.transform(TEXTS, key=jax.random.key(5))["inputs_embeds"])
    k2 = np.asarray(sgt.transform(TEXTS, key=jax.random.key(5))["inputs_embeds"])
    np.testing.assert_array_equal(k1, k2)
    seeded = StainedGlassTransform.load(directory, seed=3)
    s1, s2 = (np.asarray(seeded.transform(TEXTS)["inputs_embeds"]) for _ in range(2))
    np.testing.assert_array_equal(s1, s2)
    # Token ids in, the same as text in.
    ids = sgt.encode(TEXTS)
    by_ids = sgt.transform(ids["input_ids"], attention_mask=ids["attention_mask"], key=jax.random.key(5))
    np.testing.assert_allclose(np.asarray(by_ids["inputs_embeds"]), k1, atol=1e-6)


def test_bad_path_is_one_line(tmp_path):
    with pytest.raises(ArtifactError, match="not an SGT artifact") as info:
        StainedGlassTransform.load(tmp_path / "nowhere")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ the training noise rule at inference

TINY_CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def default_artifact(tmp_path_factory):
    """The artifact the default run (configs/tiny.yaml, embedded tiny model, alpaca format) writes."""
    from sgt_jax.config import load_config
    from sgt_jax.models.hf import resolve_model_path

    cfg = load_config(TINY_CONFIG)
    model_dir = resolve_model_path(cfg.model.path)
    cloak = TransformerCloak.from_config(cfg.cloak, str(model_dir), rngs=nnx.Rngs(0))
    return save_artifact(tmp_path_factory.mktemp("default") / "sgt", params=nnx.state(cloak, nnx.Param),
                         cloak_config=cfg.cloak, model_dir=model_dir, fingerprint="test",
                         tokenizer=load_tokenizer(str(model_dir)), data_config=cfg.data), cfg


@pytest.mark.slow
def test_inference_noises_exactly_the_tokens_training_noised(default_artifact):
    from sgt_jax.data.formats import tokenize_examples

    directory, cfg = default_artifact
    sgt = StainedGlassTransform.load(directory)
    assert sgt.noise_rule["format"] == "alpaca" and sgt.noise_rule["transform_all_tokens"] is False
    sgt.tokenizer.padding_side = "right"  # whatever the tokenizer's own side: prompts are left-padded
    prompts = ["Name three colors.", "What is the capital of France, and why?"]
    out = jax.device_get(sgt.transform(prompts, key=jax.random.key(0)))
    ids, mask, noise = (np.asarray(out[k]) for k in ("input_ids", "attention_mask", "noise_mask"))
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padded
    clean = np.asarray(sgt.embedding_table)[ids]
    x_t = np.asarray(out["inputs_embeds"])
    for row, prompt in enumerate(prompts):
        # The training formatter on the same prompt (with a reply): its tokens before the reply are the prompt.
        train = tokenize_examples([{"instruction": prompt, "output": "Red."}], sgt.tokenizer, cfg.data.format,
                                  max_length=None)
        end = int(np.argmax(train.loss_mask))
        real = mask[row].astype(bool)
        np.testing.assert_array_equal(ids[row][real], train.input_ids[:end])
        np.testing.assert_array_equal(noise[row][real], train.noise_mask[:end])
        content = noise[row].astype(bool)
        assert ids[row][real][0] == sgt.tokenizer.bos_token_id and not noise[row][real][0]  # BOS clean
        assert content.sum() >= 3 and (real & ~content).sum() > 20  # content and template (the alpaca preamble)
        np.testing.assert_array_equal(x_t[row][~content], clean[row][~content])  # BOS, template, pads: bitwise
        assert np.all(np.any(x_t[row][content] != clean[row][content], axis=-1))  # every content token changed
    # An explicit mask wins.
    all_real = sgt.transform(prompts, noise_mask=mask, key=jax.random.key(0))
    assert np.any(np.asarray(all_real["inputs_embeds"])[0, -1] != clean[0, -1])


# ------------------------------------------------------------------ no debug seed in anything shipped


@pytest.mark.slow
def test_a_debug_seed_is_dropped_on_save_and_refused_on_load(tmp_path, caplog):
    model_dir = make_tiny_model_dir(tmp_path / "model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, corpus_examples=50)
    cfg = CloakConfig(scale=[1e-3, 1.0], seed=3)
    cloak = TransformerCloak.from_config(cfg, str(model_dir), rngs=nnx.Rngs(0))
    with caplog.at_level(logging.WARNING):
        directory = save_artifact(tmp_path / "sgt", params=nnx.state(cloak, nnx.Param), cloak_config=cfg,
                                  model_dir=model_dir, fingerprint="test", tokenizer=load_tokenizer(str(model_dir)),
                                  training_config={"cloak": {"seed": 3, "scale": [1e-3, 1.0]}, "train": {"seed": 0}})
    assert any("cloak.seed=3" in r.getMessage() for r in caplog.records)
    meta = json.loads((directory / "sgt_config.json").read_text())
    assert "seed" not in meta["cloak"] and "seed" not in meta["training_config"]["cloak"]
    sgt = StainedGlassTransform.load(directory)
    a, b = (np.asarray(sgt.transform(TEXTS)["inputs_embeds"]) for _ in range(2))
    assert not np.array_equal(a, b)  # fresh noise per call, although training used seed 3

    # An artifact holding a seed (an older sgt_jax wrote them) loads only by explicit opt-in.
    meta["cloak"]["seed"] = 3
    (directory / "sgt_config.json").write_text(json.dumps(meta))
    with pytest.raises(DebugSeedError, match="allow_debug_seed=True") as info:
        StainedGlassTransform.load(directory)
    assert "\n" not in str(info.value) and isinstance(info.value, ArtifactError)
    debug = StainedGlassTransform.load(directory, allow_debug_seed=True)
    s1, s2 = (np.asarray(debug.transform(TEXTS)["inputs_embeds"]) for _ in range(2))
    np.testing.assert_array_equal(s1, s2)
