"""Simulated time (looptime): Graph's deadlines and the bot's own, in no real time.

Each test runs on looptime's fast-forwarded clock: sleeps, timeouts and timers take no
real time, and the loop's clock (``loop.time()``) says how much simulated time passed.
The tests assert on that clock and on outcomes, never on the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from callbot import AuthenticationError, Call, CallBot, CallEnded, events, models
from callbot._auth import Authenticator
from callbot._serving import ConnectionGuard
from callbot.graph._digits import MAX_PROMPT_WAIT
from callbot.graph._operations import OperationRegistry
from callbot.testing import TokenAuthority, builders, run_with_simulator

from .conftest import APP_ID, FIXTURES, until
from .test_graph_operations import event_from_item

pytestmark = pytest.mark.looptime

MENU = "https://cdn.contoso.com/menu.wav"
AGAIN = "https://cdn.contoso.com/again.wav"


def answering_bot(**options: Any) -> CallBot:
    bot = CallBot(app_id=APP_ID, **options)

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    return bot


def ended_with(call_events: list[events.Event]) -> tuple[int | None, int | None]:
    ended = next(e for e in call_events if isinstance(e, events.CallTerminated))
    assert ended.result_info is not None
    return ended.result_info.code, ended.result_info.subcode


async def test_an_incoming_call_nobody_takes_ends_after_15_seconds() -> None:
    """Graph ends an incoming call the bot does not answer, reject or redirect within 15 s
    (408/1106): with the simulator's own deadline, in simulated seconds."""
    bot = CallBot(app_id=APP_ID)
    seen: list[events.Event] = []

    @bot.on(events.CallTerminated)
    async def ended(call: Call, event: events.CallTerminated) -> None:
        seen.append(event)

    loop = asyncio.get_running_loop()
    async with run_with_simulator(bot) as sim:
        started = loop.time()
        call = await sim.incoming_call()
        await call.wait_until_ended(timeout=60)
        assert loop.time() - started == pytest.approx(15.0)
        await call.settled()
        terminated = [t for t in sim.traffic if t.summary.startswith("call terminated")]
    assert ended_with(seen) == (408, 1106)
    assert call.states == ["incoming", "terminated"]
    # Traffic is timed on the same clock: the end came 15 s after the call was offered.
    assert terminated[0].at - sim.traffic[0].at == pytest.approx(15.0)


async def test_keep_alives_keep_a_call_up_for_two_hours() -> None:
    """A bot sends keep-alives (every 15 minutes, its default) to the simulator as to Graph,
    and keeps its call: eight in two hours, 15 minutes apart on the loop's clock, and Graph
    never ends the call. The kit turned them off: Graph ended the call at 45 minutes."""
    bot = answering_bot()
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await asyncio.sleep(2 * 60 * 60 + 60)
        assert not call.ended
        sent = [request.at for request in call.requests_for("keepAlive")]
        assert len(sent) == 8
        gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
        assert gaps == pytest.approx([15 * 60.0] * 7)
        await call.hangup()
        await call.wait_until_ended()


@pytest.mark.parametrize("turned_off", ["by the bot", "by the test"])
async def test_a_call_without_keep_alives_ends_after_45_minutes(turned_off: str) -> None:
    """Graph ends a call that had no keep-alive for 45 minutes (408/8537); the simulator kept
    such a call up for ever. A bot with keep-alives off, or served with them off, sees it."""
    bot = answering_bot(keep_alive=turned_off != "by the bot")
    seen: list[events.Event] = []

    @bot.on(events.CallTerminated)
    async def ended(call: Call, event: events.CallTerminated) -> None:
        seen.append(event)

    loop = asyncio.get_running_loop()
    off = {"keep_alive": False} if turned_off == "by the test" else {}
    with capture_logs() as logs:
        async with run_with_simulator(bot, **off) as sim:
            call = await sim.incoming_call()
            await call.wait_for_state("established")
            established = loop.time()
            await call.wait_until_ended(timeout=2 * 60 * 60)
            assert loop.time() - established == pytest.approx(45 * 60.0)
            await call.settled()
            assert sim.graph.requests_for("keepAlive") == []
    assert ended_with(seen) == (408, 8537)
    [ended_here] = [e for e in logs if e["event"] == "simulator_call_not_kept_alive"]
    assert "keep_alive=False" in ended_here["hint"]


async def test_the_keep_alive_deadline_can_be_turned_off() -> None:
    bot = answering_bot()
    async with run_with_simulator(bot, keep_alive_deadline=None) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await asyncio.sleep(2 * 60 * 60)
        assert not call.ended
        await call.hangup()
        await call.wait_until_ended()


Collected = list[tuple[str | BaseException, float, float]]


def digit_bot(collected: Collected, **collect: Any) -> CallBot:
    """A bot that collects digits once the call is up, noting what it got, and when it
    started and stopped collecting on the loop's clock."""
    bot = answering_bot()

    @bot.on_state("established")
    async def collect_pin(call: Call, event: events.CallStateChanged) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            digits: str | BaseException = await call.collect_digits(MENU, **collect)
        except CallEnded as exc:
            digits = exc
        collected.append((digits, started, loop.time()))

    return bot


