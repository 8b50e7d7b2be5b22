"""lm-evaluation-harness adapter: a local multiple-choice task runs offline with and without the SGT."""

import json

import pytest

import lm_eval  # noqa: E402  (a test dependency: its absence must fail, not skip)

QUESTIONS = [
    ("What is 2 plus 3?", ["5", "7", "9"], 0),
    ("What is the capital of France?", ["Berlin", "Paris", "Rome"], 1),
    ("Which is a color?", ["dog", "run", "blue"], 2),
    ("What is 10 minus 4?", ["6", "4", "14"], 0),
    ("Which is an animal?", ["cat", "chair", "seven"], 0),
    ("What comes after Monday?", ["Sunday", "Tuesday", "Friday"], 1),
    ("How many legs has a bird?", ["four", "six", "two"], 2),
    ("What is 3 times 3?", ["9", "6", "12"], 0),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from flax import nnx

    from sgt_jax.inference.artifact import save_artifact
    from sgt_jax.transform.cloak import TransformerCloak
    from sgt_jax.config import CloakConfig
    from tiny_checkpoints import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = make_tiny_checkpoint(root / "model", "llama", vocab_size=300, hidden_size=32, intermediate_size=48,
                                     num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    # A tokenizer in the model directory (byte-level BPE trained on the questions).
    from sgt_jax.data import build_tokenizer

    texts = [q + " " + " ".join(c) for q, c, _ in QUESTIONS] * 4
    tok = build_tokenizer(texts, str(root / "_tok"), vocab_size=300)
    tok.save_pretrained(str(model_dir))
    cfg = CloakConfig(scale=[1e-3, 1.0])
    cloak = TransformerCloak.from_config(cfg, str(model_dir), rngs=nnx.Rngs(0))
    cloak.std_head.bias[...] = cloak.std_head.bias[...] * 0 + 0.05
    from sgt_jax.models.fingerprint import model_fingerprint

    sgt_dir = save_artifact(root / "sgt", params=nnx.state(cloak, nnx.Param), cloak_config=cfg, model_dir=model_dir,
                            fingerprint=model_fingerprint(model_dir))
    data = root / "tiny_mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "sgt_tiny_mc.yaml").write_text(
        "task: sgt_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return model_dir, sgt_dir, tasks


@pytest.mark.slow
@pytest.mark.parametrize("with_sgt", [False, True])
def test_multiple_choice_task_end_to_end(setup, with_sgt):
    from lm_eval.tasks import TaskManager

    from sgt_jax.evaluation.lm_eval_adapter import SGTLM

    model_dir, sgt_dir, tasks = setup
    lm = SGTLM(str(model_dir), sgt=str(sgt_dir) if with_sgt else None, batch_size=8)
    assert (lm.cloak is not None) == with_sgt
    results = lm_eval.simple_evaluate(model=lm, tasks=["sgt_tiny_mc"],
                                      task_manager=TaskManager(include_path=str(tasks)))
    acc = results["results"]["sgt_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0


@pytest.mark.slow
def test_scoring_and_generation_requests(setup):
    """The three request types directly: context-only transform leaves the continuation's score finite,
    rolling sums windows, generate_until stops at a stop string."""
    from lm_eval.api.instance import Instance

    from sgt_jax.evaluation.lm_eval_adapter import SGTLM

    model_dir, sgt_dir, _ = setup
    protected = SGTLM(str(model_dir), sgt=str(sgt_dir), batch_size=8)
    req = lambda kind, args: Instance(request_type=kind, doc={}, arguments=args, idx=0)  # noqa: E731
    ll = [req("loglikelihood", ("What is 2 plus 3?", " 5")), req("loglikelihood", ("Which is a color?", " blue"))]
    a, b = protected.loglikelihood(ll), protected.loglikelihood(ll)
    assert all(lp < 0 for lp, _ in a + b) and [x[0] for x in a] != [x[0] for x in b]  # noise advances per batch
    rolling = protected.loglikelihood_rolling([req("loglikelihood_rolling", ("What is 2 plus 3? 5",))])
    assert rolling[0] < 0
    gen = protected.generate_until([req("generate_until", ("What is", {"until": ["\n"], "max_gen_toks": 3}))])
    assert isinstance(gen[0], str) and "\n" not in gen[0]
