"""The Grain pipeline: seeded global shuffle, epochs, per-host sharding, bucketed batches, workers,
prefetch, and an exactly restorable iterator state.

    train, validation = build_datasets(cfg.data, tokenizer)
    it = iter(train)
    batch = next(it)          # numpy int32 (B, L): input_ids, attention_mask, noise_mask, loss_mask
    state = it.get_state()    # JSON-serialisable; save it in the checkpoint
    it.set_state(state)       # continue exactly after the saved batch

One training batch is what one optimizer step consumes: `data.batch_size × optimizer.grad_accum_steps`
examples (`data.batch_size` is the global micro-batch, as in MaxText), of which each host holds
`1 / process_count`; validation batches are one micro-batch. Turn host batches into global jax arrays with
`sgt_jax.training.parallel.host_batch_to_global(batch, mesh)` (or the trainer's micro-batch split).

Order of operations (all index-based, so restoring is exact and independent of num_workers):
example indices → shuffle(seed) → repeat(num_epochs) → cut to whole global batches → batch the global
batch's indices → collate this host's share [process_index::process_count], left-padded to the bucket of
the *global* batch's longest example (every host computes the same one: identical shapes on all hosts) →
to_iter_dataset → mp_prefetch. A global batch is the union of the hosts' batches with the same index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from typing import Any, Dict, Iterable, NamedTuple, Optional, Tuple

import numpy as np

from sgt_jax.data import sources as _sources
from sgt_jax.data.batching import (
    GlobalBatchCollator, TokenizedSource, default_num_workers, effective_buckets, pack_examples,
)
from sgt_jax.data.cache import cache_key, load_or_tokenize
from sgt_jax.data.errors import DataError
from sgt_jax.data.formats import FORMATS, TokenizedExamples, required_columns, tokenize_examples
from sgt_jax.data.synthetic import GENERATOR_VERSION, generate_corpus
from sgt_jax.data.tokenizer import tokenizer_fingerprint

log = logging.getLogger("sgt_jax.data")

STATE_VERSION = 1


class DataIterator:
    """Iterator over host batches with `get_state()` / `set_state(state)` for checkpoints.

    Not Grain's own iterator state, nor Grain's Orbax handler: with `num_workers > 0` Grain's state lists
    each worker's position, so a run could only resume with the same worker count, and its handler saves
    one file per process, where this position (the number of global batches consumed) is the same on every
    host. It is a JSON dict, saved as an Orbax JSON item next to the train state.
    """

    def __init__(self, pipeline: "DataPipeline"):
        self._pipeline = pipeline
        self._batch_index = 0
        self._iter = None

    def _start(self):
        self.close()
        self._iter = iter(self._pipeline._iter_dataset(self._batch_index))

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        if self._iter is None:
            self._start()
        batch = next(self._iter)
        self._batch_index += 1
        return batch

    def get_state(self) -> Dict[str, Any]:
        """JSON-serialisable position: the number of batches consumed, plus what it is valid for."""
        return {"version": STATE_VERSION, "batch_index": self._batch_index,
                "global_batch_size": self._pipeline.global_batch_size,
                "fingerprint": self._pipeline.fingerprint}

    def set_state(self, state: Dict[str, Any]) -> None:
        if state.get("fingerprint") != self._pipeline.fingerprint:
            raise DataError(
                "the saved data-iterator state belongs to a different data pipeline (source, tokenizer, "
                "format, seed, epochs, batch size or buckets changed); resume with the original data "
                "settings or start a fresh run directory"
            )
        self._batch_index = int(state["batch_index"])
        self._start()

    def close(self) -> None:
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter = None


class DataPipeline:
    """A restartable source of host batches for one split (train or validation)."""

    def __init__(
        self,
        source: TokenizedSource,
        *,
        global_batch_size: int,
        pad_id: int,
        buckets,
        process_index: int,
        process_count: int,
        shuffle: bool,
        seed: int,
        num_epochs: Optional[int],
        num_workers: int,
        prefetch_buffer_size: int,
        pad_final_batch: bool,
        fingerprint: str,
        name: str = "train",
    ):
        import grain

        if global_batch_size % process_count:
            raise DataError(
                f"data.batch_size={global_batch_size} is not divisible by the {process_count} processes; "
                "set it to a multiple of the process count"
            )
        self.name = name
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.num_workers = num_workers
        self.prefetch_buffer_size = prefetch_buffer_size
        self.num_examples = len(source)
        self.fingerprint = fingerprint
        self.source = source

        n = len(source)
        if pad_final_batch:
            # Pad with empty rows (all masks 0) so every host gets the same number of whole batches.
            source = _PaddedSource(source, -(-n // global_batch_size) * global_batch_size)
        ds = grain.MapDataset.range(len(source))
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(num_epochs if num_epochs and num_epochs > 0 else None)
        finite = len(ds) < sys.maxsize
        self.examples_dropped = (len(ds) - len(ds) // global_batch_size * global_batch_size) if finite else 0
        if finite:
            ds = ds[: len(ds) - self.examples_dropped]
        collator = GlobalBatchCollator(source, pad_id, buckets, process_index, process_count)
        self._dataset = ds.batch(global_batch_size, drop_remainder=True, batch_fn=collator)
        self.num_batches_per_epoch = -(-n // global_batch_size) if pad_final_batch else n // global_batch_size
        self.num_batches = len(self._dataset) if finite else None

    def _iter_dataset(self, start: int):
        import grain

        ds = self._dataset[start:] if start else self._dataset
        prefetch = max(int(self.prefetch_buffer_size), 0)
        ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch else 0,
                                                   prefetch_buffer_size=prefetch))
        if self.num_workers > 0:
            _ensure_absl_flags_parsed()
            ids = ids.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=max(prefetch, 1)))
        return ids

    def __iter__(self) -> DataIterator:
        return DataIterator(self)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"the {self.name} pipeline repeats forever (num_epochs <= 0)")
        return self.num_batches

    def __repr__(self):
        return (f"DataPipeline({self.name}, examples={self.num_examples}, host_batch={self.batch_size}, "
                f"batches={self.num_batches}, workers={self.num_workers})")


def _ensure_absl_flags_parsed() -> None:
    # Grain's multiprocessing reads absl flags; outside an absl app (pytest, notebooks) they are unparsed.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _PaddedSource:
    def __init__(self, source, total: int):
        self.source, self.total = source, total

    def __len__(self):
        return self.total

    def length(self, i) -> int:
        return self.source.length(i) if i < len(self.source) else 0

    def __getitem__(self, i):
        if i < len(self.source):
            return self.source[i]
        empty = np.zeros(0, np.int32)
        return {"input_ids": empty, "noise_mask": empty, "loss_mask": empty}


def _iter_rows(ds) -> Iterable[dict]:
    for chunk in ds.iter(batch_size=1000):
        keys = list(chunk)
        for values in zip(*(chunk[k] for k in keys)):
            yield dict(zip(keys, values))


def _tokenized(data_cfg, tokenizer, source: str, split: str, fmt: str, seed_for_synthetic: int):
    """(TokenizedExamples, cache entry directory) for a whole source/split, tokenized once and cached."""
    kind = _sources.source_kind(source)
    if kind == "synthetic":
        fingerprint = f"synthetic-{data_cfg.synthetic_num_examples}-{seed_for_synthetic}-v{GENERATOR_VERSION}"
    else:
        fingerprint = _sources.source_fingerprint(source, split if kind != "file" else None)
    max_length = None if data_cfg.packing else int(data_cfg.max_length)
    key = cache_key(
        source=fingerprint, tokenizer=tokenizer_fingerprint(tokenizer), format=fmt, max_length=max_length,
        transform_all_tokens=bool(data_cfg.transform_all_tokens),
        columns=[data_cfg.text_column, data_cfg.messages_column],
    )

    def tokenize() -> TokenizedExamples:
        if kind == "synthetic":
            rows = generate_corpus(int(data_cfg.synthetic_num_examples), int(seed_for_synthetic))
        else:
            ds = _sources.load_raw(source, split, data_cfg.cache_dir)
            _sources.check_columns(ds, required_columns(fmt, data_cfg.text_column, data_cfg.messages_column,
                                                        list(ds.column_names)), source, fmt)
            rows = _iter_rows(ds)
        data = tokenize_examples(rows, tokenizer, fmt, max_length=max_length,
                                 transform_all_tokens=bool(data_cfg.transform_all_tokens),
                                 text_column=data_cfg.text_column, messages_column=data_cfg.messages_column)
        if len(data) == 0:
            raise DataError(f"data.source={source!r} has no examples; point it at non-empty data")
        return data

    data, directory, hit = load_or_tokenize(
        data_cfg.cache_dir, key, {"source": source, "split": split, "format": fmt}, tokenize)
    log.info("data: %s %s (%d examples, cache %s: %s)", source, split, len(data), "hit" if hit else "written",
             directory)
    return data, directory, key


def _warn_truncation(data: TokenizedExamples, what: str, max_length: int) -> None:
    if data.num_truncated:
        log.warning("data: %d of %d %s examples (%.1f%%) were longer than data.max_length=%d and truncated",
                    data.num_truncated, len(data), what, 100.0 * data.num_truncated / max(len(data), 1),
                    max_length)


class _Split(NamedTuple):
    """One split's tokenized examples, their cache directory and key, and the indices it uses (None: all)."""

    data: TokenizedExamples
    directory: Any
    key: str
    indices: Optional[np.ndarray] = None


