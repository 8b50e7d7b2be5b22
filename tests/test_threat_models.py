"""The server's attacks (transfer, the base model as reader, LM-prior decoding) against transforms with known
answers: the identity, pure noise, input-independent Gaussian noise, and the embedded model's own copy skill."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax.evaluation.inversion import PromptSet, gaussian_transform
from sgt_jax.evaluation.threat_models import server

from test_attack import V, _prompts  # the same skewed iid prompts


@pytest.mark.parametrize("case", ["identity", "pure_noise"])
def test_transfer_recovers_an_identity_sgt_and_only_the_majority_from_pure_noise(case):
    """The attacker trains its inverter on its own transform (the same recipe: the identity, or pure noise with
    its own draws) over its own public prompts, and reads the victim's held-out prompts under the victim's."""
    table = jax.random.normal(jax.random.key(0), (V, 16)) * 0.1
    sigma = 0.0 if case == "identity" else 1000.0 * float(jnp.abs(table).max())
    victim, attacker = gaussian_transform(table, sigma=sigma), gaussian_transform(table, sigma=sigma)
    held_out = _prompts(96, 2)
    attacker_public = _prompts(384, 5).without(held_out)
    sec = server(victim, table, _prompts(8, 1), held_out, key=jax.random.key(1), attacks=("transfer",),
                 attacker_transform=attacker, attacker_train=attacker_public, inverters=("mlp",), steps=120)
    res = sec["attacks"]["transfer_mlp"]
    truth = held_out.input_ids[held_out.targets]
    majority = 100.0 * np.mean(truth == 3)  # the skewed token, counted by hand
    assert res["positions"] == truth.size
    if case == "identity":
        assert res["top1"] >= 95.0, res
    else:
        assert abs(res["top1"] - majority) <= 2.0, (res["top1"], majority)
        assert abs(res["leakage"]["bits"]) < 0.15, res["leakage"]  # nothing read out of pure noise


# -------------------------------------------------------------------- the embedded model as reader and as a prior


@pytest.fixture(scope="module")
def embedded():
    from sgt_jax.data import load_tokenizer
    from sgt_jax.models import CausalLM
    from sgt_jax.models.hf import resolve_model_path

    path = resolve_model_path("embedded:tiny-llama")
    return CausalLM.from_pretrained(path, dtype="float32"), load_tokenizer(str(path))


def _prompt_set(examples, tokenizer):
    from sgt_jax.data.formats import encode_prompts
    from sgt_jax.inference.generate import left_pad

    return PromptSet(*left_pad(encode_prompts(examples, tokenizer, "alpaca"), tokenizer.pad_token_id))


def _copy_tasks(n, seed):
    """Held-out list-formatting (copy) tasks of the embedded corpus's generator under a seed pretraining never used."""
    from sgt_jax.data.synthetic import generate_corpus

    tasks = [e for e in generate_corpus(40 * n, seed) if "list" in e["instruction"]]
    return tasks[:n]


def _items(text):
    return [w for w in re.findall(r"\w+", text)]


