"""A roofline estimate of one step of a compiled program, per device: the least time its matmul FLOPs, its HBM
traffic and its collectives could take on a chip of :mod:`sgt_jax.training.chips`. Every figure is an
*estimate* from the optimized HLO, never a measurement.

XLA's own ``cost_analysis()`` cannot price our steps: on a TPU it counts a ``while`` body once (the step is a
scan over micro-batches around a scan over layers) and on a GPU it is not implemented. This module walks the
compiled module itself (``compiled.runtime_executable().hlo_modules()``, the module's computations and their
instructions; shapes and attributes are read from each instruction's text) and counts:

**FLOPs** of every ``dot`` and ``convolution``, inside fusions too, and of cuBLAS GEMM calls (their
``dot_dimension_numbers``): a dot is 2 x (result elements) x (contracted size); a convolution 2 x (result
elements) x (kernel elements / kernel output features). Each is priced at one of two rates:

- *low precision* at ``chip.bf16_flops``: bf16 / f16 / f8 / integer operands, and float32 operands at the default
  precision on a TPU (XLA runs them as one bfloat16 pass of the MXU);
- *float32* at ``chip.f32_flops``: float32 operands with ``operand_precision`` HIGH or HIGHEST on a TPU (3 or 6
  bfloat16 passes; both are priced as HIGHEST), and any float32 operands on a GPU (the table prices plain FP32,
  not TF32).

Attention kernels carry no dot, so their FLOPs come from their operands, with B x H x Sq x Sk x D the
batch, query heads, query and key lengths and head size, and one "product" 2·B·H·Sq·Sk·D (the score matrix
Q·Kᵀ, or P·V). A forward pass is two products, **4·B·H·Sq·Sk·D**; a fused backward is five (QKᵀ recomputed,
dP, dV, dQ, dK), the usual **2.5x the forward**. Masked (causal) blocks are counted, as the model FLOPs count
them. Identified by name:

- TPU Mosaic calls (``tpu_custom_call``) whose name says ``splash``/``flash``/``mha``/``mqa``/``attention``: q and k
  are the first two floating-point operands of rank 4, laid out (B, H, S, D), or of rank 3, (H, S, D), where
  the compiler dropped a batch of one. Splash splits its backward in two
  kernels: ``dkv`` recomputes QKᵀ and dP and forms dV and dK (4 products), ``dq`` recomputes QKᵀ and dP and
  forms dQ (3 products); a kernel named ``bwd``/``backward`` is a fused backward (5); anything else a forward (2).
- cuDNN flash attention (``__cudnn$fmha...``): B·H·Sq·Sk from the call's ``intermediate_tensor_shape``, D the
  last dimension of q (operand 0); a target ending in ``Backward`` is the backward (5 products), else forward (2).

Other opaque kernels count no FLOPs and are listed in ``opaque_kernels``.

**HBM bytes**: operand + result bytes of every top-level instruction that touches memory (the usual roofline
convention; XLA's "bytes accessed"), i.e. of every instruction of the entry computation and of the loop
bodies, conditional branches and called computations it runs, but not inside a fusion: a fusion moves its
operands and results only. Skipped: instructions that move nothing (parameter, constant, tuple,
get-tuple-element, bitcast, partition/replica id, control flow itself, ...); arrays in another memory space
than the default (``S(1)``, a TPU's on-chip VMEM; host memory). An async pair counts once: the ``-start`` reads
its operands, the ``-done`` writes its result. A slice (dynamic-slice, slice, gather) reads and writes the
slice only, also where a fusion slices an operand, through bitcasts and nested fusions (a scanned layer's
weights or saved activations out of the stacked ones); a
dynamic-update-slice, top-level or as a fusion's root, reads and writes the update only (in place).

**Collectives** (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute, collective-broadcast;
also inside fusions and async wrappers; copies of one collective that XLA's async collective fusion leaves in
several fusions of one computation count once, by channel; an all-reduce fused with the slicing of each
device's 1/n, the TPU compiler's reduce-scatter fusion, is a reduce-scatter). For a group of n devices and a
buffer of B bytes (all-gather: its result; the others: their operand), the ring algorithms move, per device,

    all-gather, reduce-scatter, all-to-all: (n - 1) / n x B;   all-reduce: 2 (n - 1) / n x B;
    collective-permute, collective-broadcast: B

(groups in a spelling not read here: the size from the buffer sizes, or all devices; counted in
``collective_groups_guessed``) at ``chip.ici_bandwidth`` (one ring's bandwidth per chip and direction), or at
``chip.dcn_bandwidth`` when the group spans hosts: devices of different processes on GPUs, of different slices
on TPUs (inside a slice every TPU chip is on the ICI torus). A TPU entry has no DCN figure: groups across slices are then priced at ICI and
flagged (``dcn_not_modelled``).

**Loops**: a ``while`` counts its body and condition ``known_trip_count`` times (its backend config; nested loops
multiply). Where the compiler dropped it (the TPU compiler does), the trip count is read from the loop's
condition: ``i < N`` (or ``N > i``) on a tuple element whose initial value is a constant c gives N - c
iterations of step 1, the form ``lax.scan`` and ``fori_loop`` lower to. A loop neither gives is counted once
and reported in ``loops_without_trip_count`` (the estimate is then low).
**Conditionals** count the branch with the longest estimated time (its no-overlap sum; the most FLOPs without
a chip), so a step that sometimes does more work is priced at its larger form.

The figures per step and device: t_compute = Σ flops(class) / rate(class); t_hbm = bytes / HBM bandwidth;
t_collectives = Σ wire bytes / link bandwidth; the **bound** max(t_compute, t_hbm, t_collectives) (everything
overlaps perfectly) and the no-overlap sum. Where a device is one TensorCore of a two-core chip (v4 / v5p without
megacore), it gets half the chip's rates.

Where it is optimistic: peak rates are never reached (MFU above ~60% is rare); perfect overlap; every dot at
full MXU / tensor-core efficiency (small or oddly shaped matmuls are not); elementwise work, transposes and
VMEM / L2 reuse inside a fusion are free. Where it is pessimistic: a collective over several torus axes is
priced at one ring's bandwidth, masked attention blocks a kernel skips are counted, HIGH precision is priced
as HIGHEST.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any, Optional, Sequence

import numpy as np

from sgt_jax.training import hlo
from sgt_jax.training.chips import Chip

LOW, F32 = "low_precision", "float32"

# Instructions that move no data themselves (control flow is priced through the computations it runs).
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "add-dependency",
               "partition-id", "replica-id", "opt-barrier", "domain", "while", "conditional", "call",
               "async-update", "get-dimension-size"}
# Custom calls that are compiler bookkeeping, not kernels.
_NO_TRAFFIC_TARGETS = {"AllocateBuffer", "AssumeGatherIndicesInBound", "AsyncCollectiveStart",
                       "AsyncCollectiveDone", "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
_SLICES = {"dynamic-slice", "slice", "gather"}
# Per-device wire bytes as a multiple of the buffer, for a group of n (ring algorithms).
_RING = {"all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
         "all-reduce": lambda n: 2 * (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
         "ragged-all-to-all": lambda n: (n - 1) / n, "collective-permute": lambda n: 1.0,
         "collective-broadcast": lambda n: 1.0}
_ATTENTION = re.compile(r"splash|flash|mha|mqa|attention", re.I)


@dataclasses.dataclass
class _Totals:
    """What one run of a computation costs; loops scale it, sequences add it."""

    flops: Counter = dataclasses.field(default_factory=Counter)  # by rate class
    attention_flops: float = 0.0
    hbm_bytes: float = 0.0
    # kind -> {"count", "bytes", "wire_ici", "wire_dcn"}
    collectives: dict = dataclasses.field(default_factory=dict)
    loops_without_trip_count: int = 0
    groups_guessed: int = 0  # collectives whose replica groups were in a spelling not read
    dcn_not_modelled: bool = False
    opaque_kernels: Counter = dataclasses.field(default_factory=Counter)

    def add(self, other: "_Totals", times: float = 1.0) -> None:
        for key, value in other.flops.items():
            self.flops[key] += times * value
        self.attention_flops += times * other.attention_flops
        self.hbm_bytes += times * other.hbm_bytes
        for kind, entry in other.collectives.items():
            mine = self.collectives.setdefault(kind, dict.fromkeys(entry, 0.0))
            for key, value in entry.items():
                mine[key] += times * value
        self.loops_without_trip_count += other.loops_without_trip_count
        self.groups_guessed += other.groups_guessed
        self.dcn_not_modelled |= other.dcn_not_modelled
        self.opaque_kernels.update({k: v * times for k, v in other.opaque_kernels.items()})


class _Estimator:
    def __init__(self, module: hlo.CompiledModule, platform: str, chip: Optional[Chip], domains: Sequence):
        self.module, self.platform, self.chip, self.domains = module, platform, chip, list(domains)
        self.memo: dict[str, _Totals] = {}

    # -- control flow ---------------------------------------------------------------------------------------------
    def run(self, computation: str) -> _Totals:
        """Cost of one run of a computation whose instructions execute (entry, loop body, branch, called)."""
        if computation in self.memo:
            return self.memo[computation]
        totals, seen = _Totals(), set()
        for instruction in self.module.computations[computation]:
            if instruction.opcode == "while":
                self._loop(instruction, totals)
            elif instruction.opcode == "conditional":
                branches = [self.run(name) for name in hlo.called_computations(instruction.text)]
                totals.add(max(branches, key=self._branch_weight))
            elif instruction.opcode == "call":
                totals.add(self.run(instruction.attribute("to_apply")))
            else:
                self._inside(instruction, totals, seen)
                totals.hbm_bytes += self._traffic(instruction)
        self.memo[computation] = totals
        return totals

    def _loop(self, instruction: hlo.Instruction, totals: _Totals) -> None:
        trips = self._trip_count(instruction)
        if trips is None:
            totals.loops_without_trip_count += 1
        for key in ("body", "condition"):
            totals.add(self.run(instruction.attribute(key)), trips or 1)

    def _trip_count(self, loop: hlo.Instruction) -> Optional[int]:
        known = loop.backend_config().get("known_trip_count", {}).get("n")
        if known is not None:
            return int(known)
        compare = self.module.root(loop.attribute("condition"))
        if compare.opcode != "compare":
            return None
        left, right = (self.module.instructions[name] for name in compare.operands)
        direction = re.search(r"direction=(\w+)", compare.text).group(1)
        if direction == "GT":
            left, right, direction = right, left, "LT"
        if direction != "LT" or left.opcode != "get-tuple-element" or right.opcode != "constant":
            return None
        index = int(re.search(r"index=(\d+)", left.text).group(1))
        start = self._constant(self.module.instructions[self.module.instructions[loop.operands[0]].operands[index]]) \
            if self.module.instructions[loop.operands[0]].opcode == "tuple" else None
        bound = self._constant(right)
        return None if start is None or bound is None else max(bound - start, 0)

    def _constant(self, instruction: hlo.Instruction) -> Optional[int]:
        while instruction.opcode in ("copy", "bitcast", "convert") and instruction.operands:
            instruction = self.module.instructions[instruction.operands[0]]
        m = re.match(r"(-?\d+)\)", instruction.text) if instruction.opcode == "constant" else None
        return int(m.group(1)) if m else None

    def _branch_weight(self, totals: _Totals) -> float:
        return _times(totals, self.chip)["no_overlap_seconds"] if self.chip else sum(totals.flops.values())

    # -- FLOPs and collectives, also inside fusions ----------------------------------------------------------------
    def _inside(self, instruction: hlo.Instruction, totals: _Totals, seen: set) -> None:
        opcode = instruction.opcode
        if opcode in ("fusion", "async-start") and instruction.attribute("calls"):
            for inner in self.module.computations[instruction.attribute("calls")]:
                self._inside(inner, totals, seen)
        elif opcode in ("dot", "convolution"):
            totals.flops[self._rate_class(instruction)] += self._matmul_flops(instruction)
        elif opcode == "custom-call":
            self._custom_call(instruction, totals)
        kind = opcode.removesuffix("-start")
        if kind in _RING:
            self._collective(instruction, kind, totals, seen)

    def _matmul_flops(self, instruction: hlo.Instruction) -> float:
        result = hlo.arrays(instruction.type)[0][1]
        if instruction.opcode == "dot":
            lhs = hlo.arrays(self.module.operand_types(instruction)[0])[0][1]
            contracted = [lhs[int(d)] for d in re.search(r"lhs_contracting_dims=\{([\d,]*)\}",
                                                         instruction.text).group(1).split(",") if d]
            return 2.0 * np.prod(result, dtype=np.float64) * np.prod(contracted, dtype=np.float64)
        return _convolution_flops(instruction.text, hlo.arrays(self.module.operand_types(instruction)[0])[0][1],
                                  hlo.arrays(self.module.operand_types(instruction)[1])[0][1], result)

    def _rate_class(self, instruction: hlo.Instruction) -> str:
        dtypes = {hlo.arrays(t)[0][0] for t in self.module.operand_types(instruction)[:2] if hlo.arrays(t)}
        if not dtypes & {"f32", "f64"}:
            return LOW
        if self.platform != "tpu":
            return F32
        passes = re.search(r"operand_precision=\{([^}]*)\}|algorithm=(\w+)", instruction.text.lower())
        if passes is None:
            return LOW
        named = passes.group(1) or passes.group(2)
        return F32 if "high" in named or re.search(r"_x[369]|f32_f32_f32", named) else LOW

    def _custom_call(self, instruction: hlo.Instruction, totals: _Totals) -> None:
        target = instruction.attribute("custom_call_target")
        config = instruction.backend_config()
        if target.startswith("__cublas$") and "gemm_backend_config" in config:
            gemm = config["gemm_backend_config"]
            lhs = hlo.arrays(self.module.operand_types(instruction)[0])[0][1]
            contracted = [lhs[int(d)] for d in gemm["dot_dimension_numbers"]["lhs_contracting_dimensions"]]
            result = hlo.arrays(instruction.type)[0][1]
            totals.flops[self._rate_class(instruction)] += \
                2.0 * np.prod(result, dtype=np.float64) * np.prod(contracted, dtype=np.float64)
            return
        flops = self._attention_flops(instruction, target, config)
        if flops is None:
            if target == "tpu_custom_call" or target.startswith("__") or "triton" in target:
                totals.opaque_kernels[f"{target} {instruction.name.split('.')[0]}"] += 1
            return
        q_dtype = hlo.arrays(self.module.operand_types(instruction)[0])[0][0]
        totals.flops[F32 if q_dtype in ("f32", "f64") and self.platform != "tpu" else LOW] += flops
        totals.attention_flops += flops

    def _attention_flops(self, instruction: hlo.Instruction, target: str, config: dict) -> Optional[float]:
        """FLOPs of an attention kernel from its operands (the rule in the module docstring), or None."""
        operands = [hlo.arrays(t)[0] for t in self.module.operand_types(instruction) if hlo.arrays(t)]
        if target.startswith("__cudnn$fmha"):
            scores = config.get("cudnn_fmha_backend_config", {}).get("intermediate_tensor_shape", {})
            if not scores.get("dimensions"):
                return None
            products = 5 if target.endswith("Backward") else 2
            scores_size = np.prod([int(d) for d in scores["dimensions"]], dtype=np.float64)
            return products * 2.0 * scores_size * operands[0][1][-1]
        name = instruction.name + " " + (re.search(r'op_name="([^"]*)"', instruction.text) or [""])[0]
        if target != "tpu_custom_call" or not _ATTENTION.search(name):
            return None
        tensors = [dims for dtype, dims, _ in operands if len(dims) in (3, 4) and dtype[0] in "fb"]
        if len(tensors) < 2:
            return None
        q, k = tensors[:2]
        kernel = name.lower()
        products = 4 if "dkv" in kernel else 3 if "dq" in kernel else 5 if re.search(r"bwd|backward", kernel) else 2
        return products * 2.0 * np.prod(q, dtype=np.float64) * k[-2]

    def _collective(self, instruction: hlo.Instruction, kind: str, totals: _Totals, seen: set) -> None:
        channel = re.search(r"channel_id=(\d+)", instruction.text)
        shape = [(d, s) for d, s, _ in hlo.arrays(instruction.type)]
        key = (kind, channel.group(1), str(shape)) if channel else (kind, instruction.name)
        if key in seen:
            return
        seen.add(key)
        operand_bytes = sum(hlo.type_bytes(t) for t in self.module.operand_types(instruction))
        result_bytes = hlo.type_bytes(instruction.type)
        if instruction.opcode.endswith("-start") and instruction.type.startswith("("):
            result_bytes -= operand_bytes  # an async start returns (operands, results, ...)
        buffer = result_bytes if kind == "all-gather" else operand_bytes
        groups = hlo.replica_groups(instruction.text, len(self.domains))
        pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", instruction.text)
        if groups is None and pairs:
            groups = [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(0))]
        elif groups is None:  # a spelling not read here: the group size from the sizes, all devices at worst
            totals.groups_guessed += 1
            ratio = {"all-gather": result_bytes / max(operand_bytes, 1),
                     "reduce-scatter": operand_bytes / max(result_bytes, 1)}.get(kind, len(self.domains))
            groups = [list(range(max(int(round(ratio)), 1)))]
        size = max(len(g) for g in groups)
        if kind == "all-reduce" and self._keeps_one_shard(instruction, size):
            kind = "reduce-scatter"  # the TPU's reduce-scatter: an all-reduce each device keeps 1/n of
        wire = _RING[kind](size) * buffer if size > 1 else 0.0
        crosses = any(len({self.domains[i] for i in g if i < len(self.domains)}) > 1 for g in groups)
        if crosses and (self.chip is None or self.chip.dcn_bandwidth is None):
            totals.dcn_not_modelled, crosses = True, False
        entry = totals.collectives.setdefault(kind, {"count": 0.0, "bytes": 0.0, "wire_ici": 0.0, "wire_dcn": 0.0})
        entry["count"] += 1
        entry["bytes"] += buffer
        entry["wire_dcn" if crosses else "wire_ici"] += wire

    def _keeps_one_shard(self, all_reduce: hlo.Instruction, size: int) -> bool:
        """An all-reduce fused with the slicing of each device's 1/n (the TPU's reduce-scatter fusion). A top-level
        all-reduce whose result is sliced later is not: the compiler chose to run the all-reduce."""
        users = [self.module.instructions[name] for name in all_reduce.users]
        return size > 1 and bool(users) and self.module.computation_of[all_reduce.name] in self.module.fused and all(
            u.opcode == "dynamic-slice" and hlo.type_bytes(u.type) * size == hlo.type_bytes(all_reduce.type)
            for u in users)

    # -- HBM traffic of one top-level instruction -------------------------------------------------------------------
    def _traffic(self, instruction: hlo.Instruction) -> float:
        opcode = instruction.opcode
        if opcode in _NO_TRAFFIC or (opcode == "custom-call" and
                                     instruction.attribute("custom_call_target") in _NO_TRAFFIC_TARGETS):
            return 0.0
        written = _hbm(instruction.type)
        read = sum(_hbm(t) for t in self.module.operand_types(instruction))
        if opcode.endswith("-done"):
            return written
        if opcode.endswith("-start") or opcode in ("send", "recv"):
            return read
        if opcode in _SLICES:
            return 2.0 * written
        if opcode in ("dynamic-update-slice", "scatter"):
            update = _hbm(self.module.operand_types(instruction)[1 if opcode == "dynamic-update-slice" else 2])
            return 2.0 * update
        if opcode == "fusion":
            return self._fusion_traffic(instruction, written)
        return read + written

    def _fusion_traffic(self, fusion: hlo.Instruction, written: float) -> float:
        parameters = self.module.parameters(fusion.attribute("calls"))
        root = self.module.root(fusion.attribute("calls"))
        outputs = [self.module.instructions[n] for n in root.operands] if root.opcode == "tuple" else [root]
        in_place = set()
        for output in outputs:
            if output.opcode == "dynamic-update-slice":  # writes the update (read through its own parameter)
                in_place.add(self._through_bitcasts(output.operands[0]))
                written += _hbm(self.module.instructions[output.operands[1]].type) - _hbm(output.type)
        read = 0.0
        for index, operand_type in enumerate(self.module.operand_types(fusion)):
            parameter = parameters.get(index)
            if parameter is None or parameter.name in in_place:
                continue
            uses = self._uses(parameter)
            if uses and all(user.opcode in _SLICES and user.operands[0] == via for user, via in uses):
                space = hlo.arrays(operand_type)[0][2] if hlo.arrays(operand_type) else 0
                read += sum(hlo.type_bytes(user.type) for user, _ in uses) if space == 0 else 0.0
            else:
                read += _hbm(operand_type)
        return read + written

    def _through_bitcasts(self, name: str) -> str:
        instruction = self.module.instructions[name]
        while instruction.opcode == "bitcast" and instruction.operands:
            instruction = self.module.instructions[instruction.operands[0]]
        return instruction.name

    def _uses(self, parameter: hlo.Instruction) -> list[tuple[hlo.Instruction, str]]:
        """(user, the operand name it reads the parameter through) of a fused parameter, through bitcasts and into
        nested fusions (the TPU compiler nests them: a fusion's parameter is often sliced by a fusion inside it)."""
        uses, todo = [], [(user, parameter.name) for user in parameter.users]
        while todo:
            name, via = todo.pop()
            user = self.module.instructions[name]
            if user.opcode == "bitcast":
                todo += [(u, user.name) for u in user.users]
            elif user.opcode == "fusion":
                inner = self.module.parameters(user.attribute("calls"))
                for index in (i for i, operand in enumerate(user.operands) if operand == via):
                    todo += [(u, inner[index].name) for u in inner[index].users]
            else:
                uses.append((user, via))
        return uses


def _convolution_flops(text: str, lhs, kernel, result) -> float:
    """2 x batch x output features x kernel input features x, per spatial dimension, the (output, window)
    position pairs that land on an input element (padding and dilation leave some out): XLA's count. The TPU
    compiler writes batched matmuls as convolutions whose dilated spatial dimensions are batch dimensions."""
    lhs_labels, kernel_labels, out_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", text).groups()
    window = dict(re.findall(r"(\w+)=([\w-]+)", (re.search(r"window=\{([^}]*)\}", text) or ["", ""])[1]))
    spatial = sorted(c for c in out_labels if c.isdigit())

    def field(key, default):
        values = window.get(key)
        return [default] * len(spatial) if values is None else values.split("x")

    pairs = 1.0
    for j, size, stride, pad, base, dilation in zip(spatial, field("size", "1"), field("stride", "1"),
                                                   field("pad", "0_0"), field("lhs_dilate", "1"),
                                                   field("rhs_dilate", "1")):
        out = np.arange(result[out_labels.index(j)])[:, None]
        position = out * int(stride) + np.arange(int(size))[None, :] * int(dilation) - int(pad.split("_")[0])
        valid = (position >= 0) & (position % int(base) == 0) & (position // int(base) < lhs[lhs_labels.index(j)])
        pairs *= float(valid.sum())
    features = result[out_labels.index("b")] * result[out_labels.index("f")] * kernel[kernel_labels.index("i")]
    return 2.0 * features * pairs


def _hbm(type_text: str) -> float:
    return float(hlo.type_bytes(type_text, memory_space=0))


def _times(totals: _Totals, chip: Chip, share: float = 1.0) -> dict[str, float]:
    rates = {LOW: chip.bf16_flops * share, F32: chip.f32_flops * share}
    compute = sum(flops / rates[kind] for kind, flops in totals.flops.items())
    memory = totals.hbm_bytes / (chip.hbm_bandwidth * share)
    dcn = chip.dcn_bandwidth or chip.ici_bandwidth
    comms = sum(e["wire_ici"] / (chip.ici_bandwidth * share) + e["wire_dcn"] / (dcn * share)
                for e in totals.collectives.values())
    return {"t_compute_seconds": compute, "t_hbm_seconds": memory, "t_collectives_seconds": comms,
            "bound_seconds": max(compute, memory, comms), "no_overlap_seconds": compute + memory + comms}


def _domain(device) -> int:
    """Devices in one domain share the fast interconnect: a TPU slice (ICI), a GPU process (NVLink)."""
    return (getattr(device, "slice_index", 0) or 0) if device.platform == "tpu" else device.process_index


def device_share(devices) -> float:
    """The share of a chip one device is: 1, or 1/2 where each TensorCore of a v4 / v5p chip is its own device."""
    return 1.0 / len({getattr(d, "core_on_chip", 0) for d in devices})


def estimate(compiled, chip: Optional[Chip], devices: Sequence) -> dict[str, Any]:
    """The roofline of one run of ``compiled`` per device (every figure an estimate). ``devices`` in the order of
    the program's device assignment (a mesh's ``devices.flat``); ``chip`` None (a CPU): counts only, no times."""
    module = compiled.runtime_executable().hlo_modules()[0]
    return estimate_module(module, devices[0].platform, chip, devices)


def estimate_module(module, platform: str, chip: Optional[Chip], devices: Sequence) -> dict[str, Any]:
    reader = hlo.CompiledModule(module)
    totals = _Estimator(reader, platform, chip, [_domain(d) for d in devices]).run(reader.entry)
    share = device_share(devices)
    out: dict[str, Any] = {
        "estimate": True, "flops": {LOW: totals.flops[LOW], F32: totals.flops[F32]},
        "attention_flops": totals.attention_flops, "hbm_bytes": totals.hbm_bytes,
        "collectives": {kind: {"count": e["count"], "bytes": e["bytes"], "wire_bytes": e["wire_ici"] + e["wire_dcn"]}
                        for kind, e in sorted(totals.collectives.items())},
        "loops_without_trip_count": totals.loops_without_trip_count, "dcn_not_modelled": totals.dcn_not_modelled,
        "collective_groups_guessed": totals.groups_guessed,
        "opaque_kernels": dict(totals.opaque_kernels), "chip": chip.name if chip else None, "device_share": share,
    }
    if chip is not None:
        out.update(_times(totals, chip, share))
        out["bound_by"] = max(("compute", "hbm", "collectives"), key=lambda k: out[f"t_{k}_seconds"])
    return out


def step_figures(roofline: dict[str, Any], *, tokens_per_step: float, model_flops: float, chip: Optional[Chip],
                 num_devices: int) -> dict[str, Optional[float]]:
    """Tokens/s at the bound and the MFU the bound implies: model FLOPs / (bound x devices x bf16 peak)."""
    bound = roofline.get("bound_seconds")
    if not bound or chip is None:
        return {"roofline_step_seconds": None, "roofline_tokens_per_second": None, "roofline_mfu": None}
    peak = chip.bf16_flops * roofline["device_share"] * num_devices
    return {"roofline_step_seconds": bound, "roofline_tokens_per_second": tokens_per_step / bound,
            "roofline_mfu": model_flops / (bound * peak)}


__all__ = ["F32", "LOW", "device_share", "estimate", "estimate_module", "step_figures"]
