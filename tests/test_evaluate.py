"""Generation metrics (ROUGE, cached base generations) and the ``python -m sgt_jax.evaluate`` report."""

import json
import statistics

import numpy as np
import pytest
from rouge_score import rouge_scorer

from sgt_jax.evaluation.rouge import cached_base_generations, rouge_scores

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
        f = np.array([scorer.score(r, c)[t].fmeasure for r, c in PAIRS])
        assert got[f"{t}_fmeasure_stderr"] == pytest.approx(statistics.stdev(f) / len(f) ** 0.5, abs=1e-12)
    assert np.isnan(rouge_scores(refs[:1], cands[:1])["rougeL_fmeasure_stderr"])  # undefined for one pair


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


# ---------------------------------------------------------------------------------------------- end to end


def _tiny_run_overrides(root):
    """A tiny model written under ``root`` and the overrides of a small float32 run on its synthetic corpus."""
    from tiny_checkpoints import make_tiny_model_dir

    model_dir = make_tiny_model_dir(root / "model", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                    num_key_value_heads=2, corpus_examples=100)
    return model_dir, [
        f"model.path={model_dir}", "model.dtype=float32", f"tracking.run_dir={root / 'run'}",
        "data.synthetic_num_examples=40", "data.validation_fraction=0.2", "data.batch_size=4", "data.max_length=256",
        "data.buckets=[256]", "data.num_workers=0", f"data.cache_dir={root / 'cache'}"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from flax import nnx

    from sgt_jax import config as config_lib
    from sgt_jax.inference.artifact import save_artifact
    from sgt_jax.transform.cloak import TransformerCloak
    from sgt_jax.data import load_tokenizer
    from sgt_jax.training.trainer import model_fingerprint

    root = tmp_path_factory.mktemp("eval")
    model_dir, overrides = _tiny_run_overrides(root)
    cfg = config_lib.load_config(None, [
        *overrides, "generation.max_new_tokens=4",
        "cloak.scale=[1e-8,1e-6]",  # identity-like: mu = 0 at init, sigma <= 1e-6
    ])
    saved = config_lib.to_dict(cfg)
    saved["base_model_fingerprint"] = model_fingerprint(model_dir)
    tokenizer = load_tokenizer(str(model_dir))

    def artifact(out_dir, cloak_cfg, std_bias=None):
        cloak = TransformerCloak.from_config(cloak_cfg, str(model_dir), rngs=nnx.Rngs(0))
        if std_bias is not None:
            cloak.std_head.bias[...] = cloak.std_head.bias[...] * 0 + std_bias
        return save_artifact(out_dir, params=nnx.state(cloak, nnx.Param), cloak_config=cloak_cfg,
                             model_dir=model_dir, fingerprint=saved["base_model_fingerprint"], tokenizer=tokenizer,
                             training_config=saved)

    artifact(root / "run" / "sgt", cfg.cloak)
    noisy = artifact(root / "noisy_sgt", config_lib.CloakConfig(scale=[1e-8, 10.0]), std_bias=5.0)
    return root, noisy


@pytest.mark.slow
def test_evaluate_end_to_end_identity_like(tiny_run, capsys):
    from sgt_jax.evaluation.evaluate import main

    root, _ = tiny_run
    out = root / "report.json"
    # 8 prompts from batches of 4: prompts come from past --max-batches, in two generation batches.
    assert main(["--sgt", str(root / "run"), "--max-batches", "1", "--generation-examples", "8",
                 "--attack-steps", "20", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"forward", "obfuscation", "generation", "data", "sgt", "base_model_fingerprint"}
    fwd = report["forward"]
    assert fwd["perplexity_clean"] > 1 and fwd["perplexity_transformed"] == pytest.approx(fwd["perplexity_clean"], rel=1e-3)
    assert fwd["top1_agreement"] == pytest.approx(1.0) and fwd["top5_agreement"] == pytest.approx(1.0)
    assert fwd["mean_sigma"] <= 1e-6
    for metric in ("cosine", "l2"):
        obf = report["obfuscation"][metric]
        assert obf["percent_changed"]["mean"] == pytest.approx(0.0, abs=1e-9)
        assert set(obf["percent_changed"]) >= {"mean", "min", "max", "q10", "q50", "q90"}
        assert obf["reconstruction_rank_mean"] == pytest.approx(0.0, abs=1e-9)
    privacy = report["privacy"]  # every threat model next to nearest-neighbour obfuscation, one line each
    assert {"privacy (lookup)", "privacy (white-box)", "privacy (server)"} <= set(privacy)
    assert privacy["recovery_lookup"] == pytest.approx(100.0)  # identity-like SGT
    assert 0.0 <= privacy["recovery_white_box"] <= 100.0 and 0.0 <= privacy["recovery_server"] <= 100.0
    gen = report["generation"]
    assert gen["num_examples"] == 8 and report["data"]["batches"] == 1
    # The SGT generations draw the base generations' sampling keys: an identity-like SGT reproduces them.
    assert all(row["sgt"] == row["base"] for row in gen["examples"])
    for key in ("rouge1_precision", "rouge2_recall", "rougeL_fmeasure"):
        assert 0.0 <= gen[key] <= 1.0
    assert gen["rougeL_fmeasure_stderr"] >= 0.0
    assert report["data"]["sequences"] > 0
    assert (root / "run" / "base_generations.json").is_file()  # cached beside the run
    assert list((root / "run" / "tensorboard").glob("events*"))
    assert "SGT evaluation" in capsys.readouterr().out


def test_evaluate_noisy_sgt_obfuscates(tiny_run):
    from sgt_jax.evaluation.evaluate import evaluate

    root, noisy = tiny_run
    report = evaluate(noisy, max_batches=1, generation_examples=0, out=str(root / "noisy.json"), print_table=False,
                      attack_steps=0)
    assert report["obfuscation"]["cosine"]["percent_changed"]["mean"] > 50
    assert report["obfuscation"]["l2"]["reconstruction_rank_mean"] >= 1
    assert report["forward"]["top1_agreement"] <= 1.0 and report["generation"] == {"num_examples": 0}


def test_evaluate_bad_path_one_line(tmp_path, capsys):
    from sgt_jax.evaluation.evaluate import main

    assert main(["--sgt", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "missing" in err


@pytest.mark.slow
def test_validation_and_evaluate_give_the_same_numbers_on_the_same_sgt_data_and_key(tmp_path):
    """One evaluator: the trainer's validation pass and ``evaluate`` on the artifact of the same train state, over
    the same validation batches with the same key, report the same perplexities, agreement, obfuscation and
    mean sigma (the same per-example noise keys; sigma large enough that a different key changes the numbers)."""
    import jax

    from sgt_jax import config as config_lib
    from sgt_jax.evaluation.evaluate import evaluate
    from sgt_jax.training.trainer import Trainer

    _, overrides = _tiny_run_overrides(tmp_path)
    cfg = config_lib.load_config(None, [*overrides, "validation.max_batches=2", "cloak.scale=[1e-3,1.0]",
                                        "model.truncate_at_layer=0"])
    trainer = Trainer(cfg)
    state = trainer.init_state()
    with trainer.validator.full_model_on_devices() as full:
        validation = trainer.validator._forward_validation(state, jax.random.key(7), full).metrics()
        other_key = trainer.validator._forward_validation(state, jax.random.key(8), full).metrics()
    report = evaluate(trainer.save_artifact(state), max_batches=2, generation_examples=0, attack_steps=0, seed=7,
                      out=str(tmp_path / "report.json"), print_table=False)
    forward, cosine = report["forward"], report["obfuscation"]["cosine"]["percent_changed"]
    pairs = [(validation["perplexity_clean"], forward["perplexity_clean"]),
             (validation["perplexity_transformed"], forward["perplexity_transformed"]),
             (validation["top1_agreement"], forward["top1_agreement"]),
             (validation["top5_agreement"], forward["top5_agreement"]),
             (validation["obfuscation_mean"], cosine["mean"]), (validation["mean_sigma"], forward["mean_sigma"])]
    for ours, theirs in pairs:
        assert theirs == pytest.approx(ours, rel=1e-5, abs=1e-7), pairs
    assert other_key["perplexity_transformed"] != pytest.approx(validation["perplexity_transformed"], rel=1e-5)
