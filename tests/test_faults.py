"""Faults around the bot, and what it does about each.

The signing-key endpoint down or slow, the token endpoint failing, Graph
throttling, failing or hanging, handlers raising or hanging, and the event loop
blocked by a slow handler. Each test states the bot's behaviour; in none is a
notification that was answered 202 lost without a trace: it is handled,
dropped with a counted reason, or logged as abandoned.

Everything runs on 127.0.0.1 (TokenAuthority, FakeGraph); waits are bounded and
nothing asserts on how long anything took.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from callbot import Call, CallBot, GraphError, events
from callbot.testing import FakeGraph
from callbot.testing import builders as b

from .conftest import BotServer, make_bot, until
from .test_hosting import sample_value


def _metric(text: str, line_start: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)
    )


async def accounted(server: BotServer) -> tuple[float, float, float]:
    """(accepted, handled, dropped) from the bot's metrics."""
    text = await (await server.client.get("/metrics")).text()
    accepted = _metric(text, 'callbot_notifications_total{outcome="accepted"')
    dropped = _metric(text, 'callbot_notifications_total{outcome="dropped"')
    handled = _metric(text, "callbot_deliveries_total")
    return accepted, handled, dropped


async def assert_nothing_lost(server: BotServer, abandoned: int = 0) -> None:
    """Every accepted item was handled, dropped with a reason, or logged as abandoned."""
    accepted, handled, dropped = await accounted(server)
    assert accepted == handled + dropped + abandoned, (accepted, handled, dropped, abandoned)


def graph_bot(authority: Any, graph: FakeGraph, **options: Any) -> CallBot:
    """A bot whose outbound requests go to FakeGraph, retrying briefly."""
    settings: dict[str, Any] = {
        "app_secret": "fake-graph-secret",
        "graph_url": graph.graph_url,
        "authority_url": graph.authority_url,
        "graph_retry_time": 2.0,
        "graph_request_timeout": 2.0,
    }
    settings.update(options)
    return make_bot(authority, **settings)


class Errors:
    """What ``on_error`` handlers were told."""

    def __init__(self, bot: CallBot) -> None:
        self.seen: list[tuple[str, str, BaseException]] = []

        @bot.on_error
        async def record(call: Call, event: events.Event, exc: BaseException) -> None:
            self.seen.append((call.id, type(event).__name__, exc))


# -- signing keys ---------------------------------------------------------------------------


async def test_keys_down_at_start_means_503_with_retry_after_until_they_load(
    authority: Any, serve: Any
) -> None:
    """No key could be loaded: callbacks get 503 so Graph retries; none reaches a handler."""
    authority.available = False
    bot = make_bot(authority)
    handled: list[str] = []

    @bot.on_incoming_call
    async def ring(call: Call, event: events.IncomingCall) -> None:
        handled.append(call.id)

    server = await serve(bot)  # starts anyway: keys are retried in the background
    assert (await server.client.get("/readyz")).status == 503
    body = b.notifications(b.incoming_call("keys-down"))
    with capture_logs() as logs:
        refused = await server.post(body)
    assert refused.status == 503
    assert refused.headers["Retry-After"]
    assert (await refused.json())["error"] == "keys_unavailable"
    assert [e["reason"] for e in logs if e["event"] == "callback_refused"] == ["keys_unavailable"]
    assert bot.receiver.counts["unavailable", "keys_unavailable"] == 1

    authority.available = True

    async def ready() -> bool:
        status: int = (await server.client.get("/readyz")).status
        return status == 200

    async with asyncio.timeout(15):
        while not await ready():  # noqa: ASYNC110 - polling a probe, as a load balancer does
            await asyncio.sleep(0.05)
    # Graph's retry of the same notification is accepted and handled once.
    assert (await server.post(body)).status == 202
    await until(lambda: handled == ["keys-down"])
    await assert_nothing_lost(server)


