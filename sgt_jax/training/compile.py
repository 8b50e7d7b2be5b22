"""Ahead-of-time compilation of the real train and eval steps for a TPU slice or GPU nodes, on any machine
(``--compile-only``).

JAX can compile for a TPU topology without TPUs (with ``libtpu`` installed: the ``tpu`` extra), and for NVIDIA
GPUs without a GPU (with the CUDA plugin and cuDNN installed: the ``gpu`` extra; the GPU is described to XLA's
compiler by :func:`sgt_jax.training.chips.gpu_target_config`). The local backend becomes the CPU, the mesh is
built over the topology's devices, every input is a ``jax.ShapeDtypeStruct`` carrying its ``NamedSharding``,
and ``.lower(...).compile()`` runs the TPU or GPU compiler, the attention kernels (splash, cuDNN) included.
Nothing is allocated and no weight is read: the models are built from ``config.json`` with
``nnx.eval_shape``. The compiled executables' memory analysis says whether a configuration fits the chips
before a slice or node is rented (the check MaxText's ``train_compile.py`` makes); XLA's GPU compiler
compiles a program over its memory without complaint, so the fit is always judged from that analysis.
:mod:`sgt_jax.training.roofline` estimates, from the compiled program, a lower bound on its step time, the
tokens/s and the MFU it allows.

Without ``--topology`` the steps are compiled for the local backend, which works anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.config import ConfigError, SGTConfig
from sgt_jax.data.batching import BATCH_KEYS
from sgt_jax.training import chips, roofline
from sgt_jax.training import hlo as hlo_lib
from sgt_jax.training import builder, parallel
from sgt_jax.training.topology import chip_spec, topology_devices, topology_platform

log = logging.getLogger("sgt_jax.training.compile")

GiB = 1 << 30
# Head-room kept free of the compiler's estimate (fragmentation, the runtime's own buffers, host transfers).
HBM_MARGIN = 0.10
FIT_EXIT_CODE = 3


class CompileFitError(Exception):
    """The configuration does not fit the chips' memory; the one-line message gives the bytes."""


def abstract_batch(cfg: SGTConfig, mesh, accum_steps: int, seq_len: int):
    # data.batch_size is the global micro-batch: a training batch holds grad_accum_steps of them (as the data
    # pipeline builds it), a validation batch one.
    rows = cfg.data.batch_size
    if rows % parallel.batch_shards(mesh):
        raise ConfigError(f"data.batch_size={rows} does not split over the {parallel.batch_shards(mesh)} data x fsdp "
                          f"devices; make it a multiple of {parallel.batch_shards(mesh)}.")
    shape = (accum_steps, rows) if accum_steps else (rows,)
    sharding = parallel.batch_sharding(mesh, accumulated=bool(accum_steps))
    batch = {key: jax.ShapeDtypeStruct(shape + (seq_len,), jnp.int32, sharding=sharding) for key in BATCH_KEYS}
    batch["example_index"] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
    return batch


def _compile(jitted, *args):
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as exc:  # noqa: BLE001 - the TPU compiler refuses a program that cannot fit its HBM
        message = str(exc)
        if "Couldn't find output tile sizes" in message:  # XLA's GPU compiler, on a batch far beyond any GPU
            raise CompileFitError("does not fit: the GPU compiler cannot even tile a matmul of this size; lower "
                                  "data.batch_size or data.max_length.") from None
        if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
            raise
        used = re.search(r"Used ([\d.]+[KMGT]?i?B?) of ([\d.]+[KMGT]?i?B?) hbm", message)
        detail = f"{used.group(1)} needed, {used.group(2)} of HBM available" if used else message.splitlines()[0][:200]
        raise CompileFitError(f"does not fit: the TPU compiler ran out of memory ({detail}); lower data.batch_size, "
                              "raise optimizer.grad_accum_steps or mesh.fsdp, or set model.remat_policy=full.")
    return compiled, time.perf_counter() - start


