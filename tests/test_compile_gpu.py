"""``python -m sgt_jax.train --compile-only --topology h100:8`` on this CPU machine: XLA's GPU compiler (the CUDA
plugin and cuDNN of the gpu extra, in the test extra) compiles the real train and eval steps for NVIDIA GPUs
with the recipe's gpu: block (cuDNN flash attention, the launch scripts' mesh), reports their memory, and
refuses what cannot fit or cannot be partitioned in one line.

The model is a small Llama config.json written here (no weights) run with configs/llama2_7b.yaml: what differs
from the recipe is only the model's size, the sequence length and the accumulation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_compile import RECIPE_MODELS, SMALL

import jax_plugins.xla_cuda12  # noqa: F401  (the test extra installs it: its absence must fail, not skip)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "configs" / "llama2_7b.yaml")
CUDNN_FORWARD, CUDNN_BACKWARD = "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"
# Every (data, fsdp, tensor) mesh of 8 GPUs.
MESHES = [(d, f, 8 // (d * f)) for d in (1, 2, 4, 8) for f in (1, 2, 4, 8) if 8 % (d * f) == 0]


def _model_dir(tmp_path_factory, name: str, **changes) -> Path:
    path = tmp_path_factory.mktemp(name)
    (path / "config.json").write_text(json.dumps(dict(SMALL, **changes)))
    return path


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory, "small-llama")


def _small(model_dir, *extra):
    """The recipe at the small model's size: one kept layer, 128 tokens, no accumulation, no full model."""
    return [f"model.path={model_dir}", "model.truncate_at_layer=0", "data.max_length=128", "data.buckets=[128]",
            "optimizer.grad_accum_steps=1", "validation.perplexity=false", *extra]


def _compile_cli(monkeypatch, capsys, tmp_path, topology, overrides):
    """Runs the CLI; returns (exit code, report or None, the compiled steps or None, the error: lines)."""
    from sgt_jax.train import main
    from sgt_jax.training import compile as compile_lib

    compiled = {}
    real = compile_lib.compile_steps
    def first_kept(*args, **kwargs):  # every compile runs (--max-tokens compiles several); the first is kept
        result = real(*args, **kwargs)
        compiled.setdefault("result", result)
        return result

    monkeypatch.setattr(compile_lib, "compile_steps", first_kept)
    report = tmp_path / "report.json"
    code = main(["--config", RECIPE, "--compile-only", "--topology", topology, "--compile-report", str(report),
                 *overrides])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, json.loads(report.read_text()) if report.exists() else None, compiled.get("result"), errors


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "d%d-f%d-t%d" % m)
def test_every_cudnn_mesh_of_8_gpus_compiles_with_the_cudnn_kernel_and_fits(small_dir, mesh, monkeypatch, capsys,
                                                                            tmp_path):
    """h100:8 with the recipe's gpu: block (cuDNN attention) and each (data, fsdp, tensor) mesh — data 8 is the
    launch scripts' mesh and is given by the gpu: block itself: exit 0, the report's mesh, fits, and the cuDNN
    flash kernel (forward and backward) in the train step's HLO and its forward in the eval step's — the kernel
    is partitioned, not replaced. The 8 heads / 4 kv heads model covers kv heads tensor=8 does not divide."""
    given = [f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}"] if mesh != (8, 1, 1) else []
    code, report, result, errors = _compile_cli(monkeypatch, capsys, tmp_path, "h100:8", _small(small_dir, *given))
    assert (code, errors) == (0, []), errors
    assert report["mesh"] == dict(zip(("data", "fsdp", "tensor"), mesh)) and report["devices"] == 8 and report["fits"]
    assert report["chip"] == "NVIDIA H100 80GB HBM3" and report["hbm_bytes_per_device"] == 84_929_347_584
    train, evaluate = result["train"].as_text(), result["eval"].as_text()
    assert CUDNN_FORWARD in train and CUDNN_BACKWARD in train and CUDNN_FORWARD in evaluate


