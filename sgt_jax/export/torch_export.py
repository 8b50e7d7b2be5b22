"""Export an SGT artifact to PyTorch: ``python -m sgt_jax.export_torch ARTIFACT_DIR OUT_DIR``.

Writes to ``OUT_DIR``:

    sgt_torch.py        the module (torch + transformers + safetensors, no sgt_jax): transformers' decoder classes
                        as the estimators plus the cloak's heads (its docstring shows ``generate(inputs_embeds=...)``)
    model.safetensors   the cloak's float32 weights under transformers' names and layout (Linear weights (out, in))
    config.json         hyperparameters, each estimator's transformers config, the artifact's base-model info

``from sgt_torch import load_torch_sgt`` (with ``OUT_DIR`` on the path) loads it back, without sgt_jax.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from sgt_jax.inference.artifact import CONFIG_NAME, WEIGHTS_NAME, ArtifactError
from sgt_jax.errors import run_cli
from sgt_jax.models.decoder import DecoderConfig

MODULE_SOURCE = Path(__file__).with_name("sgt_torch.py")
FORMAT_VERSION = 2  # sgt_torch.py reads this version only


def estimator_config(dc: DecoderConfig, causal: bool) -> dict[str, Any]:
    """The transformers config (a dict for ``AutoConfig.for_model``) of the estimator the JAX cloak built as ``dc``."""
    cfg = dict(model_type=dc.model_type, vocab_size=1, pad_token_id=None, bos_token_id=None, eos_token_id=None,
               hidden_act="silu", is_causal=causal,
               rope_parameters={"rope_type": "default", "rope_theta": dc.rope_theta, **(dc.rope_scaling_dict() or {})},
               **{k: getattr(dc, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "head_dim",
                                              "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                              "max_position_embeddings", "sliding_window", "attention_bias")})
    if dc.model_type == "qwen2":  # one window for every layer, as the JAX decoder resolved it
        cfg.update(use_sliding_window=dc.sliding_window is not None, max_window_layers=0)
    if dc.num_experts:
        cfg.update(num_local_experts=dc.num_experts, num_experts_per_tok=min(dc.num_experts_per_tok, dc.num_experts),
                   router_jitter_noise=0.0)
    return cfg


def _kernel(v):
    return v.T  # (in, out) kernel -> nn.Linear's (out, in) weight (made contiguous below: safetensors needs it)


def _same(v):
    return v


def _experts(v):
    return v.transpose(0, 2, 1)  # (experts, in, out) -> (experts, out, in)


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# One layer's JAX weight name -> (transformers' name, layout change).
_LAYER_NAMES = {
    **{f"attention.{p}.kernel": (f"self_attn.{p}.weight", _kernel) for p in _PROJECTIONS},
    **{f"attention.{p}.bias": (f"self_attn.{p}.bias", _same) for p in _PROJECTIONS},
    **{f"mlp.{p}.kernel": (f"mlp.{p}.weight", _kernel) for p in ("gate_proj", "up_proj", "down_proj")},
    "input_norm.scale": ("input_layernorm.weight", _same),
    "post_attention_norm.scale": ("post_attention_layernorm.weight", _same),
    # MoE as transformers' Mixtral block: the router is its gate, gate and up are fused below.
    "mlp.router": ("mlp.gate.weight", _kernel),
    **{f"mlp.{p}": (f"mlp.experts.{p}", _experts) for p in ("gate_proj", "up_proj", "down_proj")},
}


def torch_state_dict(jax_weights: dict[str, np.ndarray], configs: dict[str, dict]) -> dict[str, np.ndarray]:
    """Map the artifact's (stacked, (in, out)) cloak weights to transformers' names and layout; ``configs``: the
    estimators' transformers configs by top-level name (``mean_estimator``)."""
    out: dict[str, np.ndarray] = {}
    for raw, value in jax_weights.items():
        name = raw.removesuffix(".value")
        value = np.asarray(value, np.float32)
        top, rest = name.split(".", 1)
        if top in ("mean_head", "std_head"):
            out[f"{top}.{'weight' if rest == 'kernel' else 'bias'}"] = _kernel(value) if rest == "kernel" else value
        elif rest == "final_norm.scale":
            out[f"{top}.norm.weight"] = value
        elif rest.startswith("layers.") and rest[len("layers."):] in _LAYER_NAMES:
            target, layout = _LAYER_NAMES[rest[len("layers."):]]
            for i, layer_value in enumerate(value):
                out[f"{top}.layers.{i}.{target}"] = layout(layer_value)
        else:
            raise ArtifactError(f"cloak weight {raw!r} is not known to the torch exporter; update sgt_jax.export.")
    for name in [n for n in out if n.endswith(".mlp.experts.gate_proj")]:  # Mixtral: (experts, 2 * inner, hidden)
        prefix = name[: -len("gate_proj")]
        out[prefix + "gate_up_proj"] = np.concatenate([out.pop(name), out.pop(prefix + "up_proj")], axis=1)
    for top, cfg in configs.items():
        # transformers' Llama biases o_proj too when attention_bias is set, its Qwen2 always biases q, k and v and
        # its Mistral never: a bias the JAX layer lacks is a zero bias; one the class lacks cannot be exported.
        wanted = {"llama": _PROJECTIONS if cfg["attention_bias"] else (), "qwen2": _PROJECTIONS[:3]}.get(
            cfg["model_type"], ())
        for i in range(cfg["num_hidden_layers"]):
            for proj in _PROJECTIONS:
                prefix = f"{top}.layers.{i}.self_attn.{proj}."
                if proj in wanted:
                    out.setdefault(prefix + "bias", np.zeros(out[prefix + "weight"].shape[0], np.float32))
                elif prefix + "bias" in out:
                    raise ArtifactError(f"the cloak's {top} has a {proj} bias that transformers' {cfg['model_type']} "
                                        "attention lacks; export a cloak trained without estimator attention_bias.")
    return {name: np.ascontiguousarray(value) for name, value in out.items()}


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
        configs[f"{which}_estimator"] = estimator_config(dc, bool(hp["use_causal_mask"]))
    config = {
        "format": "sgt_torch", "format_version": FORMAT_VERSION,
        "scale": list(hp["scale"]), "percent_to_mask": hp["percent_to_mask"], "shallow": hp["shallow"],
        "mean_bound": float(hp.get("mean_bound", 0.0)), "directly_learn_stds": hp["directly_learn_stds"],
        "use_causal_mask": hp["use_causal_mask"], "transformer_type": hp.get("transformer_type"),
        "hidden_size": configs["mean_estimator"]["hidden_size"], **configs,
        "base_model": meta.get("base_model"), "tokenizer": meta.get("tokenizer"),
        # Which tokens training noised (format, template, transform_all_tokens): a client builds its
        # noise_mask by this rule (sgt_jax's StainedGlassTransform.encode does).
        "noise_rule": meta.get("noise_rule"),
    }
    weights = torch_state_dict(load_file(str(artifact_dir / WEIGHTS_NAME)), configs)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(MODULE_SOURCE, out / "sgt_torch.py")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgt_jax.export_torch", description=__doc__.splitlines()[0])
    parser.add_argument("artifact_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)

    def body():
        out = export_torch(args.artifact_dir, args.out_dir)
        print(f"exported to {out} (load with: from sgt_torch import load_torch_sgt)")

    return run_cli(body)
