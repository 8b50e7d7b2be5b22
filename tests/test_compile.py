"""Ahead-of-time compilation (``python -m sgt_jax.train --compile-only``) for a TPU slice on this CPU machine,
and what the compiled TPU program shows: the frozen base sharded over fsdp inside the step (per-layer
all-gathers, no gradient collective in a loop), the cloak's matmuls at HIGHEST precision, and the fit check.

The model is a small Llama config.json written here (no weights); expected sizes are counted by hand from it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.recipe_models import MODELS
from conftest import cpu_heavy_lock

import libtpu  # noqa: E402,F401  (the test extra installs it: its absence must fail, not skip the TPU compiles)

# Every test here runs libtpu's compiler (a minute or more each on 2 cores): outside the contributors' inner loop.
pytestmark = pytest.mark.slow

# A small Llama: hidden 256, 8 query / 4 kv heads of 32, MLP 512, vocab 1024; ssl truncation keeps layers 0..2.
SMALL = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512,
             num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4, vocab_size=1024, rms_norm_eps=1e-5,
             rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)
# By hand: q 256x256, k and v 256x128, o 256x256, MLP 3 x 256x512, two norms of 256.
LAYER_PARAMS = 256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 512 + 2 * 256
BASE_BYTES = 2 * (1024 * 256 + 3 * LAYER_PARAMS)  # bf16 embedding + 3 kept layers


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("small-llama")
    (path / "config.json").write_text(json.dumps(SMALL))
    return path


def _overrides(model_dir, *extra):
    return [f"model.path={model_dir}", "model.dtype=bfloat16", "model.truncate_at_layer=2", "data.max_length=128",
            "data.buckets=[128]", "data.batch_size=16", "optimizer.grad_accum_steps=2", "model.remat_policy=full",
            *extra]


@pytest.fixture(scope="module")
def fsdp4(small_dir):
    """The train step compiled once for v5e:2x2 with data=1, fsdp=4."""
    from sgt_jax.training import compile as compile_lib
    from sgt_jax.config import load_config
    from sgt_jax.train import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG, _overrides(small_dir, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1"))
    devices = compile_lib.topology_devices("v5e:2x2")
    return compile_lib.compile_steps(cfg, devices, with_eval=False)


def test_base_enters_the_step_sharded_over_fsdp(fsdp4):
    """Per-device bytes of the base as the compiled step takes it (its own input shardings) are <= 0.3x the
    whole base (what every chip held when the step gathered it): fails if the base is replicated again."""
    import jax

    base_shardings = fsdp4["train"].input_shardings[0][1]
    shapes = jax.tree.leaves(fsdp4["base_state"])
    per_device = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                     for x, s in zip(shapes, jax.tree.leaves(base_shardings)))
    assert sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in shapes) == BASE_BYTES
    assert per_device <= 0.3 * BASE_BYTES, (per_device, BASE_BYTES)


def test_fsdp_collectives_per_layer_and_the_cloak_gradient_reduced_once_per_micro_batch(fsdp4):
    """In the optimized TPU HLO: the base's layers are all-gathered inside the layer scan, no all-gather returns
    more than one layer's parameters (no whole-model gather), and the reductions inside loop bodies (the cloak's
    gradient, scattered over fsdp into its sharded accumulator once per micro-batch; the TPU compiler may lower
    a scatter as an all-reduce it slices) add up to at most the cloak's float32 gradient: nothing is reduced
    per layer, and no whole gradient is reduced twice."""
    import jax

    from sgt_jax.training import hlo

    comms = hlo.collectives(fsdp4["train"].as_text())
    gathers = [c for c in comms if c["op"] == "all-gather"]
    assert any(c["in_loop"] for c in gathers), "no all-gather inside a loop: the layers are not gathered per layer"
    assert max(c["result_bytes"] for c in gathers) <= 2 * LAYER_PARAMS, max(c["result_bytes"] for c in gathers)
    cloak_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(fsdp4["state"].params))
    reduced_in_loops = sum(c["operand_bytes"] for c in comms if c["op"] in ("all-reduce", "reduce-scatter")
                           and c["in_loop"])
    assert 0 < reduced_in_loops <= 1.1 * cloak_bytes, (reduced_in_loops, cloak_bytes)


def test_cloak_dots_run_at_highest_precision_and_base_dots_do_not(fsdp4):
    """Every float32 dot (the cloak: estimators, heads, their backward) carries HIGHEST; every bfloat16 dot (the
    frozen base) keeps the default. Fails if cloak.matmul_precision stops reaching a dot, or leaks into the base."""
    from readback import dot_precisions

    dots = dot_precisions(fsdp4["train"].as_text())
    cloak = [d for d in dots if d["operand_dtypes"] and set(d["operand_dtypes"]) == {"f32"}]
    base = [d for d in dots if "bf16" in d["operand_dtypes"]]
    assert cloak and base, (len(cloak), len(base))
    assert all("highest" in d["precision"] for d in cloak), [d for d in cloak if "highest" not in d["precision"]][:3]
    assert not any("highest" in d["precision"] for d in base), [d for d in base if "highest" in d["precision"]][:3]


def test_compile_only_cli_on_cpu_for_the_tiny_config(tmp_path, capsys):
    """No --topology: the embedded tiny run compiles for the local CPU, prints the table and the JSON report."""
    from sgt_jax.train import main

    report = tmp_path / "report.json"
    assert main(["--compile-only", "--compile-report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["fits"] is True and data["devices"] >= 1
    for step in ("train_step", "eval_step"):
        assert data[step]["memory"]["total"] > data[step]["memory"]["arguments"] > 0
    assert "train_step" in capsys.readouterr().out


def test_topologies_give_one_device_per_chip_with_the_chips_hbm():
    """v4 and v5p (two TensorCores a chip) as JAX runs them, megacore: 8 devices for 2x2x2, each with the chip's
    32 / 95 GiB; v5e: 16 single-core chips of 16 GiB. Per-core devices get their share of the chip."""
    from types import SimpleNamespace

    from sgt_jax.training import compile as compile_lib

    gib = 2**30
    for name, count, hbm in (("v4:2x2x2", 8, 32 * gib), ("v5p:2x2x2", 8, 95 * gib), ("v5e:4x4", 16, 16 * gib)):
        devices = compile_lib.topology_devices(name)
        assert len(devices) == count, name
        assert compile_lib.chip_spec(devices)[0] == hbm, name
    cores = [SimpleNamespace(platform="tpu", device_kind="TPU v4", core_on_chip=c) for c in (0, 1)]
    assert compile_lib.chip_spec(cores) == (16 * gib, 275e12 / 2)


def test_configuration_that_cannot_fit_exits_3_with_one_line(small_dir, capsys):
    """data.batch_size 512 at sequence 2048 on v5e:2x2 (16 GiB chips): exit 3 and one error line with bytes."""
    from sgt_jax.train import main

    code = main(["--compile-only", "--topology", "v5e:2x2",
                 *_overrides(small_dir, "data.batch_size=512", "data.max_length=2048", "data.buckets=[2048]",
                             "optimizer.grad_accum_steps=1", "model.remat_policy=none", "validation.perplexity=false",
                             "mesh.data=-1", "mesh.fsdp=1")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 3 and len(err) == 1 and "does not fit" in err[0], err
    assert any(ch.isdigit() for ch in err[0])


def test_splash_attention_compiles_for_v5e_4x4_under_data_fsdp_tensor(small_dir):
    """model.attention_impl=splash with data=2, fsdp=2, tensor=4: both steps compile for the TPU and carry the
    Mosaic kernel (tpu_custom_call) — fails if the kernel is left to the automatic partitioner again."""
    from sgt_jax.training import compile as compile_lib
    from sgt_jax.config import load_config
    from sgt_jax.train import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG, _overrides(small_dir, "model.attention_impl=splash", "mesh.data=2",
                                                 "mesh.fsdp=2", "mesh.tensor=4"))
    result = compile_lib.compile_steps(cfg, compile_lib.topology_devices("v5e:4x4"))
    for step in ("train", "eval"):
        assert 'custom_call_target="tpu_custom_call"' in result[step].as_text(), step


def test_splash_interpret_mode_equals_xla_on_8_simulated_devices():
    """Pallas interpret mode on an 8-device CPU mesh (data=2, fsdp=2, tensor=2): forward and input gradients of
    splash equal the XLA kernel within 2e-5 (float32, left-padded rows, GQA), causal and with a sliding window
    inside the train step's kind of shard_map, bidirectional (plain and windowed) under the eval step's jit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).parent / "_splash_worker.py"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for case in results:
        assert case["max_abs_out"] > 0.1, case  # a real comparison, not of zeros
        assert max(case["max_abs_diff"]) <= 2e-5, case


