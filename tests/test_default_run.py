"""The user's first run: a short version of the default configuration (configs/tiny.yaml on the embedded tiny
model) must make the transform obfuscate more than the initial one while the utility loss stays within the
configured budget (train.max_utility_loss)."""

from pathlib import Path

import jax
import numpy as np
import pytest

from sgt_jax.config import load_config
from sgt_jax.train import train

# Each test trains for minutes on 2 cores: outside the contributors' inner loop, always in CI.
pytestmark = pytest.mark.slow

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def test_short_default_run_improves_obfuscation_within_the_utility_bound(tmp_path):
    cfg = load_config(TINY, [
        "train.max_steps=100",
        f"tracking.run_dir={tmp_path / 'run'}",
        "tracking.progress_bar=false",
        "validation.every_steps=1000",
        "validation.max_batches=2",
        "validation.generation_examples=0",
        "validation.attack_steps=100",
        "checkpoint.every_steps=null",
        "checkpoint.every_minutes=null",
    ])
    assert cfg.train.max_utility_loss is not None  # the default run carries a utility budget
    summary = train(cfg)
    assert summary["stopped_by"] == "finished" and summary["steps"] == 100
    before, after = summary["obfuscation_mean (before)"], summary["obfuscation_mean (after)"]
    # The initial transform (mu = 0, sigma at its floor) changes no token; training must change many.
    assert before < 5.0
    assert after > before + 10.0, (before, after)
    assert summary["utility_within_bound"] is True, summary
    assert summary["utility_loss (after)"] <= cfg.train.max_utility_loss
    assert (tmp_path / "run" / "sgt" / "sgt_config.json").is_file()
    # Every threat model has its privacy line; the white box's learned attacker is never weaker than lookup.
    for threat in ("lookup", "white-box", "server"):
        assert summary[f"privacy ({threat})"], summary
    assert "LM-prior decoding" in summary["privacy (server)"] and "reader" in summary["privacy (server)"]
    assert summary["recovery_white_box"] >= summary["recovery_lookup"], summary
    # The leakage figure of validation (each candidate with its own transformed mean) replaces the old MI.
    assert 0.0 < summary["leakage_bits (after)"] <= summary["leakage_bits (before)"] + 0.5, summary


def test_the_7b_recipes_cloak_settings_train_in_the_default_run(tmp_path, caplog):
    """The literal 7B recipe's sigma settings (scale (1e-8, 1.0), directly_learn_stds, rho_init 0, and the weight
    of the noise term, transform_variance_priority, read from configs/llama2_7b.yaml) on the default run
    (embedded model, its lr, half its length: 200 of 400 steps): at step 0 the stochasticity
    and utility gradients are logged and within 10x of each other (an unbounded dL_N/dsigma at the 1e-8 floor
    made them ~3000x apart, so the global-norm clip starved the utility), and training reaches >= 50% mean
    obfuscation within the utility budget (about 68% at 200 steps, 44% at 100)."""
    import logging

    from sgt_jax.inference.artifact import StainedGlassTransform

    recipe_cfg = load_config(Path(__file__).parents[1] / "configs" / "llama2_7b.yaml")
    recipe = recipe_cfg.cloak
    assert (recipe.scale, recipe.directly_learn_stds, recipe.rho_init) == ([1e-8, 1.0], True, 0.0)
    # The default run's own transform_variance_priority is a point on its frontier (sgt_jax/assets/tiny.yaml);
    # the gradient balance checked here is the recipe's, whose noise term is weighted by the recipe's value.
    variance_priority = recipe_cfg.objective.transform_variance_priority
    default = load_config(TINY)
    cfg = load_config(TINY, [
        f"cloak.scale=[{recipe.scale[0]},{recipe.scale[1]}]",
        f"cloak.directly_learn_stds={str(recipe.directly_learn_stds).lower()}",
        f"cloak.rho_init={recipe.rho_init}",
        f"objective.transform_variance_priority={variance_priority}",
        f"tracking.run_dir={tmp_path / 'run'}",
        "tracking.progress_bar=false",
        "validation.every_steps=100000",
        "validation.max_batches=2",
        "validation.generation_examples=0",
        "validation.attack_steps=0",
        "checkpoint.every_steps=null",
        "checkpoint.every_minutes=null",
        f"train.max_steps={default.train.max_steps // 2}",
    ])
    assert cfg.optimizer.learning_rate == default.optimizer.learning_rate
    assert cfg.train.max_steps == 200 == default.train.max_steps // 2
    with caplog.at_level(logging.INFO, logger="sgt_jax.train"):
        summary = train(cfg)
    assert summary["stopped_by"] == "finished" and summary["steps"] == cfg.train.max_steps
    utility, stochasticity = (summary[f"grad_norm/{t}_term (step 0)"] for t in ("utility", "stochasticity"))
    assert any("gradient norms" in r.getMessage() and "stochasticity_term=" in r.getMessage() for r in caplog.records)
    assert 0.1 < stochasticity / utility < 10.0, (stochasticity, utility)
    assert summary["obfuscation_mean (after)"] >= 50.0, summary
    assert summary["utility_within_bound"] is True, summary
    # Its artifact noises the content only: BOS and the alpaca template stay the clean embeddings.
    sgt = StainedGlassTransform.load(summary["artifact"])
    out = jax.device_get(sgt.transform(["Name three colors."]))
    clean = np.asarray(sgt.embedding_table)[np.asarray(out["input_ids"])]
    kept = ~np.asarray(out["noise_mask"]).astype(bool)
    assert kept.sum() > 20
    np.testing.assert_array_equal(np.asarray(out["inputs_embeds"])[kept], clean[kept])