@pytest.mark.parametrize("tensor", [4, 8])
def test_heads_that_mesh_tensor_does_not_divide_are_refused_in_one_line(tmp_path_factory, tensor, monkeypatch,
                                                                        capsys, tmp_path):
    """6 attention heads over mesh.tensor 4 or 8: refused before anything compiles, one error line, exit 2."""
    six_heads = _model_dir(tmp_path_factory, "six-heads", hidden_size=192, num_attention_heads=6,
                           num_key_value_heads=2)
    overrides = _small(six_heads, f"mesh.data={8 // tensor}", "mesh.fsdp=1", f"mesh.tensor={tensor}")
    code, report, _, errors = _compile_cli(monkeypatch, capsys, tmp_path, "h100:8", overrides)
    assert code == 2 and report is None and len(errors) == 1, errors
    assert f"mesh.tensor={tensor}" in errors[0] and "6 attention heads" in errors[0]


@pytest.mark.slow
def test_a_batch_that_cannot_fit_exits_3_with_one_line(small_dir, monkeypatch, capsys, tmp_path):
    """4,096 rows of 2,048 tokens on 8 H100s (80 GB): the GPU compiler compiles it anyway; the report's fit
    check refuses it with exit 3 and one line giving the bytes."""
    overrides = _small(small_dir, "data.batch_size=4096", "data.max_length=2048", "data.buckets=[2048]")
    code, report, _, errors = _compile_cli(monkeypatch, capsys, tmp_path, "h100:8", overrides)
    assert code == 3 and len(errors) == 1 and "does not fit" in errors[0], errors
    assert report["needed_bytes_per_device"] > 0.9 * report["hbm_bytes_per_device"] and not report["fits"]
    assert "84,929,347,584" in errors[0]


@pytest.mark.slow
def test_two_hosts_of_8_gpus_give_16_devices_and_compile(small_dir, monkeypatch, capsys, tmp_path):
    """h100:2x8 as the SLURM script runs it (the gpu: block's data=-1 mesh: 16 data-parallel devices)."""
    code, report, result, errors = _compile_cli(monkeypatch, capsys, tmp_path, "h100:2x8", _small(small_dir))
    assert (code, errors) == (0, []), errors
    assert report["devices"] == 16 and report["mesh"] == {"data": 16, "fsdp": 1, "tensor": 1} and report["fits"]
    assert {d.process_index for d in result["mesh"].devices.flat} == {0, 1}
    assert CUDNN_BACKWARD in result["train"].as_text()


@pytest.mark.parametrize("name, count, hbm", [("h100:8", 8, 84_929_347_584), ("a100-80g:8", 8, 85_198_045_184),
                                              ("a100-40g:4x8", 32, 42_505_273_344)])
def test_gpu_topologies_give_their_devices_with_the_chips_memory(name, count, hbm):
    from sgt_jax.training import compile as compile_lib

    devices = compile_lib.topology_devices(name)
    assert len(devices) == count and devices[0].platform == "gpu"
    assert compile_lib.chip_spec(devices)[0] == hbm
    assert compile_lib.topology_platform(name) == "gpu" and compile_lib.topology_platform("v5e:4x4") == "tpu"


@pytest.mark.parametrize("topology, needle", [("h200:8", "h100:8"), ("h100", "h100:2x8"), ("h100:x8", "h100:2x8"),
                                              ("h100:0", "h100:8"), ("tpu-v9:4x4", "v5e:4x4")])
def test_a_bad_topology_is_one_line_exit_2(small_dir, topology, needle, monkeypatch, capsys, tmp_path):
    code, report, _, errors = _compile_cli(monkeypatch, capsys, tmp_path, topology, _small(small_dir))
    assert code == 2 and report is None and len(errors) == 1 and needle in errors[0], errors