@pytest.mark.slow
def test_reader_on_clean_embeddings_recovers_the_models_own_copy_skill(embedded):
    """The copy tasks' lists as the protected spans (alone: the reader never sees the victim's instruction). The
    model's own skill, measured independently: its greedy answer to the real task prompt, scored as the share of
    list items it writes at their place. The reader on clean embeddings recovers at least that, minus 2 points."""
    from sgt_jax.evaluation.reader import reader_attack
    from sgt_jax.inference.generate import generate

    model, tokenizer = embedded
    tasks = _copy_tasks(40, 4242)
    table = model.embedding_table
    spans = _prompt_set([{"instruction": "", "input": t["input"]} for t in tasks], tokenizer)
    public = _prompt_set([{"instruction": "", "input": t["input"]} for t in _copy_tasks(60, 77)], tokenizer)
    res = reader_attack(model, tokenizer, "alpaca", gaussian_transform(table), table, public.without(spans), spans,
                        key=jax.random.key(0), ceiling=False)

    prompts = _prompt_set([{"instruction": t["instruction"], "input": t["input"]} for t in tasks], tokenizer)
    out = generate(model, input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, max_new_tokens=48,
                   do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    hits = total = 0
    for t, seq, n in zip(tasks, np.asarray(out.sequences), np.asarray(out.lengths)):
        given, answer = _items(t["input"]), _items(tokenizer.decode(seq[:n].tolist(), skip_special_tokens=True))
        hits += sum(a == b for a, b in zip(given, answer))
        total += len(given)
    skill = 100.0 * hits / total
    assert skill > 50.0, skill  # the model can copy lists (TRAINING.md: 63% exact match on these tasks)
    assert res["top1"] >= skill - 2.0, (res["top1"], skill, res["examples"])


@pytest.mark.slow
def test_reader_and_lm_prior_against_noise(embedded):
    """Pure noise: the reader comes within 2 points of its no-information baseline (the most frequent public
    word). Input-independent Gaussian noise at which nearest-neighbour lookup recovers under half the tokens:
    LM-prior decoding beats lookup by at least 10 points (BeamClean's finding), and its noise model recovers
    the noise's scale from x_t alone."""
    from sgt_jax.data.synthetic import generate_corpus
    from sgt_jax.evaluation.inversion import run_attacks
    from sgt_jax.evaluation.lm_prior import lm_prior_attack
    from sgt_jax.evaluation.reader import reader_attack

    model, tokenizer = embedded
    examples = generate_corpus(120, 4242)
    held_out = _prompt_set(examples[:48], tokenizer)
    public = _prompt_set(examples[48:], tokenizer).without(held_out)
    table = model.embedding_table

    noise = gaussian_transform(table, sigma=1000.0)
    res = reader_attack(model, tokenizer, "alpaca", noise, table, public, held_out, key=jax.random.key(0),
                        ceiling=False, templates=("bullets", "repeat"))
    assert abs(res["top1"] - res["majority_baseline"]["top1"]) <= 2.0, res

    sigma = 0.5
    channel = gaussian_transform(table, sigma=sigma)
    lookup = run_attacks(channel, table, public, held_out, attacks=("nn",), key=jax.random.key(0), ceiling=False)
    nn = max(lookup["nn_l2"]["top1"], lookup["nn_cosine"]["top1"])
    decoded = lm_prior_attack(model, channel, table, held_out, key=jax.random.key(0), prior_baseline=False)
    assert nn < 50.0, nn
    assert decoded["top1"] >= nn + 10.0, (decoded, nn)
    assert decoded["noise_model"]["mean_sigma"] == pytest.approx(sigma, rel=0.05)


def test_reader_scoring_by_hand():
    """Spans are the maximal runs of transformed positions; the answer is the reading's words then the frequent
    word, cut to the span's length; a span word counts when it is in the longest common subsequence."""
    from sgt_jax.evaluation.reader import answer, lcs_length, protected_spans

    ids = np.zeros((2, 6), np.int32)
    noise = np.array([[0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], np.int32)
    assert protected_spans(PromptSet(ids, mask, noise)) == [(0, 1, 3), (0, 4, 5), (1, 2, 6)]
    assert lcs_length("a b c d".split(), "b x d a".split()) == 2  # b, d
    assert lcs_length([], ["a"]) == 0
    assert answer("- apple\n- river", 4, "the") == ["apple", "river", "the", "the"]
    assert answer("one two three", 2, "the") == ["one", "two"]
    # A span "Write the items as a list" (6 words) against the answer [the x 6]: one word, as the baseline says.
    assert lcs_length("Write the items as a list".split(), answer("", 6, "the")) == 1


def test_sections_name_the_strongest_attack_and_the_largest_bound():
    from sgt_jax.evaluation.attack import strongest_leakage
    from sgt_jax.evaluation.threat_models import section

    sec = section({"a": {"top1": 40.0, "leakage": {"bits": 1.0, "stderr_bits": 0.1, "entropy_bits": 5.0}},
                   "b": {"top1": 60.0, "leakage": {"bits": 0.5, "stderr_bits": 0.1, "entropy_bits": 5.0}},
                   "c": {"top1": 10.0}})
    assert sec["strongest"] == "b" and sec["recovery_top1"] == 60.0
    assert sec["leakage"]["attack"] == "a" and sec["leakage"]["bits"] == 1.0
    exact = {"bits": 2.0, "stderr_bits": 0.2, "entropy_bits": 5.0}
    best = strongest_leakage({"white-box": {**sec, "exact_channel": exact}, "lookup": section({"n": {"top1": 5.0}})})
    assert best["attack"] == "white-box/exact_channel" and best["bits"] == 2.0


@pytest.mark.slow
def test_transfer_against_a_trained_sgt_with_the_attackers_own_sgt_on_disjoint_data(tmp_path):
    """A trained victim (the embedded corpus); python -m sgt_jax.attack trains the server's own SGT with the
    victim's recipe on a corpus from which every example of the victim's corpus is removed, and reports the
    transfer attack's recovery with the overlap of the two SGTs' training prompts (0, checked on tokens too)."""
    import json

    from sgt_jax.config import load_config
    from sgt_jax.data.synthetic import generate_corpus
    from sgt_jax.train import train
    from sgt_jax.training.attack_run import main
    from tiny_checkpoints import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "model", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                    num_key_value_heads=2, num_hidden_layers=2, corpus_examples=100)
    run = tmp_path / "victim"
    cfg = load_config(None, [
        f"model.path={model_dir}", "model.dtype=float32", f"tracking.run_dir={run}", "train.max_steps=6",
        "data.synthetic_num_examples=120", "data.validation_fraction=0.2", "data.batch_size=8",
        "data.max_length=256", "data.buckets=[256]", "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}",
        "optimizer.learning_rate=1e-3", "validation.every_steps=null", "validation.max_batches=1",
        "validation.generation_examples=0", "validation.attack_steps=0", "validation.leakage_positions=8",
        "tracking.progress_bar=false", "checkpoint.every_minutes=null", "cloak.scale=[1e-4,1.0]",
    ])
    assert train(cfg)["stopped_by"] == "finished"
    assert main(["--sgt", str(run), "--threat-model", "server", "--server-attacks", "transfer", "--attacks", "mlp",
                 "--steps", "60", "--batch-size", "8", "--no-ceiling", "--transfer-steps", "4"]) == 0
    report = json.loads((run / "attack_report.json").read_text())
    sec = report["threat_models"]["server"]
    assert 0.0 <= sec["attacks"]["transfer_mlp"]["top1"] <= 100.0 and sec["strongest"] == "transfer_mlp"
    assert sec["transfer_sgt"]["overlap_with_victim_training_prompts"] == 0 and sec["transfer_sgt"]["train_prompts"] > 0
    attacker = [json.loads(line) for line in (run / "transfer_sgt" / "attacker_public.jsonl").read_text().splitlines()]
    victim = {(e["instruction"], e["input"]) for e in generate_corpus(120, cfg.data.synthetic_seed)}
    assert len(attacker) >= 60 and not victim & {(e["instruction"], e["input"]) for e in attacker}
    attacker_cfg = json.loads((run / "transfer_sgt" / "sgt" / "sgt_config.json").read_text())["training_config"]
    assert attacker_cfg["train"]["max_steps"] == 4 and attacker_cfg["train"]["seed"] != cfg.train.seed
    assert attacker_cfg["data"]["source"].endswith("attacker_public.jsonl")
