"""``python -m sgt_jax.evaluate``: Evaluate an SGT on a dataset: utility, obfuscation, learned attack, ROUGE (``sgt_jax.evaluation.evaluate``)."""

import sys

from sgt_jax.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
