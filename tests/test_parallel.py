"""Mesh construction, the logical-axis rules, and sharded loading on 8 simulated CPU devices."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from sgt_jax.config import MeshConfig
from sgt_jax.training.parallel import (MeshConfigError, batch_sharding, batch_shards, host_batch_to_global,
                                      logical_to_spec, make_mesh)


class FakeMesh:
    """Only the axis sizes matter to the rule table."""

    def __init__(self, **shape):
        self.shape = shape


def test_logical_rules_and_indivisible_fallback():
    mesh = FakeMesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("layers", "embed", "mlp"), mesh) == PartitionSpec(None, "fsdp", "tensor")
    assert logical_to_spec(("batch", None), mesh) == PartitionSpec(("data", "fsdp"), None)
    # 6 heads don't split over tensor=4: replicated there instead of crashing.
    assert logical_to_spec(("embed", "heads"), FakeMesh(data=1, fsdp=2, tensor=4), (8, 6)) == PartitionSpec("fsdp", None)
    assert logical_to_spec(("batch",), mesh, (2,)) == PartitionSpec("data")
    assert logical_to_spec(("embed",), FakeMesh(data=1, fsdp=1, tensor=1)) == PartitionSpec(None)


def test_make_mesh_fills_and_refuses():
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.size == len(jax.devices())
    with pytest.raises(MeshConfigError, match="mesh.fsdp=3") as err:
        make_mesh(MeshConfig(data=1, fsdp=3, tensor=1), devices=jax.devices() * 4)
    assert "\n" not in str(err.value)
    from sgt_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="at most one of data, fsdp, tensor may be -1"):  # the schema's rule
        load_config(None, ["mesh.data=-1", "mesh.fsdp=-1"])
    batch = host_batch_to_global({"input_ids": np.arange(6).reshape(2, 3)}, mesh)
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), np.arange(6).reshape(2, 3))
    assert batch["input_ids"].sharding.spec == PartitionSpec(("data", "fsdp"))


def test_mesh_follows_the_tpu_torus_and_puts_slices_on_the_data_axis():
    """On a v5e:4x4 slice (4 hosts of 2x2 chips), as compile-only sees it, each tensor group of 4 is one row of
    the torus (a ring on ICI), where the device list's own order would group a host's 2x2 square; over 2 such
    slices each data index holds one slice, laid out inside as mesh_utils lays out one slice. Fails if the
    mesh goes back to the device list's order, or lets fsdp or tensor cross the slices (DCN)."""
    import libtpu  # noqa: F401  (the test extra installs it: its absence must fail, not skip)
    from jax.experimental import mesh_utils, topologies

    from sgt_jax.training.compile import topology_devices

    def on_one_torus_row(group):
        return len({d.coords[1] for d in group}) == 1 and sorted(d.coords[0] for d in group) == [0, 1, 2, 3]

    devices = topology_devices("v5e:4x4")
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=4), devices)
    assert all(on_one_torus_row(group) for group in mesh.devices[0]), mesh.devices
    assert not all(on_one_torus_row(group) for group in np.asarray(devices).reshape(4, 4))  # the list's order
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3

    two_slices = list(topologies.get_topology_desc(platform="tpu", topology_name="v5e:4x4", num_slices=2).devices)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=-1), two_slices)
    for index in (0, 1):
        in_slice = [d for d in two_slices if d.slice_index == index]
        expected = mesh_utils.create_device_mesh((4, 4), in_slice)
        assert [d.id for d in mesh.devices[index].flat] == [d.id for d in expected.flat]
        assert all(on_one_torus_row(group) for group in mesh.devices[index])
    with pytest.raises(MeshConfigError, match="mesh.data a multiple of 2") as err:
        make_mesh(MeshConfig(data=1, fsdp=8, tensor=4), two_slices)
    assert "\n" not in str(err.value)


def test_batch_sharding_splits_rows_and_keeps_micro_batches_whole():
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    assert batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    assert batch_sharding(mesh, accumulated=True).spec == PartitionSpec(None, ("data", "fsdp"))
    assert batch_shards(mesh) == len(jax.devices())


