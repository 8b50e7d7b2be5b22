"""Data: sources, formats (alpaca, openorca, chat, text), tokenization (cached), batching, Grain pipeline,
and the embedded synthetic corpus.

Public API:
    load_tokenizer(model_dir) -> tokenizer (pad = eos when absent, padding_side="left")
    build_tokenizer(texts, out_dir, vocab_size=512, chat_template=True) -> tokenizer
    build_datasets(data_cfg, tokenizer, *, process_index=None, process_count=None, seed=None,
                   num_workers=None, grad_accum_steps=1) -> (DataPipeline, DataPipeline | None)
    generate_corpus(num_examples, seed=1234) -> list[dict]
    DataError

Host batches are numpy int32 dicts (input_ids, attention_mask, noise_mask, loss_mask), shape (B, L);
`sgt_jax.training.parallel.host_batch_to_global(batch, mesh)` makes global jax arrays of them.
"""

from sgt_jax.data.errors import DataError
from sgt_jax.data.formats import FORMATS, tokenize_examples
from sgt_jax.data.pipeline import DataIterator, DataPipeline, build_datasets
from sgt_jax.data.synthetic import generate_corpus
from sgt_jax.data.tokenizer import build_tokenizer, load_tokenizer, tokenizer_fingerprint

__all__ = [
    "DataError", "DataIterator", "DataPipeline", "FORMATS", "build_datasets", "build_tokenizer",
    "generate_corpus", "load_tokenizer", "tokenize_examples", "tokenizer_fingerprint",
]
