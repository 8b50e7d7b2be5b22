"""Data pipeline: restorable state, sharding, padding/masks vs the tokenizer, buckets, packing, cache, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sgt_jax.config import DataConfig
from sgt_jax.data import DataError, build_datasets, build_tokenizer, generate_corpus, load_tokenizer
from sgt_jax.data.formats import render_alpaca, tokenize_examples

KEYS = ("input_ids", "attention_mask", "noise_mask", "loss_mask")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = [render_alpaca(e).text for e in generate_corpus(400, 7)] + ["The quick brown fox jumps."] * 5
    build_tokenizer(texts, str(d), vocab_size=400, chat_template=True)
    return str(d)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture
def cfg(tmp_path):
    return DataConfig(source="synthetic", synthetic_num_examples=200, cache_dir=str(tmp_path / "cache"),
                      max_length=128, buckets=[32, 64, 96, 128], batch_size=8, num_workers=0,
                      validation_fraction=0.0)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def rows_of(batch):
    """Each row's real tokens as a tuple (padding stripped)."""
    return [tuple(ids[m == 1].tolist()) for ids, m in zip(batch["input_ids"], batch["attention_mask"])]


def all_example_rows(cfg, tok):
    data = tokenize_examples(generate_corpus(cfg.synthetic_num_examples, cfg.synthetic_seed), tok, "alpaca",
                             max_length=cfg.max_length)
    return [tuple(data.input_ids[data.offsets[i]:data.offsets[i + 1]].tolist()) for i in range(len(data))]


def test_tokenizer_conventions_and_determinism(tok, tok_dir, tmp_path):
    assert tok.pad_token == tok.eos_token == "</s>" and tok.padding_side == "left"
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    texts = [render_alpaca(e).text for e in generate_corpus(400, 7)] + ["The quick brown fox jumps."] * 5
    build_tokenizer(texts, str(tmp_path), vocab_size=400)
    assert open(os.path.join(tok_dir, "tokenizer.json")).read() == open(tmp_path / "tokenizer.json").read()


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2 workers: slow
def test_state_restore_is_exact(cfg, tok, workers):
    cfg.num_epochs = 2
    train, _ = build_datasets(cfg, tok, process_index=0, process_count=1, num_workers=workers)
    it = iter(train)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip
    expected = [next(it) for _ in range(4)]
    it.close()
    resumed = iter(train)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(4)]
    resumed.close()
    for a, b in zip(expected, got):
        for k in KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    assert len(train) == 2 * (200 // 8)


def test_state_of_other_pipeline_is_refused(cfg, tok):
    train, _ = build_datasets(cfg, tok, process_index=0, process_count=1)
    state = iter(train).get_state()
    cfg.shuffle_seed = 99
    other, _ = build_datasets(cfg, tok, process_index=0, process_count=1)
    with pytest.raises(DataError):
        iter(other).set_state(state)


def test_epochs_are_reshuffled_permutations(cfg, tok):
    cfg.num_epochs, cfg.batch_size = 2, 10
    train, _ = build_datasets(cfg, tok, process_index=0, process_count=1)
    rows = [r for b in train for r in rows_of(b)]
    first, second = rows[:200], rows[200:]
    assert sorted(first) == sorted(second) == sorted(all_example_rows(cfg, tok))
    assert first != second


def test_two_process_shards_are_disjoint_and_cover_the_data(cfg, tok):
    shards = []
    for p in (0, 1):
        train, _ = build_datasets(cfg, tok, process_index=p, process_count=2)
        assert train.batch_size == 4
        shards.append([r for b in train for r in rows_of(b)])
    assert len(shards[0]) == len(shards[1]) == 100
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(all_example_rows(cfg, tok))


def test_left_padding_and_eos_match_the_tokenizer(tmp_path, tok, cfg):
    texts = ["The quick brown fox jumps.", "Hi", "Reverse the word: apple and then some more words here"]
    cfg.source = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    cfg.format, cfg.batch_size, cfg.buckets = "text", 3, [64, 128]
    train, _ = build_datasets(cfg, tok, process_index=0, process_count=1, seed=0)
    (batch,) = list(train)
    ref = tok([t + tok.eos_token for t in texts], padding=True, return_tensors="np")
    assert batch["input_ids"].shape[1] == 64 and all(batch[k].dtype == np.int32 for k in KEYS)
    # The batch holds the examples in shuffled order: match rows by content.
    L = ref["input_ids"].shape[1]
    ref_rows = [tuple(r) for r in ref["input_ids"].tolist()]
    ours = [tuple(r) for r in batch["input_ids"][:, -L:].tolist()]
    assert sorted(ours) == sorted(ref_rows)
    order = [ref_rows.index(r) for r in ours]
    np.testing.assert_array_equal(batch["attention_mask"][:, -L:], ref["attention_mask"][order])
    assert (batch["attention_mask"][:, :-L] == 0).all() and (batch["input_ids"][:, :-L] == tok.pad_token_id).all()
    assert (batch["input_ids"][:, -1] == tok.eos_token_id).all()
    # text: noise on content tokens only (not bos/eos/pad), loss on content + eos.
    real = batch["attention_mask"] == 1
    special = np.isin(batch["input_ids"], [tok.bos_token_id, tok.eos_token_id])
    np.testing.assert_array_equal(batch["noise_mask"] == 1, real & ~special)
    assert (batch["loss_mask"][:, -1] == 1).all() and (batch["loss_mask"][~real] == 0).all()


def test_alpaca_masks_cover_content_not_scaffold(tok):
    ex = {"instruction": "Reverse the word.", "input": "apple", "output": "elppa"}
    data = tokenize_examples([ex], tok, "alpaca", max_length=None)
    ids, noise, loss = data.input_ids, data.noise_mask == 1, data.loss_mask == 1
    assert ids.tolist() == tok(render_alpaca(ex).text)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids[noise]) == "Reverse the word.apple"
    assert tok.decode(ids[loss]) == "elppa</s>"
    assert "###" not in tok.decode(ids[noise]) and not noise[0] and not noise[-1]
    all_tokens = tokenize_examples([ex], tok, "alpaca", max_length=None, transform_all_tokens=True)
    assert all_tokens.noise_mask.all()