def _processes(process_index: Optional[int], process_count: Optional[int]) -> Tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is outside [0, {process_count})")
    return process_index, process_count


def _check_inputs(data_cfg, tokenizer, process_count: int) -> None:
    if data_cfg.format not in FORMATS:
        raise DataError(f"data.format={data_cfg.format!r} is not known; choose one of {', '.join(FORMATS)}")
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token; load it with sgt_jax.data.load_tokenizer (pad = eos)")
    if int(data_cfg.batch_size) % process_count:
        raise DataError(
            f"data.batch_size={data_cfg.batch_size} is not divisible by the {process_count} processes; "
            "set it to a multiple of the process count"
        )


def _splits(data_cfg, tokenizer, seed: int) -> Tuple[_Split, Optional[_Split]]:
    """(training split, validation split or None): data.validation_source, else the source's
    data.validation_split, else a hold-out of data.validation_fraction of the training examples (by ``seed``)."""
    fmt = data_cfg.format
    data, directory, key = _tokenized(data_cfg, tokenizer, data_cfg.source, data_cfg.split, fmt,
                                      data_cfg.synthetic_seed)
    train = _Split(data, directory, key, np.arange(len(data)))
    if data_cfg.validation_source:
        return train, _Split(*_tokenized(data_cfg, tokenizer, data_cfg.validation_source, "train", fmt,
                                         data_cfg.synthetic_seed + 1))
    if data_cfg.validation_split:
        return train, _Split(*_tokenized(data_cfg, tokenizer, data_cfg.source, data_cfg.validation_split, fmt,
                                         data_cfg.synthetic_seed))
    fraction = data_cfg.validation_fraction
    if not fraction or fraction <= 0:  # in [0, 1): checked by the schema
        return train, None
    order = np.random.default_rng(seed).permutation(len(data))
    num_val = max(1, int(round(fraction * len(data))))
    if num_val >= len(data):
        raise DataError(
            f"data.source={data_cfg.source!r} has {len(data)} examples, too few to hold out "
            f"data.validation_fraction={fraction}; add data or set validation_source"
        )
    return train._replace(indices=np.sort(order[num_val:])), train._replace(indices=np.sort(order[:num_val]))


