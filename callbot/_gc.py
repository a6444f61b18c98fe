"""Garbage-collector thresholds for a process that serves a bot.

Every active call keeps a few dozen container objects (its merged snapshot,
its record, its handle). CPython's default thresholds run a young-generation
collection every 700 container allocations, and each notification allocates
hundreds, so live calls are traversed again and again while they age, and a
full collection runs whenever the number of long-lived objects grew by a
quarter. Collecting the young generations far less often lets short-lived
objects die by reference counting before any collection sees them; it halved
the cost of a notification with tens of thousands of live calls (see
benchmarks/README.md). Memory is unchanged except for cyclic garbage,
which waits a little longer to be collected.
"""

from __future__ import annotations

import gc

__all__ = ["SERVING_THRESHOLDS", "tune_for_serving"]

# The interpreter's defaults on CPython 3.11 to 3.13; a process that changed them chose its own.
_INTERPRETER_DEFAULTS = (700, 10, 10)
SERVING_THRESHOLDS = (50_000, 20, 10)
"""What :func:`tune_for_serving` sets."""


def tune_for_serving() -> bool:
    """Set :data:`SERVING_THRESHOLDS`, unless the process already chose its own thresholds.

    Returns whether the thresholds were changed.
    """
    if gc.get_threshold() != _INTERPRETER_DEFAULTS:
        return False
    gc.set_threshold(*SERVING_THRESHOLDS)
    return True
