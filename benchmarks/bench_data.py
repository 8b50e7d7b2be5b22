"""Data pipeline throughput on the embedded synthetic corpus, with 0 and with 4 Grain workers.

    python benchmarks/bench_data.py [--examples 4000] [--batch-size 32] [--epochs 2] [--tokenizer DIR]

Reports: tokenization (cold cache) examples/s, then for each worker count the time to the first
batch (worker start-up) and the steady-state examples/s after it.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgt_jax.config import DataConfig  # noqa: E402
from sgt_jax.data import build_datasets, build_tokenizer, generate_corpus, load_tokenizer  # noqa: E402
from sgt_jax.data.formats import render_alpaca  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--tokenizer", default=None, help="model/tokenizer directory (default: a tiny BPE)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = tempfile.mkdtemp(prefix="bench_data_")
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        texts = [render_alpaca(e).text for e in generate_corpus(2000, 0)]
        build_tokenizer(texts, os.path.join(work, "tok"), vocab_size=1024)
        tokenizer = load_tokenizer(os.path.join(work, "tok"))

    cfg = DataConfig(source="synthetic", synthetic_num_examples=args.examples, batch_size=args.batch_size,
                     num_epochs=args.epochs, cache_dir=os.path.join(work, "cache"), validation_fraction=0.0)
    t0 = time.perf_counter()
    build_datasets(cfg, tokenizer, process_index=0, process_count=1, num_workers=0)
    cold = time.perf_counter() - t0
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; corpus {args.examples} examples, "
          f"batch {args.batch_size}, {args.epochs} epochs, max_length {cfg.max_length}, buckets {cfg.buckets}")
    print(f"tokenize + cache (cold): {cold:.2f} s = {args.examples / cold:,.0f} examples/s")

    for workers in args.workers:
        t0 = time.perf_counter()
        train, _ = build_datasets(cfg, tokenizer, process_index=0, process_count=1, num_workers=workers)
        built = time.perf_counter() - t0
        it = iter(train)
        t0 = time.perf_counter()
        next(it)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = 0
        for batch in it:
            n += batch["input_ids"].shape[0]
        steady = time.perf_counter() - t0
        it.close()
        print(f"workers={workers}: build (cache hit) {built:.2f} s, first batch {first:.2f} s, "
              f"steady {n / steady:,.0f} examples/s ({n} examples in {steady:.2f} s)")


if __name__ == "__main__":
    main()
