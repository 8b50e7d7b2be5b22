"""The one exception type for data problems a user can cause (bad path, column, encoding, settings)."""

from __future__ import annotations

from sgt_jax.errors import SGTError


class DataError(SGTError):
    """A user-fixable data problem; the message is one line naming the file/setting and the fix."""
