"""objective.adversary: the inverter learns inside the train step, its state resumes bitwise, and with the
adversary off the train state and the train step's HLO are today's."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import jax
import numpy as np
import pytest

STEPS = 6


def overrides(model_dir, run_dir, **extra):
    settings = {
        "model.path": model_dir, "model.dtype": "float32", "cloak.seed": 7, "train.seed": 0,
        "train.max_steps": STEPS, "data.batch_size": 8, "data.max_length": 64, "data.buckets": "[64]",
        "data.transform_all_tokens": "true", "data.synthetic_num_examples": 96, "data.num_workers": 0,
        "optimizer.warmup_steps": 0, "optimizer.schedule": "constant", "optimizer.learning_rate": 1e-3,
        "validation.every_steps": 1000, "validation.max_batches": 1, "validation.generation_examples": 0,
        "checkpoint.every_steps": 3, "checkpoint.every_minutes": "null", "checkpoint.async_save": "false",
        "tracking.log_every_steps": 1, "tracking.progress_bar": "false", "tracking.run_dir": run_dir,
        "objective.adversary": "mlp", "objective.adversary_learning_rate": 3e-3, "validation.attack_steps": 0,
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_checkpoints import make_tiny_model_dir

    return str(make_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny", num_hidden_layers=2))


def _train(cfg, **kw):
    from sgt_jax.train import train

    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg, **kw)


def _final_state(run_dir, template):
    from sgt_jax.training.checkpoint import Checkpointer

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
    with Checkpointer(Path(run_dir) / "checkpoints", every_minutes=None) as ckpt:
        state, _, _ = ckpt.restore(STEPS, abstract_state=abstract)
    return jax.device_get(state)


@pytest.mark.slow
def test_adversary_off_leaves_state_and_step_hlo_as_before(model_dir, tmp_path):
    """Off: no adversary leaves in the state, and the step lowers to the same HLO as on a state class without
    the field (today's) and as the step built directly from sgt_jax.training.step."""
    import flax.struct
    from typing import Any

    from sgt_jax import config as config_lib
    from sgt_jax.transform import objective
    from sgt_jax.training import builder
    from sgt_jax.training import step as step_lib
    from sgt_jax.training.trainer import Trainer

    class OldTrainState(flax.struct.PyTreeNode):  # the train state before objective.adversary existed
        step: Any
        params: Any
        opt_state: Any
        run_key: Any
        nonfinite_streak: Any
        nonfinite_total: Any

    cfg = config_lib.load_config(None, overrides(model_dir, tmp_path / "run", **{"objective.adversary": "off"}))
    trainer = Trainer(cfg)
    state = trainer.init_state()
    assert state.adversary is None and trainer.adversary is None
    fields = {f: getattr(state, f) for f in OldTrainState.__dataclass_fields__}
    old = OldTrainState(**fields)
    assert jax.tree.leaves(state) == jax.tree.leaves(old)
    batch = trainer.global_batch(next(iter(trainer.train_data)), trainer.accum_steps)
    config = trainer.experiment.model_config
    direct = step_lib.make_train_step(
        loss_fn=objective.make_loss_fn(cfg.objective), cloak_graphdef=trainer.cloak_graphdef,
        base_graphdef=trainer.base_graphdef, optimizer=trainer.optimizer, mesh=trainer.mesh,
        hidden_size=trainer.hidden_size, learning_rate_fn=trainer.schedule,
        base_step_graphdef=builder._step_graphdef(cfg, config, trainer.mesh, trainer.truncate_at_layer,
                                                  trainer.base_state, "cpu"))
    hlo_trainer = jax.jit(trainer.experiment.train_step).lower(state, trainer.base_state, batch).as_text()
    hlo_old = jax.jit(direct).lower(old, trainer.base_state, batch).as_text()
    hlo_new = jax.jit(direct).lower(state, trainer.base_state, batch).as_text()
    import re

    def strip(text):  # shardings and module names aside; private functions' numbering depends on trace order
        text = "\n".join(l for l in text.splitlines() if "module @" not in l and "sharding" not in l)  # noqa: E741
        return re.sub(r"@(_?[A-Za-z]\w*?)_\d+\b", r"@\1", text)
    assert strip(hlo_old) == strip(hlo_new)
    assert strip(hlo_trainer) == strip(hlo_new)


@pytest.mark.slow
def test_adversary_learns_in_the_step_and_resumes_bitwise(model_dir, tmp_path):
    """On (mlp), with a fresh adversary every 5 steps (2 inner steps): the inverter's CE falls over steps 0-4,
    and a run stopped after step 3's checkpoint and resumed across the reset at step 5 ends with the same cloak
    *and* adversary state, bit for bit, as the uninterrupted run. No validation (max_batches 0): nothing here
    reads it, and it only runs before step 1 and after the last."""
    from sgt_jax import config as config_lib
    from sgt_jax.tracking import read_events
    from sgt_jax.training.trainer import Trainer

    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    no_validation = {"validation.max_batches": 0, "objective.adversary_reset_every": 5,
                     "objective.adversary_reset_steps": 2}
    _train(config_lib.load_config(None, overrides(model_dir, ref_dir, **no_validation)))
    ce = [v for _, v in sorted(read_events(ref_dir / "tensorboard")["train/adversary_ce"])]
    # The co-trained inverter learns; the fresh one of step 5 starts over (measured: 3.49 -> 0.76, then 3.53).
    assert len(ce) == STEPS and ce[4] < 0.8 * ce[0] and ce[5] > 2 * ce[4], ce

    class Crash(RuntimeError):
        pass

    def crash_at_3(step, state):
        if step == 3:
            raise Crash

    cut_cfg = config_lib.load_config(None, overrides(model_dir, cut_dir, **no_validation))
    with pytest.raises(Crash):
        _train(cut_cfg, on_step=crash_at_3)
    _train(cut_cfg)  # resumes from step 3
    init = Trainer(cut_cfg).init_state()  # the restore template, and the adversary before training
    ref, resumed = _final_state(ref_dir, init), _final_state(cut_dir, init)
    assert resumed.adversary is not None and len(jax.tree.leaves(resumed.adversary)) > 0
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The adversary really moved (the comparison is not between two untouched initial states).
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(init.adversary.params), jax.tree.leaves(ref.adversary.params)))


