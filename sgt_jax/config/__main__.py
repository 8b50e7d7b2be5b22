"""``python -m sgt_jax.config``: print the configuration reference generated from the schema (paste into README)."""

from sgt_jax.config import reference_markdown

print(reference_markdown(), end="")