async def test_keys_down_later_keeps_verifying_with_the_keys_already_loaded(
    authority: Any, serve: Any
) -> None:
    """Loaded keys keep working; a token signed by a key never seen is answered 503 while
    the keys cannot be fetched (Graph sends it again), and taken once they can."""
    bot = make_bot(authority, key_refetch_cooldown=0.0)
    handled: list[str] = []

    @bot.on_incoming_call
    async def ring(call: Call, event: events.IncomingCall) -> None:
        handled.append(call.id)

    server = await serve(bot)
    authority.available = False
    assert (await server.post(b.notifications(b.incoming_call("known-key")))).status == 202

    old_token = server.token()
    authority.rotate_key()  # Graph starts signing with a key the bot cannot fetch yet
    new_token = server.token()
    body = b.notifications(b.incoming_call("new-key"))
    with capture_logs() as logs:
        refused = await server.post(body, token=new_token)
    assert refused.status == 503
    assert (await refused.json())["error"] == "keys_unavailable"
    assert any(e["event"] == "jwks_fetch_failed" for e in logs)
    assert (
        await server.post(b.notifications(b.incoming_call("old-key")), token=old_token)
    ).status == 202

    authority.available = True
    assert (await server.post(body, token=new_token)).status == 202
    await until(lambda: sorted(handled) == ["known-key", "new-key", "old-key"])
    await assert_nothing_lost(server)


async def test_slow_key_endpoint_during_rotation_delays_requests_but_refuses_none(
    authority: Any, serve: Any
) -> None:
    """Requests naming a new key wait for one shared refetch, then are accepted."""
    bot = make_bot(authority, key_refetch_cooldown=0.0)
    handled: list[str] = []

    @bot.on_incoming_call
    async def ring(call: Call, event: events.IncomingCall) -> None:
        handled.append(call.id)

    server = await serve(bot)
    authority.rotate_key()
    authority.delay = 0.3
    fetches = authority.jwks_fetches
    token = server.token()
    responses = await asyncio.gather(
        *(server.post(b.notifications(b.incoming_call(f"slow-{n}")), token=token) for n in range(8))
    )
    assert [r.status for r in responses] == [202] * 8
    assert authority.jwks_fetches == fetches + 1  # one fetch served every waiting request
    await until(lambda: len(handled) == 8)
    await assert_nothing_lost(server)


# -- outbound: token endpoint and Graph -----------------------------------------------------


async def test_token_endpoint_failing_reaches_on_error_and_the_call_goes_on(
    authority: Any, serve: Any, graph: FakeGraph
) -> None:
    """The handler's Graph request raises GraphError; on_error hears it; later events run."""
    graph.fail_next("token", 500, times=100)
    bot = graph_bot(authority, graph)
    errors = Errors(bot)
    states: list[str] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("establishing", "established")
    async def state(call: Call, event: events.CallStateChanged) -> None:
        states.append(event.state)

    with capture_logs() as logs:
        server = await serve(bot)  # the token prefetch fails, and the token cache says so
        await until(lambda: any(e["event"] == "graph_token_failed" for e in logs))
    await server.post(b.notifications(b.incoming_call("no-token")))
    await server.post(b.notifications(b.call_state("no-token", "establishing")))
    await until(lambda: len(errors.seen) == 1 and states == ["establishing"])
    call_id, kind, exc = errors.seen[0]
    assert (call_id, kind) == ("no-token", "IncomingCall")
    assert isinstance(exc, GraphError)
    assert exc.status == 500
    assert graph.requests_for("answer") == []  # nothing reached Graph without a token
    await assert_nothing_lost(server)


async def test_token_endpoint_unavailable_for_a_moment_is_retried(
    authority: Any, serve: Any, graph: FakeGraph
) -> None:
    """503 from the token endpoint is retried; the answer goes through."""
    graph.fail_next("token", 503, headers={"Retry-After": "0"}, times=2)
    bot = graph_bot(authority, graph)
    errors = Errors(bot)

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    server = await serve(bot)
    graph.add_call("late-token")  # Graph offers the call it posts
    await server.post(b.notifications(b.incoming_call("late-token")))
    request = await graph.wait_for_request("answer")
    assert request.call_id == "late-token"
    assert len(graph.token_requests) >= 3
    assert errors.seen == []
    await assert_nothing_lost(server)


