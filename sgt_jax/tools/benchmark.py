"""``python -m sgt_jax.bench``: compile time, step time, tokens/s, peak memory and MFU of the SGT train step.

Random weights, no checkpoint: the base is a ``CausalLM`` of the requested shape with ``--base-layers K``
layers kept (ssl: truncated at layer K-1, as a loaded ``truncate_at_layer=K-1`` model; lm/distill: a K-layer
model with its LM head), the cloak a ``TransformerCloak`` with ``--estimator-layers E`` per estimator, the
step exactly :func:`sgt_jax.training.step.make_train_step` (scan over ``--accum`` micro-batches, AdamW).
Its settings are the schema's ``bench`` section; every ``key=value`` of the run configuration applies to the
benchmarked run (``model.dtype=float32``, ``cloak.matmul_precision=default``, ``objective.mode=lm``, ...).

MFU is the model FLOPs of :mod:`sgt_jax.tools.flops` over the step time, each part against its own dtype's
peak.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence, get_args

import grain
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from sgt_jax.config import ConfigError, SGTConfig, load_config
from sgt_jax.config.commands import RUN_FLAGS, BenchCommand, BenchShape, parse_command
from sgt_jax.models.decoder import CausalLM, DecoderConfig
from sgt_jax.training import builder
from sgt_jax.training import step as step_lib
from sgt_jax.models.hf import hf_config_dict
from sgt_jax.tools.flops import flop_model, peak_flops
from sgt_jax.training.parallel import batch_sharding, make_mesh
from sgt_jax.transform.cloak import TransformerCloak

SHAPES = {
    "tiny": dict(hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=384),
    # Llama-2-7B's proportions at 1/16 of the width (vocab/hidden kept ~8): fits a CPU.
    "small": dict(hidden=256, heads=8, kv_heads=8, intermediate=688, vocab=2048),
    "llama2-7b": dict(hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
}
assert tuple(SHAPES) == get_args(BenchShape), "bench.shape's choices are these presets"

# ------------------------------------------------------------------------------------------------ model


def decoder_config(*, hidden, heads, kv_heads, intermediate, vocab, layers, head_dim=None, max_positions=4096,
                   model_type="llama") -> DecoderConfig:
    return DecoderConfig(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim or hidden // heads, rms_norm_eps=1e-5, rope_theta=10000.0,
                         rope_scaling=None, max_position_embeddings=max_positions, sliding_window=None,
                         attention_bias=False, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------------ batch


def host_batch(batch: int, seq: int, vocab: int, *, valid: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids, left-padded to ``seq`` with ``valid`` real tokens per row (default: no padding)."""
    rng = np.random.default_rng(seed)
    valid = seq if valid is None else min(valid, seq)
    attention = np.zeros((batch, seq), np.int32)
    attention[:, seq - valid:] = 1
    return {
        "input_ids": (rng.integers(3, vocab, size=(batch, seq)) * attention).astype(np.int32),
        "attention_mask": attention,
        "noise_mask": attention.copy(),
        "loss_mask": attention.copy(),
    }


# -------------------------------------------------------------------------------------------- the bench


# The benchmark's settings: the schema's ``bench`` section (``python -m sgt_jax.bench --help`` lists them).
BenchArgs = BenchCommand


