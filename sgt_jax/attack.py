"""``python -m sgt_jax.attack``: Attacks on an SGT under each threat model and the privacy-utility frontier (``sgt_jax.training.attack_run``)."""

import sys

from sgt_jax.training.attack_run import main

if __name__ == "__main__":
    sys.exit(main())
