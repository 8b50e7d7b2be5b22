"""The roofline step-time estimate (``sgt_jax.training.roofline``) on programs compiled ahead of time, without
accelerators, for a TPU topology (libtpu) and for H100s (the CUDA plugin): FLOPs, HBM bytes, collective bytes
and the bound counted by hand here, or taken from XLA's own cost analysis where it is right (loop-free
programs). The compile report of a small Llama carries the figures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import libtpu  # noqa: F401  (the test extra installs it: its absence must fail, not skip the TPU compiles)

MiB = 2**20


@pytest.fixture(scope="module")
def v5e():
    from sgt_jax.training import compile as compile_lib

    return compile_lib.topology_devices("v5e:2x2")


def h100s(topology: str = "1x1x8"):
    """Deviceless H100s (slices x hosts x GPUs per host). The CUDA plugin needs the CPU platform selected before
    any backend starts (conftest sets JAX_PLATFORMS=cpu for the session)."""
    import jax
    from jax.experimental import topologies

    from sgt_jax.training import chips

    assert jax.config.jax_platforms == "cpu", "set JAX_PLATFORMS=cpu before JAX starts a backend"
    target = chips.gpu_target_config(chips.CHIPS_BY_NAME["h100"])
    return list(topologies.get_topology_desc(platform="cuda", target_config=target, topology=topology).devices)


def compiled(devices, fn, *inputs):
    """``fn`` compiled over a one-axis mesh ("d") of ``devices``; inputs are (shape, dtype, PartitionSpec)."""
    import jax
    from jax.sharding import Mesh, NamedSharding

    mesh = Mesh(np.array(devices), ("d",))
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)) for shape, dtype, spec in inputs]
    return jax.jit(fn).lower(*args).compile()


def estimate(devices, fn, *inputs):
    from sgt_jax.training import chips, roofline

    return roofline.estimate(compiled(devices, fn, *inputs), chips.chip_for_device(devices[0]), devices)


def sharded_matmul(devices, x_spec, out_spec, m: int = 8192):
    """y = x @ w with x, w (m x m, bf16) and y laid out as the specs say over a one-axis mesh of ``devices``."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(devices), ("d",))
    fn = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, out_spec))
    args = [jax.ShapeDtypeStruct((m, m), jnp.bfloat16, sharding=NamedSharding(mesh, spec)) for spec in (x_spec, P("d"))]
    from sgt_jax.training import chips, roofline

    return roofline.estimate(fn.lower(*args).compile(), chips.chip_for_device(devices[0]), devices)


def test_sharded_matmul_on_v5e_is_the_hand_count(v5e):
    """x (8192 x 8192) and w row-sharded over 4 v5e chips, y row-sharded: each chip gathers w (one all-gather of
    the whole 128 MiB) and multiplies its 2048 rows. By hand, per chip: 2·2048·8192·8192 FLOPs; HBM reads its
    x rows (32 MiB) and w rows (32 MiB, the gather's operand), writes the gathered w (128 MiB), reads it again
    in the matmul (128 MiB) and writes its y rows (32 MiB); the gather sends 3/4 of 128 MiB over ICI."""
    from jax.sharding import PartitionSpec as P

    from sgt_jax.training.chips import CHIPS_BY_NAME

    chip = CHIPS_BY_NAME["v5e"]
    r = sharded_matmul(v5e, P("d"), P("d"))
    flops, hbm, gathered = 2 * 2048 * 8192 * 8192, (32 + 32 + 128 + 128 + 32) * MiB, 8192 * 8192 * 2
    assert r["flops"] == {"low_precision": flops, "float32": 0}
    assert r["hbm_bytes"] == hbm
    assert r["collectives"] == {"all-gather": {"count": 1, "bytes": gathered, "wire_bytes": 3 / 4 * gathered}}
    times = (flops / 197e12, hbm / 819e9, 3 / 4 * gathered / (2 * 45e9))
    assert (chip.bf16_flops, chip.hbm_bandwidth, chip.ici_bandwidth) == (197e12, 819e9, 2 * 45e9)
    assert r["t_compute_seconds"] == pytest.approx(times[0], rel=1e-12)
    assert r["t_hbm_seconds"] == pytest.approx(times[1], rel=1e-12)
    assert r["t_collectives_seconds"] == pytest.approx(times[2], rel=1e-12)
    assert r["bound_seconds"] == pytest.approx(max(times), rel=1e-12) and r["bound_by"] == "compute"
    assert r["no_overlap_seconds"] == pytest.approx(sum(times), rel=1e-12)


