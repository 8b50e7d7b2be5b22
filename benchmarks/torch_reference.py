"""A PyTorch reference of the same SGT train step, and a side-by-side run against ``sgt_jax.bench``.

    python benchmarks/torch_reference.py --shape small --batch 4 --seq 128 \
        --base-layers 13 --estimator-layers 1 --dtype float32 --compare

Base: transformers ``LlamaModel`` with the K kept layers (eager attention, frozen: ``requires_grad_(False)``,
final norm replaced by Identity so its output is the raw residual stream after layer K-1, as our truncated
model's). Cloak: two fp32 ``LlamaModel`` estimators of E layers (with their final norm) + ``Linear(D, D)``
heads, dropout 0.1 on the estimator outputs, straight-through clip of sigma. Objective ssl:
(1-alpha)·weight·(1 - cos(h_k(x_t), sg(h_k(x)))) + alpha·(tvp·L_N + tsp·L_S) with the clean pass under
``no_grad``. AdamW (0.9, 0.95, eps 1e-5, lr 3e-5, decay 0.1 masked off the heads) after global-norm clipping 1.0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgt_jax.tools.benchmark import SHAPES, BenchArgs, run_bench  # noqa: E402

ALPHA, WEIGHT, TVP, TSP = 0.54, 12.0, 0.01, 0.75
MIN_SCALE, MAX_SCALE = 1e-8, 1.0


def llama_config(shape, layers):
    return transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=layers, num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=4096, rms_norm_eps=1e-5, attn_implementation="eager", tie_word_embeddings=False)


class TorchSGT(torch.nn.Module):
    def __init__(self, shape, estimator_layers):
        super().__init__()
        d = shape["hidden"]
        self.mean_estimator = transformers.LlamaModel(llama_config(shape, estimator_layers)).float()
        self.std_estimator = transformers.LlamaModel(llama_config(shape, estimator_layers)).float()
        # The estimators read embeddings: their own token tables are unused (and not trained).
        self.mean_estimator.embed_tokens = None
        self.std_estimator.embed_tokens = None
        self.mean_head = torch.nn.Linear(d, d)
        self.std_head = torch.nn.Linear(d, d)
        torch.nn.init.zeros_(self.mean_head.weight)
        torch.nn.init.zeros_(self.mean_head.bias)
        torch.nn.init.normal_(self.std_head.weight, std=1e-3 / d**0.5)
        torch.nn.init.zeros_(self.std_head.bias)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, x, attention_mask, noise_mask):
        mean_h = self.mean_estimator(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state
        std_h = self.std_estimator(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state
        mu = self.mean_head(self.dropout(mean_h))
        head = self.std_head(self.dropout(std_h))
        sigma = head + (head.clamp(MIN_SCALE, MAX_SCALE) - head).detach()  # straight-through clip
        selected = (noise_mask.bool() & attention_mask.bool())[..., None]
        x_t = torch.where(selected, x + mu + sigma * torch.randn_like(x), x)
        return x_t, sigma


def masked_mean(values, mask):
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def build(shape, base_layers, estimator_layers, dtype):
    base = transformers.LlamaModel(llama_config(shape, base_layers)).to(getattr(torch, dtype)).eval()
    base.norm = torch.nn.Identity()  # the truncated model's output: the residual stream after layer K-1
    base.requires_grad_(False)
    cloak = TorchSGT(shape, estimator_layers).train()
    heads = [p for n, p in cloak.named_parameters() if n.startswith(("mean_head", "std_head"))]
    rest = [p for n, p in cloak.named_parameters() if not n.startswith(("mean_head", "std_head"))]
    optimizer = torch.optim.AdamW([{"params": rest, "weight_decay": 0.1}, {"params": heads, "weight_decay": 0.0}],
                                  lr=3e-5, betas=(0.9, 0.95), eps=1e-5)
    return base, cloak, optimizer


def train_step(base, cloak, optimizer, batch):
    ids, attention, noise = batch["input_ids"], batch["attention_mask"], batch["noise_mask"]
    with torch.no_grad():
        x_base = base.embed_tokens(ids)
        clean = base(inputs_embeds=x_base, attention_mask=attention).last_hidden_state.float()
    x = x_base.float()
    x_t, sigma = cloak(x, attention, noise)
    hidden_t = base(inputs_embeds=x_t.to(x_base.dtype), attention_mask=attention).last_hidden_state.float()
    valid = attention.bool()
    transformed = valid & noise.bool()
    utility = masked_mean(1 - torch.nn.functional.cosine_similarity(hidden_t, clean, dim=-1, eps=1e-8), valid)
    element_mask = transformed[..., None].expand_as(sigma)
    stochasticity = masked_mean(-torch.log(sigma / MAX_SCALE), element_mask)
    similarity = masked_mean(torch.nn.functional.cosine_similarity(x, x_t, dim=-1, eps=1e-8).abs(), transformed)
    loss = (1 - ALPHA) * WEIGHT * utility + ALPHA * (TVP * stochasticity + TSP * similarity)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(cloak.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def run_torch(shape, *, batch, seq, base_layers, estimator_layers, dtype, steps, warmup):
    torch.manual_seed(0)
    base, cloak, optimizer = build(shape, base_layers, estimator_layers, dtype)
    ids = torch.randint(3, shape["vocab"], (batch, seq))
    ones = torch.ones(batch, seq, dtype=torch.long)
    data = {"input_ids": ids, "attention_mask": ones, "noise_mask": ones}
    times, cpu_times = [], []
    for i in range(warmup + steps):
        t, c = time.perf_counter(), time.process_time()
        loss = train_step(base, cloak, optimizer, data)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    step_s = statistics.median(times)
    return {"step_s_median": step_s, "step_s_all": times, "step_cpu_s_median": statistics.median(cpu_times), "tokens_per_s": batch * seq / step_s, "final_loss": loss,
            "torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--base-layers", type=int, default=13)
    p.add_argument("--estimator-layers", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads (0: torch's default). On a loaded machine OpenMP's spinning threads "
                        "collapse (50 s/step at 2 threads with load 9 vs 1.9 s at 1): time both")
    p.add_argument("--compare", action="store_true", help="also run sgt_jax.bench at the same shape")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    shape = dict(SHAPES[a.shape])
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    result = {"shape": shape, "args": vars(a)}
    result["torch"] = run_torch(shape, batch=a.batch, seq=a.seq, base_layers=a.base_layers,
                                estimator_layers=a.estimator_layers, dtype=a.dtype, steps=a.steps, warmup=a.warmup)
    print(f"pytorch: {result['torch']['tokens_per_s']:.1f} tokens/s ({result['torch']['step_s_median'] * 1e3:.1f} ms/step, "
          f"{result['torch']['step_cpu_s_median'] * 1e3:.0f} CPU-ms, {result['torch']['torch_threads']} threads)")
    if a.compare:
        ours = run_bench(BenchArgs(batch=a.batch, seq=a.seq, base_layers=a.base_layers,
                                   estimator_layers=a.estimator_layers, shape=a.shape, steps=a.steps, warmup=a.warmup),
                         [f"model.dtype={a.dtype}", f"model.remat_policy={a.remat}"])
        result["sgt_jax"] = {k: ours[k] for k in ("step_s_median", "step_s_all", "step_cpu_s_median", "tokens_per_s",
                                                   "compile_s", "mfu", "final_loss", "load_average")}
        result["ratio_ours_over_torch"] = ours["tokens_per_s"] / result["torch"]["tokens_per_s"]
        # Tokens per CPU-second: what a loaded, shared machine can still compare fairly.
        result["cpu_ratio_ours_over_torch"] = result["torch"]["step_cpu_s_median"] / ours["step_cpu_s_median"]
        print(f"sgt_jax: {ours['tokens_per_s']:.1f} tokens/s ({ours['step_s_median'] * 1e3:.1f} ms/step, "
              f"{ours['step_cpu_s_median'] * 1e3:.0f} CPU-ms); ours/PyTorch = {result['ratio_ours_over_torch']:.2f}x "
              f"wall, {result['cpu_ratio_ours_over_torch']:.2f}x per CPU-second")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