async def test_collect_digits_returns_nothing_once_its_timeout_passed_in_silence() -> None:
    """``collect_digits`` returns ``""`` ``timeout`` seconds after its prompt ended with no
    key pressed (here a 4-second prompt and a 10-second timeout)."""
    collected: Collected = []
    bot = digit_bot(collected, max_digits=4, timeout=10)
    async with run_with_simulator(bot, prompt_duration=4.0) as sim:
        call = await sim.incoming_call()
        await call.settled(timeout=60)
        [(digits, started, stopped)] = collected
        assert digits == ""
        assert stopped - started == pytest.approx(14.0)
        await call.hangup()
        await call.settled()


async def test_collect_digits_times_out_after_the_last_key() -> None:
    """Keys pressed, then silence: the keys so far, ``timeout`` seconds after the last one."""
    collected: Collected = []
    bot = digit_bot(collected, max_digits=4, timeout=10)
    loop = asyncio.get_running_loop()
    async with run_with_simulator(bot, prompt_duration=4.0) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("playPrompt")
        await asyncio.sleep(1.0)
        await call.press("12")  # during the prompt, which stops
        pressed = loop.time()
        await call.settled(timeout=60)
        [(digits, _, stopped)] = collected
        assert digits == "12"
        assert stopped - pressed == pytest.approx(10.0)
        await call.hangup()
        await call.settled()


async def test_collect_digits_raises_call_ended_when_the_caller_hangs_up_in_silence() -> None:
    collected: Collected = []
    bot = digit_bot(collected, timeout=10)
    async with run_with_simulator(bot, prompt_duration=4.0) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("playPrompt")
        await asyncio.sleep(6.0)  # the prompt ended 2 s ago: 8 s of the timeout are left
        await call.hangup()
        await call.settled()
    [(raised, started, stopped)] = collected
    assert isinstance(raised, CallEnded)
    assert stopped - started == pytest.approx(6.0)


NEVER = 24 * 60 * 60.0
"""A prompt this long never ends within a test: to the bot, as if Graph's outcome was lost."""


async def test_collect_digits_times_out_when_its_prompt_s_outcome_never_comes() -> None:
    """A ``playPrompt`` whose outcome is never told (lost, or a prompt playing for hours)
    holds the timeout back at most ``MAX_PROMPT_WAIT`` seconds: a caller who presses nothing
    gets ``""`` then, not when the call ends."""
    collected: Collected = []
    bot = digit_bot(collected, max_digits=4, timeout=10)
    async with run_with_simulator(bot, prompt_duration=NEVER) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("playPrompt")
        await until(lambda: bool(collected), within=MAX_PROMPT_WAIT + 60)
        [(digits, started, stopped)] = collected
        assert digits == ""
        assert stopped - started == pytest.approx(MAX_PROMPT_WAIT + 10.0, abs=1.0)
        await call.hangup()
        await call.settled()


async def test_a_menu_waits_no_longer_for_an_invalid_choice_prompt_never_told_over() -> None:
    """The invalid-choice prompt is bounded alike: after a wrong key, the menu plays again
    ``MAX_PROMPT_WAIT`` seconds after it started at the latest."""
    bot = answering_bot()
    chosen: list[Any] = []

    @bot.on_state("established")
    async def main_menu(call: Call, event: events.CallStateChanged) -> None:
        options = {"1": "sales", "2": "support"}
        chosen.append(await call.menu(MENU, options, retries=1, invalid_prompt=AGAIN))

    loop = asyncio.get_running_loop()
    async with run_with_simulator(bot, prompt_duration=NEVER) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("playPrompt")
        await call.press("7")  # stops the menu; the invalid-choice prompt then never ends
        sorry = await call.wait_for_request("playPrompt")
        assert sorry.json["prompts"][0]["mediaInfo"]["uri"] == AGAIN
        started = loop.time()
        await call.wait_for_request("playPrompt", timeout=MAX_PROMPT_WAIT + 60)
        assert loop.time() - started == pytest.approx(MAX_PROMPT_WAIT, abs=1.0)
        await call.press("2")
        await until(lambda: bool(chosen))
        assert chosen == ["support"]
        await call.hangup()
        await call.settled()


async def test_a_state_held_for_its_predecessor_is_released_when_the_window_closes() -> None:
    """``established`` before ``establishing`` is held for the reorder window (1 s by
    default), then handed to the handlers alone."""
    bot = CallBot(app_id=APP_ID)
    told: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()

    @bot.on_state(*models.CALL_STATES)
    async def moved(call: Call, event: events.CallStateChanged | events.IncomingCall) -> None:
        told.append((event.state, loop.time()))

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.settled()
        await call.notify(builders.call_state(call.id, "established"))
        held = loop.time()
        await asyncio.sleep(0.999)
        assert [state for state, _ in told] == ["incoming"]
        await call.settled()
        assert [state for state, _ in told] == ["incoming", "established"]
        assert told[1][1] - held == pytest.approx(1.0)
        await call.hangup()
        await call.settled()


