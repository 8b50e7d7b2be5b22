"""Helpers for tests and examples: tiny Hugging Face checkpoints built with transformers' PyTorch classes."""

from __future__ import annotations

from pathlib import Path

_TINY_DEFAULTS = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def make_tiny_checkpoint(out_dir, model_type: str = "llama", *, dtype: str = "float32", seed: int = 0,
                         init_std: float = 0.1, embedding_std: float | None = None, **config_overrides) -> Path:
    """Save a tiny random llama / mistral / qwen2 model (config.json + safetensors) to out_dir and return it.

    Weights are drawn with std ``init_std`` (larger than HF's 0.02) so logits are well separated and
    comparisons between implementations are meaningful; ``embedding_std`` (default ``init_std``) larger than
    ``init_std`` with tied embeddings gives a model whose top logits are far apart (robust argmax comparisons
    in low precision). ``max_shard_size`` in the overrides makes a
    sharded (index) checkpoint.
    """
    import torch
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    if model_type not in classes:
        raise ValueError(f"model_type={model_type!r} has no tiny checkpoint; use one of {', '.join(classes)}.")
    max_shard_size = config_overrides.pop("max_shard_size", None)
    config_cls, model_cls = classes[model_type]
    settings = {**_TINY_DEFAULTS, "initializer_range": init_std, **config_overrides}
    if model_type == "mistral":
        settings.setdefault("sliding_window", None)
    config = config_cls(**settings)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                # Norm scales around 1 (not exactly 1) so a wrong norm mapping cannot pass unnoticed.
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif "embed_tokens" in name or "lm_head" in name:
                param.normal_(0.0, init_std if embedding_std is None else embedding_std)
            else:
                param.normal_(0.0, init_std)
    model = model.to(getattr(torch, dtype))
    out_dir = Path(out_dir)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


__all__ = ["make_tiny_checkpoint"]


def make_tiny_model_dir(out_dir, model_type: str = "llama", *, vocab_size: int = 384, corpus_examples: int = 400,
                        **config_overrides) -> Path:
    """A complete tiny base-model directory (config.json, safetensors and a tokenizer trained on the synthetic
    corpus), as a user's model directory would be: what the training run, the data pipeline and the artifact
    need. Deterministic for fixed arguments."""
    from sgt_jax.data import build_tokenizer, generate_corpus

    out_dir = Path(out_dir)
    rows = generate_corpus(corpus_examples, 1)
    texts = [" ".join(str(r[k]) for k in ("instruction", "input", "output")) for r in rows]
    tokenizer = build_tokenizer(texts, str(out_dir / "_tokenizer"), vocab_size=vocab_size, chat_template=True)
    make_tiny_checkpoint(out_dir, model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **config_overrides)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