def test_sharded_matmuls_on_8_h100s_are_the_hand_count():
    """The same matmul over 8 H100s (NVLink 450 GB/s a direction, HBM 3.35 TB/s, 989 TFLOP/s): 2·1024·8192·8192
    FLOPs a GPU; w gathered (HBM: its 16 MiB shard read, 128 MiB written, read again, x rows 16 MiB read, y rows
    16 MiB written). With x split along its columns instead each GPU multiplies 1024 columns into a whole
    partial y (16 + 16 MiB read, 128 MiB written) that one reduce-scatter (128 MiB read, 16 MiB written) sums.
    Either collective sends 7/8 of 128 MiB. On two hosts of 4 (1x2x4) the gather crosses hosts: 50 GB/s."""
    from jax.sharding import PartitionSpec as P

    flops, whole = 2 * 1024 * 8192 * 8192, 8192 * 8192 * 2
    wire = 7 / 8 * whole
    for x_spec, kind in ((P("d"), "all-gather"), (P(None, "d"), "reduce-scatter")):
        r = sharded_matmul(h100s(), x_spec, P("d"))
        assert r["flops"] == {"low_precision": flops, "float32": 0}, kind
        assert r["hbm_bytes"] == (16 + 128 + 16 + 128 + 16) * MiB, kind
        assert r["collectives"] == {kind: {"count": 1, "bytes": whole, "wire_bytes": wire}}
        times = (flops / 989e12, 304 * MiB / 3.35e12, wire / 450e9)
        assert r["bound_seconds"] == pytest.approx(max(times), rel=1e-12) and r["bound_by"] == "collectives"
        assert r["no_overlap_seconds"] == pytest.approx(sum(times), rel=1e-12)
    two_hosts = h100s("1x2x4")
    assert [d.process_index for d in two_hosts] == [0] * 4 + [1] * 4
    assert sharded_matmul(two_hosts, P("d"), P("d"))["t_collectives_seconds"] == pytest.approx(wire / 50e9, rel=1e-12)


def nested_scans(x, w):
    import jax
    import jax.numpy as jnp

    def inner(c, _):
        return jnp.tanh(c @ w), None

    def outer(c, _):
        return jax.lax.scan(inner, c, None, length=5)[0], None

    return jax.lax.scan(outer, x, None, length=3)[0]


def test_loops_multiply_by_their_trip_counts(v5e):
    """A scan of 3 around a scan of 5 over a (256 x 512) @ (512 x 512) matmul: 15 x 2·256·512·512 FLOPs, on a
    TPU (whose compiler drops the trip count: read from the loop condition) and on a GPU (known_trip_count)."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    inputs = [((256, 512), jnp.bfloat16, P()), ((512, 512), jnp.bfloat16, P())]
    for devices in (v5e[:1], h100s("1x1x1")):
        r = estimate(devices, nested_scans, *inputs)
        assert r["flops"]["low_precision"] == 15 * 2 * 256 * 512 * 512, devices[0].platform
        assert r["loops_without_trip_count"] == 0


def test_a_scanned_layer_moves_its_slice_of_the_stacked_weights():
    """Scanning over L stacked (512 x 512) weights and stacking the outputs: each iteration reads one layer (a
    dynamic-slice fusion) and writes one output block in place (a dynamic-update-slice fusion), so HBM bytes grow
    by the same amount per layer: linear in L. Counting the whole stack (or the whole output) per iteration would
    make them grow quadratically, and the two differences below unequal."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    def stack(x, ws):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w),) * 2, x, ws)

    gpu = h100s("1x1x1")
    hbm = [estimate(gpu, stack, ((256, 512), jnp.bfloat16, P()), ((n, 512, 512), jnp.bfloat16, P()))["hbm_bytes"]
           for n in (2, 4, 6)]
    assert hbm[2] - hbm[1] == hbm[1] - hbm[0]
    assert hbm[1] - hbm[0] >= 2 * (512 * 512 + 256 * 512) * 2  # two layers' weights and outputs at least


