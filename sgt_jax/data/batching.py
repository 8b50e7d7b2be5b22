"""Per-example token sources, left-padding collation to bucketed lengths, and packing.

Host-agreed shapes. On several hosts every host collates only its share of a global batch, but the global
array they form must have one sequence length. Every host knows the seeded global order, so each one looks
up the *lengths* of all the global batch's examples (cheap: from the offsets, no token is read), pads its
own share to the bucket of the longest, and all hosts agree without communicating
(:class:`GlobalBatchCollator`).
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from sgt_jax.data.formats import TokenizedExamples
from sgt_jax.data.cache import read_tokenized

BATCH_KEYS = ("input_ids", "attention_mask", "noise_mask", "loss_mask")


def effective_buckets(buckets: Sequence[int], max_length: int) -> List[int]:
    """Sorted bucket lengths below max_length, plus max_length itself (the longest any row can be)."""
    return sorted({int(b) for b in buckets if 0 < int(b) < max_length} | {int(max_length)})


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= length:
            return b
    return buckets[-1]


class TokenizedSource:
    """A random-access source of examples (read by index from the batch function).

    Reads ragged rows from flat arrays, optionally through an index array (a split of the data);
    index -1 is an empty example (used to pad validation to whole batches). Arrays stored in a cache
    directory are memory-mapped and re-opened in worker processes instead of being pickled.
    """

    def __init__(self, data: TokenizedExamples, indices: Optional[np.ndarray] = None,
                 directory: Optional[str] = None):
        self._data = data
        self._directory = directory
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._data) if self._indices is None else len(self._indices)

    def length(self, i: int) -> int:
        """Tokens in example ``i`` (0 for an empty one), without reading them."""
        j = int(i) if self._indices is None else int(self._indices[i])
        return 0 if j < 0 else int(self._data.offsets[j + 1] - self._data.offsets[j])

    def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
        j = int(i) if self._indices is None else int(self._indices[i])
        if j < 0:
            empty = np.zeros(0, np.int32)
            return {"input_ids": empty, "noise_mask": empty, "loss_mask": empty}
        d = self._data
        s, e = int(d.offsets[j]), int(d.offsets[j + 1])
        return {"input_ids": np.asarray(d.input_ids[s:e]), "noise_mask": np.asarray(d.noise_mask[s:e]),
                "loss_mask": np.asarray(d.loss_mask[s:e])}

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._directory is not None:
            state["_data"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._data is None:
            self._data = read_tokenized(self._directory)

    def __repr__(self):
        return f"TokenizedSource(len={len(self)}, directory={self._directory!r})"


def collate_left_padded(examples: Sequence[Mapping[str, Sequence[int]]], length: int, pad_id: int, *,
                        rows: Optional[int] = None,
                        fields: Sequence[str] = ("noise_mask", "loss_mask")) -> Dict[str, np.ndarray]:
    """int32 (rows, length) arrays (``rows`` defaults to len(examples); rows past the examples are all padding):
    ``input_ids`` with the pad id on the left, ``attention_mask`` 1 on the real tokens, and each of the
    examples' ``fields`` (0 on the padding). The package's one left-padding rule: training batches, prompts for
    generation, harness requests."""
    n = len(examples) if rows is None else rows
    out = {"input_ids": np.full((n, length), int(pad_id), np.int32),
           **{name: np.zeros((n, length), np.int32) for name in ("attention_mask", *fields)}}
    for row, e in enumerate(examples):
        k = len(e["input_ids"])
        if k == 0:
            continue
        out["input_ids"][row, length - k:] = e["input_ids"]
        out["attention_mask"][row, length - k:] = 1
        for name in fields:
            out[name][row, length - k:] = e[name]
    return out


class GlobalBatchCollator:
    """Batch function over the *source indices* of a whole global batch: collates this host's share
    (positions ``process_index::process_count``) left-padded to the bucket of the longest example of the
    whole global batch, so every host builds the same (rows, length) shape without communicating.

    ``source`` has ``length(i)`` and ``__getitem__(i)``; only the share's examples are read. Picklable (Grain
    worker processes run it).
    """

    def __init__(self, source, pad_id: int, buckets: Sequence[int], process_index: int = 0, process_count: int = 1):
        self.source = source
        self.pad_id = int(pad_id)
        self.buckets = list(buckets)
        self.process_index, self.process_count = int(process_index), int(process_count)

    def global_length(self, indices: Sequence[int]) -> int:
        longest = max((self.source.length(int(i)) for i in indices), default=0)
        return bucket_length(max(longest, 1), self.buckets)

    def __call__(self, indices: Sequence[int]) -> Dict[str, np.ndarray]:
        share = list(indices)[self.process_index::self.process_count]
        return collate_left_padded([self.source[int(i)] for i in share], self.global_length(indices), self.pad_id)


def pack_examples(data: TokenizedExamples, indices: Sequence[int], max_length: int, eos_id: int) -> TokenizedExamples:
    """Concatenate the examples (in `indices` order) separated by eos and cut into max_length rows.

    An eos is inserted after every example that does not already end with one (its masks: no noise,
    loss on, so the model learns the boundary). The last partial row is dropped. Packed rows are plain
    causal rows: tokens attend across example boundaries, as in standard pre-training packing.
    """
    ids_parts, noise_parts, loss_parts = [], [], []
    eos_arr = np.asarray([eos_id], np.int32)
    one, zero = np.ones(1, np.uint8), np.zeros(1, np.uint8)
    for j in indices:
        s, e = int(data.offsets[j]), int(data.offsets[j + 1])
        ids = np.asarray(data.input_ids[s:e])
        ids_parts.append(ids)
        noise_parts.append(np.asarray(data.noise_mask[s:e]))
        loss_parts.append(np.asarray(data.loss_mask[s:e]))
        if len(ids) == 0 or ids[-1] != eos_id:
            ids_parts.append(eos_arr)
            noise_parts.append(zero)
            loss_parts.append(one)
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)
    rows = len(ids) // max_length
    keep = rows * max_length
    return TokenizedExamples(
        input_ids=ids[:keep].astype(np.int32),
        noise_mask=np.concatenate(noise_parts)[:keep].astype(np.uint8) if rows else np.zeros(0, np.uint8),
        loss_mask=np.concatenate(loss_parts)[:keep].astype(np.uint8) if rows else np.zeros(0, np.uint8),
        offsets=np.arange(rows + 1, dtype=np.int64) * max_length,
    )


def default_num_workers(num_workers: int) -> int:
    if num_workers is None or num_workers < 0:
        return 4 if (os.cpu_count() or 1) >= 8 else 0
    return int(num_workers)
