"""``@bot.on_started``: a hook run once the bot serves and is ready.

A bot that joins a meeting or places a call when it starts polled ``bot.ready``
after starting ``bot.serve()`` as a task, and a test of it had no moment to wait
for. The hook runs in a task of its own when the bot serves: ``serve()`` once its
port accepts connections, the testing kit once it serves the simulator, a mounted
app once its startup started the bot.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from callbot import Call, CallBot, events
from callbot.graph import Target
from callbot.testing import Simulator, TokenAuthority, run_with_simulator

from .conftest import make_bot, until
from .test_hosting import serving_in_process, unused_port

CALLEE_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
JOIN_URL = (
    "https://teams.microsoft.com/l/meetup-join/19%3ameeting_abc%40thread.v2/0"
    "?context=%7b%22Tid%22%3a%22t-1%22%2c%22Oid%22%3a%22o-1%22%7d"
)


async def readyz(port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/readyz") as response,
    ):
        return response.status


async def test_serve_runs_the_hook_once_per_start_when_its_port_answers_ready(
    authority: TokenAuthority, logging_restored: None
) -> None:
    bot = make_bot(authority)
    port = unused_port()
    asked: list[int] = []
    ran = asyncio.Event()

    @bot.on_started
    async def ask_own_port(started: CallBot) -> None:
        assert started is bot
        asked.append(await readyz(port))
        ran.set()

    for start in (1, 2):
        stop = asyncio.Event()
        serving = asyncio.create_task(bot.serve("127.0.0.1", port, stop=stop))
        try:
            async with asyncio.timeout(30):
                await ran.wait()
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)
        ran.clear()
        assert asked == [200] * start


async def test_the_hook_waits_for_the_signing_keys(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """Serving, but not ready (no signing keys yet: callbacks would be refused): the hook
    runs once the keys are in."""
    authority.available = False
    bot = make_bot(authority)
    ready_then: list[bool] = []
    ran = asyncio.Event()

    @bot.on_started
    async def note(started: CallBot) -> None:
        ready_then.append(started.ready)
        ran.set()

    async with serving_in_process(bot) as port:
        assert await readyz(port) == 503
        assert ready_then == []
        authority.available = True
        async with asyncio.timeout(30):
            await ran.wait()
        assert await readyz(port) == 200
    assert ready_then == [True]


async def test_the_simulator_runs_the_hook_so_a_test_sees_the_meeting_joined_at_start(
    authority: TokenAuthority,
) -> None:
    bot = make_bot(authority)

    @bot.on_started
    async def join_the_meeting(started: CallBot) -> None:
        await started.join_meeting(JOIN_URL)

    other = make_bot(authority)
    other_started = asyncio.Event()

    @other.on_started()
    async def note(started: CallBot) -> None:
        other_started.set()

    async with run_with_simulator(bot) as sim:
        meeting = await sim.wait_for_outgoing_call()
        await meeting.wait_for_state("established")
        async with sim.serve(other):
            async with asyncio.timeout(30):
                await other_started.wait()
        await meeting.hangup()
        await meeting.wait_until_ended()
    assert len(sim.requests_for("createCall")) == 1


async def test_the_attendees_of_a_meeting_joined_at_start_are_given_before_the_bot_starts(
    authority: TokenAuthority,
) -> None:
    """A hook joining a meeting as the bot starts may join before the test's body runs:
    ``sim.meeting_attendees`` set there came too late for it, now and then. Given to the
    simulator (``run_with_simulator``'s, or the plugin's ``callbot_simulator_options``),
    they are in the meeting before the bot serves, whenever its hook joins."""
    bot = make_bot(authority)
    rosters: list[events.ParticipantsUpdated] = []

    @bot.on_started
    async def join_the_meeting(started: CallBot) -> None:
        await started.join_meeting(JOIN_URL)

    @bot.on_participants
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        rosters.append(event)

    attendees = ["Lee Gu", "Alex Wilber"]
    async with run_with_simulator(bot, meeting_attendees=attendees) as sim:
        attendees.append("Megan Bowen")  # the simulator keeps its own copy
        meeting = await sim.wait_for_outgoing_call()
        await until(lambda: bool(rosters))
        await meeting.hangup()
        await meeting.wait_until_ended()
    people = [p.info.identity.user for p in rosters[0].participants if p.info and p.info.identity]
    assert sorted(user.display_name or "" for user in people if user) == ["Alex Wilber", "Lee Gu"]
    assert sim.meeting_attendees == ["Lee Gu", "Alex Wilber"]


async def test_what_the_callees_of_a_call_placed_at_start_do_is_given_before_the_bot_starts(
    authority: TokenAuthority,
) -> None:
    """A hook placing a call as the bot starts may place it before the test's body runs:
    ``sim.queue_outgoing(...)`` there came too late for it, and the callee answered.
    Given to the simulator (``outgoing_outcomes=``, through ``run_with_simulator`` or the
    plugin's ``callbot_simulator_options``), the outcome is queued before the bot serves;
    ``queue_outgoing`` adds to it for the calls after."""
    bot = make_bot(authority)
    ended: list[events.CallTerminated] = []

    @bot.on_started
    async def call_at_start(started: CallBot) -> None:
        await started.create_call(Target.user(CALLEE_ID))

    @bot.on_terminated
    async def note(call: Call, event: events.CallTerminated) -> None:
        ended.append(event)

    outcomes = ["busy"]
    async with run_with_simulator(bot, outgoing_outcomes=outcomes) as sim:
        outcomes.append("answer")  # the simulator keeps its own copy
        first = await sim.wait_for_outgoing_call()
        await first.wait_until_ended()
        sim.queue_outgoing("decline")
        await bot.create_call(Target.user(CALLEE_ID))
        second = await sim.wait_for_outgoing_call()
        await second.wait_until_ended()
        await until(lambda: len(ended) == 2)
    assert [c.states for c in (first, second)] == [["establishing", "terminated"]] * 2
    codes = [e.result_info.code if e.result_info else None for e in ended]
    assert codes == [486, 603]


def test_outcomes_given_to_the_simulator_are_checked_as_queued_ones() -> None:
    with pytest.raises(ValueError, match="unknown outcome 'hang_up'"):
        Simulator(outgoing_outcomes=["answer", "hang_up"])


class NoMeeting(BaseException):
    """A BaseException of the bot's own: the hook's error, as an Exception is."""


@pytest.mark.parametrize("error", [LookupError, NoMeeting])
async def test_a_failing_hook_is_logged_and_the_bot_keeps_serving(
    authority: TokenAuthority, error: type[BaseException]
) -> None:
    bot = make_bot(authority)
    others: list[str] = []

    @bot.on_started
    async def fails(started: CallBot) -> None:
        raise error("no meeting configured")

    @bot.on_started
    async def works(started: CallBot) -> None:
        others.append("ran")

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    with capture_logs() as logs:
        async with run_with_simulator(bot) as sim:
            counts = bot._running().dispatcher.counts
            await until(lambda: counts["unhandled_errors"] == 1 and others == ["ran"])
            call = await sim.incoming_call()
            await call.wait_for_state("established")
            await call.hangup()
            await call.wait_until_ended()
    [failure] = [e for e in logs if e["event"] == "handler_failed"]
    assert failure["handler"].endswith("fails")
    assert failure["kind"] == "on_started"
    assert f"{error.__name__}: no meeting configured" in failure["traceback"]
    assert counts["handler_errors"] == 1


async def test_a_hook_returning_an_action_it_did_not_await_is_a_failure(
    authority: TokenAuthority,
) -> None:
    """``return bot.join_meeting(url)``, the ``await`` forgotten: nothing was joined, and
    nothing but a RuntimeWarning at garbage collection said so."""
    bot = make_bot(authority)

    @bot.on_started
    async def join(started: CallBot) -> Any:
        return started.join_meeting(JOIN_URL)

    with capture_logs() as logs:
        async with run_with_simulator(bot):
            counts = bot._running().dispatcher.counts
            await until(lambda: counts["unhandled_errors"] == 1)
    [failure] = [e for e in logs if e["event"] == "handler_failed"]
    assert failure["kind"] == "on_started"
    assert "returned <coroutine object CallBot.join_meeting" in failure["error"]


async def test_a_hook_still_running_is_cancelled_as_the_drain_begins_and_awaited(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """The hook never holds the start up, and a stop does not wait for it: it is cancelled,
    and its clean-up runs while the bot drains, still listening."""
    bot = make_bot(authority)
    port = unused_port()
    running = asyncio.Event()
    cleaned_up: list[int] = []

    @bot.on_started
    async def wait_for_ever(started: CallBot) -> None:
        try:
            running.set()
            await asyncio.Event().wait()
        finally:
            cleaned_up.append(await readyz(port))

    stop = asyncio.Event()
    serving = asyncio.create_task(bot.serve("127.0.0.1", port, stop=stop))
    try:
        async with asyncio.timeout(30):
            await running.wait()
        assert await readyz(port) == 200
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
    assert cleaned_up == [503]  # draining


async def test_a_hook_that_will_not_stop_is_logged_as_abandoned(
    authority: TokenAuthority, logging_restored: None
) -> None:
    bot = make_bot(authority, shutdown_timeout=0.2)
    running, released, done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    @bot.on_started
    async def stubborn(started: CallBot) -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await released.wait()  # swallows the cancellation
        finally:
            done.set()

    stop = asyncio.Event()
    serving = asyncio.create_task(bot.serve("127.0.0.1", unused_port(), stop=stop))
    try:
        async with asyncio.timeout(30):
            await running.wait()  # serve() has set its logging up by now
        with capture_logs() as logs:
            stop.set()
            await asyncio.wait_for(serving, 30)
    finally:
        stop.set()
        released.set()
        async with asyncio.timeout(30):
            await done.wait()
    [abandoned] = [e for e in logs if e["event"] == "started_hook_abandoned"]
    assert abandoned["handler"].endswith("stubborn")


async def test_a_mounted_app_runs_the_hook_once_its_startup_started_the_bot(
    authority: TokenAuthority,
) -> None:
    bot = make_bot(authority)
    ready_then: list[bool] = []
    ran = asyncio.Event()

    @bot.on_started
    async def note(started: CallBot) -> None:
        ready_then.append(started.ready)
        ran.set()

    root = web.Application()
    root.add_subapp("/bot", bot.create_app())
    client: TestClient[Any, Any] = TestClient(TestServer(root, host="127.0.0.1"))
    await client.start_server()
    try:
        async with asyncio.timeout(30):
            await ran.wait()
        assert (await client.get("/bot/readyz")).status == 200
    finally:
        await client.close()
    assert ready_then == [True]


def test_a_hook_must_be_async_and_take_the_bot(authority: TokenAuthority) -> None:
    bot = make_bot(authority)

    def plain(started: CallBot) -> None:
        pass

    async def nothing_given() -> None:
        pass

    with pytest.raises(TypeError, match="must be an 'async def' function"):
        bot.on_started(plain)  # type: ignore[type-var]
    with pytest.raises(TypeError, match=r"must take \(bot\)"):
        bot.on_started(nothing_given)  # type: ignore[type-var]
