"""The user's first run: a short version of the default configuration (configs/tiny.yaml on the embedded tiny
model) must make the transform obfuscate more than the initial one while the utility loss stays within the
configured budget (train.max_utility_loss)."""

from pathlib import Path

from sgt_jax.config import load_config
from sgt_jax.train import train

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def test_short_default_run_improves_obfuscation_within_the_utility_bound(tmp_path):
    cfg = load_config(TINY, [
        "train.max_steps=60",
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
    assert summary["stopped_by"] == "finished" and summary["steps"] == 60
    before, after = summary["obfuscation_mean (before)"], summary["obfuscation_mean (after)"]
    # The initial transform (mu = 0, sigma at its floor) changes no token; training must change many.
    assert before < 5.0
    assert after > before + 10.0, (before, after)
    assert summary["utility_within_bound"] is True, summary
    assert summary["utility_loss (after)"] <= cfg.train.max_utility_loss
    assert (tmp_path / "run" / "sgt" / "sgt_config.json").is_file()
    # A learned attacker is reported next to nearest-neighbour, and is never weaker than it.
    assert summary["attack_mlp_top1_recovery"] >= summary["attack_nn_cosine_top1_recovery"], summary