SHARDED_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from sgt_jax.config import MeshConfig
    from sgt_jax.models import CausalLM
    from sgt_jax.training.parallel import make_mesh, host_batch_to_global

    path = sys.argv[1]
    assert len(jax.devices()) == 8
    ids = np.random.default_rng(0).integers(3, 128, (4, 8)); mask = np.ones((4, 8), np.int32); mask[0, :3] = 0
    single = np.asarray(CausalLM.from_pretrained(path, dtype="float32")(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    for sizes in [(2, 2, 2), (1, 4, 2)]:
        mesh = make_mesh(MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2]))
        model = CausalLM.from_pretrained(path, dtype="float32", mesh=mesh)
        params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        q = params[("decoder", "layers", "attention", "q_proj", "kernel")].get_value()
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), q.sharding.spec
        assert len({str(s.index) for s in q.addressable_shards}) == sizes[1] * sizes[2]
        embed = params[("embed_tokens",)].get_value()
        assert not embed.sharding.is_fully_replicated
        batch = host_batch_to_global({"input_ids": ids, "attention_mask": mask}, mesh)
        logits = nnx.jit(lambda m, b: m(b["input_ids"], attention_mask=b["attention_mask"]))(model, batch)
        err = np.abs(np.asarray(logits) - single).max()
        assert err < 1e-5, err
        print("sharded ok", sizes, err)
    """
)


def test_sharded_load_on_8_simulated_devices(tmp_path):
    from tiny_checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "llama", "llama")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(path)], env=env, capture_output=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sharded ok") == 2


def test_distributed_start_up_only_when_asked():
    from sgt_jax.training.parallel import maybe_initialize_distributed

    assert maybe_initialize_distributed(MeshConfig(distributed="false")) is False
    env_free = {k: v for k, v in os.environ.items() if "COORDINATOR" in k or k.startswith(("SLURM_", "OMPI_", "TPU_WORKER"))}
    if not env_free:  # a plain single machine: auto does nothing
        assert maybe_initialize_distributed(MeshConfig(distributed="auto")) is False
    from sgt_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="mesh.distributed='maybe'"):  # the schema's rule
        load_config(None, ["mesh.distributed=maybe"])


def test_fsdp_moves_to_each_trained_matrix_major_dimension():
    """The train state's fsdp axis goes to the first dimension larger than 1 that it divides (a reduce-scatter
    along a minor dimension is a whole-gradient all-reduce on TPU), keeping the tensor axis where the rules put
    it; vectors and indivisible shapes stay as they were."""
    from sgt_jax.models.sharding import fsdp_on_major_dim

    mesh = FakeMesh(data=2, fsdp=4, tensor=2)
    # (layers=1, mlp, embed) down projection: rules give (None, "tensor", "fsdp").
    assert fsdp_on_major_dim(PartitionSpec(None, "tensor", "fsdp"), (1, 4096, 1024), mesh) == \
        PartitionSpec(None, ("fsdp", "tensor"), None)
    # an estimator head without logical axes (replicated by the rules) is sharded on its rows
    assert fsdp_on_major_dim(PartitionSpec(), (1024, 1024), mesh) == PartitionSpec("fsdp", None)
    assert fsdp_on_major_dim(PartitionSpec("fsdp"), (1024,), mesh) == PartitionSpec(None)  # vectors: replicated
    assert fsdp_on_major_dim(PartitionSpec(None, None), (6, 8), mesh) == PartitionSpec(None, "fsdp")  # 6 % 4 != 0
    assert fsdp_on_major_dim(PartitionSpec(None, "tensor"), (3, 6), mesh) == PartitionSpec(None, "tensor")
    assert fsdp_on_major_dim(PartitionSpec("fsdp", None), (8, 8), FakeMesh(data=8, fsdp=1, tensor=1)) == \
        PartitionSpec(None, None)