def test_openorca_and_chat_masks(tok):
    ex = {"system_prompt": "Be brief.", "question": "What is 2 + 3?", "response": "5"}
    data = tokenize_examples([ex], tok, "openorca", max_length=None)
    assert tok.decode(data.input_ids[data.noise_mask == 1]) == "Be brief.What is 2 + 3?"
    assert tok.decode(data.input_ids[data.loss_mask == 1]) == "5</s>"
    conv = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}
    data = tokenize_examples([conv], tok, "chat", max_length=None)
    assert data.input_ids.tolist() == tok.apply_chat_template(conv["messages"], tokenize=True,
                                                              return_dict=True)["input_ids"]
    assert tok.decode(data.input_ids[data.noise_mask == 1]) == "hi therehellobye"
    assert tok.decode(data.input_ids[data.loss_mask == 1]) == "ciao</s>"


def test_chat_format_renders_openorca_and_alpaca_columns_with_the_chat_template(tok):
    """The chat recipes (Mistral Instruct) train on OpenOrca/Alpaca files through the model's own template: the
    columns become a user turn (system prompt first: some templates accept only user/assistant) + the reply."""
    from sgt_jax.data.formats import encode_prompts, required_columns

    assert required_columns("chat", present=["system_prompt", "question", "response"]) == ["question", "response"]
    assert required_columns("chat", present=["instruction", "input", "output"]) == ["instruction", "output"]
    assert required_columns("chat", present=["messages", "question", "response"]) == ["messages"]
    ex = {"system_prompt": "Be brief.", "question": "What is 2 + 3?", "response": "5"}
    data = tokenize_examples([ex], tok, "chat", max_length=None)
    messages = [{"role": "user", "content": "Be brief.\n\nWhat is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    assert data.input_ids.tolist() == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(data.input_ids[data.noise_mask == 1]) == "Be brief.\n\nWhat is 2 + 3?"
    # The inference prompt of the same question: the same tokens and mask up to the reply.
    prompt = encode_prompts([{k: v for k, v in ex.items() if k != "response"}], tok, "chat")[0]
    end = int(np.argmax(data.loss_mask))
    assert prompt["input_ids"] == data.input_ids[:end].tolist()
    assert prompt["noise_mask"] == data.noise_mask[:end].tolist()
    alpaca = tokenize_examples([{"instruction": "Reverse it.", "input": "apple", "output": "elppa"}], tok, "chat",
                               max_length=None)
    assert tok.decode(alpaca.input_ids[alpaca.noise_mask == 1]) == "Reverse it.\n\napple"


def test_mistral_instruct_recipe_uses_the_chat_template():
    from pathlib import Path

    from sgt_jax.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "mistral_7b_instruct.yaml")
    assert cfg.data.format == "chat"


def test_batch_shapes_bounded_by_buckets(cfg, tok):
    cfg.buckets, cfg.batch_size = [48, 80, 128], 4
    train, _ = build_datasets(cfg, tok, process_index=0, process_count=1)
    shapes = {b["input_ids"].shape for b in train}
    assert len(shapes) <= len(cfg.buckets) and {s[1] for s in shapes} <= {48, 80, 128}


def test_truncation_is_counted_and_warned(cfg, tok, caplog):
    cfg.max_length, cfg.buckets = 40, [40]
    with caplog.at_level("WARNING", logger="sgt_jax.data"):
        train, _ = build_datasets(cfg, tok, process_index=0, process_count=1)
    msgs = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(msgs) == 1 and "max_length=40" in msgs[0] and "\n" not in msgs[0]
    assert {b["input_ids"].shape[1] for b in train} == {40}


def test_packing(cfg, tok):
    cfg.packing, cfg.max_length, cfg.buckets, cfg.num_workers = True, 64, [64], 0
    train, _ = build_datasets(cfg, tok, process_index=0, process_count=1)
    data = tokenize_examples(generate_corpus(200, cfg.synthetic_seed), tok, "alpaca", max_length=None)
    total = int(data.offsets[-1])  # every example already ends with eos
    assert len(train.source) == total // 64  # the last partial row is dropped
    batches = list(train)
    assert {b["input_ids"].shape for b in batches} == {(8, 64)}
    rows = np.concatenate([b["input_ids"] for b in batches])
    assert (np.concatenate([b["attention_mask"] for b in batches]) == 1).all()
    # Reassembling the rows in source order gives the examples joined by eos.
    flat = np.concatenate([train.source[i]["input_ids"] for i in range(len(train.source))])
    np.testing.assert_array_equal(flat, data.input_ids[: len(flat)])
    assert len(rows) == len(train) * 8
    ends = data.offsets[1:] - 1
    ends = ends[ends < len(flat)]
    assert (flat[ends] == tok.eos_token_id).all() and (flat == tok.eos_token_id).sum() == len(ends)
    assert len(flat) > total - 64  # only the partial tail is dropped
    loss = np.concatenate([train.source[i]["loss_mask"] for i in range(len(train.source))])
    assert loss[flat == tok.eos_token_id].all() and not np.concatenate(
        [train.source[i]["noise_mask"] for i in range(len(train.source))])[flat == tok.eos_token_id].any()


def test_cache_key_changes_with_format_and_tokenizer(tmp_path, cfg, tok, tok_dir):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i), "text": f"number {i}",
             "question": f"Say {i}?", "response": str(i)} for i in range(16)]
    cfg.source = write_jsonl(tmp_path / "d.jsonl", rows)
    cache = tmp_path / "cache" / "tokenized"

    def entries():
        return set(os.listdir(cache))

    build_datasets(cfg, tok, process_index=0, process_count=1)
    first = entries()
    build_datasets(cfg, tok, process_index=0, process_count=1)
    assert entries() == first  # reused
    cfg.format = "openorca"
    build_datasets(cfg, tok, process_index=0, process_count=1)
    second = entries()
    assert len(second) == 2
    texts = [render_alpaca(e).text for e in generate_corpus(300, 3)]
    other_tok = build_tokenizer(texts, str(tmp_path / "tok2"), vocab_size=300)
    build_datasets(cfg, other_tok, process_index=0, process_count=1)
    assert len(entries()) == 3
    cfg.transform_all_tokens = True
    build_datasets(cfg, other_tok, process_index=0, process_count=1)
    assert len(entries()) == 4
    # A modified file is a different source.
    write_jsonl(tmp_path / "d.jsonl", rows[:8])
    os.utime(tmp_path / "d.jsonl", ns=(1, 1))
    train, _ = build_datasets(cfg, other_tok, process_index=0, process_count=1)
    assert len(entries()) == 5 and train.num_examples == 8


