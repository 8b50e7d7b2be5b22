"""The roofline bound (sgt_jax.training.roofline) of a plain full-parameter Llama training step against a step
time MaxText measured for the same model, per-chip batch, sequence length and slice: how far the bound sits
from reality.

The step is built here, not by the SGT trainer: ``sgt_jax.models.CausalLM`` (bf16 compute, float32 parameters,
as MaxText keeps them), next-token cross-entropy (over sequence chunks so the logits never exist whole; the
LM head a bf16 matmul, as MaxText's), AdamW over every parameter, the parameters and optimizer state sharded
over all chips (FSDP, MaxText's ``ici_fsdp_parallelism=-1``). It is compiled ahead of time for the target (no
accelerator needed) and priced.

    python benchmarks/roofline_maxtext.py --case llama2_7b_h100x8    # ~10 s of compiling
    python benchmarks/roofline_maxtext.py --case llama31_8b_v6e256   # ~5 minutes of the TPU compiler

MaxText publishes no measured figure for Llama-2-7B on a TPU slice (its v5e recipe ``llama2_7b.sh`` gives the
settings, not a result). The cases are therefore the published measurements nearest to it: Llama-2-7B itself
on one A3 node (8 x H100), and the plain dense Llama MaxText reports on a TPU slice, Llama-3.1-8B on v6e-256.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX starts a backend: the CUDA plugin needs it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sgt_jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from sgt_jax.models import CausalLM, DecoderConfig  # noqa: E402
from sgt_jax.models import attention as attention_lib  # noqa: E402
from sgt_jax.models.sharding import param_shardings, train_state_shardings  # noqa: E402
from sgt_jax.training import chips, roofline  # noqa: E402
from sgt_jax.training import compile as compile_lib  # noqa: E402

_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, num_attention_heads=32,
              num_hidden_layers=32, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu")
MODELS = {  # the models' published config.json shapes
    "llama2-7b": dict(_LLAMA, intermediate_size=11008, num_key_value_heads=32, vocab_size=32000, rope_theta=1e4,
                      max_position_embeddings=4096),
    "llama3.1-8b": dict(_LLAMA, intermediate_size=14336, num_key_value_heads=8, vocab_size=128256, rope_theta=5e5,
                        max_position_embeddings=131072,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
}
# MaxText's model FLOPs per device and step at the time of each measurement (maxtext_utils.calculate_tflops_
# training_per_device): 6 x parameters x tokens + causal attention, 12·H·L·hd·S²·B / 2.
MAXTEXT_PARAMETERS = {"llama2-7b": 6_738_415_616}
CASES = {
    "llama2_7b_h100x8": dict(
        model="llama2-7b", target="h100:1x1x8", batch_per_device=4, seq=4096, attention="cudnn",
        remat="dots_with_no_batch_dims_saveable",
        maxtext=dict(
            source="https://github.com/AI-Hypercomputer/maxtext/blob/efb6d9e4a/MaxText/configs/a3/llama_2_7b/README.md",
            settings="MaxText/configs/a3/llama_2_7b/1vm.sh at efb6d9e4a (2024-04-09): 1 node, ici_fsdp 8, "
                     "per_device_batch_size 4, max_target_length 4096, cudnn_flash_te, remat minimal_flash",
            tflops_per_device=492.0)),
    "llama31_8b_v6e256": dict(
        model="llama3.1-8b", target="v6e:16x16", batch_per_device=4, seq=8192, attention="splash", remat="full",
        maxtext=dict(
            source="https://github.com/AI-Hypercomputer/tpu-recipes/blob/main/training/trillium/"
                   "Llama3.1-8B-MaxText/v6e-256/README.md (listed in MaxText docs/reference/models/tiering.md)",
            settings="MaxText tpu-recipes-v0.1.4, llama3_1_8b_8192: v6e-256, ici_fsdp -1, per_device_batch_size 4, "
                     "max_target_length 8192, splash, remat custom with host offload of layer inputs and q/k/v/out",
            step_seconds=4.546, tokens_per_second_per_device=7207.336, tflops_per_device=417.397, mfu=0.4546)),
}


def target_devices(target: str):
    if target.startswith("h100:"):
        from jax.experimental import topologies

        config = chips.gpu_target_config(chips.CHIPS_BY_NAME["h100"])
        return list(topologies.get_topology_desc(platform="cuda", target_config=config,
                                                 topology=target.split(":")[1]).devices)
    return compile_lib.topology_devices(target)


def next_token_loss(model: CausalLM, input_ids, chunk: int = 1024):
    """Mean next-token cross-entropy, the LM head and softmax applied to ``chunk`` positions at a time (each chunk
    rematerialised in the backward pass) so the (B, S, V) logits are never whole."""
    hidden, _ = model.decoder(model.embed(input_ids), jnp.ones(input_ids.shape, jnp.int32))
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    weights = jnp.ones(input_ids.shape, jnp.float32).at[:, -1].set(0.0)
    batch, seq, width = hidden.shape
    split = lambda x: jnp.moveaxis(x.reshape(batch, seq // chunk, chunk, *x.shape[2:]), 1, 0)  # noqa: E731
    head = model.head_matrix

    @jax.checkpoint
    def chunk_sum(h, t, w):
        logits = jnp.dot(h, head).astype(jnp.float32)  # a bf16 matmul, as MaxText's (logits_dot_in_fp32=False)
        return jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(logits, t))

    total = jax.lax.map(lambda args: chunk_sum(*args), (split(hidden), split(targets), split(weights))).sum()
    return total / weights.sum()


def build(case: dict, devices):
    config = DecoderConfig.from_hf(MODELS[case["model"]])
    mesh = Mesh(np.asarray(devices, dtype=object).reshape(1, len(devices), 1), ("data", "fsdp", "tensor"))
    graphdef, params = nnx.split(nnx.eval_shape(lambda: CausalLM(
        config, dtype="bfloat16", param_dtype="float32", attention_impl=case["attention"],
        remat_policy=case["remat"], platform=devices[0].platform, rngs=nnx.Rngs(0))))
    optimizer = optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)  # MaxText's defaults
    params_sharding = param_shardings(params, mesh)
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_sharding = train_state_shardings(opt_state, mesh)

    def train_step(params, opt_state, input_ids):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), input_ids))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = NamedSharding(mesh, P(("data", "fsdp")))
    step = jax.jit(train_step, in_shardings=(params_sharding, opt_sharding, batch),
                   out_shardings=(params_sharding, opt_sharding, NamedSharding(mesh, P())), donate_argnums=(0, 1))
    ids = jax.ShapeDtypeStruct((case["batch_per_device"] * len(devices), case["seq"]), jnp.int32, sharding=batch)
    if case["attention"] == "splash":  # build the kernel's mask arrays before the mesh context (host constants)
        attention_lib._splash_kernel(case["seq"], config.num_attention_heads, True, None, False)
    return config, mesh, step, (params, opt_state, ids)


def model_flops_per_device(config: DecoderConfig, batch: int, seq: int) -> float:
    """Our convention (sgt_jax.training.compile.model_flops): 6 x matmul parameters x tokens, plus attention over
    the full S x S square, 3 passes of 4·S·H·hd per token and layer."""
    d, f, h, k, hd = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                      config.num_key_value_heads, config.head_dim)
    per_layer = d * hd * (2 * h + 2 * k) + 3 * d * f
    tokens = batch * seq
    return 6.0 * tokens * (config.num_hidden_layers * per_layer + d * config.vocab_size) + \
        3.0 * tokens * config.num_hidden_layers * 4 * seq * h * hd


def maxtext_step_seconds(case: dict, config: DecoderConfig) -> float:
    measured = case["maxtext"]
    if "step_seconds" in measured:
        return measured["step_seconds"]
    b, s = case["batch_per_device"], case["seq"]
    weights = 6 * MAXTEXT_PARAMETERS[case["model"]] * s * b
    attention = 12 * config.num_attention_heads * config.num_hidden_layers * config.head_dim * s * s * b / 2
    return (weights + attention) / (measured["tflops_per_device"] * 1e12)


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")] if info.exists() else []
    return names[0] if names else platform.machine()


def package_version(name: str):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--out", help="JSON result (default benchmarks/results/roofline_maxtext_<case>.json)")
    parser.add_argument("--hlo", help="also write the compiled program's HLO text here")
    args = parser.parse_args()
    case = CASES[args.case]
    devices = target_devices(case["target"])
    chip = chips.chip_for_device(devices[0])
    config, mesh, step, inputs = build(case, devices)
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # activations stay batch-sharded (FSDP: weights gathered, not activations reduced)
        compiled = step.lower(*inputs).compile()
    compile_seconds = time.perf_counter() - start
    if args.hlo:
        Path(args.hlo).write_text(compiled.as_text())
    bound = roofline.estimate(compiled, chip, list(mesh.devices.flat))
    tokens = case["batch_per_device"] * case["seq"]
    measured = maxtext_step_seconds(case, config)
    flops = model_flops_per_device(config, case["batch_per_device"], case["seq"])
    peak = chip.bf16_flops * bound["device_share"]
    memory = compiled.memory_analysis()
    result = {
        "case": args.case, "date": datetime.date.today().isoformat(), "machine": platform.node(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "libtpu": package_version("libtpu"),
        "jax_cuda12_plugin": package_version("jax-cuda12-plugin"),
        "target": case["target"], "chip": chip.name, "devices": len(devices), "model": case["model"],
        "batch_per_device": case["batch_per_device"], "seq": case["seq"], "attention": case["attention"],
        "remat": case["remat"], "compile_seconds": round(compile_seconds, 1),
        "temp_bytes_per_device": int(memory.temp_size_in_bytes),
        "argument_bytes_per_device": int(memory.argument_size_in_bytes),
        "roofline": bound,
        "bound_tokens_per_second_per_device": tokens / bound["bound_seconds"],
        "model_flops_per_device": flops, "bound_mfu": flops / (bound["bound_seconds"] * peak),
        "maxtext": dict(case["maxtext"], step_seconds_used=measured,
                        tokens_per_second_per_device_used=tokens / measured,
                        mfu_by_our_model_flops=flops / (measured * peak)),
        "measured_over_bound": measured / bound["bound_seconds"],
        "measured_over_no_overlap": measured / bound["no_overlap_seconds"],
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"roofline_maxtext_{args.case}.json")
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "roofline"}, indent=1, default=float))
    print(f"bound {bound['bound_seconds']:.3f} s ({bound['bound_by']}), no overlap "
          f"{bound['no_overlap_seconds']:.3f} s, MaxText measured {measured:.3f} s: "
          f"{result['measured_over_bound']:.2f}x the bound")


if __name__ == "__main__":
    main()
