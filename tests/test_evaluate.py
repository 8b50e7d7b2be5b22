"""Generation metrics (ROUGE, cached base generations) and the ``python -m sgt_jax.evaluate`` report."""

import json

import pytest
from rouge_score import rouge_scorer

from sgt_jax.generation_metrics import cached_base_generations, rouge_scores

PAIRS = [  # (reference = base generation, candidate = SGT generation)
    ("The capital of France is Paris.", "Paris is the capital of France."),
    ("Add 3 and 4 to get 7", "3 plus 4 is 7"),
    ("a quick brown fox jumps", "the quick brown dog jumps over"),
    ("", "something"),
]


def test_rouge_equals_library_mean():
    refs, cands = zip(*PAIRS)
    got = rouge_scores(refs, cands)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for t in ("rouge1", "rouge2", "rougeL"):
        for part in ("precision", "recall", "fmeasure"):
            want = sum(getattr(scorer.score(r, c)[t], part) for r, c in PAIRS) / len(PAIRS)
            assert got[f"{t}_{part}"] == pytest.approx(want, abs=1e-12)


def test_rouge_hand_computed():
    f = lambda p, r: 0.0 if p + r == 0 else 2 * p * r / (p + r)  # noqa: E731
    # ref: the cat sat on the mat (6) | cand: the cat lay on a mat (6)
    # unigrams: the, cat, on, mat → 4 (clipped counts); bigrams: (the cat) → 1 of 5; LCS: the cat on mat → 4.
    got = rouge_scores(["the cat sat on the mat"], ["the cat lay on a mat"])
    assert got["rouge1_precision"] == pytest.approx(4 / 6) and got["rouge1_recall"] == pytest.approx(4 / 6)
    assert got["rouge2_precision"] == pytest.approx(1 / 5) and got["rouge2_recall"] == pytest.approx(1 / 5)
    assert got["rougeL_fmeasure"] == pytest.approx(4 / 6)
    # ref: a b c d (4) | cand: a c b (3): unigrams 3; bigrams none (ab bc cd vs ac cb); LCS 2 (a b / a c).
    got = rouge_scores(["a b c d"], ["a c b"])
    assert got["rouge1_precision"] == pytest.approx(1.0) and got["rouge1_recall"] == pytest.approx(3 / 4)
    assert got["rouge1_fmeasure"] == pytest.approx(f(1.0, 3 / 4))
    assert got["rouge2_fmeasure"] == 0.0
    assert got["rougeL_precision"] == pytest.approx(2 / 3) and got["rougeL_recall"] == pytest.approx(2 / 4)
    assert got["rougeL_fmeasure"] == pytest.approx(4 / 7)
    # Averaging is over pairs.
    both = rouge_scores(["the cat sat on the mat", "a b c d"], ["the cat lay on a mat", "a c b"])
    assert both["rougeL_recall"] == pytest.approx((4 / 6 + 2 / 4) / 2)


def test_base_generations_cached_once_and_invalidated(tmp_path):
    calls = []

    def generate_fn(prompts):
        calls.append(list(prompts))
        return [f"answer to {p} #{len(calls)}" for p in prompts]

    cache = tmp_path / "run" / "base_generations.json"
    settings = {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 8}
    first = cached_base_generations(cache, ["p1", "p2"], generate_fn, "fp", settings)
    again = cached_base_generations(cache, ["p1", "p2"], generate_fn, "fp", dict(settings))
    assert first == again == ["answer to p1 #1", "answer to p2 #1"] and len(calls) == 1
    assert json.loads(cache.read_text())  # plain JSON beside the run
    cached_base_generations(cache, ["p1", "p2"], generate_fn, "fp", {**settings, "temperature": 0.3})
    assert len(calls) == 2  # settings changed
    cached_base_generations(cache, ["p1", "p2"], generate_fn, "other-model", settings)
    assert len(calls) == 3  # model changed
    cached_base_generations(cache, ["p1", "p3"], generate_fn, "fp", settings)
    assert len(calls) == 4  # prompts changed
    assert cached_base_generations(cache, ["p1", "p2"], generate_fn, "fp", settings) == first and len(calls) == 4
    cache.write_text("{not json")
    cached_base_generations(cache, ["p1", "p2"], generate_fn, "fp", settings)
    assert len(calls) == 5  # a corrupt cache is recomputed
