"""The configuration schema: YAML + dotted overrides, typed, with one-line errors naming the key."""

import pytest

from sgt_jax.config import ConfigError, SGTConfig, load_config, to_dict


def test_defaults_follow_the_seed_recommendations():
    cfg = load_config()
    assert isinstance(cfg, SGTConfig)
    assert (cfg.objective.alpha, cfg.objective.transform_variance_priority) == (0.54, 0.01)
    assert (cfg.objective.transform_strength_priority, cfg.objective.weight) == (0.75, 12.0)
    assert (cfg.optimizer.b1, cfg.optimizer.b2, cfg.optimizer.eps) == (0.9, 0.95, 1e-5)
    assert (cfg.optimizer.learning_rate, cfg.optimizer.weight_decay) == (3e-5, 0.1)
    assert cfg.cloak.directly_learn_stds and cfg.cloak.use_causal_mask
    assert (cfg.cloak.std_dropout, cfg.cloak.mean_dropout, cfg.cloak.percent_to_mask) == (0.1, 0.1, 0.0)
    assert cfg.cloak.estimator_kwargs == {"num_hidden_layers": 1}
    g = cfg.generation
    assert (g.temperature, g.top_k, g.top_p, g.repetition_penalty, g.renormalize_logits) == (0.6, 5000, 0.9, 1.0, True)


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  learning_rate: 1.0e-4\n  warmup_steps: 7\ncloak:\n  scale: [1.0e-3, 2.0]\n")
    cfg = load_config(path, ["optimizer.learning_rate=5e-4", "cloak.estimator_kwargs.num_hidden_layers=2"])
    assert cfg.optimizer.learning_rate == 5e-4
    assert cfg.optimizer.warmup_steps == 7
    assert list(cfg.cloak.scale) == [1e-3, 2.0]
    assert cfg.cloak.estimator_kwargs["num_hidden_layers"] == 2


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optimizer.lr=1"], "optimizer.lr"),
        (["optimizer.learning_rate=abc"], "optimizer.learning_rate"),
        (["nosuchsection.x=1"], "nosuchsection"),
        (["data.batch_size=1.5"], "data.batch_size"),
        (["cloak.rho_init=-3"], "cloak.rho_init"),
        (["cloak.scale=[1.0,0.5]"], "cloak.scale"),
        (["cloak.percent_to_mask=1.5"], "cloak.percent_to_mask"),
        (["objective.mode=magic"], "objective.mode"),
        (["cloak.remat_policy=sometimes"], "cloak.remat_policy"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "mesh"),
        (["learning_rate"], "learning_rate"),
    ],
)
def test_bad_settings_give_one_line_errors_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_a_value_outside_a_settings_choices_is_refused_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"^optimizer.schedule='step' is not one of cosine, linear, constant\.$"):
        load_config(overrides=["optimizer.schedule=step"])


def test_yaml_booleans_give_the_choices_they_spell(tmp_path):
    """YAML reads off, false and true as booleans: in a file, its platform block or an override they still set
    objective.adversary=off and mesh.distributed=false / true."""
    path = tmp_path / "run.yaml"
    path.write_text("objective:\n  adversary: off\nmesh:\n  distributed: false\ngpu:\n  mesh:\n    distributed: true\n")
    tpu, gpu = load_config(path, platform="tpu"), load_config(path, platform="gpu")
    assert (tpu.objective.adversary, tpu.mesh.distributed, gpu.mesh.distributed) == ("off", "false", "true")
    cfg = load_config(overrides=["objective.adversary=off", "mesh.distributed=false"])
    assert (cfg.objective.adversary, cfg.mesh.distributed) == ("off", "false")
    assert load_config(overrides=["mesh.distributed=true"]).mesh.distributed == "true"


def test_unknown_key_in_yaml_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  learnig_rate: 1.0\n")
    with pytest.raises(ConfigError, match="learnig_rate"):
        load_config(path)


def test_missing_config_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_a_plain_dict():
    cfg = load_config(overrides=["train.seed=7", "cloak.seed=3"])
    again = load_config(saved=to_dict(cfg))
    assert again == cfg and again.train.seed == 7 and again.cloak.seed == 3


def test_a_saved_config_with_an_unknown_key_is_refused():
    saved = to_dict(load_config())
    saved["cloak"]["nosie_scale"] = 1.0
    with pytest.raises(ConfigError, match="nosie_scale"):
        load_config(saved=saved)


def test_no_arguments_means_the_embedded_tiny_run():
    """`python -m sgt_jax.train` with no arguments trains the packaged tiny default (configs/tiny.yaml)."""
    from pathlib import Path

    from sgt_jax.train import parse_args

    cfg, _ = parse_args([])
    assert cfg.model.path == "embedded:tiny-llama"
    assert cfg == load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    assert parse_args(["train.max_steps=3"])[0].train.max_steps == 3


