"""Which platform a run is on, decided without starting a backend, and quiet CLIs on a CPU machine that has the
TPU compiler (libtpu) and the CUDA plugin installed (the test extra installs both)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgt_jax import platforms

ROOT = Path(__file__).resolve().parent.parent


def test_the_platform_follows_the_running_backend_then_the_users_choice_then_the_hardware(monkeypatch):
    # The test process has started its CPU backend: that decides.
    assert platforms.local_platform() == "cpu"
    monkeypatch.setattr(platforms, "_backends_started", lambda: False)
    for value, expected in (("cuda,cpu", "gpu"), ("tpu", "tpu"), ("cpu", "cpu"), ("gpu", "gpu")):
        monkeypatch.setattr(platforms, "_jax_platforms_setting", lambda value=value: value)
        assert platforms.requested_platform() == expected and platforms.local_platform() == expected
    monkeypatch.setattr(platforms, "_jax_platforms_setting", lambda: None)
    for found, expected in (("tpu", "tpu"), ("gpu", "gpu"), (None, "cpu")):
        monkeypatch.setattr(platforms, "accelerator_present", lambda found=found: found)
        assert platforms.local_platform() == expected


def test_the_cpu_is_chosen_only_without_a_choice_and_without_accelerators(monkeypatch):
    chosen = []
    monkeypatch.setattr(platforms, "use_cpu_backend", lambda: chosen.append("cpu"))
    cases = [(None, None, ["cpu"]), (None, "gpu", []), (None, "tpu", []), ("cuda", None, [])]
    for requested, found, expected in cases:
        chosen.clear()
        monkeypatch.setattr(platforms, "_jax_platforms_setting", lambda requested=requested: requested)
        monkeypatch.setattr(platforms, "accelerator_present", lambda found=found: found)
        platforms.prefer_cpu_without_accelerators()
        assert chosen == expected, (requested, found)


def test_a_cli_error_on_a_cpu_machine_with_libtpu_and_the_cuda_plugin_prints_only_its_line():
    """python -m sgt_jax.train with a mesh the one CPU cannot hold, in an environment without JAX_PLATFORMS: the
    error is raised after the backend starts, yet stdout and stderr hold exactly the one error line — no
    libtpu host-bounds / worker-hostname errors, no CUDA plugin traceback, no cudart warnings."""
    import importlib.util

    assert importlib.util.find_spec("libtpu") and importlib.util.find_spec("jax_plugins.xla_cuda12"), \
        "the test extra installs libtpu and the CUDA plugin: this checks that they stay quiet"
    if platforms.accelerator_present() is not None:
        pytest.skip("this machine has an accelerator: JAX chooses the platform there")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "TPU_", "XLA_", "TF_CPP"))}
    proc = subprocess.run([sys.executable, "-m", "sgt_jax.train", "mesh.data=3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: mesh.data=3"), lines[:20]
