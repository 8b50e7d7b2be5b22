"""The accelerators sgt_jax sizes runs for: one table of published per-chip figures, read by the fit check
(HBM), the roofline step-time model (peak FLOP/s, HBM and interconnect bandwidth) and the GPU ahead-of-time
compiler (the device description XLA compiles for).

Figures are the vendors' published peaks (Google Cloud TPU system architecture pages; NVIDIA H100 / A100
SXM datasheets), dense (no sparsity). ``f32_flops`` is the rate of a *true single-precision* matmul, which is
what the cloak runs (``cloak.matmul_precision=highest``): on a TPU a HIGHEST float32 dot is six bfloat16
passes of the MXU (a sixth of the bf16 peak); on NVIDIA GPUs it runs on the CUDA cores (no TF32).
``ici_bandwidth`` is what one collective over a ring of chips can use, per chip and per direction: on a TPU
two ICI links (a bidirectional ring along one torus axis), on a GPU node the chip's NVLink bandwidth in one
direction. ``dcn_bandwidth`` is the per-chip share of the network between hosts (GPU nodes: eight 400 Gb/s
InfiniBand links per node of eight), used for collectives that cross hosts.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from sgt_jax.errors import SGTError

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # as --topology spells it: v4, v5e, v5p, v6e, h100, a100-80g, a100-40g
    platform: str  # "tpu" or "gpu"
    device_kinds: tuple[str, ...]  # the device_kind strings JAX reports for it
    hbm_bytes: int  # per chip
    bf16_flops: float  # dense peak FLOP/s
    f32_flops: float  # true float32 matmul FLOP/s (see the module docstring)
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s per chip and direction for one ring collective inside a slice / node
    dcn_bandwidth: Optional[float] = None  # bytes/s per chip between hosts (GPU nodes), None: not modelled
    gpu: Optional[dict] = None  # GPU only: the device description XLA's GPU compiler takes (GpuTargetConfig)


_TB = 1e12
CHIP_TABLE: tuple[Chip, ...] = (
    # TPU v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s, ICI links of 45 GB/s per direction (3D torus).
    Chip("v4", "tpu", ("TPU v4",), 32 * GiB, 275e12, 275e12 / 6, 1.2 * _TB, 2 * 45e9),
    # TPU v5e: 197 TFLOP/s bf16, 16 GiB HBM2e at 819 GB/s, ICI 45 GB/s per link and direction (2D torus).
    Chip("v5e", "tpu", ("TPU v5 lite", "TPU v5e"), 16 * GiB, 197e12, 197e12 / 6, 0.819 * _TB, 2 * 45e9),
    # TPU v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2,765 GB/s, ICI 90 GB/s per link and direction (3D torus).
    Chip("v5p", "tpu", ("TPU v5", "TPU v5p"), 95 * GiB, 459e12, 459e12 / 6, 2.765 * _TB, 2 * 90e9),
    # TPU v6e (Trillium): 918 TFLOP/s bf16, 32 GiB HBM at 1,640 GB/s, ICI 90 GB/s per link and direction.
    Chip("v6e", "tpu", ("TPU v6 lite", "TPU v6e"), 32 * GiB, 918e12, 918e12 / 6, 1.64 * _TB, 2 * 90e9),
    # H100 SXM5 80GB: 989 TFLOP/s dense bf16, 67 TFLOP/s fp32, HBM3 at 3.35 TB/s, NVLink 4 at 450 GB/s per
    # direction (900 GB/s both ways).
    Chip("h100", "gpu", ("NVIDIA H100 80GB HBM3",), 84_929_347_584, 989e12, 67e12, 3.35 * _TB, 450e9, 50e9,
         gpu=dict(cc=(9, 0), core_count=132, fpus_per_core=128, shared_memory_per_core=233472,
                  shared_memory_per_block_optin=232448, l2_cache_size=52428800, clock_rate_ghz=1.98)),
    # A100 SXM4 80GB: 312 TFLOP/s bf16, 19.5 TFLOP/s fp32, HBM2e at 2,039 GB/s, NVLink 3 at 300 GB/s per direction.
    Chip("a100-80g", "gpu", ("NVIDIA A100-SXM4-80GB",), 85_198_045_184, 312e12, 19.5e12, 2.039 * _TB, 300e9, 25e9,
         gpu=dict(cc=(8, 0), core_count=108, fpus_per_core=64, shared_memory_per_core=167936,
                  shared_memory_per_block_optin=166912, l2_cache_size=41943040, clock_rate_ghz=1.41)),
    # A100 SXM4 40GB: as the 80GB part with HBM2 at 1,555 GB/s.
    Chip("a100-40g", "gpu", ("NVIDIA A100-SXM4-40GB",), 42_505_273_344, 312e12, 19.5e12, 1.555 * _TB, 300e9, 25e9,
         gpu=dict(cc=(8, 0), core_count=108, fpus_per_core=64, shared_memory_per_core=167936,
                  shared_memory_per_block_optin=166912, l2_cache_size=41943040, clock_rate_ghz=1.41)),
)
CHIPS_BY_NAME = {chip.name: chip for chip in CHIP_TABLE}


class UnknownChipError(SGTError, LookupError):
    """A device whose chip is not in the table (a user-caused error: the CLIs print its one line)."""


def chip_for_device(device) -> Chip:
    """The table entry of a JAX device (by its ``device_kind``)."""
    for chip in CHIP_TABLE:
        if device.device_kind in chip.device_kinds:
            return chip
    known = ", ".join(kind for chip in CHIP_TABLE for kind in chip.device_kinds)
    raise UnknownChipError(f"unknown accelerator {device.device_kind!r}: its memory and peaks are not in "
                           f"sgt_jax.training.chips; sgt_jax knows {known}.")


def gpu_target_config(chip: Chip) -> str:
    """The ``GpuTargetConfig`` text proto XLA's GPU compiler needs to compile for ``chip`` without one."""
    if chip.gpu is None:
        raise ValueError(f"{chip.name} is not a GPU")
    g = chip.gpu
    major, minor = g["cc"]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {g['shared_memory_per_core']}
  threads_per_core_limit: 2048
  core_count: {g['core_count']}
  fpus_per_core: {g['fpus_per_core']}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bandwidth)}
  l2_cache_size: {g['l2_cache_size']}
  clock_rate_ghz: {g['clock_rate_ghz']}
  device_memory_size: {chip.hbm_bytes}
  shared_memory_per_block_optin: {g['shared_memory_per_block_optin']}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{chip.device_kinds[0]}"
"""


__all__ = ["CHIPS_BY_NAME", "CHIP_TABLE", "Chip", "GiB", "UnknownChipError", "chip_for_device", "gpu_target_config"]
