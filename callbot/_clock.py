"""The clock callbot measures deadlines, timeouts and timers on: the running event loop's.

``loop.time()`` is monotonic and is what asyncio's sleeps, timeouts and timers run on, so a
deadline read from it agrees with the timer that enforces it; a test on simulated time
(looptime) moves that clock, and every deadline moves with it. The few readings of the
wall clock (token expiry, Graph's datetimes, log timestamps, metrics of real latency,
leases Redis expires in real time) each say why, where they are.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from typing import Any

__all__ = ["from_wall_ms", "loop_time", "timer_at", "wait_all", "wall_ms"]


def loop_time() -> float:
    """The running event loop's time in seconds (``asyncio.get_running_loop().time()``)."""
    return asyncio.get_running_loop().time()


def wall_ms(at: float) -> int:
    """Loop time ``at`` (in the past) as milliseconds of the wall clock: the one form another
    process (an instance sharing a store) reads a moment in, its own loop's clock being its own."""
    return round((time.time() - (loop_time() - at)) * 1000)


def from_wall_ms(ms: int) -> float:
    """The loop time of the wall-clock moment ``ms`` (:func:`wall_ms`), as near as the two
    processes' clocks agree."""
    return loop_time() - (time.time() - ms / 1000)


def timer_at(
    timer: asyncio.TimerHandle | None, when: float, callback: Callable[..., object], *args: Any
) -> asyncio.TimerHandle:
    """A timer calling ``callback(*args)`` at loop time ``when``: ``timer`` if it is set for
    then already, else a new one, ``timer`` cancelled (a wait that moves as what it waits
    for changes: the first of several windows to close)."""
    if timer is not None:
        if timer.when() == when:
            return timer
        timer.cancel()
    return asyncio.get_running_loop().call_at(when, callback, *args)


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