def test_readme_configuration_reference_is_generated_from_the_schema():
    """README's reference must be exactly `python -m sgt_jax.config`'s output (regenerate it when the schema
    changes); it fails when a setting is added, removed or re-documented without updating README."""
    from pathlib import Path

    from sgt_jax.config import reference_markdown

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    section = readme[readme.index(start) + len(start): readme.index(end)]
    assert section == reference_markdown()
    assert "`cloak.rho_init`" in section and "`optimizer.weight_decay`" in section


PLATFORM_YAML = """model:
  attention_impl: splash
mesh:
  fsdp: 4
optimizer:
  learning_rate: 1.0e-4
gpu:
  model:
    attention_impl: cudnn
  mesh:
    data: -1
    fsdp: 1
cpu:
  model:
    attention_impl: xla
"""


def test_the_platform_block_of_the_run_applies_over_the_file_and_under_the_overrides(tmp_path):
    """A file's gpu: block on GPUs, its cpu: block on CPUs, none on TPUs (it has no tpu: block); the file's other
    settings stay; command-line overrides beat the block."""
    path = tmp_path / "recipe.yaml"
    path.write_text(PLATFORM_YAML)
    resolved = {p: load_config(path, platform=p) for p in ("gpu", "tpu", "cpu")}
    assert (resolved["gpu"].model.attention_impl, resolved["gpu"].mesh.data, resolved["gpu"].mesh.fsdp) == ("cudnn", -1, 1)
    assert (resolved["tpu"].model.attention_impl, resolved["tpu"].mesh.fsdp) == ("splash", 4)
    assert (resolved["cpu"].model.attention_impl, resolved["cpu"].mesh.fsdp) == ("xla", 4)
    assert {cfg.optimizer.learning_rate for cfg in resolved.values()} == {1e-4}
    overridden = load_config(path, ["mesh.fsdp=2", "model.attention_impl=xla"], platform="gpu")
    assert (overridden.model.attention_impl, overridden.mesh.data, overridden.mesh.fsdp) == ("xla", -1, 2)


def test_without_a_platform_the_machines_own_is_used(tmp_path, monkeypatch):
    from sgt_jax import platforms

    path = tmp_path / "recipe.yaml"
    path.write_text(PLATFORM_YAML)
    monkeypatch.setattr(platforms, "local_platform", lambda: "gpu")
    assert load_config(path).model.attention_impl == "cudnn"
    monkeypatch.setattr(platforms, "local_platform", lambda: "tpu")
    assert load_config(path).model.attention_impl == "splash"


@pytest.mark.parametrize("block, needle", [("gpu:\n  model:\n    attention_iml: cudnn\n", "attention_iml"),
                                           ("gpu: cudnn\n", "gpu:"), ("tpu:\n  mesh:\n    fsdp: many\n", "fsdp")])
def test_a_bad_platform_block_is_refused_on_every_platform(tmp_path, block, needle):
    """Checked against the schema whichever platform the run is on: a typo under gpu: fails on a TPU too."""
    path = tmp_path / "bad.yaml"
    path.write_text("mesh:\n  fsdp: 2\n" + block)
    for platform in ("tpu", "gpu", "cpu"):
        with pytest.raises(ConfigError) as info:
            load_config(path, platform=platform)
        assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_base_file_applies_under_the_file_with_its_own_platform_block(tmp_path):
    """`base:` (relative to the file) layers: base, the base's block for the platform, the file, the file's block,
    overrides. A value the file sets beats the base's platform block; one it leaves keeps the base's."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "common.yaml").write_text(PLATFORM_YAML)
    (tmp_path / "recipe.yaml").write_text("base: sub/common.yaml\nmesh:\n  fsdp: 2\ngpu:\n  mesh:\n    tensor: 2\n")
    gpu = load_config(tmp_path / "recipe.yaml", platform="gpu")
    assert (gpu.model.attention_impl, gpu.mesh.fsdp, gpu.mesh.tensor, gpu.optimizer.learning_rate) == ("cudnn", 2, 2,
                                                                                                       1e-4)
    tpu = load_config(tmp_path / "recipe.yaml", ["mesh.fsdp=8"], platform="tpu")
    assert (tpu.model.attention_impl, tpu.mesh.fsdp, tpu.mesh.tensor) == ("splash", 8, 1)


@pytest.mark.parametrize("files, needle", [({"a.yaml": "base: missing.yaml\n"}, "missing.yaml"),
                                           ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "itself"),
                                           ({"a.yaml": "base: [x]\n"}, "base:")])
def test_a_bad_base_is_one_line(tmp_path, files, needle):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "a.yaml", platform="tpu")
    assert needle in str(info.value) and "\n" not in str(info.value)
