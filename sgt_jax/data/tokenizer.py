"""Tokenizer loading (pad = eos, left padding), a deterministic tiny BPE builder, and tokenizer identity."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

from sgt_jax.data.errors import DataError

BOS, EOS, UNK = "<s>", "</s>", "<unk>"

# A small Llama-2/ChatML-like template over our own special tokens: every turn is
# "<s>{role}\n{content}</s>"; the generation prompt is "<s>assistant\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)


def configure_tokenizer(tokenizer):
    """Apply the project's tokenizer conventions in place: pad = eos when absent, padding on the left."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos token; "
                "add an eos_token to its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(model_dir: str):
    """Load the tokenizer of a model directory with `AutoTokenizer`, pad = eos when absent, left padding."""
    from transformers import AutoTokenizer

    path = os.path.expanduser(str(model_dir))
    if not os.path.isdir(path):
        raise DataError(
            f"tokenizer directory {model_dir!r} does not exist; point model.path at a local model "
            "directory holding tokenizer.json / tokenizer_config.json"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types here; the user fix is the same
        raise DataError(
            f"could not load a tokenizer from {path!r} ({type(exc).__name__}: {exc}); "
            "the directory needs tokenizer.json or the tokenizer files of its model family"
        ) from exc
    return configure_tokenizer(tokenizer)


def build_tokenizer(
    texts: Iterable[str],
    out_dir: str,
    vocab_size: int = 512,
    chat_template: bool = True,
):
    """Train a small deterministic byte-level BPE on `texts` and save it as a HF tokenizer in `out_dir`.

    Special tokens: `<unk>` (0), bos `<s>` (1), eos `</s>` (2); deliberately no pad token so the
    pad = eos rule of `load_tokenizer` is exercised. A bos is prepended to every encoded text, like Llama.
    Returns the (configured) `PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    kwargs = dict(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="left")
    if chat_template:
        kwargs["chat_template"] = CHAT_TEMPLATE
    hf_tokenizer = PreTrainedTokenizerFast(**kwargs)
    os.makedirs(out_dir, exist_ok=True)
    hf_tokenizer.save_pretrained(out_dir)
    # transformers 5 no longer writes special_tokens_map.json; older loaders (and people) look for it.
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}, f, indent=2, sort_keys=True)
    return configure_tokenizer(hf_tokenizer)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that changes token ids: vocab/merges/normalisers, special tokens, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "all_special_ids": sorted(int(i) for i in tokenizer.all_special_ids),
        "class": type(tokenizer).__name__,
    }
    h.update(json.dumps(specials, sort_keys=True).encode())
    template: Optional[str] = getattr(tokenizer, "chat_template", None)
    h.update(json.dumps(template).encode())
    return h.hexdigest()[:16]