def _pipeline(data_cfg, tokenizer, split: _Split, name: str, *, seed: int, workers: int, buckets: list,
              grad_accum_steps: int, process_index: int, process_count: int) -> DataPipeline:
    """The pipeline of one split: training shuffles and repeats data.num_epochs over whole optimizer-step
    batches; validation runs one epoch in order, its last batch padded."""
    max_length = int(data_cfg.max_length)
    indices = split.indices
    if data_cfg.packing:
        all_indices = np.arange(len(split.data)) if indices is None else indices
        source = TokenizedSource(pack_examples(split.data, all_indices, max_length, tokenizer.eos_token_id))
    else:
        source = TokenizedSource(split.data, indices, directory=split.directory)
    is_train = name == "train"
    epochs = int(data_cfg.num_epochs) if is_train else 1
    global_batch = int(data_cfg.batch_size) * (int(grad_accum_steps) if is_train else 1)
    fingerprint = hashlib.sha256(json.dumps(
        [split.key, None if indices is None else hashlib.sha256(np.asarray(indices).tobytes()).hexdigest(),
         name, seed, epochs, global_batch, buckets, bool(data_cfg.packing), max_length]
    ).encode()).hexdigest()[:16]
    pipeline = DataPipeline(
        source, global_batch_size=global_batch, pad_id=tokenizer.pad_token_id, buckets=buckets,
        process_index=process_index, process_count=process_count, shuffle=is_train, seed=seed,
        num_epochs=epochs, num_workers=workers, prefetch_buffer_size=int(data_cfg.prefetch_buffer_size),
        pad_final_batch=not is_train, fingerprint=fingerprint, name=name,
    )
    if is_train:
        _check_training_batches(pipeline, data_cfg, len(source), epochs, grad_accum_steps)
    return pipeline


