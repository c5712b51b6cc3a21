"""A `preftune` command line whose optimizer steps each take `seconds` longer, for tests that send a
process a signal between steps (run it as `python -c slow_step_driver(s) ARGS...`)."""

from __future__ import annotations


def slow_step_driver(seconds: float) -> str:
    """Python source running `preftune.cli.main(sys.argv[1:])` with each step's objective delayed by
    `seconds` (long enough steps for the test to act between them; no effect on the numbers)."""
    return f"""
import sys, time
import preftune.train.run as train_run
real = train_run.objective_on_batch
def slow(*a, **kw):
    time.sleep({seconds!r})
    return real(*a, **kw)
train_run.objective_on_batch = slow
from preftune.cli import main
sys.exit(main(sys.argv[1:]))
"""