def test_validation_sources(tmp_path, cfg, tok):
    import datasets

    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(24)]
    # explicit validation file
    cfg.source = write_jsonl(tmp_path / "train.jsonl", rows[:16])
    cfg.validation_source = write_jsonl(tmp_path / "val.jsonl", rows[16:21])
    train, val = build_datasets(cfg, tok, process_index=0, process_count=1)
    assert train.num_examples == 16 and val.num_examples == 5 and len(val) == 1
    (vb,) = list(val)
    assert vb["input_ids"].shape[0] == 8 and vb["attention_mask"].sum(1).tolist().count(0) == 3
    # validation split of a save_to_disk DatasetDict
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:16]),
                               "test": datasets.Dataset.from_list(rows[16:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg.source, cfg.validation_source, cfg.validation_split = str(tmp_path / "dd"), None, "test"
    train, val = build_datasets(cfg, tok, process_index=0, process_count=1)
    assert train.num_examples == 16 and val.num_examples == 8
    # seeded hold-out, disjoint from train
    cfg.source, cfg.validation_split, cfg.validation_fraction = "synthetic", None, 0.1
    train, val = build_datasets(cfg, tok, process_index=0, process_count=1)
    assert val.num_examples == 20 and train.num_examples == 180
    t_rows = {r for b in train for r in rows_of(b)}
    v_rows = {r for b in val for r in rows_of(b) if r}
    assert len(v_rows) == 20 and not t_rows & v_rows


def test_csv_and_parquet_sources(tmp_path, cfg, tok):
    import pandas as pd

    df = pd.DataFrame({"text": [f"line number {i}" for i in range(8)]})
    cfg.format = "text"
    for name, write in (("d.csv", df.to_csv), ("d.parquet", df.to_parquet)):
        write(str(tmp_path / name), index=False)
        cfg.source = str(tmp_path / name)
        train, _ = build_datasets(cfg, tok, process_index=0, process_count=1)
        assert train.num_examples == 8


def _one_line_error(cfg, tok, *needles):
    with pytest.raises(DataError) as info:
        build_datasets(cfg, tok, process_index=0, process_count=1)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_errors_are_one_line(tmp_path, cfg, tok):
    cfg.source = str(tmp_path / "nope.jsonl")
    _one_line_error(cfg, tok, "nope.jsonl", "does not exist")

    cfg.source = write_jsonl(tmp_path / "cols.jsonl", [{"prompt": "a", "answer": "b"}])
    _one_line_error(cfg, tok, "'instruction'", "prompt", "answer")
    cfg.format, cfg.text_column = "text", "body"
    _one_line_error(cfg, tok, "'body'", "data.text_column", "prompt")
    cfg.format = "alpaca"

    (tmp_path / "empty.jsonl").write_bytes(b"")
    cfg.source = str(tmp_path / "empty.jsonl")
    _one_line_error(cfg, tok, "empty.jsonl", "empty")

    (tmp_path / "bad.jsonl").write_bytes(
        b'{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "caf\xe9", "input": "", "output": "x"}\n')
    cfg.source = str(tmp_path / "bad.jsonl")
    _one_line_error(cfg, tok, "bad.jsonl", "line 2", "UTF-8")

    no_template = build_tokenizer(["some text here"] * 5, str(tmp_path / "notpl"), vocab_size=300,
                                  chat_template=False)
    cfg.source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                                     {"role": "assistant", "content": "b"}]}])
    cfg.format = "chat"
    _one_line_error(cfg, no_template, "chat template", "data.format")

    cfg.format, cfg.source = "alpaca", "some-org/some-dataset"
    _one_line_error(cfg, tok, "some-org/some-dataset", "local path")

    cfg.source, cfg.batch_size, cfg.synthetic_num_examples = "synthetic", 64, 10
    _one_line_error(cfg, tok, "data.batch_size=64")


