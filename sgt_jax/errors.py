"""The exceptions a user can cause (bad setting, path, model family, data, checkpoint). Each carries a
one-line message naming the setting and the fix; entry points print it instead of a traceback."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    from sgt_jax.artifact import ArtifactError
    from sgt_jax.checkpoint import CheckpointError
    from sgt_jax.cloak import CloakConfigError
    from sgt_jax.config import ConfigError
    from sgt_jax.data.errors import DataError
    from sgt_jax.models.decoder import ModelLoadError
    from sgt_jax.parallel import MeshConfigError

    return (ArtifactError, CheckpointError, CloakConfigError, ConfigError, DataError, ModelLoadError, MeshConfigError)


def run_cli(body) -> int:
    """Run a command-line entry point: INFO logging without third-party chatter, and a user-caused error
    printed as its one line (exit code 2) instead of a traceback."""
    import logging
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        body()
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