def precisions(x, w):
    import jax.numpy as jnp

    return (jnp.dot(x, w, precision="highest"), jnp.dot(x, w),
            jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)))


def test_float32_highest_runs_at_the_float32_rate_and_bfloat16_at_the_bf16_rate(v5e):
    """Three (256 x 512) @ (512 x 1024) dots: float32 HIGHEST, float32 default, bfloat16. On a TPU only HIGHEST
    is float32 work (the default is one bf16 pass); on a GPU both float32 dots are. t_compute prices each class
    at its own rate."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from sgt_jax.training.chips import CHIPS_BY_NAME

    one = 2 * 256 * 512 * 1024
    inputs = [((256, 512), jnp.float32, P()), ((512, 1024), jnp.float32, P())]
    for devices, f32_dots, chip in ((v5e[:1], 1, CHIPS_BY_NAME["v5e"]), (h100s("1x1x1"), 2, CHIPS_BY_NAME["h100"])):
        r = estimate(devices, precisions, *inputs)
        assert r["flops"] == {"float32": f32_dots * one, "low_precision": (3 - f32_dots) * one}, chip.name
        expected = f32_dots * one / chip.f32_flops + (3 - f32_dots) * one / chip.bf16_flops
        assert r["t_compute_seconds"] == pytest.approx(expected, rel=1e-12)


def loop_free(a, b, q, k):
    import jax.numpy as jnp

    return a @ b, jnp.einsum("btkgd,bskd->bkgts", q, k)  # a matmul and grouped-query attention scores


def test_flops_of_a_loop_free_program_equal_xla_cost_analysis(v5e):
    """Where XLA's own count is right (no loops): the TPU's cost_analysis() and, for the GPU-compiled module,
    XLA's HLO cost analysis run on the CPU client. The attention einsum becomes a convolution with dilated
    spatial dimensions on the TPU, whose FLOPs only count the window positions that land on the input."""
    import jax
    import jax.numpy as jnp
    from jax._src import xla_bridge
    from jax._src.lib import _jax
    from jax.sharding import PartitionSpec as P

    from sgt_jax.training import chips, roofline

    inputs = [((1024, 512), jnp.bfloat16, P()), ((512, 1024), jnp.bfloat16, P()),
              ((4, 128, 4, 2, 32), jnp.bfloat16, P()), ((4, 128, 4, 32), jnp.bfloat16, P())]
    by_hand = 2 * 1024 * 512 * 1024 + 2 * (4 * 4 * 2) * 128 * 128 * 32
    tpu = compiled(v5e[:1], loop_free, *inputs)
    assert roofline.estimate(tpu, chips.CHIPS_BY_NAME["v5e"], v5e[:1])["flops"]["low_precision"] == \
        tpu.cost_analysis()["flops"] == by_hand
    gpu = h100s("1x1x1")
    program = compiled(gpu, loop_free, *inputs)
    xla = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), program.runtime_executable().hlo_modules()[0])
    assert roofline.estimate(program, chips.CHIPS_BY_NAME["h100"], gpu)["flops"]["low_precision"] == \
        xla["flops"] == by_hand
    assert jax.devices()[0].platform == "cpu"


def attention_step(impl, mesh):
    """Gradients of a sum over the attention kernel's output, the kernel in a shard_map over the batch."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from sgt_jax.models.attention import dot_product_attention

    def loss(q, k, v, mask):
        local = jax.shard_map(lambda *a: dot_product_attention(*a, attention_impl=impl), mesh=mesh,
                              in_specs=(P("d"),) * 4, out_specs=P("d"), check_vma=False)
        return local(q, k, v, mask).astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))


