"""The devices ``--compile-only --topology`` compiles for, without the hardware: a TPU slice (``v5e:4x4``,
``v4:2x2x2``) from libtpu, or GPU nodes (``h100:8``, ``h100:2x8``, ``a100-80g:8``) from XLA's GPU compiler given
the chip's device description; and the memory of one such device. The chips are those of
:mod:`sgt_jax.training.chips`.

The local backend becomes the CPU first (:func:`sgt_jax.platforms.use_cpu_backend`): the compile only traces
here, and with the CUDA plugin installed a GPU topology can be made only while no CUDA backend has started.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Optional

import jax
from jax.experimental import topologies

from sgt_jax import platforms
from sgt_jax.config import ConfigError
from sgt_jax.training import chips


def _topology_chip(name: str) -> chips.Chip:
    """The chip a ``--topology`` name starts with (``v5e`` of ``v5e:4x4``, ``h100`` of ``h100:2x8``)."""
    chip = chips.CHIPS_BY_NAME.get(name.partition(":")[0].strip().lower())
    if chip is None or not name.partition(":")[2]:
        names = {kind: ", ".join(c.name for c in chips.CHIP_TABLE if c.platform == kind) for kind in ("tpu", "gpu")}
        raise ConfigError(f"--topology {name!r} names no known slice or node: give a TPU slice as <chip>:<shape> "
                          f"({names['tpu']}; e.g. v5e:4x4, v4:2x2x2) or GPU nodes as <chip>:<gpus> or "
                          f"<chip>:<hosts>x<gpus> ({names['gpu']}; e.g. h100:8, h100:2x8).")
    return chip


def topology_platform(name: str) -> str:
    """tpu or gpu: what a ``--topology`` compiles for (a recipe's platform block follows it)."""
    return _topology_chip(name).platform


def topology_devices(name: Optional[str]) -> list:
    """The devices of a TPU slice such as ``v5e:4x4`` or of GPU nodes such as ``h100:8`` / ``h100:2x8`` (no TPU
    or GPU needed: the local backend becomes the CPU), or the local devices for None."""
    if name is None:
        return list(jax.devices())
    chip = _topology_chip(name)
    platforms.use_cpu_backend()
    return _gpu_devices(name, chip) if chip.platform == "gpu" else _tpu_devices(name)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _tpu_devices(name: str) -> list:
    # libtpu otherwise warns about (and, with other processes using it, refuses) a machine that has no TPU.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        try:  # v4 and v5p chips have two TensorCores: one device per chip (megacore), as JAX runs them
            desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="megacore")
        except Exception:  # noqa: BLE001 - single-core chips (v5e, v6e) have no megacore configuration
            desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
        return list(desc.devices)
    except Exception as exc:  # noqa: BLE001 - libtpu missing or a shape it refuses: one line either way
        raise ConfigError(f"--topology {name!r} cannot be compiled for ({_first_line(exc)}); install the TPU compiler "
                          "with `pip install sgt_jax[tpu]` and use a name like v5e:4x4, v4:2x2x2 or v5p:2x2x2.")


def _cuda_plugin_installed() -> bool:
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))


def _gpu_devices(name: str, chip: chips.Chip) -> list:
    """``hosts`` x ``gpus`` devices of ``chip`` from XLA's GPU compiler, given the chip's device description."""
    shape = re.fullmatch(r"(?:(\d+)x)?(\d+)", name.partition(":")[2].strip())
    if shape is None or int(shape.group(1) or 1) < 1 or int(shape.group(2)) < 1:
        raise ConfigError(f"--topology {name!r}: give GPU nodes as <chip>:<gpus> or <chip>:<hosts>x<gpus>, e.g. "
                          f"{chip.name}:8 (one host of 8) or {chip.name}:2x8 (two hosts of 8).")
    if not _cuda_plugin_installed():
        raise ConfigError(f"--topology {name!r} needs JAX's CUDA plugin to compile for NVIDIA GPUs; install it with "
                          "`pip install sgt_jax[gpu]`.")
    try:
        desc = topologies.get_topology_desc(platform="cuda", target_config=chips.gpu_target_config(chip),
                                            topology=f"1x{int(shape.group(1) or 1)}x{int(shape.group(2))}")
    except Exception as exc:  # noqa: BLE001 - a plugin of another version, or one that cannot load: one line
        raise ConfigError(f"--topology {name!r} cannot be compiled for ({_first_line(exc)}); install the GPU "
                          "compiler with `pip install sgt_jax[gpu]`.")
    return list(desc.devices)


def chip_spec(devices) -> tuple[int, Optional[float]]:
    """(HBM bytes, peak bf16 FLOP/s or None) of one device; the host's memory for CPU devices. Where each
    TensorCore of a chip is its own device (v4 / v5p without megacore), a device has its share of the chip."""
    device = devices[0]
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
    chip = chips.chip_for_device(device)
    cores = len({getattr(d, "core_on_chip", 0) for d in devices})
    return chip.hbm_bytes // cores, chip.bf16_flops / cores


__all__ = ["chip_spec", "topology_devices", "topology_platform"]
