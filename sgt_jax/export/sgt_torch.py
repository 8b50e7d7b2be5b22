"""A plain-PyTorch Stained Glass Transform, exported from an sgt_jax artifact (``sgt_jax.export_torch``).

This file is self-contained (torch, safetensors and the standard library only; no jax, no sgt_jax): the
exporter copies it next to ``model.safetensors`` and ``config.json`` so that PyTorch code and
prompt-embedding servers can use an SGT trained with sgt_jax. It reproduces the JAX cloak numerically
(float32, inference: no dropout) — the estimators (Llama / Mistral / Qwen2 decoder layers: RMSNorm, RoPE incl.
llama3 scaling, GQA attention with a causal or bidirectional + padding mask, sliding window, SwiGLU or a
dense-dispatch top-k MoE), the mean / std heads, both sigma parameterisations and ``percent_to_mask``::

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

Weights (``model.safetensors``) use torch's layout: ``nn.Linear`` weights are (out, in), one module per layer
(``mean_estimator.layers.0.self_attn.q_proj.weight``, ``...norm.weight``, ``mean_head.weight``). MoE experts are
stored as (experts, in, out) tensors ``...mlp.gate_proj`` / ``up_proj`` / ``down_proj`` and the router as a
Linear ``...mlp.router.weight`` (experts, hidden).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SGTOutput", "TorchStainedGlassTransform", "load_torch_sgt"]

_MASKED_LOGIT = -1e30  # finite, like sgt_jax: fully masked (left-pad) query rows give a uniform softmax


class SGTOutput(NamedTuple):
    x_t: torch.Tensor  # (B, S, D) float32 transformed embeddings
    mu: torch.Tensor  # (B, S, D)
    sigma: torch.Tensor  # (B, S, D)
    feature_mask: Optional[torch.Tensor]  # (B, S, D) bool, features replaced by mu; None when percent_to_mask == 0


def rope_inverse_frequencies(cfg: dict) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) float32, with llama3 scaling when ``rope_scaling`` is set."""
    dim = cfg["head_dim"]
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (float(cfg["rope_theta"]) ** exponent)  # float32 throughout, as sgt_jax (numpy)
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled).to(torch.float32)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def attention_mask_4d(attention_mask: torch.Tensor, causal: bool, sliding_window: Optional[int]) -> torch.Tensor:
    """(B, 1, S, S) bool: padding on the key side + causal order over indices + sliding window (HF semantics)."""
    seq = attention_mask.shape[-1]
    idx = torch.arange(seq, device=attention_mask.device)
    q, k = idx[:, None], idx[None, :]
    structure = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device)
    if causal:
        structure &= k <= q
    if sliding_window is not None:
        distance = q - k
        structure &= (distance < sliding_window) if causal else (distance.abs() <= sliding_window)
    return attention_mask.bool()[:, None, None, :] & structure[None, None]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, hd = cfg["hidden_size"], cfg["head_dim"]
        self.num_heads, self.num_kv_heads, self.head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], hd
        bias = bool(cfg["attention_bias"])
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)

    def forward(self, x, mask4d, cos, sin):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5
        logits = logits.masked_fill(~mask4d, _MASKED_LOGIT)
        out = torch.matmul(torch.softmax(logits.float(), dim=-1).to(v.dtype), v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, f = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoeMLP(nn.Module):
    """Dense-dispatch top-k mixture of SwiGLU experts (the top-k gates renormalised to sum to 1)."""

    def __init__(self, cfg: dict):
        super().__init__()
        e, d, f = cfg["num_experts"], cfg["hidden_size"], cfg["intermediate_size"]
        self.top_k = min(int(cfg.get("num_experts_per_tok") or 2), e)
        self.router = nn.Linear(d, e, bias=False)
        self.gate_proj = nn.Parameter(torch.zeros(e, d, f))
        self.up_proj = nn.Parameter(torch.zeros(e, d, f))
        self.down_proj = nn.Parameter(torch.zeros(e, f, d))

    def forward(self, x):
        logits = self.router(x.float())
        top_logits, top_index = torch.topk(logits, self.top_k, dim=-1)
        combine = torch.zeros_like(logits).scatter(-1, top_index, torch.softmax(top_logits, dim=-1))
        gate = torch.einsum("bsd,edi->bsei", x, self.gate_proj)
        up = torch.einsum("bsd,edi->bsei", x, self.up_proj)
        expert_out = torch.einsum("bsei,eid->bsed", F.silu(gate) * up, self.down_proj)
        return torch.einsum("bsed,bse->bsd", expert_out, combine.to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.mlp = MoeMLP(cfg) if int(cfg.get("num_experts") or 0) > 0 else SwiGLU(cfg)

    def forward(self, x, mask4d, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), mask4d, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Estimator(nn.Module):
    """Decoder layers + final norm (no embedding, no LM head), like a Hugging Face ``*Model`` body."""

    def __init__(self, cfg: dict, causal: bool):
        super().__init__()
        self.cfg, self.causal = dict(cfg), bool(causal)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def forward(self, x, attention_mask):
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        freqs = positions.float()[..., None] * self.inv_freq[None, None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        mask4d = attention_mask_4d(attention_mask, self.causal, self.cfg.get("sliding_window"))
        for layer in self.layers:
            x = layer(x, mask4d, cos, sin)
        return self.norm(x)


class TorchStainedGlassTransform(nn.Module):
    """The SGT in PyTorch (inference). ``config``: the exported ``config.json`` (see ``sgt_jax.export_torch``)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        c = self.config
        self.min_scale, self.max_scale = (float(s) for s in c["scale"])
        self.directly_learn_stds = bool(c["directly_learn_stds"])
        self.shallow = float(c["shallow"])
        self.percent_to_mask = float(c["percent_to_mask"])
        self.num_masked_features = int(math.floor(self.percent_to_mask * c["hidden_size"] + 0.5))
        causal = bool(c["use_causal_mask"])
        self.mean_estimator = Estimator(c["mean_estimator"], causal)
        self.std_estimator = Estimator(c["std_estimator"], causal)
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

        mu = self.mean_head(self.mean_estimator(x, attention_mask))
        sigma = self.sigma_from_head(self.std_head(self.std_estimator(x, attention_mask)))
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
