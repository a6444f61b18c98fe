"""The clock callbot measures deadlines, timeouts and timers on: the running event loop's.

``loop.time()`` is monotonic and is what asyncio's sleeps, timeouts and timers run on, so a
deadline read from it agrees with the timer that enforces it; a test on simulated time
(looptime) moves that clock, and every deadline moves with it. The few readings of the
wall clock (token expiry, Graph's datetimes, log timestamps, metrics of real latency,
leases Redis expires in real time) each say why, where they are.
"""

from __future__ import annotations

import asyncio

__all__ = ["loop_time"]


def loop_time() -> float:
    """The running event loop's time in seconds (``asyncio.get_running_loop().time()``)."""
    return asyncio.get_running_loop().time()
