"""Export an SGT artifact to plain PyTorch: ``python -m sgt_jax.export_torch ARTIFACT_DIR OUT_DIR``.

Writes to ``OUT_DIR``:

    sgt_torch.py        the self-contained module (torch + safetensors only; see its docstring for use with
                        transformers' ``generate(inputs_embeds=...)``)
    model.safetensors   the cloak's float32 weights in torch layout (Linear weights (out, in), one module per layer)
    config.json         hyperparameters + the resolved estimator decoder configs (+ the artifact's base-model info)

``load_torch_sgt(OUT_DIR)`` loads it back (also importable from ``OUT_DIR/sgt_torch.py`` without sgt_jax).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from sgt_jax.inference.artifact import CONFIG_NAME, WEIGHTS_NAME, ArtifactError
from sgt_jax.errors import run_cli
from sgt_jax.models.decoder import DecoderConfig

MODULE_SOURCE = Path(__file__).with_name("sgt_torch.py")
_DECODER_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "rms_norm_eps", "rope_theta", "sliding_window", "attention_bias", "num_experts",
                 "num_experts_per_tok")


def _estimator_config(decoder_config) -> dict[str, Any]:
    cfg = {k: getattr(decoder_config, k) for k in _DECODER_KEYS}
    cfg["rope_scaling"] = decoder_config.rope_scaling_dict()
    cfg["model_type"] = decoder_config.model_type
    return cfg


def _strip(name: str) -> str:
    return name[: -len(".value")] if name.endswith(".value") else name


_LAYER_RENAMES = {
    "attention.q_proj.kernel": "self_attn.q_proj.weight", "attention.k_proj.kernel": "self_attn.k_proj.weight",
    "attention.v_proj.kernel": "self_attn.v_proj.weight", "attention.o_proj.kernel": "self_attn.o_proj.weight",
    "attention.q_proj.bias": "self_attn.q_proj.bias", "attention.k_proj.bias": "self_attn.k_proj.bias",
    "attention.v_proj.bias": "self_attn.v_proj.bias",
    "input_norm.scale": "input_layernorm.weight", "post_attention_norm.scale": "post_attention_layernorm.weight",
    "mlp.gate_proj.kernel": "mlp.gate_proj.weight", "mlp.up_proj.kernel": "mlp.up_proj.weight",
    "mlp.down_proj.kernel": "mlp.down_proj.weight",
    # MoE: experts kept (experts, in, out); the router becomes a Linear (experts, hidden).
    "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj",
    "mlp.router": "mlp.router.weight",
}


def torch_state_dict(jax_weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map the artifact's (stacked, (in, out)) cloak weights to the torch module's names and layout."""
    out: dict[str, np.ndarray] = {}
    for raw, value in jax_weights.items():
        name = _strip(raw)
        value = np.asarray(value, np.float32)
        top, rest = name.split(".", 1)
        if top in ("mean_head", "std_head"):
            out[f"{top}.{'weight' if rest == 'kernel' else 'bias'}"] = value.T.copy() if rest == "kernel" else value
        elif rest == "final_norm.scale":
            out[f"{top}.norm.weight"] = value
        elif rest.startswith("layers."):
            sub = rest[len("layers."):]
            if sub not in _LAYER_RENAMES:
                raise ArtifactError(f"cloak weight {raw!r} is not known to the torch exporter; update sgt_jax.export_torch.")
            target = _LAYER_RENAMES[sub]
            for i in range(value.shape[0]):
                v = value[i]
                if target.endswith(".weight") and v.ndim == 2:
                    v = v.T  # (in, out) kernel → (out, in) Linear weight
                out[f"{top}.layers.{i}.{target}"] = np.ascontiguousarray(v)
        else:
            raise ArtifactError(f"cloak weight {raw!r} is not known to the torch exporter; update sgt_jax.export_torch.")
    return out


def export_torch(artifact_dir, out_dir) -> Path:
    """Write ``sgt_torch.py``, ``model.safetensors`` and ``config.json`` for the artifact to ``out_dir``."""
    artifact_dir, out = Path(artifact_dir), Path(out_dir)
    if not (artifact_dir / CONFIG_NAME).is_file() or not (artifact_dir / WEIGHTS_NAME).is_file():
        raise ArtifactError(f"{artifact_dir} is not an SGT artifact (needs {CONFIG_NAME} and {WEIGHTS_NAME}); pass "
                            "the artifact directory written at the end of training (<run_dir>/sgt).")
    meta = json.loads((artifact_dir / CONFIG_NAME).read_text())
    hp = dict(meta["cloak"])
    kwargs = dict(hp.get("estimator_kwargs") or {})
    base_config = artifact_dir / "base_config"
    configs = {}
    for which in ("mean", "std"):
        dc = DecoderConfig.from_hf(base_config, **{**kwargs, "num_experts": int(hp[f"{which}_num_experts"])})
        configs[f"{which}_estimator"] = _estimator_config(dc)
    config = {
        "format": "sgt_torch", "format_version": 1,
        "scale": list(hp["scale"]), "percent_to_mask": hp["percent_to_mask"], "shallow": hp["shallow"],
        "directly_learn_stds": hp["directly_learn_stds"],
        "use_causal_mask": hp["use_causal_mask"], "transformer_type": hp.get("transformer_type"),
        "hidden_size": configs["mean_estimator"]["hidden_size"], **configs,
        "base_model": meta.get("base_model"), "tokenizer": meta.get("tokenizer"),
        # Which tokens training noised (format, template, transform_all_tokens): a client builds its
        # noise_mask by this rule (sgt_jax's StainedGlassTransform.encode does).
        "noise_rule": meta.get("noise_rule"),
    }
    weights = torch_state_dict(load_file(str(artifact_dir / WEIGHTS_NAME)))
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(MODULE_SOURCE, out / "sgt_torch.py")
    return out


def load_torch_sgt(out_dir, *, device="cpu"):
    """Load an exported directory with its own copy of ``sgt_torch.py`` (what a user without sgt_jax runs)."""
    path = Path(out_dir) / "sgt_torch.py"
    if not path.is_file():
        raise ArtifactError(f"{out_dir} has no sgt_torch.py; run sgt_jax.export_torch.export_torch first.")
    spec = importlib.util.spec_from_file_location(f"sgt_torch_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NamedTuple / pickling-free, but dataclass-style lookups need the module
    spec.loader.exec_module(module)
    return module.load_torch_sgt(out_dir, device=device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgt_jax.export_torch", description=__doc__.splitlines()[0])
    parser.add_argument("artifact_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)

    def body():
        out = export_torch(args.artifact_dir, args.out_dir)
        print(f"exported to {out} (load with: from sgt_torch import load_torch_sgt)")

    return run_cli(body)
