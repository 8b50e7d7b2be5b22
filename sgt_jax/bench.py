"""``python -m sgt_jax.bench``: benchmark the train step (``sgt_jax.training.benchmark``; see benchmarks/README.md)."""

from sgt_jax.training.benchmark import main

if __name__ == "__main__":
    main()
