"""The server's attack that asks the base model itself to read the protected prompt back.

The server hosts the base model, which by design still understands transformed embeddings. It takes each
protected span of a prompt (a maximal run of transformed positions), wraps it in clean instructions that ask
the model to reproduce it, and decodes greedily. Templates (:data:`TEMPLATES`, per data format):

- ``alpaca`` (the embedded default's format): the tiny model's own copy skills, the list tasks it was
  pretrained on (``Write the items as a bulleted list.`` / ``Write the list items separated by commas.``
  with the span as the input), and ``Repeat the input exactly.``;
- ``chat``, ``openorca``, ``text`` (instruct checkpoints): the span followed by ``Repeat the text above
  exactly, word for word.`` in the format's own template.

With several templates the attacker keeps, per span, the reading the base model is most confident in (the
highest mean log-probability of its own generated tokens), ranking last any reading that runs into the
template's own markup (``###`` in alpaca: the model went on writing the prompt instead of copying): it needs
no ground truth to choose. A reading is
scored on *words* (maximal runs of letters and digits of the decoded text), because a copy may reformat the
text around them (a comma list read back as bullets): a span word is recovered when it is in the longest
common subsequence of the span's words and the reading's. The same score on the clean embeddings of the span
is the model's own reading skill (the ceiling); the most frequent word of the public spans, answered
everywhere, is the no-information baseline.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.data.formats import render_prompt
from sgt_jax.evaluation import metrics as metrics_lib
from sgt_jax.evaluation.inversion import PromptSet, Transform, assert_disjoint
from sgt_jax.inference.generate import generate

__all__ = ["TEMPLATES", "reader_templates", "protected_spans", "words", "lcs_length", "word_majority_baseline",
           "answer", "read_back", "reader_attack"]

_MARK = "\u2063SPAN\u2063"
_REPEAT = "Repeat the text above exactly, word for word."
# Per data format: template name -> the prompt that holds the span (_MARK), rendered by the format's renderer.
TEMPLATES = {
    "alpaca": {
        "bullets": {"instruction": "Write the items as a bulleted list.", "input": _MARK},
        "commas": {"instruction": "Write the list items separated by commas.", "input": _MARK},
        "repeat": {"instruction": "Repeat the input exactly.", "input": _MARK},
    },
    "openorca": {"repeat": {"system_prompt": "", "question": f"{_MARK}\n\n{_REPEAT}"}},
    "chat": {"repeat": [{"role": "user", "content": f"{_MARK}\n\n{_REPEAT}"}]},
    "text": {"repeat": f"{_MARK}\n\n{_REPEAT}\n"},
}


# Text that, in a reading, shows the model continued the template instead of copying the span.
MARKUP = {"alpaca": "###"}


def reader_templates(fmt: str, tokenizer, names: Optional[Sequence[str]] = None) -> list[tuple[str, list, list]]:
    """(name, clean token ids before the span, after it) of the format's templates (``names``: a subset)."""
    table = TEMPLATES[fmt]
    out = []
    for name in names or table:
        rendered = render_prompt(table[name], fmt, tokenizer)
        before, after = rendered.text.split(_MARK)
        pre = tokenizer(before, add_special_tokens=rendered.add_special_tokens)["input_ids"]
        post = tokenizer(after, add_special_tokens=False)["input_ids"]
        out.append((name, list(pre), list(post)))
    return out


def protected_spans(data: PromptSet) -> list[tuple[int, int, int]]:
    """(row, start, end) of every maximal run of transformed positions."""
    spans = []
    for row, target in enumerate(data.targets):
        padded = np.concatenate([[False], target, [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(padded))
        spans.extend((row, int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]))
    return spans


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b``."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _span_words(data: PromptSet, spans, tokenizer) -> list[list[str]]:
    return [words(tokenizer.decode(data.input_ids[r, a:b].tolist())) for r, a, b in spans]


def word_majority_baseline(train: PromptSet, held_out: PromptSet, tokenizer) -> dict:
    """Recovery (%) of answering the public spans' most frequent word everywhere (its share of held-out words)."""
    counts = Counter(w for ws in _span_words(train, protected_spans(train), tokenizer) for w in ws)
    top = counts.most_common(1)[0][0] if counts else ""
    truth = [w for ws in _span_words(held_out, protected_spans(held_out), tokenizer) for w in ws]
    return {"top1": 100.0 * sum(w == top for w in truth) / max(len(truth), 1), "word": top, "unit": "word"}


def _assemble(table, x, spans, pre, post, length):
    """Left-padded (N, length) embeddings [pre | span of x | post], their mask, and ids for the clean parts."""
    rows = []
    for r, a, b in spans:
        n = len(pre) + (b - a) + len(post)
        rows.append((length - n, r, a, b))
    emb = np.zeros((len(spans), length, table.shape[1]), np.float32)
    mask = np.zeros((len(spans), length), np.int32)
    pre_e, post_e = np.asarray(table[np.asarray(pre, np.int32)]), np.asarray(table[np.asarray(post, np.int32)])
    for i, (start, r, a, b) in enumerate(rows):
        emb[i, start:start + len(pre)] = pre_e
        emb[i, start + len(pre):start + len(pre) + b - a] = x[r, a:b]
        emb[i, length - len(post):] = post_e
        mask[i, start:] = 1
    return emb, mask


@functools.partial(jax.jit, static_argnames="graphdef")
def _confidence(graphdef, state, prompt_emb, prompt_mask, generated, lengths, table):
    """Mean log-probability the model gives its own generated tokens (teacher-forced), per row."""
    model = nnx.merge(graphdef, state)
    gen_emb = jnp.take(table, generated, axis=0)
    emb = jnp.concatenate([prompt_emb, gen_emb], axis=1)
    gen_mask = (jnp.arange(generated.shape[1])[None] < lengths[:, None]).astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask, gen_mask], axis=1)
    logits = model(inputs_embeds=emb, attention_mask=mask)
    start = prompt_emb.shape[1] - 1
    logp = jax.nn.log_softmax(logits[:, start:start + generated.shape[1]].astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, generated[..., None], axis=-1)[..., 0]
    return jnp.sum(tok * gen_mask, axis=1) / jnp.maximum(jnp.sum(gen_mask, axis=1), 1)


