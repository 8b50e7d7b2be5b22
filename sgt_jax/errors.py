"""The exceptions a user can cause (bad setting, path, model family, data, checkpoint, artifact). Every one
derives from :class:`SGTError` and carries a one-line message naming the setting and the fix; the entry
points print that line instead of a traceback (exit code 2).

This module imports nothing from the package but :mod:`sgt_jax.platforms` (which imports nothing from it):
every other module may import it, so the error types live next to the code that raises them and the CLIs
catch the one base class."""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2


class SGTError(ValueError):
    """A user-fixable problem. A ``ValueError`` too, so code that caught those before keeps working."""

    def __init__(self, message: str = ""):
        # One line, so it reads cleanly at the edge of a CLI.
        super().__init__(" ".join(str(message).split()))


def run_cli(body) -> int:
    """Run a command-line entry point: the CPU on a machine without accelerators (no TPU / CUDA plugin start-up
    noise; see :mod:`sgt_jax.platforms`), INFO logging without third-party chatter, and a user-caused error
    printed as its one line (exit code 2) instead of a traceback."""
    import logging
    import sys

    from sgt_jax import platforms

    platforms.prefer_cpu_without_accelerators()

    # force: importing Orbax already gave the root logger absl's default WARNING handler.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        body()
    except SGTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0
