"""The train step itself (sgt_jax.training.step): exact gradient accumulation and the non-finite guard, on one device
with the tiny model. The sharded properties (one reduction, sharded = single device) are in test_train.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgt_jax.transform import objective
from sgt_jax.training import step as step_lib

ROWS, SEQ = 8, 32


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from sgt_jax import config as config_lib
    from tiny_checkpoints import make_tiny_model_dir
    from sgt_jax.training.trainer import Trainer

    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny", num_hidden_layers=2)
    cfg = config_lib.load_config(None, [
        f"model.path={model_dir}", "model.dtype=float32", "cloak.seed=3", "data.synthetic_num_examples=48",
        "data.max_length=64", "data.buckets=[64]", "data.num_workers=0", "train.max_steps=4",
        "optimizer.learning_rate=1e-2", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
        f"tracking.run_dir={tmp_path_factory.mktemp('run')}",
    ])
    return Trainer(cfg)


def padded_batch(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Left-padded rows of very different lengths (1..32 real tokens) and noise/loss masks covering
    different shares of each row: per-micro-batch means differ a lot from the global mean."""
    rng = np.random.default_rng(seed)
    lengths = np.array([32, 3, 17, 1, 29, 6, 24, 11])
    ids = rng.integers(3, vocab_size, size=(ROWS, SEQ)).astype(np.int32)
    attention = (np.arange(SEQ)[None, :] >= SEQ - lengths[:, None]).astype(np.int32)
    noise = attention * (rng.random((ROWS, SEQ)) < np.linspace(0.2, 1.0, ROWS)[:, None])
    noise[:, -1] = 1  # every row has at least one transformed token
    loss = attention * (np.arange(SEQ)[None, :] >= SEQ - lengths[:, None] // 2)
    return {"input_ids": ids * attention, "attention_mask": attention, "noise_mask": noise.astype(np.int32),
            "loss_mask": loss.astype(np.int32)}


def gradient_recorder() -> optax.GradientTransformation:
    """An "optimizer" whose update is zero and whose state is the gradient it was given: the train step's
    accumulated gradient comes back, bit for bit, as the new state's ``opt_state``."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def accumulated_grads(trainer, host_batch, accum_steps, *, global_denominators=True):
    """(grads, metrics) of the whole batch through the public train step with ``accum_steps`` micro-batches."""
    recorder = gradient_recorder()
    step = jax.jit(step_lib.make_train_step(
        loss_fn=objective.make_loss_fn(trainer.cfg.objective), cloak_graphdef=trainer.cloak_graphdef,
        base_graphdef=trainer.base_graphdef, optimizer=recorder, mesh=trainer.mesh, hidden_size=trainer.hidden_size))
    fresh = trainer.init_state()
    state = step_lib.init_train_state(fresh.params, recorder, fresh.run_key)
    batch = {k: jnp.asarray(v) for k, v in step_lib.split_micro_batches(host_batch, accum_steps).items()}

    def run(batch):
        new_state, metrics = step(state, trainer.base_state, batch)
        return new_state.opt_state, metrics

    if global_denominators:
        return run(batch)
    # What a per-micro-batch mean would compute: each micro-batch averaged alone (a step of its own), then averaged.
    outs = [run(jax.tree.map(lambda x, m=m: x[m:m + 1], batch)) for m in range(accum_steps)]
    return jax.tree.map(lambda *xs: sum(xs) / accum_steps, *outs)


def max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_accumulation_over_4_micro_batches_equals_the_full_batch_gradient(trainer):
    """4 micro-batches of 2 rows give the 8-row gradient and loss components within 1e-6 (fp32, relative to
    the largest gradient element: the largest are ~50, where one float32 ulp is already 4e-6). The same
    batch with per-micro-batch means is off by orders of magnitude more, so a step that averaged each
    micro-batch on its own (or used local denominators) would fail. Dropout and noise are on: per-example
    keys must make the micro-batching invisible too."""
    host_batch = padded_batch(trainer.tokenizer.vocab_size if hasattr(trainer.tokenizer, "vocab_size") else 300)
    grads_1, metrics_1 = accumulated_grads(trainer, host_batch, 1)
    grads_4, metrics_4 = accumulated_grads(trainer, host_batch, 4)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_1))
    assert scale > 1e-3, "degenerate batch: no gradient"
    assert max_abs_diff(grads_4, grads_1) <= 1e-6 * max(scale, 1.0)
    for name in ("loss", "utility_loss", "stochasticity_loss", "similarity_loss", "mean_sigma"):
        assert abs(float(metrics_4[name]) - float(metrics_1[name])) <= 1e-6, name

    naive_grads, naive_metrics = accumulated_grads(trainer, host_batch, 4, global_denominators=False)
    assert max_abs_diff(naive_grads, grads_1) > 1e-3 * scale
    assert abs(float(naive_metrics["loss"]) - float(metrics_1["loss"])) > 1e-4


@pytest.mark.slow
def test_train_step_with_accumulation_equals_one_big_step(trainer):
    """Through the jitted train step (Trainer.global_batch splits the host batch): accum 4 and accum 1 give
    the same metrics and updated parameters. Fails if the step's reshaping, keys or denominators depend on
    the micro-batch layout."""
    host_batch = padded_batch(300, seed=1)
    state_1, metrics_1 = trainer.jitted_train_step(trainer.init_state(), trainer.base_state,
                                                   trainer.global_batch(host_batch, 1))
    state_4, metrics_4 = trainer.jitted_train_step(trainer.init_state(), trainer.base_state,
                                                   trainer.global_batch(host_batch, 4))
    assert abs(float(metrics_4["loss"]) - float(metrics_1["loss"])) <= 1e-6
    assert float(metrics_4["grad_norm"]) == pytest.approx(float(metrics_1["grad_norm"]), rel=1e-5)
    assert max_abs_diff(state_4.params, state_1.params) <= 1e-6  # Adam: updates ~ lr * sign(g), O(1e-2)
    assert int(state_4.step) == int(state_1.step) == 1


@pytest.mark.slow
def test_non_finite_step_is_skipped_and_counted(trainer):
    """A NaN loss (and so NaN gradients) leaves parameters and optimizer state bit-identical while step,
    streak and total count up; the next finite step updates again and resets the streak. Fails if the guard
    lets the NaN update through (params become NaN) or if Adam's moments/count move on a skipped step."""
    real_loss = objective.make_loss_fn(trainer.cfg.objective)

    def nan_loss(*args):
        loss, metrics = real_loss(*args)
        return loss * jnp.nan, {**metrics, "loss": metrics["loss"] * jnp.nan}

    def jitted(loss_fn):
        fn = step_lib.make_train_step(
            loss_fn=loss_fn, cloak_graphdef=trainer.cloak_graphdef, base_graphdef=trainer.base_graphdef,
            optimizer=trainer.optimizer, mesh=trainer.mesh, hidden_size=trainer.hidden_size)
        return step_lib.jit_train_step(fn, mesh=trainer.mesh, state_sharding=trainer.state_sharding,
                                       base_sharding=trainer.base_sharding)

    nan_step, good_step = jitted(nan_loss), jitted(real_loss)
    batch = trainer.global_batch(padded_batch(300, seed=2), 2)
    state = trainer.init_state()
    before = jax.device_get(state)

    state, metrics = nan_step(state, trainer.base_state, batch)
    assert not bool(metrics["finite"])
    state, metrics = nan_step(state, trainer.base_state, batch)
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state)), jax.tree.leaves((before.params, before.opt_state))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert (int(after.step), int(after.nonfinite_streak), int(after.nonfinite_total)) == (2, 2, 2)
    assert int(metrics["nonfinite_streak"]) == 2

    state, metrics = good_step(state, trainer.base_state, batch)
    assert bool(metrics["finite"])
    final = jax.device_get(state)
    assert (int(final.step), int(final.nonfinite_streak), int(final.nonfinite_total)) == (3, 0, 2)
    assert max_abs_diff(final.params, before.params) > 0
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final.params))
