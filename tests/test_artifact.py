"""The SGT artifact: no pickle, load → transform equals the in-memory cloak, noise freshness and seeding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.artifact import ArtifactError, StainedGlassTransform, save_artifact
from sgt_jax.cloak import TransformerCloak
from sgt_jax.config import CloakConfig
from sgt_jax.data import load_tokenizer
from sgt_jax.testing import make_tiny_model_dir

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


def test_load_transform_equals_in_memory_cloak(artifact):
    directory, cloak = artifact
    sgt = StainedGlassTransform.load(directory)
    key = jax.random.key(11)
    out = sgt.transform(TEXTS, key=key)
    ids, mask = np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])
    assert mask[:, -1].all() and not mask.all()  # left padded
    x = jnp.take(sgt.embedding_table, jnp.asarray(ids), axis=0)
    run = nnx.jit(lambda c, x, m, k: c(x, m, m, key=k, deterministic=True).x_t)
    want = run(cloak, x, jnp.asarray(mask), key)
    np.testing.assert_allclose(np.asarray(out["inputs_embeds"]), np.asarray(want), atol=1e-6)
    assert out["inputs_embeds"].dtype == jnp.float32
    real = mask.astype(bool)
    assert not np.allclose(np.asarray(out["inputs_embeds"])[real], np.asarray(x)[real])  # protected
    np.testing.assert_array_equal(np.asarray(out["inputs_embeds"])[~real], np.asarray(x)[~real])  # pads untouched


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