def compile_steps(cfg: SGTConfig, devices, *, with_eval: bool = True) -> dict[str, Any]:
    """Lower and compile the train step and the eval step of the experiment ``cfg`` describes, built by the same
    builder as a training run (:func:`sgt_jax.training.builder.build`), over abstract inputs; returns the
    executables and the pieces the report needs."""
    mesh = parallel.make_mesh(cfg.mesh, devices=devices)
    steps = int(cfg.train.max_steps or 1000)  # the schedule is baked into the step; its length changes nothing
    experiment = builder.build(cfg, mesh, total_steps=steps, platform=devices[0].platform)
    state = experiment.abstract_state(jax.random.key_data(jax.random.key(0)))
    seq_len = step_seq_len(cfg)
    train_batch = abstract_batch(cfg, mesh, cfg.optimizer.grad_accum_steps, seq_len)
    train, train_s = _compile(experiment.jit_train_step(), state, experiment.base_state, train_batch)
    full_state = None  # what validation's eval step reads for perplexity (Validator.full_model_on_devices)
    if cfg.validation.perplexity:
        full_state = experiment.base_state if experiment.truncate_at_layer is None else builder.abstract_model(
            cfg, experiment.model_config, mesh, truncate_at_layer=None, platform=devices[0].platform)[1]
    result = dict(mesh=mesh, config=experiment.model_config, truncate_at_layer=experiment.truncate_at_layer,
                  train=train, train_seconds=train_s, eval=None, eval_seconds=0.0, seq_len=seq_len, state=state,
                  base_state=experiment.base_state,
                  full_state=full_state if experiment.truncate_at_layer is not None else None)
    if with_eval:
        eval_batch = abstract_batch(cfg, mesh, 0, seq_len)
        key = jax.ShapeDtypeStruct(jax.random.key(0).shape, jax.random.key(0).dtype)
        with jax.set_mesh(mesh):  # as the Trainer validates: activations stay batch-sharded (FSDP, not TP)
            result["eval"], result["eval_seconds"] = _compile(experiment.jit_eval_step(), state.params,
                                                              experiment.base_state, full_state, eval_batch, key)
    return result


def step_seq_len(cfg: SGTConfig) -> int:
    """The sequence length a configuration's steps are compiled for: its longest bucket (or max_length)."""
    return min(max(cfg.data.buckets), cfg.data.max_length) if cfg.data.buckets else cfg.data.max_length


def needed_bytes(result) -> int:
    """Per-device bytes a configuration needs: the train step, or a validation — the eval step next to the
    optimizer state, which is no argument of it. The full model that validation uses waits in host memory
    while training (``Validator.full_model_on_devices``): it is an argument of the eval step only."""
    train = memory(result["train"])["total"]
    if result["eval"] is None:
        return train
    return max(train, memory(result["eval"])["total"] + tree_bytes(result["state"].opt_state))


def tree_bytes(tree) -> int:
    """Per-device bytes of an abstract, sharded tree (the largest shard of each leaf)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shard, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
    return total


def memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
           "code": int(m.generated_code_size_in_bytes)}
    # Donated (aliased) outputs reuse their argument's buffer.
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    return out


def _decoder_params(config, layers: int) -> int:
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    attention = d * hd * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    mlp = 3 * d * f * max(1, config.num_experts_per_tok if config.num_experts else 1)
    return layers * (attention + mlp)


def model_flops(cfg: SGTConfig, config, truncate_at_layer, seq_len: int) -> float:
    """Matmul FLOPs of one optimizer step (the 6·N·T convention plus attention scores): the cloak's two
    estimators and heads train (forward + backward = 3 passes); the frozen base runs forward on the clean and
    on the transformed input and backward to its input only (no weight gradients): 3 passes."""
    tokens = cfg.data.batch_size * max(cfg.optimizer.grad_accum_steps, 1) * seq_len
    base_layers = config.num_hidden_layers if truncate_at_layer is None else truncate_at_layer + 1
    cloak_layers = int((cfg.cloak.estimator_kwargs or {}).get("num_hidden_layers", 1))
    d, heads, hd = config.hidden_size, config.num_attention_heads, config.head_dim
    attention_per_layer = 4 * seq_len * heads * hd  # QK^T and AV, per token, forward
    base = 3 * tokens * (2 * _decoder_params(config, base_layers) + base_layers * attention_per_layer)
    cloak = 3 * tokens * 2 * (2 * _decoder_params(config, cloak_layers) + 2 * d * d + cloak_layers * attention_per_layer)
    if cfg.objective.mode != "ssl":
        base += 3 * tokens * 2 * d * config.vocab_size
    return float(base + cloak)


def chip_of(devices) -> Optional[chips.Chip]:
    """The chip table's entry for these devices, or None (a CPU, or a device the table does not know)."""
    try:
        return chips.chip_for_device(devices[0])
    except chips.UnknownChipError:
        return None


