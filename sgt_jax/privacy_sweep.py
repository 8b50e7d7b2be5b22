"""``python -m sgt_jax.privacy_sweep``: Train and attack a grid of settings; plot the privacy-utility frontier (``sgt_jax.tools.privacy_sweep``)."""

import sys

from sgt_jax.tools.privacy_sweep import main

if __name__ == "__main__":
    sys.exit(main())
