"""``python -m sgt_jax.export_torch``: Export an SGT artifact to PyTorch on transformers' classes (``sgt_jax.export.torch_export``)."""

import sys

from sgt_jax.export.torch_export import main

if __name__ == "__main__":
    sys.exit(main())