def step_report(compiled, seconds: float, *, chip: Optional[chips.Chip], devices) -> dict[str, Any]:
    """Memory, collectives and the roofline estimate (:mod:`sgt_jax.training.roofline`) of one compiled step;
    ``devices`` in the program's device order (the mesh's), ``chip`` None for counts without times."""
    comms = hlo_lib.collectives(compiled.as_text())
    return {"compile_seconds": round(seconds, 1), "memory": memory(compiled),
            "roofline": _roofline(compiled, chip, devices),
            "collectives": comms, "collectives_in_loops": sum(c["in_loop"] for c in comms)}


def _roofline(compiled, chip, devices) -> dict[str, Any]:
    try:
        return roofline.estimate(compiled, chip, devices)
    except Exception as exc:  # noqa: BLE001 - a program the estimate cannot read must not cost the memory report
        log.warning("no roofline estimate for this program (%s: %s)", type(exc).__name__, exc)
        return {"estimate": True, "error": f"{type(exc).__name__}: {exc}"[:300]}


def build_report(cfg: SGTConfig, topology: Optional[str], devices, result) -> dict[str, Any]:
    mesh = result["mesh"]
    hbm, _ = chip_spec(devices)
    chip, order = chip_of(devices), list(mesh.devices.flat)
    train = step_report(result["train"], result["train_seconds"], chip=chip, devices=order)
    evaluate = step_report(result["eval"], result["eval_seconds"], chip=chip, devices=order) \
        if result["eval"] is not None else None
    full_bytes = tree_bytes(result["full_state"]) if result["full_state"] is not None else 0
    needed = needed_bytes(result)
    flops = model_flops(cfg, result["config"], result["truncate_at_layer"], result["seq_len"])
    tokens = cfg.data.batch_size * max(cfg.optimizer.grad_accum_steps, 1) * result["seq_len"]
    return {
        "topology": topology or f"local {devices[0].platform}", "chip": devices[0].device_kind,
        "devices": len(devices), "mesh": dict(mesh.shape), "seq_len": result["seq_len"],
        "batch_size": cfg.data.batch_size, "grad_accum_steps": cfg.optimizer.grad_accum_steps,
        "hbm_bytes_per_device": hbm, "margin": HBM_MARGIN, "needed_bytes_per_device": needed,
        "fits": needed <= (1 - HBM_MARGIN) * hbm,
        "base_argument_bytes_per_device": tree_bytes(result["base_state"]),
        "state_argument_bytes_per_device": tree_bytes(result["state"]),
        "full_model_host_bytes_per_device": full_bytes,
        "model_flops_per_step": flops, "tokens_per_step": tokens,
        **roofline.step_figures(train["roofline"], tokens_per_step=tokens, model_flops=flops, chip=chip,
                                num_devices=len(devices)),
        "train_step": train, "eval_step": evaluate,
    }


def _gib(n) -> str:
    return f"{n / GiB:8.2f} GiB"


def format_table(report: dict[str, Any]) -> str:
    rows = [f"compiled for {report['topology']} ({report['devices']} x {report['chip']}), mesh {report['mesh']}, "
            f"batch {report['batch_size']} x seq {report['seq_len']}, accum {report['grad_accum_steps']}",
            f"{'per device':<14}{'arguments':>13}{'outputs':>13}{'temporaries':>13}{'total':>13}{'compile s':>11}"]
    for name in ("train_step", "eval_step"):
        if report[name] is None:
            continue
        m, s = report[name]["memory"], report[name]
        rows.append(f"{name:<14}{_gib(m['arguments']):>13}{_gib(m['outputs']):>13}{_gib(m['temporaries']):>13}"
                    f"{_gib(m['total']):>13}{s['compile_seconds']:>11}")
    verdict = "fits" if report["fits"] else "does NOT fit"
    rows.append(f"needed {_gib(report['needed_bytes_per_device']).strip()} of {_gib(report['hbm_bytes_per_device']).strip()}"
                f" per device (keeping {report['margin']:.0%} free): {verdict}")
    rows.append(f"model FLOPs/step {report['model_flops_per_step']:.3e}, tokens/step {report['tokens_per_step']:,}")
    rows += _roofline_rows(report)
    rows.append("collectives (train step): op, operand bytes, result bytes, in loop body")
    for c in report["train_step"]["collectives"]:
        rows.append(f"  {c['op']:<18}{c['operand_bytes']:>14,}{c['result_bytes']:>14,}  {'loop' if c['in_loop'] else '-'}"
                    f"  {c['source'][-70:]}")
    return "\n".join(rows)


