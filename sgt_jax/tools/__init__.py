"""Tools beside the runtime: the step benchmark (python -m sgt_jax.bench), its FLOP model, and the privacy
sweep (python -m sgt_jax.privacy_sweep). They build on sgt_jax.training; nothing in the runtime imports them."""
