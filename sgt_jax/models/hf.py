"""Hugging Face checkpoints <-> our parameters: config.json + safetensors (single file or sharded index).

Tensors are read one at a time (safetensors ``safe_open``), only those the (possibly truncated) model needs:
with ``truncate_at_layer=k`` no tensor of a layer above k, no final norm and no LM head is ever read.
Per-layer tensors are stacked on the leading ``layers`` axis and placed with the mesh's shardings as read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgt_jax.models.config import SUPPORTED_MODEL_TYPES, DecoderConfig, ModelLoadError
from sgt_jax.models.sharding import param_shardings

EMBEDDED_PREFIX = "embedded:"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


# The one name map, shared by llama / mistral / qwen2: our parameter path -> HF tensor name ({i}: layer).
# Kernels are stored (in, out) here and (out, in) in HF, hence the transpose flag.
_LAYER = "model.layers.{i}."
PARAM_NAME_MAP: dict[tuple[str, ...], tuple[str, bool]] = {
    ("embed_tokens",): ("model.embed_tokens.weight", False),
    ("decoder", "final_norm", "scale"): ("model.norm.weight", False),
    ("lm_head", "kernel"): ("lm_head.weight", True),
    ("decoder", "layers", "input_norm", "scale"): (_LAYER + "input_layernorm.weight", False),
    ("decoder", "layers", "post_attention_norm", "scale"): (_LAYER + "post_attention_layernorm.weight", False),
    **{("decoder", "layers", "attention", proj, "kernel"): (_LAYER + f"self_attn.{proj}.weight", True)
       for proj in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{("decoder", "layers", "attention", proj, "bias"): (_LAYER + f"self_attn.{proj}.bias", False)
       for proj in ("q_proj", "k_proj", "v_proj")},
    **{("decoder", "layers", "mlp", proj, "kernel"): (_LAYER + f"mlp.{proj}.weight", True)
       for proj in ("gate_proj", "up_proj", "down_proj")},
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def resolve_model_path(path) -> Path:
    """A model directory; ``embedded:<name>`` is a directory shipped inside the package (sgt_jax/assets)."""
    text = str(path)
    if text.startswith(EMBEDDED_PREFIX):
        return Path(__file__).resolve().parent.parent / "assets" / text[len(EMBEDDED_PREFIX):]
    return Path(text).expanduser()


def _check_model_dir(path, directory: Path) -> None:
    if not directory.is_dir():
        raise ModelLoadError(f"model.path={str(path)!r} is not a directory ({directory}); point model.path at a "
                              "Hugging Face model directory (config.json + *.safetensors).")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"model.path={str(path)!r} has no config.json; point model.path at a Hugging Face "
                              "model directory.")
    if not ((directory / SINGLE_FILE).is_file() or (directory / INDEX_FILE).is_file()):
        if any((directory / name).exists() for name in _PICKLE_FILES):
            raise ModelLoadError(
                f"model.path={str(path)!r} holds only pickle weights (pytorch_model.bin); safetensors only: "
                "convert it with transformers save_pretrained(safe_serialization=True)."
            )
        raise ModelLoadError(f"model.path={str(path)!r} has no weights ({SINGLE_FILE} or {INDEX_FILE}); "
                              "save the model with safetensors.")


class SafetensorsReader:
    """Reads single named tensors from a single-file or index-sharded safetensors checkpoint."""

    def __init__(self, directory: Path):
        self.directory = directory
        if (directory / INDEX_FILE).is_file():
            self.weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        else:
            from safetensors import safe_open

            with safe_open(directory / SINGLE_FILE, framework="numpy") as handle:
                self.weight_map = {name: SINGLE_FILE for name in handle.keys()}
        self._handles: dict[str, Any] = {}
        self.names_read: list[str] = []

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        self.names_read.append(name)
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self.weight_map:
            raise ModelLoadError(f"tensor {name!r} is missing from the checkpoint in {self.directory}; "
                                  "re-save the model with save_pretrained.")
        file_name = self.weight_map[name]
        if file_name not in self._handles:
            # numpy framework reads bfloat16 as ml_dtypes.bfloat16 without torch.
            self._handles[file_name] = safe_open(self.directory / file_name, framework="numpy").__enter__()
        return self._handles[file_name]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def load_causal_lm(model_cls, path, *, dtype="bfloat16", truncate_at_layer=None, mesh=None, attention_impl="xla",
                   remat_policy="none", reader_hook: Callable[[SafetensorsReader], None] | None = None,
                   memory_kind: str | None = None):
    """Build ``model_cls`` (``CausalLM``, whose ``from_pretrained`` calls this) from a Hugging Face directory,
    reading only the tensors the model needs. The class is passed in so that checkpoint I/O does not import the
    model definition (which imports this module). ``memory_kind`` (with ``mesh``): where the shards live, e.g.
    ``"pinned_host"`` to keep a model in host memory until it is moved to the devices."""
    directory = resolve_model_path(path)
    _check_model_dir(path, directory)
    config = DecoderConfig.from_hf(directory / "config.json")
    if config.num_experts > 0:
        raise ModelLoadError(f"model.path={str(path)!r} is a mixture-of-experts checkpoint; base models must be "
                              "dense llama / mistral / qwen2.")
    if truncate_at_layer is not None and not 0 <= truncate_at_layer < config.num_hidden_layers:
        raise ModelLoadError(
            f"model.truncate_at_layer={truncate_at_layer} is out of range for the {config.num_hidden_layers}-layer "
            f"model at {str(path)!r}; use 0..{config.num_hidden_layers - 1} or null."
        )
    target_dtype = jnp.dtype(dtype)
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=target_dtype, truncate_at_layer=truncate_at_layer,
                                               attention_impl=attention_impl, remat_policy=remat_policy,
                                               rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = None
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(param_shardings(abstract_state, mesh)))
    reader = SafetensorsReader(directory)
    if reader_hook is not None:
        reader_hook(reader)
    try:
        flat = []
        for key, variable in nnx.to_flat_state(abstract_state):
            key = _path_key(key)
            value = _read_param(reader, key, variable, config, target_dtype)
            sharding = shardings[key].get_value() if shardings is not None else None
            if sharding is not None and memory_kind is not None:
                sharding = sharding.with_memory_kind(memory_kind)
            flat.append((key, variable.replace(jax.device_put(value, sharding) if sharding else jnp.asarray(value))))
    finally:
        reader.close()
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _read_param(reader: SafetensorsReader, key, variable, config, dtype) -> np.ndarray:
    if key not in PARAM_NAME_MAP:
        raise ModelLoadError(f"parameter {'.'.join(key)} has no Hugging Face name; this checkpoint layout is "
                              "not supported.")
    template, transpose = PARAM_NAME_MAP[key]
    layered = "{i}" in template
    names = [template.format(i=i) for i in range(variable.shape[0])] if layered else [template]
    expected = variable.shape[1:] if layered else variable.shape
    tensors = []
    for name in names:
        shape = reader.shape(name)
        hf_expected = tuple(reversed(expected)) if transpose else tuple(expected)
        if shape != hf_expected:
            raise ModelLoadError(f"tensor {name!r} has shape {shape} but config.json implies {hf_expected} in "
                                  f"{reader.directory}; the weights and config.json do not match.")
        tensor = reader.read(name)
        tensors.append((tensor.T if transpose else tensor).astype(dtype))
    return np.stack(tensors) if layered else tensors[0]


# ------------------------------------------------------------------------------------------------ saving


def hf_config_dict(config: DecoderConfig, dtype: str = "float32") -> dict[str, Any]:
    """config.json for transformers (v5 `rope_parameters` layout; also readable by DecoderConfig.from_hf)."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {**dict(config.rope_scaling), "rope_type": "llama3", "rope_theta": config.rope_theta}
    out = {
        "architectures": [_ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "dtype": dtype,
    }
    if config.model_type == "llama":
        out["attention_bias"] = config.attention_bias
    if config.model_type == "mistral":
        out["sliding_window"] = config.sliding_window
    if config.model_type == "qwen2":
        out.update(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
                   max_window_layers=0)
    return out


def save_pretrained_safetensors(model_or_params, config: DecoderConfig, out_dir) -> Path:
    """Write our parameters (a CausalLM or its nnx State) as a Hugging Face directory loadable by transformers."""
    from safetensors.numpy import save_file

    state = nnx.state(model_or_params, nnx.Param) if isinstance(model_or_params, nnx.Module) else model_or_params
    tensors: dict[str, np.ndarray] = {}
    num_layers = config.num_hidden_layers
    for key, variable in nnx.to_flat_state(state):
        key = _path_key(key)
        template, transpose = PARAM_NAME_MAP[key]
        value = np.asarray(jax.device_get(getattr(variable, "get_value", lambda: variable)()))
        if "{i}" in template:
            num_layers = value.shape[0]
            for i, layer_value in enumerate(value):
                tensors[template.format(i=i)] = np.ascontiguousarray(layer_value.T if transpose else layer_value)
        else:
            tensors[template] = np.ascontiguousarray(value.T if transpose else value)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype_name = str(next(iter(tensors.values())).dtype)
    hf_config = hf_config_dict(config, dtype_name)
    hf_config["num_hidden_layers"] = num_layers
    save_file(tensors, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out_dir


__all__ = ["ModelLoadError", "PARAM_NAME_MAP", "SUPPORTED_MODEL_TYPES", "SafetensorsReader", "hf_config_dict",
           "load_causal_lm", "resolve_model_path", "save_pretrained_safetensors"]
