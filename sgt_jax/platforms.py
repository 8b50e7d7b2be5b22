"""Which platform a run is on (tpu, gpu or cpu), decided without initialising a JAX backend, and the CPU
choice for machines without accelerators.

With the TPU compiler (libtpu) and the CUDA plugin installed — the ``tpu``, ``gpu`` and ``test`` extras — a
JAX that picks its own platform on a machine with neither a TPU nor a GPU lets both look for their hardware
and print what they did not find (libtpu's host-bounds and worker-hostname errors, the plugin's "Unable to
load CUDA" traceback) before any output of ours. The entry points therefore choose ``cpu`` themselves on such
a machine, before a backend starts, unless the user chose a platform (``JAX_PLATFORMS`` or
``jax.config.update("jax_platforms", ...)``). TPU VMs and GPU machines are left to JAX. The detection is
JAX's own: TPU chips by their PCI vendor and device ids, NVIDIA GPUs by their device nodes.

This module imports nothing from the package, so every layer may use it (the configuration applies a recipe's
``gpu:`` / ``tpu:`` block by :func:`local_platform`).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

PLATFORMS = ("tpu", "gpu", "cpu")
# JAX's platform names (JAX_PLATFORMS, jax.default_backend()) -> ours.
_ALIASES = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "cpu": "cpu"}


def _jax_platforms_setting() -> Optional[str]:
    jax = sys.modules.get("jax")
    return jax.config.jax_platforms if jax is not None else os.environ.get("JAX_PLATFORMS")


def requested_platform() -> Optional[str]:
    """The platform the user asked JAX for (the first of ``JAX_PLATFORMS`` / ``jax_platforms``), or None."""
    first = (_jax_platforms_setting() or "").split(",")[0].strip().lower()
    return _ALIASES.get(first, first) or None


def accelerator_present() -> Optional[str]:
    """"tpu" when TPU chips sit on this machine's PCI bus, "gpu" when NVIDIA (or AMD) GPU devices exist, else
    None — read from /sys and /dev, as JAX itself detects them, without starting a backend."""
    try:
        from jax._src import hardware_utils
    except ImportError:  # a JAX that moved its detection: assume an accelerator and leave the choice to JAX
        return "unknown"
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        return "tpu"
    if hardware_utils.has_visible_nvidia_gpu() or hardware_utils.num_available_amd_gpus(stop_at=1) > 0:
        return "gpu"
    return None


def _backends_started() -> bool:
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def local_platform() -> str:
    """tpu, gpu or cpu: the platform a run started here computes on — the running backend's when one has
    started, else the user's choice, else the accelerator found on the machine (cpu when none)."""
    if _backends_started():
        import jax

        return _ALIASES.get(jax.default_backend(), "cpu")
    requested = requested_platform()
    if requested in PLATFORMS:
        return requested
    found = accelerator_present()
    return found if found in PLATFORMS else "cpu"


def use_cpu_backend() -> None:
    """Make the local backend the CPU (before any backend starts; nothing to do once one has): what an
    ahead-of-time compile for a TPU or GPU topology traces on, whatever this machine holds."""
    if _backends_started():
        return
    import jax

    jax.config.update("jax_platforms", "cpu")


def prefer_cpu_without_accelerators() -> None:
    """Select the CPU on a machine with no TPU chip and no GPU when the user chose no platform, so that no
    installed TPU or CUDA plugin reports its failed detection; elsewhere JAX chooses as it always does."""
    if requested_platform() is None and accelerator_present() is None:
        use_cpu_backend()


__all__ = ["PLATFORMS", "accelerator_present", "local_platform", "prefer_cpu_without_accelerators",
           "requested_platform", "use_cpu_backend"]
