"""Shared test set-up. Multi-device tests run in subprocesses with their own XLA_FLAGS."""

import os

# Keep single-process tests on one CPU device and quiet; subprocess tests set their own flags.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def cpu_heavy_lock(tmp_path_factory):
    """Held around the 7B TPU compiles and the two-host launches so that they never run at the same time on
    different pytest-xdist workers: side by side on a 2-core machine the compile starves the two hosts' gloo
    connection set-up ("Connect timeout"). The lock file lives in the folder every worker's base temp shares;
    hold it only around the work itself (a fixture's teardown may wait on the scheduler)."""
    import filelock

    return filelock.FileLock(str(tmp_path_factory.getbasetemp().parent / "cpu_heavy.lock"), timeout=3600)