async def test_a_handler_still_running_at_shutdown_is_given_the_shutdown_timeout() -> None:
    """The shutdown deadline was read from the real clock while the wait ran on the loop's:
    on simulated time, a stuck handler kept the bot stopping for hours of it."""
    bot = answering_bot()
    stuck = asyncio.Event()

    @bot.on_state("established")
    async def wait_for_ever(call: Call, event: events.CallStateChanged) -> None:
        stuck.set()
        await asyncio.Event().wait()

    loop = asyncio.get_running_loop()
    async with run_with_simulator(bot, shutdown_timeout=2.0) as sim:
        await sim.incoming_call()
        await stuck.wait()
        running = bot._running()
        started = loop.time()
        await running.drain()
        assert loop.time() - started == pytest.approx(2.0)
        assert running.dispatcher.counts["abandoned"] == 1


async def test_a_connection_whose_headers_never_end_is_closed_at_the_header_deadline() -> None:
    """The header deadline was read from the real clock and checked by a loop timer: on
    simulated time the connection was never closed."""
    loop = asyncio.get_running_loop()
    runner = web.AppRunner(web.Application(), access_log=None)
    await runner.setup()
    guard = ConnectionGuard(header_timeout=10.0, max_connections=8)
    assert runner.server is not None
    server = await loop.create_server(
        guard.protocol_factory(runner.server, access_log=None), "127.0.0.1", 0
    )
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /api/calls HTTP/1.1\r\nHost: bot\r\nX-Padding: ")
        await writer.drain()
        started = loop.time()
        async with asyncio.timeout(60):
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
        writer.close()
        assert loop.time() - started == pytest.approx(10.0)
        assert guard.closed["header_timeout"] == 1
    finally:
        server.close()
        await runner.cleanup()


async def test_an_unknown_key_is_fetched_again_once_the_cooldown_passed(
    authority: TokenAuthority,
) -> None:
    """The refetch cooldown was timed on the real clock: on simulated time it never passed."""
    auth = Authenticator(
        app_id=APP_ID, openid_config_url=authority.openid_config_url, refetch_cooldown=30.0
    )
    await auth.start()
    try:
        fetched = authority.jwks_fetches

        async def verify_an_unknown_kid() -> None:
            token = authority.mint(audience=APP_ID, kid=secrets.token_hex(8))
            with pytest.raises(AuthenticationError) as refused:
                await auth.verify("Bearer " + token)
            assert refused.value.reason == "unknown_key"

        await verify_an_unknown_kid()
        assert authority.jwks_fetches == fetched + 1
        await verify_an_unknown_kid()  # within the cooldown: no fetch
        assert authority.jwks_fetches == fetched + 1
        await asyncio.sleep(30.0)
        await verify_an_unknown_kid()
        assert authority.jwks_fetches == fetched + 2
    finally:
        await auth.close()


async def test_an_early_operation_outcome_is_kept_for_its_lifetime_of_loop_time() -> None:
    """Outcomes that came before the response naming their operation are kept
    ``recent_ttl`` seconds, on the loop's clock."""
    registry = OperationRegistry(recent_ttl=60.0)
    item = json.loads(
        (FIXTURES / "notifications" / "31-call-playprompt-operation-completed.json").read_text()
    )["value"][0]
    calls = "/communications/calls/a1b2c3d4-0000-4000-8000-000000000001/operations/"
    registry.on_event(event_from_item(dict(item, resourceUrl=calls + "first")))
    await asyncio.sleep(59.0)
    registry.on_event(event_from_item(dict(item, resourceUrl=calls + "second")))
    assert [operation for _, operation in registry._recent] == ["first", "second"]
    await asyncio.sleep(2.0)
    registry.on_event(event_from_item(dict(item, resourceUrl=calls + "third")))
    assert [operation for _, operation in registry._recent] == ["second", "third"]


async def test_a_recording_is_served_for_the_retention_asked_for_after_its_call_ends() -> None:
    """Graph discards a recording shortly after its call ends; ``recording_retention`` says
    how long the simulator keeps it (``None``: for good)."""
    bot = answering_bot()
    results: list[models.RecordOperation] = []

    @bot.on_state("established")
    async def record(call: Call, event: events.CallStateChanged) -> None:
        op = await call.record_response(max_record_duration=10)
        results.append(await op.wait(timeout=30))

    async def status_of(location: str, token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(location, headers=headers) as got,
        ):
            return got.status

    for retention, after, expected in ((30.0, 29.0, 200), (30.0, 31.0, 404), (None, 3600.0, 200)):
        results.clear()
        async with run_with_simulator(bot, recording_retention=retention) as sim:
            call = await sim.incoming_call()
            await call.wait_for_request("recordResponse")
            await call.listen(timeout=30)
            await call.settled()
            await call.hangup()
            await call.wait_until_ended()
            await asyncio.sleep(after)
            location = results[0].recording_location
            token = results[0].recording_access_token
            assert location
            assert token
            assert await status_of(location, token) == expected, (retention, after)
