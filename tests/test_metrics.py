"""Forward and obfuscation metrics against hand-computed / brute-force numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax.evaluation import metrics


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    return rng.normal(size=(50, 8)).astype(np.float32)


def test_identity_transform_changes_no_token(table):
    ids = np.array([[3, 7, 11, 2], [5, 5, 9, 1]])
    x = table[ids]
    for metric in ("cosine", "l2"):
        out = metrics.obfuscation_per_sequence(jnp.asarray(x), jnp.asarray(ids), jnp.ones(ids.shape), table, metric=metric)
        np.testing.assert_allclose(np.asarray(out["percent_changed"]), 0.0)
        np.testing.assert_allclose(np.asarray(out["mean_rank"]), 0.0)


def test_moving_every_embedding_onto_another_token_changes_all(table):
    ids = np.array([[3, 7, 11, 2]])
    x = table[(ids + 1) % 50]
    mask = np.array([[1, 1, 1, 0]])  # the untransformed last token is not counted
    for metric in ("cosine", "l2"):
        out = metrics.obfuscation_per_sequence(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(mask), table, metric=metric)
        np.testing.assert_allclose(np.asarray(out["percent_changed"]), 100.0)
        assert np.all(np.asarray(out["mean_rank"]) >= 1)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_nearest_and_rank_match_brute_force_with_vocab_chunks(table, metric):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5, 8)).astype(np.float32)
    true = rng.integers(0, 50, size=(3, 5))
    nearest, rank = metrics.nearest_tokens(jnp.asarray(x), jnp.asarray(table), metric=metric, true_ids=jnp.asarray(true), vocab_chunk=16)
    flat = x.reshape(-1, 8)
    if metric == "cosine":
        scores = (flat / np.linalg.norm(flat, axis=1, keepdims=True)) @ (table / np.linalg.norm(table, axis=1, keepdims=True)).T
    else:
        scores = -((flat[:, None, :] - table[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(nearest).reshape(-1), scores.argmax(1))
    true_scores = scores[np.arange(15), true.reshape(-1)]
    np.testing.assert_array_equal(np.asarray(rank).reshape(-1), (scores > (true_scores + 1e-5 * (1 + np.abs(true_scores)))[:, None]).sum(1))


def test_perplexity_ignores_padding_and_shifts_labels():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    nll, count = metrics.next_token_nll_sums(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    expected, n = 0.0, 0
    for b in range(2):
        for t in range(4):
            if mask[b, t + 1] and mask[b, t]:  # never a target predicted from a pad
                lp = logits[b, t] - np.log(np.exp(logits[b, t]).sum())
                expected -= lp[ids[b, t + 1]]
                n += 1
    assert float(count) == n
    np.testing.assert_allclose(float(nll), expected, rtol=1e-5)


def test_topk_agreement_and_summary():
    clean = jnp.asarray([[[0.0, 5.0, 1.0, 0.5]]])
    transformed = jnp.asarray([[[5.0, 4.0, 1.0, 0.0]]])  # clean's top-1 (1) is transformed's 2nd
    out = metrics.topk_agreement_sums(clean, transformed, jnp.ones((1, 1)), ks=(1, 2))
    assert float(out["top1_agreement"]) == 0.0 and float(out["top2_agreement"]) == 1.0
    s = metrics.summarize([10.0, 20.0, np.nan, 40.0])
    assert s["mean"] == pytest.approx(70 / 3) and s["min"] == 10.0 and s["q50"] == 20.0
