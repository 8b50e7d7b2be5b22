"""Shared test set-up. Multi-device tests run in subprocesses with their own XLA_FLAGS."""

import os

# Keep single-process tests on one CPU device and quiet; subprocess tests set their own flags.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
