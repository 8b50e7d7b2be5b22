"""``python -m sgt_jax.bench``: benchmark the train step (``sgt_jax.training.benchmark``; see benchmarks/README.md)."""

import sys

from sgt_jax.errors import run_cli
from sgt_jax.training.benchmark import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
