"""The shipped configs/*.yaml: each parses, follows the recommendations' recipe, and builds its model family's base model
and cloak from a tiny stand-in checkpoint of the same family (same model_type and RoPE settings; no hub)."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.transform.cloak import TransformerCloak
from sgt_jax.config import load_config
from sgt_jax.models import CausalLM, DecoderConfig
from sgt_jax.training.builder import default_truncation_layer
from tiny_checkpoints import make_tiny_checkpoint

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# The real models' family settings that change the computation (from their config.json on the hub).
LARGE = {
    "llama2_7b.yaml": dict(model_type="llama", rope_theta=10000.0),
    "llama3_8b.yaml": dict(model_type="llama", rope_theta=500000.0),
    "mistral_7b_instruct.yaml": dict(model_type="mistral", rope_theta=1000000.0, sliding_window=None),
    "llama3_70b.yaml": dict(model_type="llama", rope_theta=500000.0),
}
NUM_LAYERS = {"llama3_70b.yaml": 80}  # the others: 32
FSDP = {"llama3_70b.yaml": 8}  # on its 8 TPU chips and on 8 GPUs; the 7B recipes: 4 on TPU, 1 on GPU (data-parallel)


def test_every_yaml_in_configs_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted([*LARGE, "base.yaml", "tiny.yaml"])


@pytest.mark.parametrize("name", sorted([*LARGE, "tiny.yaml"]))
def test_recipes_are_short_deltas_that_resolve_to_the_full_configurations_they_replaced(name):
    """Each recipe is its model's delta over configs/base.yaml (configs/tiny.yaml loads the packaged default):
    30 lines or fewer, and on every platform it resolves to the configuration the full 120-130-line recipe
    resolved to before (tests/data/recipes_resolved.json, written from those files)."""
    import json

    from sgt_jax.config import to_dict

    assert len((CONFIGS / name).read_text().splitlines()) <= 30
    want = json.loads((Path(__file__).parent / "data" / "recipes_resolved.json").read_text())[name[:-5]]
    flat = lambda cfg: {f"{s}.{k}": v for s, keys in json.loads(json.dumps(to_dict(cfg))).items()  # noqa: E731
                        for k, v in keys.items()}
    for platform in ("tpu", "gpu", "cpu"):
        got, before = flat(load_config(CONFIGS / name, platform=platform)), flat_dict(want[platform])
        # A key the schema gained since then resolves to its default.
        defaults = flat(load_config(None, platform=platform))
        expected = {k: before.get(k, defaults[k]) for k in got}
        assert got == expected and set(before) <= set(got), (platform, {k for k in got if got[k] != expected[k]})


def flat_dict(config: dict) -> dict:
    return {f"{s}.{k}": v for s, keys in config.items() for k, v in keys.items()}


# The recommendations, stated once: the schema's defaults (the configuration reference calls them recommended).
# A recipe for a real model keeps every one of these settings.
RECOMMENDED = {
    "model": ("dtype",),
    "cloak": ("percent_to_mask", "shallow", "seed", "std_dropout", "mean_dropout", "directly_learn_stds",
              "mean_num_experts", "std_num_experts", "use_causal_mask", "estimator_kwargs"),
    "objective": ("mode", "alpha", "transform_variance_priority", "transform_strength_priority", "weight"),
    "optimizer": ("learning_rate", "b1", "b2", "eps", "weight_decay"),
    "generation": ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "renormalize_logits"),
}


def _recommended(cfg) -> dict[str, object]:
    return {f"{section}.{key}": getattr(getattr(cfg, section), key)
            for section, keys in RECOMMENDED.items() for key in keys}


@pytest.mark.parametrize("name", sorted(LARGE))
def test_large_model_config_follows_the_recommendations(name):
    cfg = load_config(CONFIGS / name)
    assert _recommended(cfg) == _recommended(load_config(None))
    assert cfg.cloak.transformer_type == LARGE[name]["model_type"]
    # Truncation as the recommendations' rule gives it for the model's depth.
    assert cfg.model.truncate_at_layer == default_truncation_layer(NUM_LAYERS.get(name, 32))
    # OpenOrca data; the instruct model's data goes through its own chat template (format chat), the base
    # models' through the OpenOrca scaffold.
    want_format = "chat" if name.startswith("mistral") else "openorca"
    assert cfg.data.format == want_format and cfg.data.source.startswith("/")
    assert cfg.data.num_workers >= 4
    assert cfg.checkpoint.save_on_preemption and cfg.checkpoint.every_minutes <= 60 and cfg.checkpoint.resume
    assert cfg.validation.every_steps or cfg.validation.every_minutes
    # Both targets are spelled out: the TPU settings at the top, the GPU launch's in the gpu: block.
    text = (CONFIGS / name).read_text()
    assert "tpu_pod.sh" in text and "gpu_single_node.sh" in text
    tpu, gpu = load_config(CONFIGS / name, platform="tpu"), load_config(CONFIGS / name, platform="gpu")
    assert (tpu.mesh.data, tpu.mesh.fsdp, tpu.mesh.tensor, tpu.model.attention_impl) == (-1, FSDP.get(name, 4), 1,
                                                                                          "splash")
    assert (gpu.mesh.data, gpu.mesh.fsdp, gpu.mesh.tensor, gpu.model.attention_impl) == (-1, FSDP.get(name, 1), 1,
                                                                                          "cudnn")
    assert _recommended(gpu) == _recommended(tpu)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A tiny checkpoint per large config, with two layers more than the configured truncation keeps."""
    out = {}
    for name, family in LARGE.items():
        layers = default_truncation_layer(NUM_LAYERS.get(name, 32)) + 2
        out[name] = make_tiny_checkpoint(tmp_path_factory.mktemp(name.split(".")[0]), num_hidden_layers=layers,
                                         hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, **family)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LARGE))