@pytest.mark.parametrize("status", [429, 503])
async def test_graph_throttling_or_unavailable_is_retried_until_it_answers(
    authority: Any, serve: Any, graph: FakeGraph, status: int
) -> None:
    """429 and 503 are sent again after Retry-After; the handler sees only success."""
    graph.fail_next("answer", status, headers={"Retry-After": "0"}, times=2)
    bot = graph_bot(authority, graph)
    errors = Errors(bot)
    answered: list[str] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()
        answered.append(call.id)

    server = await serve(bot)
    graph.add_call(f"busy-{status}")  # Graph offers the call it posts
    await server.post(b.notifications(b.incoming_call(f"busy-{status}")))
    await until(lambda: answered == [f"busy-{status}"])
    assert [graph.answer_to(r).status for r in graph.requests_for("answer")] == [
        status,
        status,
        202,
    ]
    assert errors.seen == []
    await assert_nothing_lost(server)


async def test_graph_server_error_is_not_retried_and_reaches_on_error(
    authority: Any, serve: Any, graph: FakeGraph
) -> None:
    """A 500 may have done something, so it is not repeated: GraphError goes to on_error."""
    graph.fail_next("answer", 500)
    bot = graph_bot(authority, graph)
    errors = Errors(bot)

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    server = await serve(bot)
    await server.post(b.notifications(b.incoming_call("graph-500")))
    await until(lambda: len(errors.seen) == 1)
    exc = errors.seen[0][2]
    assert isinstance(exc, GraphError)
    assert exc.status == 500
    assert exc.client_request_id
    assert len(graph.requests_for("answer")) == 1
    await assert_nothing_lost(server)


async def test_graph_hanging_times_out_into_on_error_and_frees_the_call(
    authority: Any, serve: Any, graph: FakeGraph
) -> None:
    """A request Graph never answers times out (and is retried) until the budget is spent."""
    graph.hang_next("answer", times=100)
    bot = graph_bot(authority, graph, graph_request_timeout=0.2, graph_retry_time=0.6)
    errors = Errors(bot)
    later: list[str] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("establishing")
    async def establishing(call: Call, event: events.CallStateChanged) -> None:
        later.append(call.id)

    server = await serve(bot)
    await server.post(b.notifications(b.incoming_call("graph-hangs")))
    # Acknowledged at once, queued behind the hanging handler of the same call.
    assert (
        await server.post(b.notifications(b.call_state("graph-hangs", "establishing")))
    ).status == 202
    await until(lambda: len(errors.seen) == 1 and later == ["graph-hangs"], within=10)
    exc = errors.seen[0][2]
    assert isinstance(exc, GraphError)
    assert exc.status == 0  # no response at all
    assert len(graph.requests_for("answer")) >= 1
    await assert_nothing_lost(server)


# -- handlers and the loop ------------------------------------------------------------------


async def test_a_handler_that_always_raises_loses_nothing(authority: Any, serve: Any) -> None:
    """Each raise is reported with its call and event; every later event still runs."""
    bot = make_bot(authority)
    errors = Errors(bot)

    @bot.on(events.Event)
    async def broken(call: Call, event: events.Event) -> None:
        raise RuntimeError(f"broken on {type(event).__name__}")

    server = await serve(bot)
    items = [
        b.incoming_call("raises"),
        b.call_state("raises", "establishing"),
        b.call_state("raises", "established"),
        b.tone("raises", "tone1", 1),
        b.call_terminated("raises"),
    ]
    for item in items:
        assert (await server.post(b.notifications(item))).status == 202
    await until(lambda: len(errors.seen) == len(items))
    assert [kind for _, kind, _ in errors.seen] == [
        "IncomingCall",
        "CallStateChanged",
        "CallStateChanged",
        "ToneReceived",
        "CallTerminated",
    ]
    await assert_nothing_lost(server)