def test_without_the_cuda_plugin_a_gpu_topology_is_one_line_naming_the_extra(small_dir, monkeypatch, capsys,
                                                                              tmp_path):
    from sgt_jax.training import topology

    monkeypatch.setattr(topology, "_cuda_plugin_installed", lambda: False)
    code, _, _, errors = _compile_cli(monkeypatch, capsys, tmp_path, "a100-40g:8", _small(small_dir))
    assert code == 2 and len(errors) == 1 and "pip install sgt_jax[gpu]" in errors[0], errors


@pytest.fixture(scope="module", params=sorted(RECIPE_MODELS))
def recipe_on_h100(request, tmp_path_factory):
    """One 7B recipe's train and eval steps compiled for h100:8 as the GPU launch scripts run it."""
    from sgt_jax.config import load_config
    from sgt_jax.training import compile as compile_lib

    path = tmp_path_factory.mktemp(request.param)
    (path / "config.json").write_text(json.dumps(RECIPE_MODELS[request.param]))
    cfg = load_config(ROOT / "configs" / f"{request.param}.yaml", [f"model.path={path}"],
                      platform=compile_lib.topology_platform("h100:8"))
    devices = compile_lib.topology_devices("h100:8")
    result = compile_lib.compile_steps(cfg, devices)
    report = compile_lib.build_report(cfg, "h100:8", devices, result)
    print(compile_lib.format_table(report))  # the numbers benchmarks/README.md records (pytest -rP)
    return cfg, result, report


@pytest.mark.slow
def test_7b_recipe_compiles_for_8_h100s_with_cudnn_and_the_launch_mesh_and_fits(recipe_on_h100):
    cfg, result, report = recipe_on_h100
    assert cfg.model.attention_impl == "cudnn" and report["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert report["fits"] and report["needed_bytes_per_device"] <= 0.9 * 84_929_347_584, report
    assert CUDNN_BACKWARD in result["train"].as_text() and CUDNN_FORWARD in result["eval"].as_text()


def test_a_device_of_an_unknown_chip_is_a_one_line_user_error():
    from types import SimpleNamespace

    from sgt_jax.errors import SGTError
    from sgt_jax.training import compile as compile_lib

    with pytest.raises(SGTError) as info:
        compile_lib.chip_spec([SimpleNamespace(platform="gpu", device_kind="NVIDIA B200")])
    assert "NVIDIA B200" in str(info.value) and "NVIDIA H100 80GB HBM3" in str(info.value)


@pytest.mark.slow
def test_max_tokens_finds_a_micro_batch_that_fits_and_one_more_step_that_does_not(tmp_path_factory, monkeypatch,
                                                                                  capsys, tmp_path):
    """--max-tokens on a100-40g:8 at 2,048 tokens, for a model wide enough (hidden 2,048) that some tens of rows
    fill a GPU: the rows per device it reports, compiled again through the CLI, fit (exit 0), and the first row
    count it found not to fit exits 3 — the answer is a compiled fact on both sides, not the line's prediction.
    Two proposals suffice: the line's first (41 rows) fits and its second (53) does not."""
    wide = _model_dir(tmp_path_factory, "wide-llama", hidden_size=2048, intermediate_size=5632,
                      num_attention_heads=16, num_key_value_heads=16)
    long = ["data.max_length=2048", "data.buckets=[2048]"]
    code, report, _, errors = _compile_cli(monkeypatch, capsys, tmp_path, "a100-40g:8",
                                           _small(wide, "--max-tokens", "--max-tokens-checks", "2", *long,
                                                  "data.batch_size=64"))
    assert (code, errors) == (0, []), errors
    capacity = report["capacity"]
    rows, fails = capacity["rows_per_device"], capacity["first_row_fails"]
    assert rows > 8 and capacity["tokens_per_device"] == rows * 2048 and capacity["seq_len"] == 2048
    assert fails is not None and rows < fails, capacity
    for count, expected in ((rows, 0), (fails, 3)):
        (tmp_path / str(count)).mkdir()
        code, _, _, errors = _compile_cli(monkeypatch, capsys, tmp_path / str(count), "a100-40g:8",
                                          _small(wide, *long, f"data.batch_size={8 * count}"))
        assert code == expected, (count, errors)
