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
