"""Shared test set-up. Multi-device tests run in subprocesses with their own XLA_FLAGS."""

import os

# Keep single-process tests on one CPU device and quiet; subprocess tests set their own flags.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _share_compiled_programs():
    """A persistent XLA compilation cache for this pytest process (and each xdist worker: they share the folder):
    many tests compile the same small programs (the tiny default's train and eval steps), and a cache hit skips
    the compile. Set in-process only, so the CLIs that tests run in subprocesses compile as a user's would. A
    deviceless TPU/GPU compile writes an entry that cannot be read back without that device (JAX warns and
    compiles again; setup.cfg filters the warning)."""
    import getpass
    import tempfile

    import jax

    folder = os.path.join(tempfile.gettempdir(), f"sgt_jax_tests_xla_cache_{getpass.getuser()}")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


_share_compiled_programs()


def cpu_heavy_lock(tmp_path_factory):
    """Held around the 7B TPU compiles and the two-host launches so that they never run at the same time on
    different pytest-xdist workers: side by side on a 2-core machine the compile starves the two hosts' gloo
    connection set-up ("Connect timeout"). The lock file lives in the folder every worker's base temp shares;
    hold it only around the work itself (a fixture's teardown may wait on the scheduler)."""
    import filelock

    return filelock.FileLock(str(tmp_path_factory.getbasetemp().parent / "cpu_heavy.lock"), timeout=3600)


def computed_once(tmp_path_factory, name, compute, *, paths=()):
    """``compute()`` (a JSON-able result) once per test session even when the tests that use it run on different
    pytest-xdist workers: the first worker to ask computes it under a file lock in the folder every worker's base
    temp shares and writes it there; the others wait and read it back (the files it names stay: a session's temp
    folders are kept until it ends). ``paths``: the keys, at any depth, whose values are read back as Paths."""
    import json
    from pathlib import Path

    def decode(value):
        if isinstance(value, dict):
            return {k: Path(v) if k in paths and isinstance(v, str) else decode(v) for k, v in value.items()}
        return value

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:  # one process: a module-scoped fixture already computes it once; the same types either way
        return decode(json.loads(json.dumps(compute(), default=str)))
    import filelock

    root = tmp_path_factory.getbasetemp().parent
    stored = root / f"{name}-{run}.json"
    with filelock.FileLock(str(root / f"{name}-{run}.lock"), timeout=3600):
        if not stored.is_file():
            stored.write_text(json.dumps(compute(), default=str))
    return decode(json.loads(stored.read_text()))
