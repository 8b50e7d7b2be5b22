"""A PyTorch Stained Glass Transform on transformers' own decoder classes, exported from an sgt_jax artifact
(``python -m sgt_jax.export_torch``).

This file needs torch, transformers and safetensors only (no jax, no sgt_jax): the exporter copies it next to
``model.safetensors`` and ``config.json``. Each estimator is transformers' ``LlamaModel`` / ``MistralModel`` /
``Qwen2Model`` (layers + final norm) built from its ``config.json`` entry, MoE layers as transformers' Mixtral
block; this file adds the mean / std heads, both sigma parameterisations and ``percent_to_mask`` (float32,
inference: no dropout)::

    x_t = where(noise_mask & attention_mask, x + mu + sigma * eps, x)     eps ~ N(0, I) from a torch.Generator

Use with transformers (left padding, as for any batched generation)::

    import sys, torch, transformers; sys.path.insert(0, "exported_sgt")
    from sgt_torch import load_torch_sgt
    tok = transformers.AutoTokenizer.from_pretrained("base_model"); tok.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained("base_model"); sgt = load_torch_sgt("exported_sgt")
    enc = tok(["Tell me about Paris."], return_tensors="pt", padding=True)
    x = model.get_input_embeddings()(enc.input_ids).float()
    # The tokens training noised: content 1, BOS / template / special tokens 0 (rule: config.json "noise_rule";
    # sgt_jax.StainedGlassTransform.encode builds the prompt and this mask exactly as training did).
    noise_mask = enc.attention_mask * ~torch.isin(enc.input_ids, torch.tensor(tok.all_special_ids))  # text format
    x_t = sgt(x, enc.attention_mask, noise_mask).x_t        # fresh OS entropy unless generator= / eps=
    out = model.generate(inputs_embeds=x_t.to(model.dtype), attention_mask=enc.attention_mask, max_new_tokens=64,
                         do_sample=True, temperature=0.6, top_k=5000, top_p=0.9)
    print(tok.batch_decode(out, skip_special_tokens=True))

Weights (``model.safetensors``) carry transformers' names below ``mean_estimator.`` / ``std_estimator.``
(``mean_estimator.layers.0.self_attn.q_proj.weight``, ``...norm.weight``, ``...mlp.experts.gate_up_proj``) and
the heads as ``nn.Linear`` (``mean_head.weight``, (out, in)).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import transformers
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

__all__ = ["SGTOutput", "TorchStainedGlassTransform", "load_torch_sgt"]

FORMAT_VERSION = 2  # 1: the estimators were a decoder written in this file, their configs in its own keys


class SGTOutput(NamedTuple):
    x_t: torch.Tensor  # (B, S, D) float32 transformed embeddings
    mu: torch.Tensor  # (B, S, D)
    sigma: torch.Tensor  # (B, S, D)
    feature_mask: Optional[torch.Tensor]  # (B, S, D) bool, features replaced by mu; None when percent_to_mask == 0


def build_estimator(hf_config: dict) -> nn.Module:
    """transformers' decoder stack with final norm for one estimator's config (a transformers config as a dict,
    ``is_causal`` included: False makes transformers build bidirectional, windowed-bidirectional, masks)."""
    config = transformers.AutoConfig.for_model(**hf_config)
    # Eager: the float32 softmax over an explicit additive mask, the arithmetic of the JAX cloak; fully masked
    # (left-pad) query rows get a uniform softmax there too.
    model = transformers.AutoModel.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.embed_tokens = None  # the estimators read embeddings, never token ids
    if getattr(config, "num_local_experts", 0):
        # Llama / Mistral / Qwen2 have no MoE MLP; Mixtral's block is the same top-k SwiGLU mixture.
        for layer in model.layers:
            layer.mlp = MixtralSparseMoeBlock(config)
    return model


class TorchStainedGlassTransform(nn.Module):
    """The SGT in PyTorch (inference). ``config``: the exported ``config.json`` (see ``sgt_jax.export_torch``)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = c = dict(config)
        if c.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"config.json has format_version {c.get('format_version')}, this module reads "
                             f"{FORMAT_VERSION}: re-export the artifact with python -m sgt_jax.export_torch.")
        self.min_scale, self.max_scale = (float(s) for s in c["scale"])
        self.directly_learn_stds = bool(c["directly_learn_stds"])
        self.shallow = float(c["shallow"])
        self.percent_to_mask = float(c["percent_to_mask"])
        self.mean_bound = float(c.get("mean_bound", 0.0))
        self.num_masked_features = int(math.floor(self.percent_to_mask * c["hidden_size"] + 0.5))
        self.mean_estimator = build_estimator(c["mean_estimator"])
        self.std_estimator = build_estimator(c["std_estimator"])
        d = c["hidden_size"]
        self.mean_head = nn.Linear(d, d)
        self.std_head = nn.Linear(d, d)

    def sigma_from_head(self, head: torch.Tensor) -> torch.Tensor:
        if self.directly_learn_stds:
            return head.clamp(self.min_scale, self.max_scale)
        unit = (1.0 + torch.tanh(head / self.shallow)) / 2.0
        return self.min_scale + (self.max_scale - self.min_scale) * unit

    def _generator(self, device) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))  # fresh OS entropy
        return gen

    @torch.no_grad()
    def forward(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                noise_mask: Optional[torch.Tensor] = None, *, generator: Optional[torch.Generator] = None,
                eps: Optional[torch.Tensor] = None) -> SGTOutput:
        """Transform float32 embeddings (B, S, D). Padding (attention_mask 0) is never transformed.

        noise_mask: tokens to transform; pass the mask training would use (``config["noise_rule"]``: BOS,
        template and special tokens clean), as sgt_jax's ``StainedGlassTransform.encode`` builds it (default:
        every real token). eps: the standard-normal noise (B, S, D) to use (tests, reproducing another
        implementation); else drawn from ``generator``, else from fresh OS entropy on every call.
        """
        x = inputs_embeds
        if x.dtype != torch.float32:
            raise TypeError(f"the SGT runs in float32 only; got {x.dtype}: pass inputs_embeds.float().")
        for name, p in self.named_parameters():
            if p.dtype != torch.float32:
                raise TypeError(f"SGT parameter {name} is {p.dtype}; the SGT must stay float32 (no downcast).")
        if attention_mask is None:
            attention_mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        attention_mask = attention_mask.to(x.device).bool()
        noise_mask = attention_mask if noise_mask is None else noise_mask.to(x.device).bool()
        selected = noise_mask & attention_mask
        # Left padding: real tokens count positions from 0 (transformers' default counts the padding too).
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

        def estimate(estimator):
            return estimator(inputs_embeds=x, attention_mask=attention_mask.long(), position_ids=positions,
                             use_cache=False).last_hidden_state

        mu = self.mean_head(estimate(self.mean_estimator))
        sigma = self.sigma_from_head(self.std_head(estimate(self.std_estimator)))
        if self.mean_bound > 0:  # ||mu / sigma|| <= mean_bound (sgt_jax.transform.cloak.bounded_mean)
            r = torch.sqrt((mu / sigma).square().sum(-1, keepdim=True) + 1e-12)
            mu = mu * (self.mean_bound * torch.tanh(r / self.mean_bound) / r)
        if eps is None:
            gen = generator if generator is not None else self._generator(x.device)
            eps = torch.randn(x.shape, generator=gen, dtype=torch.float32, device=x.device)
        x_t = torch.where(selected[..., None], x + mu + sigma * eps.to(x), x)
        feature_mask = None
        if self.percent_to_mask > 0:
            chosen = torch.zeros_like(sigma, dtype=torch.bool)
            if self.num_masked_features > 0:
                top = torch.topk(sigma, self.num_masked_features, dim=-1).indices
                chosen.scatter_(-1, top, True)
            feature_mask = chosen & selected[..., None]
            x_t = torch.where(feature_mask, mu, x_t)
        return SGTOutput(x_t=x_t, mu=mu, sigma=sigma, feature_mask=feature_mask)


def load_torch_sgt(directory, *, device="cpu") -> TorchStainedGlassTransform:
    """Load an exported SGT directory (``config.json`` + ``model.safetensors``) in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"{directory} is not an exported SGT (needs config.json and model.safetensors).")
    config = json.loads((directory / "config.json").read_text())
    module = TorchStainedGlassTransform(config)
    module.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    return module.to(device).eval()
