"""Native mixture-of-experts MLP: top-2 routing, renormalised gates, load-balancing loss."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.models.moe import MoeMLP, load_balancing_loss, route_top_k

CFG = SimpleNamespace(hidden_size=8, intermediate_size=12, num_experts=4, num_experts_per_tok=2)


def _silu(v):
    return v / (1 + np.exp(-v))


def test_top2_routing_picks_the_two_largest_logits_and_renormalises():
    logits = jnp.array([[0.1, 2.0, -1.0, 1.5], [3.0, -2.0, 0.0, 2.9]])
    probs, combine, idx = route_top_k(logits, 2)
    assert sorted(np.asarray(idx[0]).tolist()) == [1, 3]
    assert sorted(np.asarray(idx[1]).tolist()) == [0, 3]
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(probs), p, rtol=1e-6)
    expected = np.zeros((2, 4))
    expected[0, [1, 3]] = p[0, [1, 3]] / p[0, [1, 3]].sum()
    expected[1, [0, 3]] = p[1, [0, 3]] / p[1, [0, 3]].sum()
    np.testing.assert_allclose(np.asarray(combine), expected, rtol=1e-6)


def test_aux_loss_hand_computed_and_ignores_padding():
    # 3 real tokens + 1 pad token whose routing must not count.
    probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0]])
    top = np.array([[0, 1], [1, 2], [2, 3], [3, 2]])
    mask = np.array([1, 1, 1, 0])
    # f: assignments over real tokens: e0:1, e1:2, e2:2, e3:1 out of 6; P: mean probs of the 3 real tokens.
    f = np.array([1, 2, 2, 1]) / 6.0
    P = probs[:3].mean(0)
    expected = 4 * np.sum(f * P)
    got = load_balancing_loss(jnp.asarray(probs), jnp.asarray(top), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    # balanced routing → 1.0
    uniform = load_balancing_loss(jnp.full((4, 4), 0.25), jnp.array([[0, 1], [2, 3], [0, 1], [2, 3]]), jnp.ones(4))
    np.testing.assert_allclose(float(uniform), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_moe_forward_matches_per_token_reference():
    moe = MoeMLP(CFG, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    mask = jnp.array([[0, 1, 1], [1, 1, 1]], bool)
    y, aux = moe(x, mask)
    assert y.shape == (2, 3, 8) and y.dtype == jnp.float32 and aux.shape == ()

    W_r = np.asarray(moe.router[...])
    G, U, Dn = (np.asarray(p[...]) for p in (moe.gate_proj, moe.up_proj, moe.down_proj))
    xs = np.asarray(x).reshape(-1, 8)
    ref = np.zeros_like(xs)
    for t, v in enumerate(xs):
        logit = v @ W_r
        top = np.argsort(-logit)[:2]
        g = np.exp(logit[top] - logit[top].max())
        g /= g.sum()
        for w, e in zip(g, top):
            ref[t] += w * ((_silu(v @ G[e]) * (v @ U[e])) @ Dn[e])
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 8), ref, rtol=1e-4, atol=1e-6)

    # aux over the 5 real tokens only: changing the pad token's input leaves it unchanged
    x2 = x.at[0, 0].set(100.0)
    _, aux2 = moe(x2, mask)
    np.testing.assert_allclose(float(aux2), float(aux), rtol=1e-6)
