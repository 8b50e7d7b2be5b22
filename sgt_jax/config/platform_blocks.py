"""Per-platform deltas in a config file: top-level ``tpu:``, ``gpu:`` and ``cpu:`` blocks holding any of the
schema's keys. The block of the platform a run is on is applied over the file's own settings and under the
command-line overrides, so one recipe says both how a TPU slice and how a GPU node runs it (e.g. splash
attention and fsdp 4 at the top, cuDNN attention and a data-parallel mesh under ``gpu:``), and the launch
scripts and ``--compile-only`` read the same values. Every block is checked against the schema, whichever
platform the run is on, so a misspelt key under ``gpu:`` fails on a TPU too."""

from __future__ import annotations

from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from sgt_jax.config.checks import ConfigError

PLATFORM_BLOCKS = ("tpu", "gpu", "cpu")

REFERENCE = """### Platform blocks

A config file may carry top-level `tpu:`, `gpu:` and `cpu:` blocks of the keys above. The block of the platform
the run is on is applied over the file's other settings and under the command-line overrides: a run's JAX
backend (`JAX_PLATFORMS` when set, else the accelerator on the machine), and for `--compile-only --topology` the
topology's (`h100:8` is gpu, `v5e:4x4` tpu). The recipes keep their TPU settings at the top level and the GPU
launch's (cuDNN attention, mesh) under `gpu:`.
"""


def one_line(exc: OmegaConfBaseException) -> str:
    msg = str(exc).strip().splitlines()[0]
    key = getattr(exc, "full_key", None)
    if key and key not in msg:
        msg = f"{key}: {msg}"
    return msg


def file_layers(data: DictConfig, path: str, schema, platform: Optional[str]) -> list:
    """A config file's layers: its settings without the platform blocks, then the block for ``platform``
    (when the file has one). Each block must be a mapping the schema accepts."""
    blocks = {}
    for name in PLATFORM_BLOCKS:
        if name not in data:
            continue
        block = data.pop(name)
        if not isinstance(block, DictConfig):
            raise ConfigError(f"config file {path!r}: `{name}:` must be a block of settings (e.g. `{name}: "
                              "{model: {attention_impl: xla}}`), not a single value.")
        try:
            OmegaConf.merge(schema, block)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"config file {path!r}, block `{name}:`: {one_line(exc)}") from None
        blocks[name] = block
    return [data] + ([blocks[platform]] if platform in blocks else [])


__all__ = ["PLATFORM_BLOCKS", "REFERENCE", "file_layers", "one_line"]