def test_sigma_over_spacing_by_hand():
    """Vocabulary e0=(0,0), e1=(1,0), e2=(0,2); token 0 with sigma (0.5, 0.1): along e1-e0 the std is 0.5 over
    distance 1, along e2-e0 it is 0.1 over distance 2: mean (0.5 + 0.05) / 2 = 0.275; one of two tokens
    (the second is unselected) and it is >= 0.5? no."""
    import jax.numpy as jnp

    from sgt_jax.transform.noise_spacing import finalize_spacing, spacing_sums

    table = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    sigma = jnp.array([[[0.5, 0.1], [9.0, 9.0]]])
    sums = spacing_sums(sigma, jnp.array([[0, 1]]), jnp.array([[True, False]]), table, k=2)
    out = finalize_spacing(jax.device_get(sums))
    assert out["sigma_over_spacing"] == pytest.approx(0.275, rel=1e-6)
    assert out["sigma_over_spacing_ge_half"] == 0.0
    sums = spacing_sums(sigma * 4, jnp.array([[0, 1]]), jnp.array([[True, False]]), table, k=2)
    assert finalize_spacing(jax.device_get(sums))["sigma_over_spacing"] == pytest.approx(1.1, rel=1e-6)


def test_privacy_verdict_flips_at_the_threshold():
    from sgt_jax.evaluation.attack import NOT_HIDDEN, privacy_verdict, summary_verdict

    assert NOT_HIDDEN in privacy_verdict(98.5)  # the recommendations' default on the tiny run
    assert NOT_HIDDEN not in privacy_verdict(30.0)
    assert NOT_HIDDEN in privacy_verdict(30.0, threshold=25.0)
    assert privacy_verdict(None) is None
    assert NOT_HIDDEN in summary_verdict({"recovery_white_box": 99.0})
    assert NOT_HIDDEN not in summary_verdict({"recovery_white_box": 20.0})
    assert summary_verdict({"top1_agreement (after)": 0.99}) is None


