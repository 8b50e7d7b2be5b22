"""Formats (alpaca, openorca, chat, text) → token ids with noise and loss masks.

Each example is rendered to one string plus character spans: the prompt's *content* spans (what the
user wrote: instruction, input, question, system prompt, message contents) and the response span.
The whole string is tokenized once with offsets, so `input_ids` are exactly the tokenizer's own output
for that string; a token is in `noise_mask` when its characters overlap a content span (special tokens
and template scaffold such as "### Instruction:" or chat markup are not), and in `loss_mask` when they
overlap the response span. An eos is appended after the response (alpaca/openorca/text) and carries
loss, so the model learns to stop. `loss_mask[t] = 1` marks token t as a prediction target: the
objective shifts (predicts t from < t).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from sgt_jax.data.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("alpaca", "openorca", "chat", "text")
# Bump when a template or masking rule changes: it is part of the tokenized-data cache key.
TEMPLATE_VERSION = 1

ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)


@dataclass
class Rendered:
    text: str
    content_spans: List[Tuple[int, int]]
    response_span: Tuple[int, int]
    add_special_tokens: bool  # False where the chat template already writes bos
    append_eos: bool


def required_columns(fmt: str, text_column: str = "text", messages_column: str = "messages",
                     present: Sequence[str] = ()) -> List[str]:
    """Columns ``fmt`` needs. Chat data without a messages column may be OpenOrca or Alpaca columns instead
    (``present``): they are turned into a conversation and rendered with the tokenizer's chat template."""
    if fmt == "chat" and messages_column not in present:
        for layout in ("openorca", "alpaca"):
            if set(required_columns(layout)) <= set(present):
                return required_columns(layout)
    return {
        "alpaca": ["instruction", "output"],
        "openorca": ["question", "response"],
        "chat": [messages_column],
        "text": [text_column],
    }[fmt]


class _Builder:
    """Concatenates scaffold and content pieces while recording the content spans."""

    def __init__(self):
        self.parts: List[str] = []
        self.length = 0
        self.spans: List[Tuple[int, int]] = []

    def scaffold(self, s: str):
        self.parts.append(s)
        self.length += len(s)

    def content(self, s: str):
        if s:
            self.spans.append((self.length, self.length + len(s)))
        self.scaffold(s)

    def text(self) -> str:
        return "".join(self.parts)


def _str(value) -> str:
    return "" if value is None else str(value)


def render_alpaca(example: Dict) -> Rendered:
    b = _Builder()
    given = _str(example.get("input")).strip()
    b.scaffold((ALPACA_PREAMBLE_INPUT if given else ALPACA_PREAMBLE) + "### Instruction:\n")
    b.content(_str(example["instruction"]).strip())
    if given:
        b.scaffold("\n\n### Input:\n")
        b.content(given)
    b.scaffold("\n\n### Response:\n")
    start = b.length
    b.scaffold(_str(example["output"]).strip())
    return Rendered(b.text(), b.spans, (start, b.length), True, True)


def render_openorca(example: Dict) -> Rendered:
    b = _Builder()
    system = _str(example.get("system_prompt")).strip()
    if system:
        b.scaffold("### System:\n")
        b.content(system)
        b.scaffold("\n\n")
    b.scaffold("### Instruction:\n")
    b.content(_str(example["question"]).strip())
    b.scaffold("\n\n### Response:\n")
    start = b.length
    b.scaffold(_str(example["response"]).strip())
    return Rendered(b.text(), b.spans, (start, b.length), True, True)


def render_text(example: Dict, column: str) -> Rendered:
    text = _str(example[column])
    return Rendered(text, [(0, len(text))] if text else [], (0, len(text)), True, True)


def as_messages(example: Dict, column: str) -> List[Dict]:
    """The conversation of a chat example: its messages column, or one built from OpenOrca
    (system_prompt/question/response) or Alpaca (instruction/input/output) columns. A system prompt is put
    at the head of the user turn: some chat templates (Mistral's) accept only user and assistant roles."""
    if column in example or not ({"question", "instruction"} & set(example)):
        return list(example.get(column) or [])
    openorca = "question" in example
    parts = [_str(example.get(k)).strip() for k in (("system_prompt", "question") if openorca else ("instruction", "input"))]
    reply = _str(example.get("response" if openorca else "output")).strip()
    return [{"role": "user", "content": "\n\n".join(p for p in parts if p)}, {"role": "assistant", "content": reply}]