def _check_training_batches(pipeline: DataPipeline, data_cfg, num_rows: int, epochs: int,
                            grad_accum_steps: int) -> None:
    rows = "packed rows" if data_cfg.packing else "examples"
    if pipeline.num_batches_per_epoch == 0:
        raise DataError(
            f"the training data has {num_rows} {rows}, fewer than one optimizer step's "
            f"data.batch_size={data_cfg.batch_size} × optimizer.grad_accum_steps={grad_accum_steps}; "
            "lower them or add data"
        )
    if pipeline.examples_dropped:
        log.warning("data: the last %d of %d %s (over %d epochs) do not fill a whole global batch of %d and "
                    "are not trained on", pipeline.examples_dropped, num_rows * max(epochs, 1), rows,
                    epochs, pipeline.global_batch_size)


def build_datasets(
    data_cfg,
    tokenizer,
    *,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    seed: Optional[int] = None,
    num_workers: Optional[int] = None,
    grad_accum_steps: int = 1,
) -> Tuple[DataPipeline, Optional[DataPipeline]]:
    """(train_pipeline, validation_pipeline or None) for `data_cfg` (a `sgt_jax.config.DataConfig`).

    `tokenizer`: from `load_tokenizer(model_dir)` (pad = eos, left padding). process_index /
    process_count default to jax's. `seed` overrides data_cfg.shuffle_seed (the shuffle and the
    hold-out split); `num_workers` overrides data_cfg.num_workers. A training batch holds
    `data_cfg.batch_size × grad_accum_steps` examples (one optimizer step's), a validation batch
    `data_cfg.batch_size` (one micro-batch). Validation is never shuffled, runs
    one epoch, and its last batch is padded with empty rows (all masks 0) so every example is seen
    and all hosts run the same number of batches.
    """
    process_index, process_count = _processes(process_index, process_count)
    _check_inputs(data_cfg, tokenizer, process_count)
    seed = int(data_cfg.shuffle_seed if seed is None else seed)
    workers = default_num_workers(data_cfg.num_workers if num_workers is None else num_workers)
    settings = dict(seed=seed, workers=workers, buckets=effective_buckets(data_cfg.buckets, int(data_cfg.max_length)),
                    grad_accum_steps=grad_accum_steps, process_index=process_index, process_count=process_count)
    train, val = _splits(data_cfg, tokenizer, seed)
    _warn_truncation(train.data, "training", int(data_cfg.max_length))
    if val is not None and val.directory != train.directory:
        _warn_truncation(val.data, "validation", int(data_cfg.max_length))
    train_pipeline = _pipeline(data_cfg, tokenizer, train, "train", **settings)
    return train_pipeline, _pipeline(data_cfg, tokenizer, val, "validation", **settings) if val is not None else None
