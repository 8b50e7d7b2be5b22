"""On-disk cache of tokenized data, keyed by everything that changes the token ids or masks.

Key = hash(source fingerprint (path+mtime+size / hub name+split / synthetic settings), tokenizer
identity (vocab, merges, special tokens, chat template), format, columns, max_length, packing,
transform_all_tokens, template version). A changed format, tokenizer or file never reuses a stale
cache. Entries are flat .npy arrays (memory-mapped on load) plus meta.json, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Optional, Tuple

import numpy as np

from sgt_jax.data.formats import TEMPLATE_VERSION, TokenizedExamples

_ARRAYS = ("input_ids", "noise_mask", "loss_mask", "offsets")


def default_cache_dir(cache_dir: Optional[str] = None) -> str:
    return os.path.expanduser(cache_dir or os.path.join("~", ".cache", "sgt_jax"))


def cache_key(**parts) -> str:
    parts = dict(parts, template_version=TEMPLATE_VERSION)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_tokenized(directory: str) -> TokenizedExamples:
    arrays = {name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r") for name in _ARRAYS}
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    return TokenizedExamples(num_truncated=int(meta["num_truncated"]), **arrays)


def write_tokenized(directory: str, data: TokenizedExamples, meta: dict) -> None:
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        for name in _ARRAYS:
            np.save(os.path.join(tmp, f"{name}.npy"), np.asarray(getattr(data, name)))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(meta, num_truncated=data.num_truncated, num_examples=len(data)), f, indent=1)
        try:
            os.replace(tmp, directory)
        except OSError:  # another process won the race: its entry is equally valid
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_or_tokenize(cache_dir: Optional[str], key: str, meta: dict,
                     tokenize: Callable[[], TokenizedExamples]) -> Tuple[TokenizedExamples, str, bool]:
    """(data, entry directory, cache_hit): read the entry for `key`, or tokenize and write it."""
    directory = os.path.join(default_cache_dir(cache_dir), "tokenized", key)
    if os.path.exists(os.path.join(directory, "meta.json")):
        return read_tokenized(directory), directory, True
    write_tokenized(directory, tokenize(), meta)
    return read_tokenized(directory), directory, False