def render_chat(example: Dict, column: str, tokenizer) -> Rendered:
    messages = as_messages(example, column)
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError(
            f"a chat example in column {column!r} does not end with an assistant message; "
            "each conversation must end with the assistant reply to train on"
        )
    messages = [{"role": m["role"], "content": _str(m.get("content"))} for m in messages]
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(
            "the tokenizer's chat template does not render the conversation as prompt + reply; "
            "use a template whose add_generation_prompt output is a prefix of the full conversation"
        )
    spans, cursor = [], 0
    for m in messages[:-1]:
        at = prompt.find(m["content"], cursor) if m["content"] else -1
        if at >= 0:
            spans.append((at, at + len(m["content"])))
            cursor = at + len(m["content"])
    # The response is everything after the generation prompt: the reply and the template's end-of-turn.
    return Rendered(full, spans, (len(prompt), len(full)), False, False)


def render(example: Dict, fmt: str, tokenizer, text_column: str, messages_column: str) -> Rendered:
    if fmt == "alpaca":
        return render_alpaca(example)
    if fmt == "openorca":
        return render_openorca(example)
    if fmt == "text":
        return render_text(example, text_column)
    if fmt == "chat":
        return render_chat(example, messages_column, tokenizer)
    raise DataError(f"data.format={fmt!r} is not known; choose one of {', '.join(FORMATS)}")


def _overlaps(offsets: np.ndarray, spans: Sequence[Tuple[int, int]]) -> np.ndarray:
    start, end = offsets[:, 0], offsets[:, 1]
    out = np.zeros(len(offsets), dtype=bool)
    nonempty = end > start
    for s, e in spans:
        if e > s:
            out |= nonempty & (start < e) & (end > s)
    return out


def token_masks(r: Rendered, ids, offsets, special: np.ndarray, eos, transform_all_tokens: bool):
    """(ids, noise, loss) of one rendered example from its tokens and their character offsets: THE rule for
    which tokens are noised, shared by training data and inference prompts (:func:`encode_prompts`)."""
    ids = np.asarray(ids, dtype=np.int64)
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    is_special = np.isin(ids, special)
    noise = _overlaps(offs, r.content_spans) & ~is_special
    loss = _overlaps(offs, [r.response_span])
    if r.append_eos and eos is not None and (len(ids) == 0 or ids[-1] != eos):
        ids = np.append(ids, eos)
        noise = np.append(noise, False)
        loss = np.append(loss, True)
    if transform_all_tokens:
        noise = np.ones(len(ids), dtype=bool)
    return ids, noise, loss


# The field a plain-text prompt fills in each format (the rest of the example stays empty).
_PROMPT_FIELD = {"alpaca": "instruction", "openorca": "question"}
_RESPONSE_FIELD = {"alpaca": "output", "openorca": "response"}


def render_prompt(prompt, fmt: str, tokenizer, text_column: str = "text", messages_column: str = "messages") -> Rendered:
    """A prompt (what a client sends at inference) rendered as training renders an example up to its response:
    the same template and content spans, no response, no eos. ``prompt``: a str (the format's instruction /
    question / user message / text), an example dict (its response, if any, is dropped) or, for chat, a list of
    messages not ending with the assistant's reply."""
    if fmt == "chat":
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, dict):
            messages = [prompt] if "role" in prompt else as_messages(prompt, messages_column)
        else:
            messages = list(prompt)
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        # Render through render_chat with a placeholder reply, then cut at the generation prompt: the spans
        # and the template come from the one code path training uses.
        r = render_chat({messages_column: messages + [{"role": "assistant", "content": "x"}]}, messages_column,
                        tokenizer)
        end = r.response_span[0]
        return Rendered(r.text[:end], r.content_spans, (end, end), r.add_special_tokens, False)
    if fmt == "text":
        text = prompt if isinstance(prompt, str) else _str(prompt.get(text_column))
        return Rendered(text, [(0, len(text))] if text else [], (len(text), len(text)), True, False)
    example = {_PROMPT_FIELD[fmt]: prompt} if isinstance(prompt, str) else dict(prompt)
    example[_RESPONSE_FIELD[fmt]] = ""
    r = render(example, fmt, tokenizer, text_column, messages_column)
    return Rendered(r.text, r.content_spans, (len(r.text), len(r.text)), r.add_special_tokens, False)


