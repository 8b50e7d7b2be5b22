"""``python -m sgt_jax.bench``: benchmark the train step (``sgt_jax.tools.benchmark``; see benchmarks/README.md)."""

import sys

from sgt_jax.errors import run_cli
from sgt_jax.tools.benchmark import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