def test_attention_kernels_are_priced_from_their_operands(v5e):
    """Forward and backward of attention through the opaque kernels, 4 query heads (2 kv heads), sequence 256,
    head size 128; batch 8 over 4 TPUs or 8 GPUs, and 4 over 4 TPUs (one row a chip: the compiler drops the
    batch dimension of the kernel's operands). One product is 2·B·H·S·S·D per device. Splash: forward 2
    products, its dkv kernel 4, its dq kernel 3. cuDNN: forward 2, fused backward 5 (2.5x the forward)."""
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    def inputs(rows):
        return [((rows, 256, 4, 128), jnp.bfloat16, P("d")), ((rows, 256, 2, 128), jnp.bfloat16, P("d")),
                ((rows, 256, 2, 128), jnp.bfloat16, P("d")), ((rows, 256), jnp.int32, P("d"))]

    for devices, rows, impl, products in ((v5e, 8, "splash", 2 + 4 + 3), (v5e, 4, "splash", 2 + 4 + 3),
                                          (h100s(), 8, "cudnn", 2 + 5)):
        r = estimate(devices, attention_step(impl, Mesh(np.array(devices), ("d",))), *inputs(rows))
        product = 2 * (rows // len(devices)) * 4 * 256 * 256 * 128
        assert r["attention_flops"] == products * product, (impl, rows)
        assert r["flops"]["low_precision"] >= r["attention_flops"]
        assert r["opaque_kernels"] == {}


def test_replica_group_spellings():
    """Explicit, iota and mesh-axes replica groups (with sub-axes and a device order), worked out by hand."""
    from sgt_jax.training.hlo import replica_groups

    assert replica_groups("replica_groups={{0,1},{2,3}}, dimensions={0}", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups={}, to_apply=%add", 4) == [[0, 1, 2, 3]]
    assert replica_groups("replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}", 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert replica_groups("replica_groups=mesh['a'=2,'b'=4] {'b'}, dimensions={0}", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("replica_groups=mesh['a'=2,'b'=4] {'a'}, x", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # 'a':(1)2 is the major half of a (a stride of 4 devices); 'a':(2)4 its minor four.
    assert replica_groups("replica_groups=mesh['a'=8] {'a':(1)2}, x", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("replica_groups=mesh['a'=8] {'a':(2)4}, x", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("replica_groups=mesh['a'=2,'b'=2], device_ids=(0,2,1,3) {'b'}, x", 4) == [[0, 2], [1, 3]]
    # An iota device order: arange(16) as (2, 4, 2), transposed (0, 2, 1), is the mesh (4, 1, 4) with rows
    # [0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]; grouping axis_0 takes its columns.
    assert replica_groups("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=4], device_ids=([2,4,2]T(0,2,1)) "
                          "{'axis_0'}, dimensions={0}", 16) == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13],
                                                                [6, 7, 14, 15]]
    assert replica_groups("source_target_pairs={{0,1},{1,0}}", 2) is None


def test_a_cpu_program_gets_counts_and_no_times():
    """No chip figures for a CPU: FLOPs and bytes are counted, the times and the step figures are absent."""
    import jax
    import jax.numpy as jnp

    from sgt_jax.training import roofline

    program = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
    r = roofline.estimate(program, None, jax.devices()[:1])
    assert r["flops"]["float32"] == 2 * 64 * 32 * 16 and "bound_seconds" not in r
    assert set(roofline.step_figures(r, tokens_per_step=1, model_flops=1, chip=None, num_devices=1).values()) == {None}


@pytest.mark.slow
def test_compile_report_of_a_small_llama_carries_the_roofline(tmp_path):
    """The small Llama of tests/test_compile.py compiled for v5e:2x2 (data 1 x fsdp 4): both steps carry the
    roofline, the train step's bound is positive, the MFU it implies is in (0, 1] and agrees with the model
    FLOPs over the bound; the table prints it as an estimate."""
    from test_compile import SMALL, _overrides

    from sgt_jax.config import load_config
    from sgt_jax.train import DEFAULT_CONFIG
    from sgt_jax.training import compile as compile_lib

    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    cfg = load_config(DEFAULT_CONFIG, _overrides(tmp_path, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1"))
    devices = compile_lib.topology_devices("v5e:2x2")
    report = compile_lib.build_report(cfg, "v5e:2x2", devices, compile_lib.compile_steps(cfg, devices))
    for step in ("train_step", "eval_step"):
        r = report[step]["roofline"]
        assert r["estimate"] and r["bound_seconds"] > 0 and r["loops_without_trip_count"] == 0, step
        assert r["flops"]["float32"] > 0 and r["flops"]["low_precision"] > 0, step  # the cloak and the base
    assert report["roofline_step_seconds"] == report["train_step"]["roofline"]["bound_seconds"] > 0
    assert 0 < report["roofline_mfu"] <= 1
    assert report["roofline_mfu"] == pytest.approx(report["model_flops_per_step"] /
                                                   (report["roofline_step_seconds"] * 4 * 197e12))
    assert report["roofline_tokens_per_second"] == pytest.approx(16 * 2 * 128 / report["roofline_step_seconds"])
    table = compile_lib.format_table(report)
    assert "estimate" in table and "MFU" in table
    json.dumps(report)


def test_the_tpu_reduce_scatter_fusion_is_priced_as_a_reduce_scatter(v5e):
    """x split along its columns over 4 v5e chips: each chip's partial y is summed and scattered. The TPU compiler
    writes that as an all-reduce of which each chip keeps a quarter (a fusion), which moves (n-1)/n of the
    buffer per chip, not the 2(n-1)/n of an all-reduce. The buffer is the 32 MiB partial y (the compiler pads
    it by up to 10% to split it evenly)."""
    from jax.sharding import PartitionSpec as P

    r = sharded_matmul(v5e, P(None, "d"), P("d"), m=4096)
    assert set(r["collectives"]) - {"collective-permute"} == {"reduce-scatter"}, r["collectives"]
    scatter = r["collectives"]["reduce-scatter"]
    assert 32 * MiB <= scatter["bytes"] <= 1.1 * 32 * MiB
    assert scatter["wire_bytes"] == pytest.approx(3 / 4 * scatter["bytes"])


def test_the_tpu_backward_scan_reads_one_saved_layer_per_iteration(v5e):
    """The gradient of 16 rematerialised layers tanh(x @ w_l) (x, w_l: 2048 x 2048 bf16, 8 MiB each) on a v5e: the
    backward loop takes each layer's saved input out of the stacked residuals through a fusion nested in a
    fusion. Per layer the step moves a handful of 8 MiB tensors (weight, saved input, recomputed output,
    incoming and outgoing gradients, weight gradient): at most 12 here. Reading the whole 128 MiB stack in
    every iteration, as a count that stops at the outer fusion would, adds 16 tensors per layer."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    def loss(ws, x):
        body = jax.checkpoint(lambda c, w: (jnp.tanh(c @ w), None))
        return jax.lax.scan(body, x, ws)[0].astype(jnp.float32).sum()

    layers, tensor = 16, 2048 * 2048 * 2
    r = estimate(v5e[:1], jax.grad(loss), ((layers, 2048, 2048), jnp.bfloat16, P()), ((2048, 2048), jnp.bfloat16, P()))
    assert r["flops"]["low_precision"] == 4 * layers * 2 * 2048**3  # forward, recomputed forward, two backward dots
    assert r["hbm_bytes"] <= 12 * layers * tensor, r["hbm_bytes"] / (layers * tensor)


def test_a_program_the_estimate_cannot_read_keeps_its_compile_report(monkeypatch):
    """The roofline is an extra: if it fails on a program, the step report keeps its memory and says n/a."""
    import jax
    import jax.numpy as jnp

    from sgt_jax.training import compile as compile_lib, roofline

    def broken(*args):
        raise ValueError("an instruction the reader does not know")

    monkeypatch.setattr(roofline, "estimate", broken)
    program = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
    step = compile_lib.step_report(program, 1.0, chip=None, devices=jax.devices()[:1])
    assert step["memory"]["total"] > 0 and "does not know" in step["roofline"]["error"]
    report = {"train_step": step, "eval_step": None, **roofline.step_figures(
        step["roofline"], tokens_per_step=1, model_flops=1, chip=None, num_devices=1)}
    assert "n/a" in "\n".join(compile_lib._roofline_rows(report))