def encode_prompts(prompts: Sequence, tokenizer, fmt: str, *, transform_all_tokens: bool = False,
                   text_column: str = "text", messages_column: str = "messages") -> List[Dict[str, List[int]]]:
    """``[{"input_ids", "noise_mask"}]`` of inference prompts, with the noise mask training would give them
    (:func:`render_prompt` + :func:`token_masks`); left-pad with :func:`sgt_jax.inference.generate.left_pad`."""
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not known; choose one of {', '.join(FORMATS)}")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.format='chat' needs a tokenizer with a chat template, and {tokenizer.name_or_path!r} "
                        "has none; add chat_template to its tokenizer_config.json")
    special = np.asarray(sorted(int(i) for i in tokenizer.all_special_ids), dtype=np.int64)
    out = []
    for prompt in prompts:
        r = render_prompt(prompt, fmt, tokenizer, text_column, messages_column)
        enc = tokenizer(r.text, add_special_tokens=r.add_special_tokens, return_offsets_mapping=True,
                        return_attention_mask=False)
        ids, noise, _ = token_masks(r, enc["input_ids"], enc["offset_mapping"], special, None, transform_all_tokens)
        out.append({"input_ids": [int(t) for t in ids], "noise_mask": [int(t) for t in noise]})
    return out


@dataclass
class TokenizedExamples:
    """Ragged token data in flat arrays: example i is [offsets[i], offsets[i+1])."""

    input_ids: np.ndarray  # int32
    noise_mask: np.ndarray  # uint8
    loss_mask: np.ndarray  # uint8
    offsets: np.ndarray  # int64, len = num_examples + 1
    num_truncated: int = 0

    def __len__(self):
        return len(self.offsets) - 1


def tokenize_examples(
    examples,
    tokenizer,
    fmt: str,
    *,
    max_length: int | None,
    transform_all_tokens: bool = False,
    text_column: str = "text",
    messages_column: str = "messages",
    chunk_size: int = 1000,
) -> TokenizedExamples:
    """Render and tokenize an iterable of example dicts; truncate (right) to max_length when given."""
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"data.format='chat' needs a tokenizer with a chat template, and {tokenizer.name_or_path!r} has none; "
            "add chat_template to its tokenizer_config.json or use data.format=alpaca/openorca/text"
        )
    special = np.asarray(sorted(int(i) for i in tokenizer.all_special_ids), dtype=np.int64)
    eos = tokenizer.eos_token_id
    ids_parts, noise_parts, loss_parts, lengths = [], [], [], []
    num_truncated = 0

    def flush(batch: List[Rendered]):
        nonlocal num_truncated
        for add_special in (True, False):
            group = [r for r in batch if r.add_special_tokens == add_special]
            if not group:
                continue
            enc = tokenizer(
                [r.text for r in group], add_special_tokens=add_special, return_offsets_mapping=True,
                return_attention_mask=False,
            )
            for r, ids, offs in zip(group, enc["input_ids"], enc["offset_mapping"]):
                ids, noise, loss = token_masks(r, ids, offs, special, eos, transform_all_tokens)
                if max_length is not None and len(ids) > max_length:
                    num_truncated += 1
                    ids, noise, loss = ids[:max_length], noise[:max_length], loss[:max_length]
                ids_parts.append(ids.astype(np.int32))
                noise_parts.append(noise.astype(np.uint8))
                loss_parts.append(loss.astype(np.uint8))
                lengths.append(len(ids))

    batch: List[Rendered] = []
    for example in examples:
        batch.append(render(example, fmt, tokenizer, text_column, messages_column))
        if len(batch) >= chunk_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    # Rendering groups by add_special_tokens within a chunk; only chat sets it False and chat sets it
    # for every example, so the order of examples is preserved.
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    return TokenizedExamples(
        cat(ids_parts, np.int32), cat(noise_parts, np.uint8), cat(loss_parts, np.uint8), offsets, num_truncated
    )
