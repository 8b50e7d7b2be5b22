"""The decoder's configuration, read from a Hugging Face ``config.json`` (Llama / Mistral / Qwen2)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp

from sgt_jax.errors import SGTError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ModelLoadError(SGTError):
    """A user-caused problem with a base model (path, family, checkpoint); one line naming the fix."""


def _as_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # Hashable (sorted key, value) pairs of HF's llama3 rope parameters; None for plain RoPE.
    rope_scaling: tuple | None
    max_position_embeddings: int
    # Effective window for every layer (None: full attention).
    sliding_window: int | None
    attention_bias: bool
    tie_word_embeddings: bool
    num_experts: int = 0
    num_experts_per_tok: int = 2
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, config_dict_or_dir: Mapping[str, Any] | str | Path, **overrides) -> "DecoderConfig":
        """Build from a Hugging Face config.json (dict, file or model directory), then apply overrides."""
        if isinstance(config_dict_or_dir, (str, Path)):
            path = Path(config_dict_or_dir)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise ModelLoadError(f"{path} does not exist; point model.path at a directory with config.json.")
            hf = json.loads(path.read_text())
        else:
            hf = dict(config_dict_or_dir)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"model_type={model_type!r} is not supported; use a {', '.join(SUPPORTED_MODEL_TYPES)} checkpoint."
            )
        num_heads = hf["num_attention_heads"]
        num_layers = hf["num_hidden_layers"]
        rope_theta, rope_scaling = _rope_from_hf(hf)
        fields = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            sliding_window=_sliding_window_from_hf(hf, model_type, num_layers),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            num_experts=int(hf.get("num_local_experts", hf.get("num_experts", 0)) or 0),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 2) or 2),
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
            pad_token_id=_first_id(hf.get("pad_token_id")),
        )
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown decoder config override(s) {', '.join(unknown)}; valid names: {', '.join(fields)}."
            )
        fields.update(overrides)
        return cls(**fields)

    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None


def _first_id(token_id):
    return token_id[0] if isinstance(token_id, (list, tuple)) else token_id


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, tuple | None]:
    # transformers 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ModelLoadError(
            f"rope_type={rope_type!r} in config.json is not supported; only default and llama3 RoPE are."
        )
    params.pop("type", None)
    params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
    return theta, tuple(sorted(params.items()))


def _sliding_window_from_hf(hf: Mapping[str, Any], model_type: str, num_layers: int) -> int | None:
    window = hf.get("sliding_window")
    if model_type == "llama" or window is None:
        return None
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", False):
            return None
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", num_layers) else "full_attention"
            for i in range(num_layers)
        ]
        if all(t == "full_attention" for t in layer_types):
            return None
        if not all(t == "sliding_attention" for t in layer_types):
            raise ModelLoadError(
                "qwen2 use_sliding_window with a mix of sliding and full layers (max_window_layers) is not "
                "supported; set use_sliding_window=false in config.json."
            )
    return int(window)


# ----------------------------------------------------------------------------------------------- layers
