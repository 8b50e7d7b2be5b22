"""The one exception type for data problems a user can cause (bad path, column, encoding, settings)."""

from __future__ import annotations


class DataError(ValueError):
    """A user-fixable data problem; the message is one line naming the file/setting and the fix."""

    def __init__(self, message: str):
        # Keep every message on one line so it reads cleanly at the edge of a CLI.
        super().__init__(" ".join(str(message).split()))
