"""Keys for the transform's noise (and for sampling) from OS entropy.

An SGT protects a prompt only if an attacker cannot replay its noise, so every key that reaches the noise
comes from here: a debug ``seed`` gives a reproducible key, anything else fills the whole key with OS
entropy. Draw it outside ``jit``: entropy drawn while tracing would be baked into the compiled program.
"""

from __future__ import annotations

import secrets
from typing import Optional

import jax
import numpy as np

__all__ = ["example_keys", "fresh_key"]


def fresh_key(seed: Optional[int] = None) -> jax.Array:
    """``jax.random.key(seed)`` for an int ``seed`` (reproducible, debug only, never secure); for None a key whose
    every bit of the default PRNG implementation's key data comes from OS entropy."""
    if seed is not None:
        return jax.random.key(seed)
    template = np.asarray(jax.random.key_data(jax.random.key(0)))
    data = np.frombuffer(secrets.token_bytes(template.nbytes), dtype=template.dtype).reshape(template.shape)
    return jax.random.wrap_key_data(data)


def example_keys(key: jax.Array, example_index: jax.Array) -> jax.Array:
    """Per-example keys ``fold_in(key, example_index)``: an example's noise and dropout depend on its place in
    the global batch, not on how the batch is split into micro-batches, devices or hosts."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(example_index.reshape(-1)).reshape(example_index.shape)
