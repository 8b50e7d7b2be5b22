"""sgt_jax: train and use Stained Glass Transforms for frozen decoder LLMs in JAX/Flax."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Heavy (jax-importing) names are resolved lazily so `import sgt_jax.config` stays cheap.
_LAZY = {
    "CausalLM": "sgt_jax.models",
    "TransformerCloak": "sgt_jax.transform.cloak",
    "StainedGlassTransform": "sgt_jax.inference.artifact",
    "load_config": "sgt_jax.config",
    "SGTConfig": "sgt_jax.config",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgt_jax' has no attribute {name!r}")
