"""The frozen base decoder family (Llama / Mistral / Qwen2) and its Hugging Face checkpoint I/O."""

from sgt_jax.models.decoder import CausalLM, DecoderConfig, DecoderStack, ModelLoadError

__all__ = ["CausalLM", "DecoderConfig", "DecoderStack", "ModelLoadError"]