# The three 7B recipes, compiled for v5e:4x4 (16 chips of 16 GiB) from the models' published config.json shapes.
RECIPE_MODELS = {name: MODELS[name] for name in ("llama2_7b", "llama3_8b", "mistral_7b_instruct")}


def _base_bytes(model: dict, layers: int) -> tuple[int, int]:
    """(bf16 bytes of the truncated base: embedding + ``layers`` layers, bytes of one layer), counted by hand."""
    d, f, kv = model["hidden_size"], model["intermediate_size"], model["num_key_value_heads"]
    layer = 2 * (2 * d * d + 2 * d * (kv * d // model["num_attention_heads"]) + 3 * d * f + 2 * d)
    return 2 * model["vocab_size"] * d + layers * layer, layer


def _recipe_config(tmp_path_factory, recipe: str, *overrides):
    from pathlib import Path

    from sgt_jax.config import load_config

    path = tmp_path_factory.mktemp(recipe)
    (path / "config.json").write_text(json.dumps(RECIPE_MODELS[recipe]))
    return load_config(str(Path(__file__).parent.parent / "configs" / f"{recipe}.yaml"), [f"model.path={path}", *overrides])


def _compiled_base_bytes(result) -> int:
    """Per-device bytes of the base as the compiled train step takes it (its own input shardings)."""
    import jax

    shapes = jax.tree.leaves(result["base_state"])
    shardings = jax.tree.leaves(result["train"].input_shardings[0][1])
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(shapes, shardings))


# 5-12 CPU-minutes each: deselected by setup.cfg (CI's 30 minutes), run with -m tpu7b.
@pytest.fixture(scope="module", params=sorted(RECIPE_MODELS))
def recipe(request, tmp_path_factory):
    """One recipe's train and eval steps compiled once for v5e:4x4 with the recipe's own settings."""
    from sgt_jax.training import compile as compile_lib

    cfg = _recipe_config(tmp_path_factory, request.param)
    devices = compile_lib.topology_devices("v5e:4x4")
    with cpu_heavy_lock(tmp_path_factory):
        result = compile_lib.compile_steps(cfg, devices)
    report = compile_lib.build_report(cfg, "v5e:4x4", devices, result)
    # The numbers benchmarks/README.md records (shown with pytest -rP).
    print(compile_lib.format_table(report))
    print(json.dumps(report, default=str))
    return request.param, result, report


@pytest.mark.tpu7b
def test_7b_recipe_compiles_for_v5e_4x4_and_fits(recipe, tmp_path_factory):
    """With its own mesh (data 4 x fsdp 4), batch, remat and splash settings the recipe's train and eval steps need
    at most 75% of a 16 GiB v5e chip (12 GiB); the base enters the compiled step sharded four ways (<= 0.26x the
    whole base, which is what every chip holds at fsdp=1: the base is replicated when no axis shards "embed"),
    so raising fsdp from 1 to 4 cuts its bytes per chip in proportion; the reductions in loop bodies add up to
    at most one cloak gradient (once per micro-batch, never per layer) and no all-gather returns more than one
    base layer."""
    import jax

    from sgt_jax.training import hlo

    name, result, report = recipe
    model = RECIPE_MODELS[name]
    assert report["mesh"] == {"data": 4, "fsdp": 4, "tensor": 1} and report["devices"] == 16
    assert report["fits"], (name, report["needed_bytes_per_device"] / 2**30, report["train_step"]["memory"],
                            report["eval_step"]["memory"])
    assert report["needed_bytes_per_device"] <= 0.75 * 16 * 2**30, report["needed_bytes_per_device"] / 2**30
    whole, layer = _base_bytes(model, result["truncate_at_layer"] + 1)
    assert sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(result["base_state"])) == whole
    assert whole / 4 <= _compiled_base_bytes(result) <= 0.26 * whole, (_compiled_base_bytes(result), whole)
    # The same base laid out for mesh.fsdp=1 (data 16) is whole on every chip: fsdp 4 holds <= 0.3x of it.
    from sgt_jax.models import DecoderConfig
    from sgt_jax.training import builder, compile as compile_lib, parallel

    cfg1 = _recipe_config(tmp_path_factory, name, "mesh.fsdp=1", "mesh.data=-1")
    mesh1 = parallel.make_mesh(cfg1.mesh, devices=compile_lib.topology_devices("v5e:4x4"))
    base1 = builder.abstract_model(cfg1, DecoderConfig.from_hf(cfg1.model.path), mesh1,
                                   truncate_at_layer=result["truncate_at_layer"], platform="tpu")[1]
    assert dict(mesh1.shape) == {"data": 16, "fsdp": 1, "tensor": 1}
    assert compile_lib.tree_bytes(base1) == whole
    assert _compiled_base_bytes(result) <= 0.3 * compile_lib.tree_bytes(base1)
    for step in ("train", "eval"):
        assert 'custom_call_target="tpu_custom_call"' in result[step].as_text(), step  # splash, partitioned
    comms = hlo.collectives(result["train"].as_text())
    cloak_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(result["state"].params))
    assert sum(c["operand_bytes"] for c in comms if c["op"] in ("all-reduce", "reduce-scatter") and c["in_loop"]) \
        <= 1.1 * cloak_bytes  # the cloak's gradient once per micro-batch, nothing per layer
    assert max(c["result_bytes"] for c in comms if c["op"] == "all-gather") <= layer