def test_host_shares_in_different_buckets_get_the_global_batch_shape():
    """A global batch whose host-0 share is short (bucket 32 on its own) and whose host-1 share holds a
    100-token example: both hosts collate (2, 128), the bucket of the global batch's longest example, each
    with its own examples left-padded. Fails if a host picks the bucket of its own share (the global array
    of the hosts' batches would then have no single shape)."""
    from sgt_jax.data.batching import GlobalBatchCollator, TokenizedSource, bucket_length
    from sgt_jax.data.formats import TokenizedExamples

    lengths = [5, 7, 3, 100]
    ids = np.concatenate([np.full(n, 10 + i, np.int32) for i, n in enumerate(lengths)])
    ones = np.ones(len(ids), np.uint8)
    source = TokenizedSource(TokenizedExamples(input_ids=ids, noise_mask=ones, loss_mask=ones,
                                               offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)))
    global_batch = [2, 3, 0, 1]  # host p gets positions p, p + 2: host 0 -> examples 2, 0; host 1 -> 3, 1
    shares = [GlobalBatchCollator(source, 0, [32, 64, 128], p, 2)(global_batch) for p in (0, 1)]
    assert [s["input_ids"].shape for s in shares] == [(2, 128), (2, 128)]
    assert bucket_length(max(source.length(2), source.length(0)), [32, 64, 128]) == 32  # host 0's share alone
    for share, examples in zip(shares, ([2, 0], [3, 1])):
        assert rows_of(share) == [tuple([10 + e] * lengths[e]) for e in examples]
        assert (share["attention_mask"].sum(axis=1) == [lengths[e] for e in examples]).all()
        assert (share["attention_mask"][:, -1] == 1).all()  # padding on the left