def shape_of(args: BenchArgs) -> dict[str, int]:
    """The model shape the settings ask for: the preset, then the explicit sizes over it."""
    shape = dict(SHAPES[args.shape or "tiny"])
    for key in ("hidden", "heads", "kv_heads", "intermediate", "vocab"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if args.shape is None and args.hidden is not None and args.heads is None:
        shape["heads"] = max(1, args.hidden // 64)
        shape["kv_heads"] = shape["heads"]
    if args.kv_heads is None and args.heads is not None:
        shape["kv_heads"] = args.heads
    return shape


def _memory(compiled, device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes")
        out["memory_analysis"] = {f: int(getattr(analysis, f, 0) or 0) for f in fields}
        m = out["memory_analysis"]
        out["compiled_peak_bytes"] = (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
                                      - m["alias_size_in_bytes"] + m["temp_size_in_bytes"])
        out["compiled_temp_plus_argument_bytes"] = m["argument_size_in_bytes"] + m["temp_size_in_bytes"]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator stats
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        out["peak_memory_bytes"] = int(stats["peak_bytes_in_use"])
        out["peak_memory_source"] = "device.memory_stats()['peak_bytes_in_use'] (whole process)"
    elif "compiled_peak_bytes" in out:
        out["peak_memory_bytes"] = out["compiled_peak_bytes"]
        out["peak_memory_source"] = ("compiled.memory_analysis(): argument + output - alias + temp "
                                     "(no allocator stats on this backend)")
    return out


def _loop_batches(args: BenchArgs, shape, sharding, steps: int, accum: int) -> Iterator[Mapping[str, jax.Array]]:
    """The step loop's batches, made on the host (with ``--host-delay-ms`` of simulated loader work each) and
    put on the device: ``--prefetch N > 0`` by Grain's ``device_put`` in background threads, N batches ahead
    on the host and N on the device; ``--prefetch 0`` inside the loop, between steps."""

    def host_batch_at(i: int):
        if args.host_delay_ms:
            time.sleep(args.host_delay_ms / 1000.0)  # stands in for the data loader's per-batch work
        raw = host_batch(args.batch, args.seq, shape["vocab"], valid=args.valid_tokens, seed=i)
        return step_lib.split_micro_batches(raw, accum)

    if args.prefetch > 0:
        batches = grain.MapDataset.range(steps).map(host_batch_at).to_iter_dataset()
        return iter(grain.experimental.device_put(batches, sharding, cpu_buffer_size=args.prefetch,
                                                  device_buffer_size=args.prefetch))
    return (jax.device_put(host_batch_at(i), sharding) for i in range(steps))


class _Step(NamedTuple):
    """The benchmarked train step, jitted, and what it runs on."""
    cfg: SGTConfig
    config: DecoderConfig
    jitted: Any
    state: Any
    base_state: Any
    cloak_params: Any
    batch_sharding: NamedSharding
    batch: Mapping[str, jax.Array]


def bench_config(args: BenchArgs, shape: dict[str, int], model_dir: Path, overrides: Sequence[str] = ()
                 ) -> SGTConfig:
    """The run configuration of the benchmark: the schema's defaults, the settings below, then the command
    line's run-config ``overrides`` (``model.dtype=float32``, ``objective.mode=lm``, ...), over a model directory
    holding only the ``config.json`` of the requested shape: ssl keeps ``--base-layers`` layers (truncated at
    K-1, as a loaded ``truncate_at_layer=K-1`` model), lm/distill runs a K-layer model with its LM head."""
    run = load_config(None, list(overrides))  # what the settings below depend on: the objective, accumulation
    accum = run.optimizer.grad_accum_steps
    if args.batch % accum:
        raise ConfigError(f"bench.batch={args.batch} is not a multiple of optimizer.grad_accum_steps={accum}.")
    config = decoder_config(hidden=shape["hidden"], heads=shape["heads"], kv_heads=shape["kv_heads"],
                            intermediate=shape["intermediate"], vocab=shape["vocab"],
                            layers=args.model_layers or args.base_layers, max_positions=max(4096, args.seq))
    (model_dir / "config.json").write_text(json.dumps(hf_config_dict(config)))
    truncate = args.base_layers - 1 if run.objective.mode == "ssl" else None
    return load_config(None, [
        f"model.path={model_dir}", f"model.truncate_at_layer={'null' if truncate is None else truncate}",
        f"cloak.estimator_kwargs.num_hidden_layers={args.estimator_layers}", "cloak.seed=0",
        f"data.batch_size={args.batch // accum}", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1",
        "validation.perplexity=false", "validation.generation_examples=0", *overrides])


def _build_step(args: BenchArgs, shape: dict[str, int], device: jax.Device, overrides: Sequence[str]) -> _Step:
    """Random-weight base and cloak of the requested shape, and the train step the experiment builder makes of
    them (the one training and --compile-only run)."""
    with tempfile.TemporaryDirectory(prefix="sgt_bench_") as tmp:
        cfg = bench_config(args, shape, Path(tmp), overrides)
        config = DecoderConfig.from_hf(tmp)
        mesh = make_mesh(cfg.mesh, devices=[device])
        base = CausalLM(config, dtype=cfg.model.dtype, truncate_at_layer=cfg.model.truncate_at_layer,
                        attention_impl=cfg.model.attention_impl, remat_policy=cfg.model.remat_policy,
                        rngs=nnx.Rngs(0))
        cloak = TransformerCloak.from_config(cfg.cloak, tmp, rngs=nnx.Rngs(0))
        experiment = builder.build(cfg, mesh, total_steps=1000, base=base, cloak=cloak)
    state = jax.device_put(experiment.fresh_state(jax.random.key_data(jax.random.key(0))), experiment.state_sharding)
    jitted = step_lib.jit_train_step(experiment.train_step, mesh=mesh, state_sharding=experiment.state_sharding,
                                     base_sharding=experiment.base_sharding, donate=args.donate)
    batch_in = batch_sharding(mesh, accumulated=True)
    raw = host_batch(args.batch, args.seq, shape["vocab"], valid=args.valid_tokens)
    batch = jax.device_put(step_lib.split_micro_batches(raw, cfg.optimizer.grad_accum_steps), batch_in)
    base_state = jax.device_put(experiment.base_state, experiment.base_sharding)
    return _Step(cfg, config, jitted, state, base_state, experiment.cloak_params, batch_in, batch)


def _time_steps(args: BenchArgs, compiled, state, base_state, batch):
    """Wall and process-CPU seconds of each timed step (after ``args.warmup`` untimed ones)."""
    times, cpu_times = [], []
    for i in range(args.warmup + args.steps):
        t, c = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, base_state, batch)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    return state, metrics, times, cpu_times


def _time_loop(args: BenchArgs, shape, compiled, state, base_state, batch_sharding, accum: int) -> dict[str, Any]:
    """Seconds per step of a loop fed from a host iterator, as the training loop is."""
    loop_steps = max(args.steps, 4)
    it = _loop_batches(args, shape, batch_sharding, loop_steps + 1, accum)
    state, metrics = compiled(state, base_state, next(it))  # first batch: pipeline fill, not timed
    jax.block_until_ready(state)
    t = time.perf_counter()
    for micro in it:
        state, metrics = compiled(state, base_state, micro)
        if args.sync_every_step:
            float(metrics["loss"])  # a loop that logs every step waits for it: no async-dispatch overlap
    jax.block_until_ready((state, metrics))
    loop_s = (time.perf_counter() - t) / loop_steps
    return {"prefetch": args.prefetch, "host_delay_ms": args.host_delay_ms, "steps": loop_steps,
            "sync_every_step": args.sync_every_step, "step_s": loop_s,
            "tokens_per_s": args.batch * args.seq / loop_s}


def run_bench(args: BenchArgs, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The benchmark of the settings ``args`` with the run-config ``overrides``."""
    shape = shape_of(args)
    device = jax.devices()[0]
    step = _build_step(args, shape, device, overrides)
    t0 = time.perf_counter()
    lowered = step.jitted.lower(step.state, step.base_state, step.batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    flops = flop_model(step.config, batch=args.batch, seq=args.seq, base_layers=args.base_layers,
                       estimator_layers=args.estimator_layers, objective=step.cfg.objective.mode)
    result: dict[str, Any] = {
        "bench": "sgt_train_step",
        "date": datetime.date.today().isoformat(),
        "args": dataclasses.asdict(args),
        "run": {key: functools.reduce(getattr, key.split("."), step.cfg) for key in RUN_FLAGS["bench"].values()},
        "shape": shape,
        "base_param_count": int(sum(x.size for x in jax.tree.leaves(step.base_state))),
        "cloak_param_count": int(sum(x.size for x in jax.tree.leaves(step.cloak_params))),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "flops": flops,
    }
    result.update(_memory(compiled, device))
    if args.memory_only:
        return result

    state, metrics, times, cpu_times = _time_steps(args, compiled, step.state, step.base_state, step.batch)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    valid = args.batch * min(args.valid_tokens or args.seq, args.seq)
    peaks = peak_flops(device, step.cfg.model.dtype)
    ideal_s = flops["base"] / peaks["base"] + flops["cloak"] / peaks["cloak"]
    result.update({
        "step_s_median": step_s,
        "step_s_all": times,
        # CPU seconds this process used per step (all threads): on a shared machine, less sensitive than wall
        # time to other tenants; wall ≈ cpu / cores when the process has the machine to itself.
        "step_cpu_s_median": statistics.median(cpu_times),
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "valid_tokens_per_s": valid / step_s,
        "achieved_flops_per_s": flops["total"] / step_s,
        "peak_flops": peaks,
        "mfu": ideal_s / step_s,
        "final_loss": float(metrics["loss"]),
    })
    result.update(_memory(compiled, device))  # allocator peak now includes the run
    if args.prefetch >= 0:
        result["loop"] = _time_loop(args, shape, compiled, state, step.base_state, step.batch_sharding,
                                    step.cfg.optimizer.grad_accum_steps)
    return result


def parse_args(argv=None) -> tuple[BenchArgs, list[str]]:
    """The bench's settings and the run-config overrides of a command line."""
    return parse_command("bench", sys.argv[1:] if argv is None else argv, prog="python -m sgt_jax.bench",
                         doc=__doc__)


def main(argv=None) -> dict[str, Any]:
    args, overrides = parse_args(argv)
    result = run_bench(args, overrides)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    summary = {k: result.get(k) for k in ("compile_s", "step_s_median", "tokens_per_s", "mfu", "peak_memory_bytes",
                                          "peak_memory_source", "loop")}
    print(json.dumps(summary, indent=1), file=sys.stdout)
    return result
