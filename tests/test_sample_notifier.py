"""The notifier sample's outcome when the call does not end the usual way."""

from __future__ import annotations

import asyncio

from callbot.samples.notifier import bot as notifier
from callbot.testing import Simulator, run_with_simulator

from .conftest import Clock, spin

USER_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


async def test_a_message_heard_is_delivered_even_when_the_hang_up_after_it_fails() -> None:
    """The message played to the end, then the bot's hang-up failed (a 500 after Graph's
    retries): no termination comes, and notify() times out. It must still say the message
    was heard (it was), not call the person again to play it once more."""
    loop = asyncio.get_running_loop()
    real_time = loop.time
    async with run_with_simulator(notifier.bot, prompt_duration=0.0) as sim:
        clock = Clock()  # from here on, the timeout only ends when the test moves time on
        try:
            await _heard_then_timed_out(sim, clock)
        finally:
            loop.time = real_time  # type: ignore[method-assign]


async def _heard_then_timed_out(sim: Simulator, clock: Clock) -> None:
    sim.graph.fail_next("deleteCall", 500)
    notifying = asyncio.create_task(
        notifier.notify(USER_ID, attempts=1, retry_delay=0, timeout=120)
    )
    await spin(lambda: bool(sim.requests_for("deleteCall")))  # the hang-up, failed
    dispatcher = notifier.bot._running().dispatcher
    await spin(lambda: dispatcher.counts["handler_errors"] == 1)
    assert sim.requests_for("playPrompt")
    await clock.advance(120.0)  # notify() times out
    await spin(notifying.done)
    assert notifying.result() is True
    assert len(sim.requests_for("createCall")) == 1
