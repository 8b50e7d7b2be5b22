"""The shipped default base model (sgt_jax/assets/tiny-llama, built by ``python -m tools.pretrain_tiny``):
small enough to ship, has learned the synthetic corpus (perplexity and held-out task accuracy), and loads
identically in transformers and sgt_jax."""

import json

import numpy as np
import pytest

from sgt_jax.models import CausalLM, DecoderConfig
from sgt_jax.models.hf import resolve_model_path
from tools import pretrain_tiny

MODEL_DIR = resolve_model_path("embedded:tiny-llama")


def test_shipped_directory_is_a_small_hf_llama():
    files = {p.name: p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file()}
    assert sum(files.values()) <= 20 * 1024 * 1024, files
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "TRAINING.md",
                 "training.json"):
        assert name in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)  # no pickle
    hf = json.loads((MODEL_DIR / "config.json").read_text())
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
    config = DecoderConfig.from_hf(MODEL_DIR)
    assert config.num_key_value_heads < config.num_attention_heads and config.tie_word_embeddings
    from sgt_jax.data import load_tokenizer

    tokenizer = load_tokenizer(str(MODEL_DIR))
    assert tokenizer.chat_template and tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == config.eos_token_id
    assert len(tokenizer) == config.vocab_size


@pytest.fixture(scope="module")
def heldout():
    from sgt_jax.data import load_tokenizer

    tokenizer = load_tokenizer(str(MODEL_DIR))
    train, held = pretrain_tiny.corpus_splits()
    return tokenizer, train, held


def test_heldout_perplexity_is_far_below_the_unigram_baseline(heldout):
    tokenizer, _, held = heldout
    model = CausalLM.from_pretrained(MODEL_DIR, dtype="float32")
    rng = np.random.default_rng(0)
    sample = [held[i] for i in sorted(rng.choice(len(held), 96, replace=False))]
    tokens = pretrain_tiny.tokenize(sample, tokenizer)
    result = pretrain_tiny.evaluate_perplexity(model, tokens, tokenizer.pad_token_id, batch_size=32)
    # The unigram baseline is computed here, on the same held-out target tokens.
    targets = np.concatenate([tokens.input_ids[tokens.offsets[i] + 1:tokens.offsets[i + 1]] for i in range(len(tokens))])
    counts = np.bincount(targets)
    p = counts[counts > 0] / counts.sum()
    unigram = float(np.exp(-(p * np.log(p)).sum()))
    assert result["unigram_perplexity"] == pytest.approx(unigram, rel=1e-6)
    assert result["perplexity"] < unigram / 5, result
    # The responses (what the model must work out) are also far better than unigram.
    assert result["response_perplexity"] < result["response_unigram_perplexity"] / 3, result


def test_transformers_and_sgt_jax_give_the_same_logits(heldout):
    _, _, held = heldout
    texts = [pretrain_tiny.alpaca_prompt(ex) + ex["output"] for ex in held[:4]]
    parity = pretrain_tiny.torch_logit_difference(MODEL_DIR, texts)
    assert parity["max_abs_logit_diff"] < 1e-4 * max(1.0, parity["logit_scale"]), parity
    assert parity["argmax_agreement"] == 1.0, parity


@pytest.mark.slow
def test_heldout_tasks_are_answered_above_their_baselines(heldout):
    """Greedy exact match on held-out prompts: the copy task family (formatting) and arithmetic are answered
    significantly above their majority baselines (one-sided binomial p < 0.01, >= 100 prompts per family)."""
    tokenizer, train, held = heldout
    model = CausalLM.from_pretrained(MODEL_DIR, dtype="float32")
    families = ("arithmetic", "formatting")
    subset = [ex for ex in held if pretrain_tiny.task_of(ex)[0] in families]
    rows = pretrain_tiny.task_accuracy(model, tokenizer, train, subset, max_new_tokens=24)["heldout"]
    for family in families:
        row = rows[family]
        assert row["n"] >= 100 and row["accuracy"] > row["majority_baseline"], (family, row)
        assert pretrain_tiny.binomial_p_above(row) < 0.01, (family, row)
