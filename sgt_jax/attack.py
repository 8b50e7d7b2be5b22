"""``python -m sgt_jax.attack``: Inversion attacks on an SGT and the privacy-utility frontier (``sgt_jax.evaluation.attack``)."""

import sys

from sgt_jax.evaluation.attack import main

if __name__ == "__main__":
    sys.exit(main())