def _roofline_rows(report: dict[str, Any]) -> list[str]:
    """The roofline estimate of each step: a lower bound on its time, not a measurement."""
    rows = [f"roofline per device ({report['train_step']['roofline'].get('chip') or 'no chip figures: counts only'}; "
            "an estimate, the step's lower bound, not a measurement):",
            f"{'':<14}{'low-prec FLOP':>14}{'f32 FLOP':>11}{'HBM GB':>9}{'coll. GB':>9}{'compute s':>11}{'HBM s':>9}"
            f"{'coll. s':>9}{'bound s':>9}{'sum s':>9}"]
    for name in ("train_step", "eval_step"):
        if report[name] is None:
            continue
        r = report[name]["roofline"]
        if "error" in r:
            rows.append(f"{name:<14}n/a: the estimate could not read this program ({r['error'][:80]})")
            continue
        wire = sum(c["wire_bytes"] for c in r["collectives"].values())
        times = "".join(f"{r[k]:>9.4f}" if k in r else f"{'n/a':>9}" for k in
                        ("t_compute_seconds", "t_hbm_seconds", "t_collectives_seconds", "bound_seconds",
                         "no_overlap_seconds"))
        rows.append(f"{name:<14}{r['flops']['low_precision']:>14.3e}{r['flops']['float32']:>11.3e}"
                    f"{r['hbm_bytes'] / 1e9:>9.2f}{wire / 1e9:>9.2f}  {times}")
    step, mfu = report["roofline_step_seconds"], report["roofline_mfu"]
    rows.append("train step at the bound: " + (f"{step:.4f} s, {report['roofline_tokens_per_second']:,.0f} tokens/s, "
                                               f"MFU {mfu:.1%} (estimates)" if step else "n/a"))
    return rows


# The largest number of tokens per chip a configuration fits (--compile-only --max-tokens).
#
# A train step's memory grows with the rows of the micro-batch, close to linearly (XLA reuses more buffers at
# large batches, so a line through small batches over-predicts). The search compiles the configuration's own
# rows per device r0 and 2 r0 (train step only), then proposes the rows where the line through the two latest
# points meets the budget (HBM less the margin; at most 8x the largest tried) and, once a proposal has not
# fitted, the middle of the gap. It compiles both steps at each proposal and keeps the largest row count that
# fitted and the smallest that did not, until they are within 5% (or one row) of each other or four proposals
# are spent. The answer is rows per device per micro-batch at the configuration's sequence length: tokens per
# chip are ``rows * seq_len`` (gradient accumulation multiplies an optimizer step's tokens, not its memory).


def _needed(cfg: SGTConfig, devices, rows: int, shards: int, *, with_eval: bool) -> float:
    """Bytes per device at ``rows`` rows per device; infinite when the compiler gives up on the size (XLA's
    GPU compiler can fail to tile an enormous batch instead of reporting its memory)."""
    data = dataclasses.replace(cfg.data, batch_size=rows * shards)
    try:
        result = compile_steps(dataclasses.replace(cfg, data=data), devices, with_eval=with_eval)
    except (CompileFitError, jax.errors.JaxRuntimeError) as exc:
        log.info("%d rows per device do not compile: %s", rows, str(exc).strip().splitlines()[0][:160])
        return float("inf")
    return needed_bytes(result)


