"""The notifier against the Graph simulator, through callbot's pytest plugin."""

from __future__ import annotations

import asyncio

import pytest

from callbot import CallBot
from callbot.testing import Simulator

from . import bot as notifier

USER_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


@pytest.fixture
def callbot_bot() -> CallBot:
    return notifier.bot


async def test_plays_the_message_to_whoever_answers(sim: Simulator) -> None:
    assert await notifier.notify(USER_ID, retry_delay=0) is True
    placed = sim.requests_for("createCall")
    assert len(placed) == 1
    assert placed[0].json["targets"][0]["identity"]["user"]["id"] == USER_ID
    prompt = sim.requests_for("playPrompt")[0]
    assert prompt.json["prompts"][0]["mediaInfo"]["uri"] == notifier.MESSAGE_URL
    # notify() returns once the call has ended: the bot has hung up and been told.
    assert sim.requests_for("deleteCall")


async def test_calls_again_when_nobody_answers(sim: Simulator) -> None:
    sim.queue_outgoing("no_answer", "busy")
    assert await notifier.notify("+14255550123", attempts=3, retry_delay=0) is True
    placed = sim.requests_for("createCall")
    assert len(placed) == 3
    assert placed[0].json["targets"][0]["identity"]["phone"]["id"] == "+14255550123"
    assert len(sim.requests_for("playPrompt")) == 1


async def test_gives_up_after_the_last_attempt(sim: Simulator) -> None:
    sim.queue_outgoing("no_answer", "decline")
    assert await notifier.notify(USER_ID, attempts=2, retry_delay=0) is False
    assert len(sim.requests_for("createCall")) == 2
    assert not sim.requests_for("playPrompt")


async def test_callee_hanging_up_during_the_message_is_not_delivered(sim: Simulator) -> None:
    sim.prompt_duration = 5.0

    async def hang_up_during_message() -> None:
        call = await sim.wait_for_outgoing_call()
        await call.wait_for_request("playPrompt")
        await call.hangup()

    hanging_up = asyncio.create_task(hang_up_during_message())
    assert await notifier.notify(USER_ID, attempts=1, retry_delay=0) is False
    await hanging_up
