"""``python tests/_skewed_clock_worker.py SCALE,OFFSET [python -m sgt_jax.train's arguments]``: that command with
a wall clock of OFFSET + SCALE * time.monotonic() for the time-based validation and checkpoint intervals, so
that the processes of a multi-process test have clocks that disagree."""

import functools
import sys
import time

import sgt_jax.train as cli
from sgt_jax.training import run

if __name__ == "__main__":
    scale, offset = (float(x) for x in sys.argv[1].split(","))
    cli.train = functools.partial(run.train, clock=lambda: offset + scale * time.monotonic())
    sys.exit(cli.main(sys.argv[2:]))