def test_collate_left_padded_rows_fields_and_empty_examples():
    """The one left-padding rule, written out by hand: pad ids and zero masks on the left, the named fields
    copied to the right end, empty examples and the extra ``rows`` all padding."""
    from sgt_jax.data.batching import collate_left_padded

    examples = [{"input_ids": [5, 6, 7], "context_mask": [1, 1, 0]}, {"input_ids": [], "context_mask": []},
                {"input_ids": [9], "context_mask": [1]}]
    got = collate_left_padded(examples, 4, 2, rows=4, fields=("context_mask",))
    assert sorted(got) == ["attention_mask", "context_mask", "input_ids"]
    assert got["input_ids"].tolist() == [[2, 5, 6, 7], [2, 2, 2, 2], [2, 2, 2, 9], [2, 2, 2, 2]]
    assert got["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert got["context_mask"].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert all(a.dtype == np.int32 for a in got.values())


def test_two_process_batches_have_the_same_shapes(tmp_path, cfg, tok):
    """Through the pipeline, on a corpus whose lengths spread over the buckets: at every batch index the two
    processes' batches have the same shape, that of the longest example of their union rounded up to a
    bucket. Fails if the bucket is chosen from one host's share."""
    texts = [" ".join(["word"] * n) for n in (2, 3, 40, 2, 5, 90, 3, 4, 20, 2, 3, 2, 60, 4, 3, 2)]
    cfg.source = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    cfg.format, cfg.batch_size, cfg.buckets = "text", 4, [16, 32, 64, 128]
    batches = [list(build_datasets(cfg, tok, process_index=p, process_count=2)[0]) for p in (0, 1)]
    shapes = [[b["input_ids"].shape for b in bs] for bs in batches]
    assert shapes[0] == shapes[1] and len(shapes[0]) == 4
    bucket = lambda n: min(b for b in (16, 32, 64, 128) if b >= n)  # noqa: E731
    own_buckets_differ = 0
    for b0, b1 in zip(*batches):
        assert b0["input_ids"].shape[1] == bucket(max(len(r) for r in rows_of(b0) + rows_of(b1)))
        own_buckets_differ += bucket(max(map(len, rows_of(b0)))) != bucket(max(map(len, rows_of(b1))))
    assert own_buckets_differ, "the corpus should put the hosts' shares in different buckets"