def read_back(model, tokenizer, table, x, spans, templates, *, batch_size: int = 32, max_new_tokens: int = 96,
              markup: Optional[str] = None):
    """The most confident reading of every span: list of (template name, decoded text), one per span.
    ``x`` (N, S, D) holds the embeddings the spans are cut from (transformed or clean); a reading containing
    ``markup`` ranks below every reading that does not."""
    table, (graphdef, state) = jnp.asarray(table, jnp.float32), nnx.split(model)
    longest = max(b - a for _, a, b in spans)
    best_score = np.full(len(spans), -np.inf)
    best: list = [("", "")] * len(spans)
    eos = tokenizer.eos_token_id
    for name, pre, post in templates:
        length = len(pre) + longest + len(post)
        for start in range(0, len(spans), batch_size):
            chunk = list(spans[start:start + batch_size])
            real = len(chunk)
            chunk += [chunk[-1]] * (batch_size - real)  # one compiled shape per template
            emb, mask = _assemble(table, x, chunk, pre, post, length)
            out = generate(model, inputs_embeds=jnp.asarray(emb), attention_mask=mask, max_new_tokens=max_new_tokens,
                           do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
            conf = np.asarray(_confidence(graphdef, state, jnp.asarray(emb), jnp.asarray(mask), out.sequences,
                                          out.lengths, table))
            seqs, lens = np.asarray(out.sequences), np.asarray(out.lengths)
            for i in range(real):
                text = tokenizer.decode(seqs[i, :lens[i]].tolist(), skip_special_tokens=True)
                score = conf[i] - (1e6 if markup and markup in text else 0.0)
                if score > best_score[start + i]:
                    best_score[start + i] = score
                    best[start + i] = (name, text)
    return best


def answer(reading: str, length: int, fill: str) -> list[str]:
    """The attacker's answer for a span of ``length`` positions: the reading's words, then the most frequent
    public word, cut to ``length`` words (it knows how many positions the span has, not what they hold, and
    guesses the frequent word where it cannot read)."""
    return (words(reading) + [fill] * length)[:length]


def _score(truth: list[list[str]], readings, spans, fill: str) -> dict:
    hits = [lcs_length(t, answer(text, b - a, fill)) for t, (_, text), (_, a, b) in zip(truth, readings, spans)]
    total = sum(len(t) for t in truth)
    per_row: dict[int, list] = {}
    for (row, _, _), t, h in zip(spans, truth, hits):
        per_row.setdefault(row, [0, 0])
        per_row[row][0] += h
        per_row[row][1] += len(t)
    per_seq = [100.0 * h / n for h, n in per_row.values() if n]
    return {"top1": 100.0 * sum(hits) / max(total, 1), "positions": int(total), "unit": "word",
            "per_sequence_top1": metrics_lib.summarize(np.asarray(per_seq)),
            "templates_chosen": dict(Counter(name for name, _ in readings))}


def reader_attack(model, tokenizer, fmt: str, transform: Transform, table, train: PromptSet, held_out: PromptSet,
                  *, key, ceiling: bool = True, templates: Optional[Sequence[str]] = None,
                  max_new_tokens: int = 96, batch_size: int = 32, examples: int = 4) -> dict:
    """The base model asked to read back every protected span of ``held_out`` under ``transform``: word
    recovery (%) with per-prompt quantiles, the majority-word baseline, the clean-embedding ceiling and a few
    (span, reading) examples. ``train`` holds the public prompts the baseline's word frequencies come from."""
    assert_disjoint(train, held_out)
    spans = protected_spans(held_out)
    truth = _span_words(held_out, spans, tokenizer)
    chosen = reader_templates(fmt, tokenizer, templates)
    x_t, _ = transform(jnp.asarray(held_out.input_ids), jnp.asarray(held_out.attention_mask),
                       jnp.asarray(held_out.noise_mask), key)
    read = functools.partial(read_back, model, tokenizer, table, spans=spans, templates=chosen,
                             batch_size=batch_size, max_new_tokens=max_new_tokens, markup=MARKUP.get(fmt))
    readings = read(x=np.asarray(x_t))
    baseline = word_majority_baseline(train, held_out, tokenizer)
    out = _score(truth, readings, spans, baseline["word"])
    out["majority_baseline"] = baseline
    out["examples"] = [{"span": " ".join(t), "reading": text, "template": name}
                       for t, (name, text) in list(zip(truth, readings))[:examples]]
    if ceiling:
        clean = np.asarray(jnp.asarray(table, jnp.float32)[jnp.asarray(held_out.input_ids)])
        out["clean"] = {"top1": _score(truth, read(x=clean), spans, baseline["word"])["top1"]}
    return out