def largest_fitting_rows(cfg: SGTConfig, devices, *, max_checks: int = 4, first=None) -> dict[str, Any]:
    """Rows per device per micro-batch (and tokens per device) that fit, searched as the comment above says;
    ``rows_per_device`` is 0 when not even one row fits or no compile confirmed one. ``first``: the
    configuration's own :func:`compile_steps` result, reused for the first point."""
    mesh = parallel.make_mesh(cfg.mesh, devices=devices)
    shards = parallel.batch_shards(mesh)
    budget = (1 - HBM_MARGIN) * chip_spec(devices)[0]
    r0 = max(1, cfg.data.batch_size // shards)
    m0 = memory(first["train"])["total"] if first is not None and cfg.data.batch_size == r0 * shards else \
        _needed(cfg, devices, r0, shards, with_eval=False)
    points = [(r0, m0), (2 * r0, _needed(cfg, devices, 2 * r0, shards, with_eval=False))]
    fits, fails = 0, next((r for r, m in points if m > budget), None)
    for _ in range(max_checks if fails is None else 0):  # the configuration's own rows already too many: no line
        (ra, ma), (rb, mb) = points[-2:]
        slope = max((mb - ma) / (rb - ra), 1.0) if rb != ra else max(mb / rb, 1.0)
        # The line through the two latest points (growing at most 8-fold a step: a flat start says little) until
        # a compile has not fitted; then halve the gap.
        rows = min(int(rb + (budget - mb) // slope), 8 * max(r for r, _ in points)) if fails is None \
            else (fits + fails) // 2
        rows = max(fits + 1, rows)
        if fails is not None and rows >= fails:
            break
        needed = _needed(cfg, devices, rows, shards, with_eval=True)
        log.info("%d rows per device need %.2f GiB of %.2f GiB", rows, needed / 2**30, budget / 2**30)
        points.append((rows, needed))
        if needed <= budget:
            fits = rows
        else:
            fails = rows
        if fails is not None and fails - fits <= max(1, fits // 20):
            break
    (ra, ma), (rb, mb) = points[:2]
    seq_len = step_seq_len(cfg)
    per_row = (mb - ma) / (rb - ra)
    return {"rows_per_device": fits, "tokens_per_device": fits * seq_len, "seq_len": seq_len,
            "first_row_fails": fails, "bytes_per_row": int(per_row) if np.isfinite(per_row) else None,
            "budget_bytes": int(budget), "compiles": len(points)}


def compile_only(cfg: SGTConfig, *, topology: Optional[str] = None, report_path: Optional[str] = None,
                 max_tokens: int = 0) -> int:
    """The ``--compile-only`` entry point: compile, print the table and the JSON report, and return 0 when the
    configuration fits (raises :class:`CompileFitError` otherwise). ``max_tokens``: also find the largest number
    of tokens per device that fits (:func:`largest_fitting_rows` with that many proposals, each a compile)."""
    devices = topology_devices(topology)
    result = compile_steps(cfg, devices)
    report = build_report(cfg, topology, devices, result)
    if max_tokens:
        report["capacity"] = largest_fitting_rows(cfg, devices, max_checks=max_tokens, first=result)
    text = json.dumps(report, indent=1, default=str)
    if report_path:
        Path(report_path).write_text(text)
    print(format_table(report), flush=True)
    if max_tokens:
        cap = report["capacity"]
        print(f"largest micro-batch that fits: {cap['rows_per_device']} rows x {cap['seq_len']} tokens = "
              f"{cap['tokens_per_device']:,} tokens per device ({cap['compiles']} compiles; "
              f"{(cap['bytes_per_row'] or 0) / GiB:.2f} GiB per row at small batches)", flush=True)
    print(text, flush=True)
    if not report["fits"]:
        raise CompileFitError(
            f"does not fit: {report['needed_bytes_per_device']:,} bytes per device needed, "
            f"{int((1 - HBM_MARGIN) * report['hbm_bytes_per_device']):,} available on {report['chip']} "
            f"({report['hbm_bytes_per_device']:,} HBM less {HBM_MARGIN:.0%}); lower data.batch_size, raise "
            "optimizer.grad_accum_steps or mesh.fsdp, or set model.remat_policy=full.")
    return 0


__all__ = ["CompileFitError", "FIT_EXIT_CODE", "HBM_MARGIN", "build_report", "chip_of", "compile_only",
           "chip_spec", "compile_steps", "format_table", "largest_fitting_rows", "model_flops", "needed_bytes",
           "step_report", "step_seq_len", "topology_devices", "topology_platform",
           "tree_bytes"]