@pytest.mark.slow
def test_sweep_of_three_settings_plots_the_runs_attack_reports(model_dir, tmp_path):
    """Three tiny runs (one step each, two lengths of one setting): each is attacked under every threat model
    (the server without its transfer attack); the frontier PNG is written, its plotted points are exactly the
    runs' own reports, and a finished point is read back, not run again. An untrained (identity-like) SGT is
    recovered by the white box's learned attacker, so its verdict says it does not hide tokens."""
    import json

    from sgt_jax.evaluation.attack import HIGH_RECOVERY, NOT_HIDDEN, privacy_verdict
    from sgt_jax.tools.privacy_sweep import grid, sweep

    common = overrides(model_dir, tmp_path / "unused", **{
        "optimizer.learning_rate": 1e-6, "data.synthetic_num_examples": 32, "checkpoint.every_steps": 100,
        "objective.adversary": "off", "validation.leakage_positions": 8})
    settings = grid("objective.alpha=0.54,0.8 train.max_steps=1,2")[:3]
    assert settings[0] == ["objective.alpha=0.54", "train.max_steps=1"] and len(settings) == 3
    kwargs = {"steps": 40, "attacks": ("mlp",), "ceiling": False, "max_eval": 8, "exact_positions": 8}
    points = sweep(settings, tmp_path / "sweep", common=common, transfer=False, attack_kwargs=kwargs)
    assert (tmp_path / "sweep" / "frontier.png").stat().st_size > 1000
    frontier = json.loads((tmp_path / "sweep" / "frontier.json").read_text())
    assert len(frontier) == 3
    for p in frontier:
        attack = json.loads(Path(p["attack_report"]).read_text())
        assert set(attack["threat_models"]) == {"lookup", "white-box", "server"}
        assert set(attack["threat_models"]["server"]["attacks"]) == {"reader", "lm_prior"}
        for threat, sec in attack["threat_models"].items():
            assert p["plotted"][threat][:2] == pytest.approx([sec["recovery_top1"], 100 * p["top1_agreement"]])
            assert p["plotted"][threat][2] == pytest.approx(p["utility_loss"])
    # One step at lr 1e-6 leaves the SGT at its near-identity initialisation: a learned attack reads it.
    assert points[0]["recovery"]["white-box"] >= HIGH_RECOVERY
    assert NOT_HIDDEN in privacy_verdict(points[0]["recovery"]["white-box"])
    before = (tmp_path / "sweep" / "alpha0.54_max_steps1" / "privacy_point.json").stat().st_mtime
    assert sweep(settings, tmp_path / "sweep", common=common, transfer=False, attack_kwargs=kwargs) == frontier
    assert (tmp_path / "sweep" / "alpha0.54_max_steps1" / "privacy_point.json").stat().st_mtime == before


def test_a_non_finite_inverter_step_leaves_the_inverter_as_it_was(tmp_path):
    """An inverter-only step on a cloak whose output is NaN (so NaN gradients) keeps the inverter's
    parameters and Adam moments, twice in a row; the same step on the real cloak moves them. Fails if a NaN
    update gets through or a skipped step still advances Adam."""
    import jax.numpy as jnp
    from flax import nnx

    from sgt_jax.config import CloakConfig, ObjectiveConfig
    from sgt_jax.models import CausalLM
    from sgt_jax.training.adversary import Adversary
    from sgt_jax.transform.cloak import TransformerCloak
    from tiny_checkpoints import make_tiny_checkpoint

    model_dir = make_tiny_checkpoint(tmp_path / "model", "llama")
    cloak = TransformerCloak.from_config(CloakConfig(), str(model_dir), rngs=nnx.Rngs(0))
    base_graphdef, base_state = nnx.split(CausalLM.from_pretrained(model_dir, dtype="float32"))
    config = CausalLM.from_pretrained(model_dir).config
    adversary = Adversary(ObjectiveConfig(adversary="mlp"), cloak=cloak, hidden_size=config.hidden_size,
                          vocab_size=config.vocab_size, seed=0)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, 2, 8))
    ones = np.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": ones, "noise_mask": ones, "loss_mask": ones,
             "example_index": np.arange(2).reshape(1, 2)}
    cloak_params = nnx.state(cloak, nnx.Param)
    nan_cloak = jax.tree.map(lambda p: p * jnp.nan, cloak_params)

    def step(adv, params):
        return adversary._inverter_step(adv, params, base_state, base_graphdef, batch, jax.random.key(1))

    before = adversary.init_state()
    skipped = step(step(before, nan_cloak), nan_cloak)
    moved = step(before, cloak_params)
    leaves = lambda adv: jax.tree.leaves((adv.params, adv.opt_state.inner_state))  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(leaves(skipped), leaves(before), strict=True))
    assert int(skipped.opt_state.total_notfinite) == 2
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(moved), leaves(before), strict=True))
