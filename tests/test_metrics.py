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


def _reference_sums(hidden, head, ids, mask):
    """Per-row NLL sums and counts from the full (B, S, V) logits, through optax's cross-entropy (an independent
    implementation) and an explicit pair mask: target n+1 scored when tokens n and n+1 are both real."""
    import optax

    logits = np.einsum("bsd,dv->bsv", hidden.astype(np.float64), head.astype(np.float64)).astype(np.float32)
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits[:, :-1]), jnp.asarray(ids[:, 1:])))
    pairs = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    return float(np.sum(np.where(pairs, ce, 0.0))), int(pairs.sum()), logits


@pytest.mark.parametrize("chunk", [1, 3, 5, 16, 64])
def test_chunked_nll_equals_optax_on_full_logits_with_left_padding(chunk):
    """hidden @ head a chunk of positions at a time (3 and 5 do not divide S=16) gives the same NLL sum and count
    as optax's cross-entropy on the whole logits, with left-padded and fully padded rows left out."""
    rng = np.random.default_rng(3)
    b, s, d, v = 4, 16, 8, 37
    hidden = rng.normal(size=(b, s, d)).astype(np.float32)
    head = rng.normal(size=(d, v)).astype(np.float32)
    ids = rng.integers(0, v, size=(b, s))
    mask = np.ones((b, s), np.int32)
    mask[1, :5] = 0  # left padding
    mask[2, :15] = 0  # one real token: nothing to score
    mask[3, :] = 0  # an all-padding row
    hidden[3] = np.nan  # what a fully masked row may hold: must not reach the sum
    expected, count, _ = _reference_sums(np.nan_to_num(hidden), head, ids, mask)
    sums = metrics.chunked_forward_sums(jnp.asarray(hidden), jnp.asarray(hidden), jnp.asarray(head),
                                        jnp.asarray(ids), jnp.asarray(mask), chunk=chunk)
    assert float(sums["nll_count"]) == count == 15 + 10
    np.testing.assert_allclose([float(sums["clean_nll"]), float(sums["transformed_nll"])], [expected] * 2, rtol=2e-5)


def test_chunked_nll_response_only_masks_and_full_logit_version_agree():
    """A target mask different from the context mask (response-only scoring): the chunked sums equal the
    full-logit next_token_nll_sums on the same logits."""
    rng = np.random.default_rng(4)
    hidden = rng.normal(size=(3, 11, 6)).astype(np.float32)
    head = rng.normal(size=(6, 29)).astype(np.float32)
    ids = rng.integers(0, 29, size=(3, 11))
    context = np.ones((3, 11), np.int32)
    context[0, :4] = 0
    target = context * (np.arange(11) >= 6)
    full = metrics.next_token_nll_sums(jnp.asarray(hidden) @ jnp.asarray(head), jnp.asarray(ids), jnp.asarray(target),
                                       jnp.asarray(context))
    chunked = metrics.chunked_forward_sums(jnp.asarray(hidden), jnp.asarray(hidden), jnp.asarray(head),
                                           jnp.asarray(ids), jnp.asarray(context), target_mask=jnp.asarray(target),
                                           chunk=4)
    assert float(chunked["nll_count"]) == float(full[1]) == 3 * 5
    np.testing.assert_allclose(float(chunked["clean_nll"]), float(full[0]), rtol=2e-5)
    assert float(chunked["agreement_count"]) == context.sum()  # agreement is over every real token


def test_chunked_forward_sums_equal_full_logit_metrics():
    """clean / transformed NLL and top-1/5 agreement over position chunks (chunk 6, S=13) equal the optax
    reference and topk_agreement_sums on the whole logits."""
    rng = np.random.default_rng(5)
    b, s, d, v = 3, 13, 8, 41
    clean = rng.normal(size=(b, s, d)).astype(np.float32)
    transformed = clean + 0.7 * rng.normal(size=(b, s, d)).astype(np.float32)
    head = rng.normal(size=(d, v)).astype(np.float32)
    ids = rng.integers(0, v, size=(b, s))
    mask = np.ones((b, s), np.int32)
    mask[0, :3] = 0
    mask[2, :12] = 0
    sums = metrics.chunked_forward_sums(jnp.asarray(clean), jnp.asarray(transformed), jnp.asarray(head),
                                        jnp.asarray(ids), jnp.asarray(mask), chunk=6)
    clean_nll, count, clean_logits = _reference_sums(clean, head, ids, mask)
    t_nll, _, t_logits = _reference_sums(transformed, head, ids, mask)
    np.testing.assert_allclose([float(sums["clean_nll"]), float(sums["transformed_nll"])], [clean_nll, t_nll], rtol=2e-5)
    assert float(sums["nll_count"]) == count == 9 + 12
    # top-k agreement by brute force: is the clean argmax among the transformed k largest?
    top1 = clean_logits.argmax(-1)
    order = np.argsort(-t_logits, axis=-1)
    for k in (1, 5):
        hits = (order[..., :k] == top1[..., None]).any(-1)
        assert float(sums[f"top{k}_agreement"]) == float((hits * mask).sum())
    assert float(sums["agreement_count"]) == mask.sum()
    assert 0 < float(sums["top1_agreement"]) < float(sums["top5_agreement"])
