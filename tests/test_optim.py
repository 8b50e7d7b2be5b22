"""Optimizer: masked weight decay (heads never decay), schedules, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sgt_jax.config import OptimizerConfig
from sgt_jax.training.optim import decay_mask, make_optimizer, make_schedule, path_names


class _FakeCloak(nnx.Module):
    """Same attribute layout as the cloak: estimators (nested, with a list of layers) + two heads."""

    def __init__(self, rngs):
        self.mean_estimator = nnx.Dict(layers=nnx.List([nnx.Linear(4, 4, rngs=rngs)]), norm=nnx.Linear(4, 4, rngs=rngs))
        self.std_estimator = nnx.Dict(layers=nnx.List([nnx.Linear(4, 4, rngs=rngs)]))
        self.mean_head = nnx.Linear(4, 4, rngs=rngs)
        self.std_head = nnx.Linear(4, 4, rngs=rngs)
        # biases start at 0 in nnx.Linear: make them non-zero so "unchanged" is a real check.
        for lin in (self.mean_head, self.std_head):
            lin.bias[...] = jnp.full((4,), 0.5)


def _params():
    return nnx.state(_FakeCloak(nnx.Rngs(0)), nnx.Param)


def test_decay_mask_is_false_exactly_on_head_leaves():
    mask = decay_mask(_params())
    flat = {path_names(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert len(flat) == 10
    for names, m in flat.items():
        assert bool(m) == (names[0] not in ("mean_head", "std_head")), names
    # a plain dict works as well
    pure = decay_mask(nnx.to_pure_dict(_params()))
    assert pure["std_head"]["bias"] is False and pure["mean_estimator"]["norm"]["kernel"] is True


def test_zero_grad_step_decays_body_like_adamw_and_leaves_heads_unchanged():
    cfg = OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, warmup_steps=0, schedule="constant")
    params = _params()
    opt = make_optimizer(cfg, total_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    new = optax.apply_updates(params, updates)

    ref_opt = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1)  # no mask
    ref_updates, _ = ref_opt.update(zeros, ref_opt.init(params), params)
    ref = optax.apply_updates(params, ref_updates)

    for (path, p0), p1, pr in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new), jax.tree.leaves(ref)
    ):
        names = path_names(path)
        if names[0] in ("mean_head", "std_head"):
            np.testing.assert_array_equal(np.asarray(p1), np.asarray(p0))
        else:
            np.testing.assert_allclose(np.asarray(p1), np.asarray(pr), rtol=0, atol=1e-7)
            np.testing.assert_allclose(np.asarray(p1), np.asarray(p0) * (1 - 1e-2 * 0.1), rtol=1e-6)
            assert not np.array_equal(np.asarray(p1), np.asarray(p0)) or not np.any(np.asarray(p0))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warmup_then_decay_to_end_ratio(kind):
    cfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, schedule=kind, end_lr_ratio=0.1)
    s = make_schedule(cfg, total_steps=110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    end = 1e-3 if kind == "constant" else 1e-4
    np.testing.assert_allclose(float(s(110)), end, rtol=1e-5)
    if kind == "cosine":  # halfway through the decay: (lr + end)/2
        np.testing.assert_allclose(float(s(60)), (1e-3 + 1e-4) / 2, rtol=1e-5)
    if kind == "linear":
        np.testing.assert_allclose(float(s(35)), 1e-3 - 0.25 * 9e-4, rtol=1e-5)


def test_global_norm_clipping_is_applied_before_adam():
    """Two steps with gradients of very different norms: Adam alone is scale-sensitive across steps, so the
    clipped run (first gradient cut to norm 1) must match clip-then-adamw and differ from adamw alone."""
    cfg = OptimizerConfig(learning_rate=1.0, weight_decay=0.0, warmup_steps=0, schedule="constant", max_grad_norm=1.0)
    params = {"w": jnp.zeros(2)}
    grads = [{"w": jnp.array([300.0, 400.0])}, {"w": jnp.array([0.3, -0.4])}]

    def run(opt):
        state, p = opt.init(params), params
        for g in grads:
            u, state = opt.update(g, state, p)
            p = optax.apply_updates(p, u)
        return np.asarray(p["w"])

    ours = run(make_optimizer(cfg, 2))
    adamw = optax.adamw(1.0, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.0)
    manual = run(optax.chain(optax.clip_by_global_norm(1.0), adamw))
    unclipped = run(optax.adamw(1.0, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.0))
    np.testing.assert_allclose(ours, manual, rtol=1e-6)
    assert np.max(np.abs(ours - unclipped)) > 1e-3


def test_real_cloak_heads_are_exempt_from_decay(tmp_path):
    """The mask on the real TransformerCloak state: exactly the 4 head leaves are exempt, and a zero-gradient
    step leaves them unchanged while every estimator parameter shrinks by lr * weight_decay."""
    import json

    from sgt_jax.transform.cloak import TransformerCloak

    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6)))
    params = nnx.state(TransformerCloak(config_path=tmp_path, rngs=nnx.Rngs(0)), nnx.Param)
    exempt = [path_names(p) for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(params)) if not m]
    assert sorted(n[:2] for n in exempt) == [("mean_head", "bias"), ("mean_head", "kernel"),
                                             ("std_head", "bias"), ("std_head", "kernel")]
    cfg = OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, warmup_steps=0, schedule="constant")
    opt = make_optimizer(cfg, 10)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    new = optax.apply_updates(params, updates)
    for (path, p0), p1 in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new)):
        factor = 1.0 if path_names(path)[0] in ("mean_head", "std_head") else 1 - 1e-3
        np.testing.assert_allclose(np.asarray(p1), np.asarray(p0) * factor, rtol=1e-6, atol=0)
