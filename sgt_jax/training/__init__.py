"""Training: the jitted step (one reduction), optimizer, mesh and sharding, trainer, loop, checkpoints, AOT compile."""
