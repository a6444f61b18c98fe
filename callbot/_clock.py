"""The clock callbot measures deadlines, timeouts and timers on: the running event loop's.

``loop.time()`` is monotonic and is what asyncio's sleeps, timeouts and timers run on, so a
deadline read from it agrees with the timer that enforces it; a test on simulated time
(looptime) moves that clock, and every deadline moves with it. The few readings of the
wall clock (token expiry, Graph's datetimes, log timestamps, metrics of real latency,
leases Redis expires in real time) each say why, where they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

__all__ = ["loop_time", "wait_all"]


def loop_time() -> float:
    """The running event loop's time in seconds (``asyncio.get_running_loop().time()``)."""
    return asyncio.get_running_loop().time()


async def wait_all(
    tasks: Collection[asyncio.Future[Any]],
    timeout: float,
    stop_waiting: asyncio.Event | None = None,
) -> None:
    """Wait until every one of ``tasks`` is done, ``timeout`` seconds have passed or
    ``stop_waiting`` is set, whichever comes first; the tasks are left as they are."""
    if not tasks:
        return
    if stop_waiting is None:
        await asyncio.wait(tasks, timeout=timeout)
        return
    if stop_waiting.is_set():
        return
    every = asyncio.ensure_future(asyncio.wait(tasks, timeout=timeout))
    told = asyncio.ensure_future(stop_waiting.wait())
    try:
        await asyncio.wait((every, told), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Cancelling a wait leaves the tasks it waited for running.
        every.cancel()
        told.cancel()