def test_large_model_config_builds_its_family(name, stand_ins):
    path = stand_ins[name]
    cfg = load_config(CONFIGS / name, [f"model.path={path}"])
    family = LARGE[name]
    decoder_config = DecoderConfig.from_hf(path)
    assert decoder_config.model_type == family["model_type"]
    assert decoder_config.rope_theta == family["rope_theta"]
    assert decoder_config.sliding_window is None
    base = CausalLM.from_pretrained(path, dtype=cfg.model.dtype, truncate_at_layer=cfg.model.truncate_at_layer,
                                    attention_impl="xla", remat_policy=cfg.model.remat_policy)
    assert base.num_layers == cfg.model.truncate_at_layer + 1 and base.embedding_table.dtype == jnp.bfloat16
    ids = jnp.asarray(np.arange(12, dtype=np.int32).reshape(2, 6) % decoder_config.vocab_size)
    hidden = base(ids)
    assert hidden.shape == (2, 6, decoder_config.hidden_size) and bool(jnp.isfinite(hidden.astype(jnp.float32)).all())
    cloak = TransformerCloak.from_config(cfg.cloak, str(path), rngs=nnx.Rngs(0))
    out = cloak(base.embed(ids).astype(jnp.float32), jnp.ones((2, 6), bool), jnp.ones((2, 6), bool),
                key=jax.random.key(0), deterministic=True)
    assert out.x_t.dtype == jnp.float32 and out.x_t.shape == (2, 6, decoder_config.hidden_size)
    # The recipe spells out what the cloak itself picks for directly-learned stds (sigma bounds, head start).
    implicit = TransformerCloak.from_config(dataclasses.replace(cfg.cloak, scale=None, rho_init=None), str(path),
                                            rngs=nnx.Rngs(0))
    assert cloak.directly_learn_stds and implicit.directly_learn_stds
    assert (cloak.min_scale, cloak.max_scale, cloak.rho_init) == (implicit.min_scale, implicit.max_scale,
                                                                  implicit.rho_init)


def test_tiny_config_is_the_default_run():
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.model.path == "embedded:tiny-llama"
    assert cfg.tracking.run_dir == "runs/tiny"
    decoder_config = DecoderConfig.from_hf(Path(__file__).resolve().parent.parent / "sgt_jax/assets/tiny-llama")
    assert decoder_config.model_type == "llama"
    assert 0 <= cfg.model.truncate_at_layer < decoder_config.num_hidden_layers
    lo, hi = cfg.cloak.scale
    assert 0 < lo < hi
    # The scale is the recommendations' rule of thumb read off the shipped model's embeddings (2 significant digits in the
    # yaml): re-pretraining the model must come with a recomputed scale.
    from safetensors.numpy import load_file

    from sgt_jax.transform.cloak import scale_from_embeddings

    weights = load_file(Path(__file__).resolve().parent.parent / "sgt_jax/assets/tiny-llama/model.safetensors")
    expected = scale_from_embeddings(weights["model.embed_tokens.weight"])
    assert (lo, hi) == pytest.approx(expected, rel=0.05), expected
    # The recommendations' loss weights stay, except transform_variance_priority: the default's point on its own
    # measured privacy-utility frontier (benchmarks/privacy_results.md); lr/scale/steps are adapted to the tiny model.
    import dataclasses

    schema = load_config(None)
    recommended_variance = schema.objective.transform_variance_priority
    assert dataclasses.replace(cfg.objective, transform_variance_priority=recommended_variance) == schema.objective
    assert cfg.objective.transform_variance_priority == 0.5
    assert cfg.cloak.directly_learn_stds == schema.cloak.directly_learn_stds and cfg.cloak.rho_init in (None, 0.0)
    assert cfg.train.max_steps is not None
