"""The simulator refuses an action in a call state Graph does not take it in.

Graph's pages say ``answer``, ``reject`` and ``redirect`` are for an incoming call not yet
answered, rejected or redirected, and that the actions on a call in progress (prompts,
tones, mute, transfer, invitations, ...) are for an active call. The simulator answers such
a request ``409 Conflict`` (its own status: Graph documents none), so a bot that acts too
early, or twice, fails its tests rather than production.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from callbot import Call, CallBot, GraphError, events
from callbot.graph import CallServices, Target
from callbot.testing import Simulator, run_with_simulator

from .conftest import APP_ID, plain_server, until

PROMPT = "https://cdn.contoso.com/welcome.wav"

Action = Callable[[Call], Awaitable[object]]

ON_A_CONNECTED_CALL: dict[str, Action] = {
    "playPrompt": lambda call: call.play_prompt(PROMPT),
    "recordResponse": lambda call: call.record_response(),
    "subscribeToTone": lambda call: call.subscribe_to_tone(),
    "mute": lambda call: call.mute(),
    "transfer": lambda call: call.transfer(Target.user("user-2", "Lee Gu")),
    "invite": lambda call: call.participants.invite(Target.user("user-2", "Lee Gu")),
}


async def refusal(action: Awaitable[Any]) -> BaseException | None:
    """The GraphError ``action`` raised, if any."""
    try:
        await action
    except GraphError as exc:
        return exc
    return None


def assert_refused(error: BaseException | None, action: str, state: str) -> None:
    assert isinstance(error, GraphError), error
    assert (error.status, error.code) == (409, "Conflict")
    assert f"The call is {state}: {action} needs" in error.message


@pytest.mark.parametrize("action", sorted(ON_A_CONNECTED_CALL))
async def test_an_action_on_an_incoming_call_not_yet_answered_is_refused(action: str) -> None:
    """A bot that plays a prompt (mutes, transfers, ...) before it answered gets a
    GraphError it can see, and Graph starts nothing; the call then goes on as usual."""
    bot = CallBot(app_id=APP_ID)
    refused: list[BaseException | None] = []

    @bot.on_incoming_call
    async def too_early(call: Call, event: events.IncomingCall) -> None:
        refused.append(await refusal(ON_A_CONNECTED_CALL[action](call)))
        await call.answer()

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        request = sim.graph.requests_for(action)[0]
        assert sim.graph.answer_to(request).status == 409
    assert_refused(refused[0], action, "incoming")
    assert call.states == ["incoming", "establishing", "established"]
    assert not sim.graph.operations  # Graph started nothing


@pytest.mark.parametrize("second", ["answer", "reject", "redirect"])
async def test_an_answered_call_cannot_be_answered_rejected_or_redirected(second: str) -> None:
    """Answering twice, or rejecting or redirecting a call once answered, is refused (Graph's
    reject page: it does not end a call already answered); the call stays up."""
    bot = CallBot(app_id=APP_ID)
    refused: list[BaseException | None] = []
    again: dict[str, Action] = {
        "answer": lambda call: call.answer(),
        "reject": lambda call: call.reject("busy"),
        "redirect": lambda call: call.redirect(Target.user("user-2", "Lee Gu")),
    }

    @bot.on_incoming_call
    async def twice(call: Call, event: events.IncomingCall) -> None:
        await call.answer()
        refused.append(await refusal(again[second](call)))

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await until(lambda: bool(refused))
        assert not call.ended
    assert isinstance(refused[0], GraphError)
    assert (refused[0].status, refused[0].code) == (409, "Conflict")
    assert f": {second} needs an incoming call not yet answered" in refused[0].message


@pytest.fixture
async def held_after_first() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A callback endpoint that takes the first notification (the incoming call) and holds
    every later one until released: Graph posts a call's news one after another, so the
    call's state on Graph's side stays where the bot's own requests put it."""
    release = asyncio.Event()
    seen = 0

    async def take(request: web.Request) -> web.Response:
        nonlocal seen
        seen += 1
        if seen > 1:
            await release.wait()
        return web.Response(status=202)

    async with plain_server(take) as base:
        try:
            yield f"{base}/api/calls", release
        finally:
            release.set()


@pytest.fixture
async def services_on(
    held_after_first: tuple[str, asyncio.Event],
) -> AsyncIterator[tuple[Simulator, CallServices]]:
    url, _ = held_after_first
    async with Simulator(callback_url=url) as sim:
        services = CallServices(sim.graph.settings(app_id=sim.app_id))
        await services.start()
        try:
            yield sim, services
        finally:
            await services.close()


async def test_an_action_on_an_answered_call_still_establishing_is_refused(
    services_on: tuple[Simulator, CallServices],
) -> None:
    sim, services = services_on
    offered = await sim.incoming_call()
    call = services.call(offered.id)
    await call.answer()
    assert_refused(await refusal(call.play_prompt(PROMPT)), "playPrompt", "establishing")
    assert_refused(await refusal(call.subscribe_to_tone()), "subscribeToTone", "establishing")
    assert_refused(await refusal(call.answer()), "answer", "establishing")


async def test_an_action_on_a_placed_call_still_establishing_is_refused(
    services_on: tuple[Simulator, CallServices], held_after_first: tuple[str, asyncio.Event]
) -> None:
    _, services = services_on
    url, _ = held_after_first
    call = await services.create_call(Target.user("user-2", "Lee Gu"), callback_uri=url)
    assert_refused(await refusal(call.play_prompt(PROMPT)), "playPrompt", "establishing")
    assert_refused(
        await refusal(call.transfer(Target.user("user-3", "Megan Bowen"))),
        "transfer",
        "establishing",
    )