async def test_a_hanging_handler_holds_only_its_call_and_is_reported_at_shutdown(
    authority: Any, serve: Any
) -> None:
    """Other calls go on; at shutdown every delivery still waiting is logged, by call id."""
    bot = make_bot(authority, shutdown_timeout=0.2)
    others: list[str] = []

    @bot.on(events.Event)
    async def handler(call: Call, event: events.Event) -> None:
        if call.id == "stuck":
            await asyncio.Event().wait()  # never returns
        others.append(call.id)

    outcomes: list[tuple[str, str]] = []
    bot.watch_handlers(lambda name, event, outcome: outcomes.append((event.call_id, outcome)))
    server = await serve(bot)
    stuck = [
        b.incoming_call("stuck"),
        b.call_state("stuck", "establishing"),
        b.call_state("stuck", "established"),
    ]
    for item in stuck:
        assert (await server.post(b.notifications(item))).status == 202
    for n in range(10):
        assert (await server.post(b.notifications(b.incoming_call(f"free-{n}")))).status == 202
    await until(lambda: len(others) == 10)
    with capture_logs() as logs:
        await bot.drain()
    abandoned = [e for e in logs if e["event"] == "notification_abandoned"]
    assert [e["call_id"] for e in abandoned] == ["stuck"] * len(stuck)
    assert [e["kind"] for e in abandoned] == [
        "IncomingCall",
        "CallStateChanged",
        "CallStateChanged",
    ]
    # The handler stopped mid-run is told as abandoned, not as a run that went well.
    assert [outcome for call_id, outcome in outcomes if call_id == "stuck"] == ["abandoned"]
    assert (
        sample_value(
            bot.metrics.render().decode(), "callbot_handler_seconds_count", {"outcome": "abandoned"}
        )
        == 1
    )
    await assert_nothing_lost(server, abandoned=len(abandoned))


async def test_a_handler_blocking_the_loop_delays_acks_but_loses_nothing(
    authority: Any, serve: Any
) -> None:
    """Blocking code in a handler stalls the whole process, yet every request is answered."""
    bot = make_bot(authority)
    handled: list[str] = []

    @bot.on(events.Event)
    async def blocking(call: Call, event: events.Event) -> None:
        time.sleep(0.01)  # noqa: ASYNC251 - the fault under test
        handled.append(call.id)

    server = await serve(bot)
    responses = await asyncio.gather(
        *(server.post(b.notifications(b.incoming_call(f"blocked-{n}"))) for n in range(40))
    )
    assert [r.status for r in responses] == [202] * 40
    await until(lambda: len(handled) == 40, within=15)
    assert sorted(handled) == sorted(f"blocked-{n}" for n in range(40))
    await assert_nothing_lost(server)


async def test_one_handler_slot_for_many_slow_calls_keeps_every_call_in_order(
    authority: Any, serve: Any
) -> None:
    """With max_concurrent_handlers=1 calls take turns; each call's events stay in order."""
    bot = make_bot(authority, max_concurrent_handlers=1)
    seen: dict[str, list[str]] = {}

    @bot.on(events.Event)
    async def slow(call: Call, event: events.Event) -> None:
        await asyncio.sleep(0.001)
        label = event.state if isinstance(event, events.CallStateChanged) else "incoming"
        seen.setdefault(call.id, []).append(label)

    server = await serve(bot)

    async def lifecycle(call_id: str) -> None:
        for item in (
            b.incoming_call(call_id),
            b.call_state(call_id, "establishing"),
            b.call_state(call_id, "established"),
        ):
            assert (await server.post(b.notifications(item))).status == 202

    await asyncio.gather(*(lifecycle(f"turns-{n}") for n in range(20)))
    await until(lambda: sum(map(len, seen.values())) == 60, within=15)
    assert all(v == ["incoming", "establishing", "established"] for v in seen.values())
    await assert_nothing_lost(server)


async def test_a_key_set_past_a_megabyte_is_not_read(authority: Any, serve: Any) -> None:
    """The platform's key set is a few KB; one endpoint sending more (misconfigured, or
    answering for another) was read whole, however large. It is read up to 1 MiB: past
    that the fetch fails, and the keys already loaded keep working (a token of a key not
    among them is answered 503: the keys could not be fetched)."""
    bot = make_bot(authority, key_refetch_cooldown=0.0)
    server = await serve(bot)
    assert (await server.post(b.notifications(b.incoming_call("before")))).status == 202
    published = authority.jwks
    authority.jwks = lambda: {**published(), "padding": "x" * (2 << 20)}
    authority.rotate_key()
    with capture_logs() as logs:
        refused = await server.post(b.notifications(b.incoming_call("after")))
    assert refused.status == 503
    assert (await refused.json())["error"] == "keys_unavailable"
    failures = [e["error"] for e in logs if e["event"] == "jwks_fetch_failed"]
    assert failures
    assert "more than 1048576 bytes" in failures[0]
