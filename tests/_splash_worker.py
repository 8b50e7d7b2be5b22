"""Splash attention (Pallas interpret mode) against the XLA kernel on an 8-device CPU mesh, inside the same
kind of shard_map the train step uses (manual over data and fsdp, tensor automatic) and under a plain jit with
the mesh in context (the eval step). Prints one JSON line of max abs differences. Run by tests/test_compile.py
with XLA_FLAGS set for 8 devices."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sgt_jax.models.attention import dot_product_attention


def case(causal, window, in_train_shard_map):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))  # Auto axes
    rng = np.random.default_rng(0)
    batch, seq, heads, kv_heads, dim = 4, 256, 4, 2, 32  # GQA: 2 query heads per kv head
    q, k, v = (jnp.asarray(rng.normal(size=(batch, seq, h, dim)), jnp.float32) for h in (heads, kv_heads, kv_heads))
    lengths = np.array([256, 200, 129, 7])  # left padding
    mask = jnp.asarray(np.arange(seq)[None, :] >= seq - lengths[:, None], jnp.int32)
    weights = jnp.asarray(rng.normal(size=(batch, seq, heads, dim)), jnp.float32) * mask[:, :, None, None]

    def loss(impl, q, k, v, mask, weights):
        out = dot_product_attention(q, k, v, mask, attention_impl=impl, causal=causal, sliding_window=window,
                                    interpret=True)
        real = mask[:, :, None, None]  # pad query rows differ by design (never read downstream)
        return jnp.sum(out * real * weights), out * real

    def run(impl):
        def both(q, k, v, m, w):
            grads = jax.grad(lambda *a: loss(impl, *a, m, w)[0], argnums=(0, 1, 2))(q, k, v)
            return loss(impl, q, k, v, m, w)[1], grads

        if in_train_shard_map:  # as in the train step: manual over data and fsdp, tensor automatic
            spec = P(("data", "fsdp"))
            fn = jax.shard_map(both, mesh=mesh, in_specs=(spec,) * 5, out_specs=(spec, (spec,) * 3),
                               axis_names={"data", "fsdp"}, check_vma=False)
            return jax.jit(fn)(q, k, v, mask, weights)
        sharding = NamedSharding(mesh, P(("data", "fsdp")))  # as the eval step: plain jit, mesh in context
        args = [jax.device_put(x, sharding) for x in (q, k, v, mask, weights)]
        with jax.set_mesh(mesh):
            return jax.jit(both)(*args)

    (out_x, grads_x), (out_s, grads_s) = run("xla"), run("splash")
    diffs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out_x, *grads_x), (out_s, *grads_s))]
    return {"causal": causal, "window": window, "train_shard_map": in_train_shard_map, "max_abs_diff": diffs,
            "max_abs_out": float(jnp.max(jnp.abs(out_x)))}


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    results = [case(True, None, True), case(True, 64, True), case(False, None, False), case(False, 48, False)]
    print(json.dumps(results))
    sys.stdout.flush()
