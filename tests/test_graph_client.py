"""Outbound requests: retries with Retry-After, GraphError, request ids, re-authentication."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import socket
import uuid
import warnings
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from structlog.testing import capture_logs
from yarl import URL

from callbot import Call, CallBot, GraphError, Operation, events
from callbot._ids import id_key, path_segment
from callbot.graph import CallServices, RetryPolicy, Target
from callbot.graph._http import connection_trace, parse_retry_after, send
from callbot.testing import FakeGraph, run_with_simulator
from callbot.testing._fake_graph import FakeResponse

from .conftest import APP_ID, Clock, plain_server

CALL_ID = "57dab8b1-894c-409a-b240-bd8beae78896"
FAST = RetryPolicy(total_time=5.0, base_delay=0.001, max_delay=0.01, request_timeout=5.0)


@pytest.fixture
async def services(graph: FakeGraph) -> AsyncIterator[CallServices]:
    graph.add_call(CALL_ID, state="established")  # the call the tests act on, offered
    svc = CallServices(graph.settings(), retry=FAST)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


async def test_429_and_503_are_retried_honouring_retry_after(
    graph: FakeGraph, services: CallServices
) -> None:
    graph.fail_next("playPrompt", 429, headers={"Retry-After": "0"})
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=5), usegmt=True)
    graph.fail_next("playPrompt", 503, headers={"Retry-After": past})
    op = await services.call(CALL_ID).play_prompt("https://x/beep.wav")
    attempts = graph.requests_for("playPrompt")
    assert [graph.answer_to(r).status for r in attempts] == [429, 503, 200]
    # one operation, one clientContext, one client-request-id for the request's attempts
    assert {r.json["clientContext"] for r in attempts} == {op.client_context}
    assert len({r.client_request_id for r in attempts}) == 1
    assert {r.scenario_id for r in attempts} == {services.call(CALL_ID).scenario_id}


async def test_every_attempt_of_a_request_carries_its_client_request_id(
    graph: FakeGraph, services: CallServices
) -> None:
    """Graph's SDKs send a retry as the request it repeats, numbered in ``Retry-Attempt``:
    its ``client-request-id`` (what Microsoft support traces a request by) stays. Each
    attempt carried a new one, so the id a GraphError or a log line gave named one attempt
    only, and a throttled transfer's attempts could not be told apart from other requests."""
    graph.fail_next("transfer", 503, headers={"Retry-After": "0"})
    graph.fail_next("transfer", 401)  # a revoked token, replaced
    graph.fail_next("transfer", 429, headers={"Retry-After": "0"})
    graph.fail_next("transfer", 400)
    call = services.call(CALL_ID)
    with capture_logs() as logs, pytest.raises(GraphError) as failure:
        await call.transfer(Target.user("agent-id"))
    attempts = graph.requests_for("transfer")
    assert [graph.answer_to(r).status for r in attempts] == [503, 401, 429, 400]
    sent = {r.client_request_id for r in attempts}
    assert len(sent) == 1
    assert uuid.UUID(next(iter(sent)) or "").version == 4
    assert failure.value.client_request_id in sent
    assert [r.headers.get("Retry-Attempt") for r in attempts] == [None, "1", "2", "3"]
    told = {e["client_request_id"] for e in logs if "client_request_id" in e}
    assert told == sent
    # another request has its own
    await call.keep_alive()
    assert graph.requests_for("keepAlive")[-1].client_request_id not in sent


async def test_retry_after_beyond_the_budget_gives_up_at_once(graph: FakeGraph) -> None:
    svc = CallServices(graph.settings(), retry=RetryPolicy(total_time=1.0, base_delay=0.001))
    graph.fail_next("keepAlive", 429, headers={"Retry-After": "120"}, times=5)
    try:
        with pytest.raises(GraphError) as failure:
            await svc.call(CALL_ID).keep_alive()
    finally:
        await svc.close()
    assert failure.value.status == 429
    assert failure.value.code == "TooManyRequests"
    assert len(graph.requests_for("keepAlive")) == 1


async def test_a_throttled_request_given_up_carries_the_wait_graph_asked_for(
    graph: FakeGraph,
) -> None:
    """A 429 or 503 whose Retry-After was past the retry budget raised a GraphError that
    did not say how long Graph asked to wait, nor did the log: no backing off as told."""
    svc = CallServices(graph.settings(), retry=RetryPolicy(total_time=30.0, base_delay=0.001))
    graph.fail_next("keepAlive", 429, headers={"Retry-After": "0"})
    graph.fail_next("keepAlive", 429, headers={"Retry-After": "120"})
    in_an_hour = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    graph.fail_next("keepAlive", 503, headers={"Retry-After": in_an_hour})
    found: list[GraphError] = []
    try:
        with capture_logs() as logs:
            for _ in range(2):
                with pytest.raises(GraphError) as failure:
                    await svc.call(CALL_ID).keep_alive()
                found.append(failure.value)
    finally:
        await svc.close()
    assert [graph.answer_to(r).status for r in graph.requests_for("keepAlive")] == [429, 429, 503]
    throttled, unavailable = found
    assert (throttled.status, throttled.retry_after) == (429, 120.0)  # the last answer's
    assert unavailable.status == 503
    # an HTTP date: the seconds left until it when the answer came (a minute of slack)
    assert unavailable.retry_after is not None
    assert 3540 < unavailable.retry_after <= 3600
    gave_up = [line for line in logs if line["event"] == "graph_request_gave_up"]
    assert [(line["status"], line["attempt"], line["call_id"]) for line in gave_up] == [
        (429, 2, CALL_ID),
        (503, 1, CALL_ID),
    ]
    assert gave_up[0]["retry_after"] == 120.0
    assert 3540 < gave_up[1]["retry_after"] <= 3600
    assert [line["client_request_id"] for line in gave_up] == [e.client_request_id for e in found]


@pytest.mark.parametrize("named", ["-4", "soon", "inf", "nan", ""])
async def test_a_retry_after_that_names_no_wait_is_none_on_the_error(
    graph: FakeGraph, named: str
) -> None:
    # total_time 0: the first answer is the last, whatever it names.
    svc = CallServices(graph.settings(), retry=RetryPolicy(total_time=0.0))
    graph.fail_next("keepAlive", 429, headers={"Retry-After": named})
    try:
        with pytest.raises(GraphError) as failure:
            await svc.call(CALL_ID).keep_alive()
    finally:
        await svc.close()
    assert (failure.value.status, failure.value.retry_after) == (429, None)


async def test_budget_bounds_repeated_retries(graph: FakeGraph) -> None:
    policy = RetryPolicy(total_time=0.05, base_delay=0.01, max_delay=0.02)
    svc = CallServices(graph.settings(), retry=policy)
    graph.fail_next("keepAlive", 503, times=1000)
    try:
        with pytest.raises(GraphError) as failure:
            await svc.call(CALL_ID).keep_alive()
    finally:
        await svc.close()
    assert failure.value.status == 503
    assert 1 <= len(graph.requests_for("keepAlive")) < 1000


async def test_graph_error_fields(graph: FakeGraph, services: CallServices) -> None:
    graph.fail_next(
        "transfer",
        403,
        headers={"request-id": "0b7b3c2e-request"},
        body={"error": {"code": "7505", "message": "Request denied: no permission."}},
    )
    with pytest.raises(GraphError) as failure:
        await services.call(CALL_ID).transfer({"identity": {"user": {"id": "u"}}})
    error = failure.value
    sent = graph.requests_for("transfer")[-1]
    assert error.status == 403
    assert error.code == "7505"
    assert error.message == "Request denied: no permission."
    assert error.request_id == "0b7b3c2e-request"
    assert error.client_request_id == sent.client_request_id
    assert error.method == "POST"
    assert error.url.endswith(f"/communications/calls/{CALL_ID}/transfer")
    assert len(graph.requests_for("transfer")) == 1, "a 403 is not retried"
    assert "7505" in str(error)


# A gateway in front of Graph answers with a page of its own (Azure Application Gateway's).
GATEWAY_PAGE = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n"
    b"<hr><center>Microsoft-Azure-Application-Gateway/v2</center>\r\n</body>\r\n</html>\r\n"
)


async def test_graph_errors_in_their_real_shapes_say_what_went_wrong(
    graph: FakeGraph, services: CallServices
) -> None:
    """Graph's error with an empty message ({"code": "NotFound", "message": ""}, as live
    bots have seen it) became a GraphError whose message was the whole JSON body, and a
    gateway's HTML page one whose message was the markup: in the exception and its log line."""
    inner = {"request-id": "7ebde706", "date": "2021-02-23T13:54:17"}
    graph.fail_next(
        "keepAlive", 404, body={"error": {"code": "NotFound", "message": "", "innerError": inner}}
    )
    graph.route(
        "getCall",
        lambda _: FakeResponse(status=502, raw=GATEWAY_PAGE, headers={"Content-Type": "text/html"}),
    )
    graph.route(
        "answer",
        lambda _: FakeResponse(
            status=400, raw=b"Bad Request\r\n", headers={"Content-Type": "text/plain"}
        ),
    )
    call = services.call(CALL_ID)
    found: list[GraphError] = []
    with capture_logs() as logs:
        for action in (call.keep_alive, call.refresh, call.answer):
            with pytest.raises(GraphError) as failure:
                await action()
            found.append(failure.value)
    described = [(e.status, e.code, e.message) for e in found]
    assert described == [
        (404, "NotFound", "HTTP 404 Not Found"),
        (502, None, "502 Bad Gateway"),
        (400, None, "Bad Request"),
    ]
    assert found[0].body["error"]["innerError"] == inner  # all Graph said is kept
    failed = [line for line in logs if line["event"] == "graph_request_failed"]
    assert [(line["status"], line["error"]) for line in failed] == [
        (status, message) for status, _, message in described
    ]


async def test_an_error_code_written_as_a_number_is_the_same_code(
    graph: FakeGraph, services: CallServices
) -> None:
    """Graph's error codes are strings ("8522"); one written as a JSON number was read as no
    code at all, so a call not found (8522) about a participant was a plain 404."""
    graph.fail_next("keepAlive", 404, body={"error": {"code": 8522, "message": "x"}})
    with pytest.raises(GraphError) as failure:
        await services.call(CALL_ID).keep_alive()
    assert failure.value.code == "8522"


async def test_not_found_is_not_retried(graph: FakeGraph, services: CallServices) -> None:
    graph.end_call(CALL_ID)
    with pytest.raises(GraphError) as failure:
        await services.call(CALL_ID).keep_alive()
    assert failure.value.status == 404
    assert (failure.value.code, failure.value.message) == ("8522", "Call not found.")
    assert failure.value.request_id is not None
    assert len(graph.requests_for("keepAlive")) == 1


async def test_a_request_cut_off_after_reaching_graph_is_retried_when_repeatable(
    graph: FakeGraph, services: CallServices
) -> None:
    graph.drop_next("keepAlive")
    await services.call(CALL_ID).keep_alive()
    assert len(graph.requests_for("keepAlive")) == 2


async def test_a_request_graph_never_answers_times_out(graph: FakeGraph) -> None:
    # However slow the machine, every attempt hangs: the request gives up, whatever the count.
    policy = RetryPolicy(total_time=0.3, base_delay=0.001, max_delay=0.01, request_timeout=0.05)
    svc = CallServices(graph.settings(), retry=policy)
    graph.hang_next("keepAlive", times=1000)
    try:
        with pytest.raises(GraphError) as failure:
            await svc.call(CALL_ID).keep_alive()
    finally:
        await svc.close()
    assert (failure.value.status, failure.value.code) == (0, "connectionFailed")


async def test_unreachable_graph_raises_status_zero(graph: FakeGraph) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    policy = RetryPolicy(total_time=0.05, base_delay=0.01, max_delay=0.02)
    settings = graph.settings(graph_url=f"http://127.0.0.1:{port}/v1.0")
    svc = CallServices(settings, retry=policy)
    try:
        with capture_logs() as logs, pytest.raises(GraphError) as failure:
            await svc.call(CALL_ID).keep_alive()
    finally:
        await svc.close()
    assert failure.value.status == 0
    assert failure.value.code == "connectionFailed"
    assert any(e["event"] == "graph_request_gave_up" and e["call_id"] == CALL_ID for e in logs)


async def test_revoked_token_is_replaced_once(graph: FakeGraph, services: CallServices) -> None:
    call = services.call(CALL_ID)
    await call.keep_alive()
    graph.revoke_tokens()
    await call.keep_alive()
    assert len(graph.token_requests) == 2
    assert [graph.answer_to(r).status for r in graph.requests_for("keepAlive")] == [200, 401, 200]


async def test_persistent_401_raises(graph: FakeGraph, services: CallServices) -> None:
    graph.fail_next("keepAlive", 401, times=2)
    with pytest.raises(GraphError) as failure:
        await services.call(CALL_ID).keep_alive()
    assert failure.value.status == 401
    assert failure.value.code == "InvalidAuthenticationToken"


async def test_request_ids_are_logged_with_the_call(
    graph: FakeGraph, services: CallServices
) -> None:
    call = services.call(CALL_ID)
    with capture_logs() as logs:
        await call.keep_alive()
    sent = graph.requests_for("keepAlive")[-1]
    assert uuid.UUID(sent.client_request_id or "").version == 4
    line = next(e for e in logs if e["event"] == "graph_request_ok")
    assert line["call_id"] == CALL_ID
    assert line["client_request_id"] == sent.client_request_id
    assert line["scenario_id"] == call.scenario_id == sent.scenario_id
    assert line["request_id"] == graph.answer_to(sent).headers["request-id"]


async def test_each_call_has_its_own_scenario(graph: FakeGraph, services: CallServices) -> None:
    one = services.call(CALL_ID)
    two = services.call(graph.add_call("2f1a1100-b174-40a0-aba7-0b405e01ed92").id)
    await one.keep_alive()
    await one.keep_alive()
    await two.keep_alive()
    ids = [r.scenario_id for r in graph.requests_for("keepAlive")]
    assert ids[0] == ids[1] != ids[2]


def test_parse_retry_after() -> None:
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("-4") is None
    assert parse_retry_after("inf") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("Mon, 01 Jan 2024 12:00:10 GMT", now=now) == 10.0
    assert parse_retry_after("Mon, 01 Jan 2024 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("") is None
    assert parse_retry_after(None) is None


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=4.0)
    assert 0.5 <= policy.backoff(1) <= 1.0
    assert 1.0 <= policy.backoff(2) <= 2.0
    assert 2.0 <= policy.backoff(10) <= 4.0


async def test_a_post_that_may_have_reached_graph_is_not_sent_again(
    graph: FakeGraph, services: CallServices
) -> None:
    graph.drop_next("playPrompt")
    with pytest.raises(GraphError) as failure:
        await services.call(CALL_ID).play_prompt("https://cdn.example.test/a.wav")
    assert failure.value.status == 0
    assert len(graph.requests_for("playPrompt")) == 1


async def test_an_error_says_whether_graph_may_have_acted(
    graph: FakeGraph, services: CallServices
) -> None:
    """Graph does not act on a request it refuses (a 4xx but 408) or answers 503; one that
    may have reached it otherwise (504, cut off) may have been carried out, and so may a
    repeatable one whose earlier attempt may have reached it, whatever the last answer."""
    call = services.call(CALL_ID)
    for status, acted in ((400, False), (404, False), (408, True), (500, True), (502, True)):
        graph.fail_next("playPrompt", status)
        with pytest.raises(GraphError) as failure:
            await call.play_prompt("https://cdn.example.test/a.wav")
        assert (failure.value.status, failure.value.may_have_acted) == (status, acted)
    graph.fail_next("deleteParticipant", 504)
    graph.fail_next("deleteParticipant", 429, headers={"Retry-After": "120"})
    graph.add_participant(CALL_ID, {"id": "p-1"})
    with pytest.raises(GraphError) as after_a_timeout:
        await call.participants.remove("p-1")
    assert after_a_timeout.value.status == 429
    assert after_a_timeout.value.may_have_acted is True  # the 504 may have removed them
    assert GraphError(503, None, "").may_have_acted is False
    assert GraphError(0, "connectionFailed", "").may_have_acted is True


@pytest.mark.parametrize("lost", ["answered 504", "connection cut"])
async def test_a_delete_graph_carried_out_is_done_when_its_retry_gets_404(
    graph: FakeGraph, services: CallServices, lost: str
) -> None:
    """Graph removed the participant, deleted the group or ended the call, but its answer
    was lost (a gateway's 504, a connection cut once sent): the retry's 404 raised a
    GraphError or CallEnded, as though what the bot asked had not been done. (aiohttp also
    resent a cut-off DELETE on its own, unseen by the retries, so its 404 said nothing of
    the first attempt.)"""
    call = services.call(CALL_ID)
    graph.add_participant(CALL_ID, {"id": "p-1"})
    group = await call.audio_routing_groups.create(sources=["p-1"], receivers=["p-2"])
    deletes: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("deleteParticipant", lambda: call.participants.remove("p-1")),
        ("deleteAudioRoutingGroup", lambda: call.audio_routing_groups.delete(group.id or "")),
        ("deleteCall", call.hangup),
    ]
    for action, delete in deletes:
        if lost == "answered 504":
            graph.fail_next(action, 504, acted=True)
        else:
            graph.drop_next(action, acted=True)
        with capture_logs() as logs:
            await delete()
        _first, retry = graph.requests_for(action)
        assert retry.headers.get("Retry-Attempt") == "1"
        assert graph.answer_to(retry).status == 404
        done = [e for e in logs if e["event"] == "graph_request_ok"]
        assert [(e["status"], e["deleted_by_earlier_attempt"]) for e in done] == [(404, True)]
    fake = graph.calls[id_key(CALL_ID)]
    assert fake.ended
    assert not fake.participants
    assert not fake.audio_routing_groups
    # A 404 no attempt of which may have acted is what it always was; but hangup()'s, whose
    # call is gone: the bot is out of it, as asked.
    await call.hangup()
    other = graph.add_call(state="established")
    graph.fail_next("deleteParticipant", 503)  # Graph did not act on it
    with pytest.raises(GraphError) as not_there:
        await services.call(other.id).participants.remove("p-9")
    assert (not_there.value.status, type(not_there.value)) == (404, GraphError)


async def test_a_failed_request_writes_one_line_saying_why(
    graph: FakeGraph, services: CallServices
) -> None:
    """A throttled request given up wrote graph_request_gave_up and then graph_request_failed
    about the same answer, and a token request given up wrote graph_request_gave_up before
    the token cache's line: two warnings for each failure."""
    call = services.call(CALL_ID)
    graph.fail_next("keepAlive", 429, headers={"Retry-After": "0"})
    graph.fail_next("keepAlive", 429, headers={"Retry-After": "120"})  # past the budget
    graph.drop_next("playPrompt")  # a POST cut off once sent: not sent again
    graph.fail_next("transfer", 400)  # refused: not retried
    actions: list[Callable[[], Awaitable[object]]] = [
        call.keep_alive,
        lambda: call.play_prompt("https://cdn.example.test/a.wav"),
        lambda: call.transfer(Target.user("agent-id")),
    ]
    found: list[GraphError] = []
    with capture_logs() as logs:
        for action in actions:
            with pytest.raises(GraphError) as failure:
                await action()
            found.append(failure.value)
    lines = [e for e in logs if e["log_level"] == "warning" and e["event"] != "graph_request_retry"]
    assert [e["event"] for e in lines] == [
        "graph_request_gave_up",
        "graph_request_gave_up",
        "graph_request_failed",
    ]
    assert [(e["event"], e["status"], e["code"], e["attempt"]) for e in lines] == [
        ("graph_request_gave_up", 429, "TooManyRequests", 2),
        ("graph_request_gave_up", 0, "connectionFailed", 1),
        ("graph_request_failed", 400, "BadRequest", 1),
    ]
    for line, error in zip(lines, found, strict=True):
        told = (line["error"], line["retry_after"], line["request_id"], line["client_request_id"])
        assert told == (error.message, error.retry_after, error.request_id, error.client_request_id)
        assert (line["method"], line["url"], line["call_id"]) == (error.method, error.url, CALL_ID)
    assert lines[0]["retry_after"] == 120.0
    assert lines[0]["request_id"] is not None
    # The token endpoint throttling: the token cache's line is the only one.
    graph.revoke_tokens()
    graph.fail_next("token", 429, headers={"Retry-After": "120"})
    with capture_logs() as logs, pytest.raises(GraphError):
        await call.keep_alive()
    warned = [(e["event"], e.get("status")) for e in logs if e["log_level"] == "warning"]
    assert warned == [("graph_token_failed", 429)]


async def _turns_until(predicate: Callable[[], bool]) -> None:
    """Let the loop run, its clock stopped, until ``predicate()`` holds."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened while the clock stood still")


class _SilentResolver(AbstractResolver):
    """Looks up every name as 127.0.0.1, once the first ``unanswered`` lookups are over:
    those never end, as with a DNS server that does not answer."""

    def __init__(self, unanswered: int) -> None:
        self.unanswered = unanswered
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups += 1
        if self.lookups <= self.unanswered:
            await asyncio.Event().wait()
        address: ResolveResult = {
            "hostname": host,
            "host": "127.0.0.1",
            "port": port,
            "family": socket.AF_INET,
            "proto": 0,
            "flags": 0,
        }
        return [address]

    async def close(self) -> None:
        pass


async def test_a_request_that_could_not_connect_in_time_never_reached_graph(
    clock: Clock,
) -> None:
    """aiohttp's connect timeout (no name looked up, no connection made or free in time)
    was taken for an answer lost once the request was sent: a POST was not sent again, and
    its GraphError said Graph may have acted on it. (Nor did send() bound the connecting
    apart from the whole attempt, so aiohttp never told the two apart.)"""
    received: list[str] = []

    async def record(request: web.Request) -> web.Response:
        received.append(request.method)
        return web.json_response({})

    policy = RetryPolicy(
        total_time=5.0, base_delay=0.001, max_delay=0.01, request_timeout=5.0, connect_timeout=0.05
    )
    async with plain_server(record) as base:
        url = f"http://graph.test:{URL(base).port}/x"
        for unanswered in (1, 1000):
            resolver = _SilentResolver(unanswered)
            connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
            async with aiohttp.ClientSession(connector=connector) as session:
                with capture_logs() as logs:
                    if unanswered == 1:
                        sending = asyncio.ensure_future(
                            send(session, "POST", url, policy=policy, json_body={})
                        )
                    else:
                        # No time left for a retry: given up, and Graph never had it.
                        sending = asyncio.ensure_future(
                            send(
                                session,
                                "POST",
                                url,
                                policy=RetryPolicy(total_time=0.0, connect_timeout=0.05),
                                json_body={},
                            )
                        )
                    await _turns_until(lambda: resolver.lookups == 1)  # noqa: B023 - awaited here
                    # Time moves only here: a slow machine cannot run the retry's connect out.
                    await clock.advance(0.05)
                    if unanswered == 1:
                        while resolver.lookups < 2:  # the back-off before the retry
                            await clock.advance(0.01)
                        response = await sending
                    else:
                        with pytest.raises(GraphError) as failure:
                            await sending
            if unanswered == 1:
                assert response.status == 200
                assert not response.acted_before
                retried = [e["error"] for e in logs if e["event"] == "graph_request_retry"]
                assert [r.split(":")[0] for r in retried] == ["ConnectionTimeoutError"]
                assert resolver.lookups == 2
            else:
                assert (failure.value.code, failure.value.may_have_acted) == (
                    "connectionFailed",
                    False,
                )
                assert failure.value.message.startswith("ConnectionTimeoutError")
    assert received == ["POST"]


@asynccontextmanager
async def server_that_never_speaks() -> AsyncIterator[tuple[int, asyncio.Queue[None]]]:
    """A server on 127.0.0.1 that takes connections and never writes a byte: an https
    client's TLS handshake, and so its connecting, never ends. Yields its port and a
    queue that gets one item per connection taken."""
    taken: asyncio.Queue[None] = asyncio.Queue()
    open_connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        open_connections[task] = writer
        taken.put_nowait(None)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client gives up on it
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], taken
    finally:
        server.close()
        for writer in open_connections.values():
            writer.transport.abort()
        await asyncio.gather(*open_connections, return_exceptions=True)


@pytest.mark.parametrize("connect_timeout", [0.2, 10.0], ids=["as_long", "longer"])
async def test_a_post_still_connecting_when_its_attempt_ran_out_never_reached_graph(
    graph: FakeGraph, connect_timeout: float
) -> None:
    """With connect_timeout not shorter than request_timeout, the attempt's own timeout
    struck while it was still connecting and was taken for an answer lost once sent: a
    POST that never reached Graph was not sent again, and its GraphError said Graph may
    have acted on it."""
    timeouts = {"request_timeout": 0.2, "connect_timeout": connect_timeout}
    async with server_that_never_speaks() as (port, _):
        settings = graph.settings(graph_url=f"https://127.0.0.1:{port}/v1.0")
        # No time for a retry: given up, and Graph never had it.
        svc = CallServices(settings, retry=RetryPolicy(total_time=0.0, **timeouts))
        try:
            with pytest.raises(GraphError) as failure:
                await svc.graph.request("POST", "/communications/calls", json={})
        finally:
            await svc.close()
    assert (failure.value.code, failure.value.may_have_acted) == ("connectionFailed", False)

    # Time for retries: the POST is sent again once its first attempt runs out.
    async with server_that_never_speaks() as (port, taken):
        settings = graph.settings(graph_url=f"https://127.0.0.1:{port}/v1.0")
        retry = RetryPolicy(total_time=60.0, base_delay=0.001, max_delay=0.01, **timeouts)
        svc = CallServices(settings, retry=retry)
        posting = asyncio.ensure_future(svc.graph.request("POST", "/communications/calls"))

        async def next_connection() -> None:
            connecting = asyncio.ensure_future(taken.get())
            await asyncio.wait({connecting, posting}, return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                connecting.cancel()
                raise AssertionError(f"not sent again: {posting.exception()!r}")

        try:
            await next_connection()
            await next_connection()
        finally:
            posting.cancel()
            await asyncio.gather(posting, return_exceptions=True)
            await svc.close()


@pytest.mark.parametrize("connect_timeout", [1.0, 2.0, 10.0])
async def test_a_post_graph_had_but_never_answered_is_not_sent_again(
    graph: FakeGraph, clock: Clock, connect_timeout: float
) -> None:
    # Connected, sent, and then no answer within the attempt: Graph may be acting on it,
    # whatever the connect bound.
    policy = RetryPolicy(total_time=30.0, request_timeout=2.0, connect_timeout=connect_timeout)
    svc = CallServices(graph.settings(), retry=policy)
    graph.add_call(CALL_ID, state="established")
    graph.hang_next("playPrompt")
    try:
        playing = asyncio.ensure_future(svc.call(CALL_ID).play_prompt("https://x/a.wav"))
        await graph.wait_for_request("playPrompt")
        await clock.advance(2.0)
        with pytest.raises(GraphError) as failure:
            await playing
    finally:
        await svc.close()
    assert (failure.value.code, failure.value.may_have_acted) == ("connectionFailed", True)
    assert len(graph.requests_for("playPrompt")) == 1


def _lines(logs: list[MutableMapping[str, Any]], *events: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] in events]


async def test_a_request_that_ran_out_of_time_says_which_bound_and_how_long_it_was(
    graph: FakeGraph, clock: Clock
) -> None:
    """An attempt with no answer within request_timeout was logged, and raised, as a bare
    ``TimeoutError``: not which bound ran out, after how long, or how far it got."""
    policy = RetryPolicy(
        total_time=30.0, base_delay=0.001, max_delay=0.01, request_timeout=2.0, connect_timeout=1.0
    )
    svc = CallServices(graph.settings(), retry=policy)
    graph.add_call(CALL_ID, state="established")
    call = svc.call(CALL_ID)
    no_answer = "TimeoutError: no answer within request_timeout (2 s)"
    try:
        with capture_logs() as logs:
            # A POST sent and never answered: not sent again, one line says why.
            graph.hang_next("playPrompt")
            playing = asyncio.ensure_future(call.play_prompt("https://cdn.example.test/a.wav"))
            await graph.wait_for_request("playPrompt")
            await clock.advance(2.0)
            with pytest.raises(GraphError) as failure:
                await playing
            # A request sent again: its retry line says why the attempt before failed.
            graph.hang_next("keepAlive")
            keeping = asyncio.ensure_future(call.keep_alive())
            await graph.wait_for_request("keepAlive")
            await clock.advance(2.0)
            await _turns_until(lambda: bool(_lines(logs, "graph_request_retry")))
            await clock.advance(0.01)  # the back-off
            await keeping
    finally:
        await svc.close()
    error = failure.value
    assert error.message == no_answer
    path = f"/communications/calls/{path_segment(CALL_ID)}/playPrompt"
    assert error.method == "POST"
    assert error.url.endswith(path)
    assert str(error) == f"POST {error.url} -> 0 connectionFailed: {no_answer}"
    [failed] = _lines(logs, "graph_request_failed", "graph_request_gave_up")
    assert (failed["event"], failed["error"], failed["method"], failed["url"]) == (
        "graph_request_gave_up",
        no_answer,
        "POST",
        error.url,
    )
    [retry] = _lines(logs, "graph_request_retry")
    assert retry["error"] == no_answer
    assert str(retry["url"]).endswith(f"/communications/calls/{path_segment(CALL_ID)}/keepAlive")
    # Nothing of the request's headers: the token stays out of the line.
    assert "Bearer" not in repr(logs)


async def test_an_answer_cut_short_by_request_timeout_says_so(clock: Clock) -> None:
    """The status and headers came and the body did not: the attempt got that far."""
    released = asyncio.Event()
    answered: list[str] = []

    async def body_never_ends_once(request: web.Request) -> web.StreamResponse:
        answered.append(request.method)
        if len(answered) > 1:
            return web.json_response({"value": []})
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 100
        await response.prepare(request)
        await response.write(b'{"value": [')
        # Until the test is done: the server's shutdown would wait on the stopped clock.
        await released.wait()
        return response

    headers_came = asyncio.Event()

    async def on_headers(session: object, context: object, params: object) -> None:
        headers_came.set()

    seen = aiohttp.TraceConfig()
    seen.on_request_end.append(on_headers)
    policy = RetryPolicy(
        total_time=30.0, base_delay=0.001, max_delay=0.01, request_timeout=2.0, connect_timeout=1.0
    )
    async with (
        plain_server(body_never_ends_once) as base,
        aiohttp.ClientSession(trace_configs=[connection_trace(), seen]) as session,
    ):
        url = base + "/v1.0/communications/calls"
        try:
            with capture_logs() as logs:
                getting = asyncio.ensure_future(send(session, "GET", url, policy=policy))
                await headers_came.wait()
                await clock.advance(2.0)
                await _turns_until(lambda: bool(_lines(logs, "graph_request_retry")))
                await clock.advance(0.01)  # the back-off
                response = await getting
        finally:
            released.set()
    assert response.status == 200
    [retry] = _lines(logs, "graph_request_retry")
    cut_short = "TimeoutError: the answer did not come in full within request_timeout (2 s)"
    assert (retry["error"], retry["method"], retry["url"]) == (cut_short, "GET", url)


@pytest.mark.parametrize(
    ("connect_timeout", "ran_out", "said"),
    [
        (1.0, 1.0, "ConnectionTimeoutError: no connection within connect_timeout (1 s)"),
        (10.0, 2.0, "TimeoutError: no connection within request_timeout (2 s)"),
    ],
    ids=["connect_timeout", "request_timeout"],
)
async def test_a_request_that_could_not_connect_in_time_says_which_bound_ran_out(
    graph: FakeGraph, clock: Clock, connect_timeout: float, ran_out: float, said: str
) -> None:
    """Connecting (here a TLS handshake never answered) bounded by connect_timeout, or by
    request_timeout when that is shorter: the error named neither (aiohttp's "Connection
    timeout to host ...", or a bare TimeoutError)."""
    policy = RetryPolicy(total_time=0.0, request_timeout=2.0, connect_timeout=connect_timeout)
    async with server_that_never_speaks() as (port, taken):
        settings = graph.settings(graph_url=f"https://127.0.0.1:{port}/v1.0")
        svc = CallServices(settings, retry=policy)
        try:
            with capture_logs() as logs:
                posting = asyncio.ensure_future(
                    svc.graph.request("POST", "/communications/calls", json={})
                )
                await taken.get()
                await clock.advance(ran_out)
                with pytest.raises(GraphError) as failure:
                    await posting
        finally:
            await svc.close()
    error = failure.value
    assert (error.message, error.may_have_acted) == (said, False)
    assert (
        str(error)
        == f"POST https://127.0.0.1:{port}/v1.0/communications/calls -> 0 connectionFailed: {said}"
    )
    [line] = _lines(logs, "graph_request_failed", "graph_request_gave_up")
    assert (line["error"], line["method"], line["url"]) == (said, "POST", error.url)


async def test_ids_reach_the_wire_as_path_segment_encoded_them(graph: FakeGraph) -> None:
    paths: list[str] = []

    async def record(request: web.Request) -> web.Response:
        paths.append(request.raw_path)
        return web.json_response({})

    # Every sub-delimiter, and characters yarl would otherwise decode or re-quote.
    ids = ["a;b=c", "x:y@z", "a,b", "a+b", "a$b", "a!b", "a'b", "a(b)", "a&b", "a*b", "é"]
    async with plain_server(record) as base:
        services = CallServices(graph.settings(graph_url=base + "/v1.0"), retry=FAST)
        try:
            for participant in ids:
                await services.call(CALL_ID).participants.get(participant)
            # What a URL cannot hold at all is still encoded.
            await services.graph.request("GET", "/communications/calls?$filter=name eq 'caf\u00e9'")
        finally:
            await services.close()
    participants = f"/v1.0/communications/calls/{path_segment(CALL_ID)}/participants/"
    assert paths[:-1] == [participants + path_segment(i) for i in ids]
    assert paths[-1] == "/v1.0/communications/calls?$filter=name%20eq%20'caf%C3%A9'"


# -- a hostile or broken Graph -----------------------------------------------------------


async def test_retry_after_zero_on_every_answer_still_backs_off() -> None:
    # Retry-After: 0 forever: each wait is still at least half the backoff, so few attempts.
    attempts = 0

    async def throttle(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        return web.Response(status=429, headers={"Retry-After": "0"})

    policy = RetryPolicy(total_time=0.5, base_delay=0.05, max_delay=0.05)
    async with plain_server(throttle) as base, aiohttp.ClientSession() as session:
        response = await send(session, "GET", base + "/x", policy=policy)
    assert response.status == 429
    assert 2 <= attempts <= 1 + 0.5 / 0.025


async def test_a_504_to_a_post_is_not_sent_again(graph: FakeGraph, services: CallServices) -> None:
    # The gateway timed out: Graph may be playing the prompt (or placing the call) already.
    graph.fail_next("playPrompt", 504)
    with pytest.raises(GraphError) as failure:
        await services.call(CALL_ID).play_prompt("https://cdn.example.test/a.wav")
    assert failure.value.status == 504
    assert len(graph.requests_for("playPrompt")) == 1
    graph.fail_next("keepAlive", 504)
    await services.call(CALL_ID).keep_alive()
    assert len(graph.requests_for("keepAlive")) == 2


@pytest.mark.parametrize("encoding", ["gzip", "deflate", None])
async def test_a_huge_or_decompression_bomb_body_is_cut_off(encoding: str | None) -> None:
    limit = 1024 * 1024
    plain = b"[" + b" " * (8 * limit) + b"]"
    body = gzip.compress(plain) if encoding == "gzip" else plain
    body = zlib.compress(plain) if encoding == "deflate" else body

    async def bomb(request: web.Request) -> web.Response:
        headers = {"Content-Type": "application/json"}
        if encoding:
            headers["Content-Encoding"] = encoding
        return web.Response(body=body, headers=headers)

    async with plain_server(bomb) as base, aiohttp.ClientSession() as session:
        with pytest.raises(GraphError) as failure:
            await send(session, "GET", base + "/x", policy=FAST, max_body=limit)
    assert (failure.value.status, failure.value.code) == (0, "responseTooLarge")
    assert f"200 answer is more than {limit} bytes" in failure.value.message


async def test_graph_requests_are_capped_at_16_mib(
    graph: FakeGraph, services: CallServices
) -> None:
    big = {"value": [], "pad": "x" * (16 * 1024 * 1024)}
    graph.route("listParticipants", lambda request: FakeResponse(status=200, body=big))
    with capture_logs() as logs, pytest.raises(GraphError) as failure:
        await services.call(CALL_ID).participants.list()
    assert failure.value.code == "responseTooLarge"
    warned = [(e["event"], e["code"]) for e in logs if e["log_level"] == "warning"]
    assert warned == [("graph_request_failed", "responseTooLarge")]


async def test_graph_answers_that_do_not_fit_raise_graph_errors(
    graph: FakeGraph, services: CallServices
) -> None:
    """Answers nested past the decoder, or not fitting the models, raised RecursionError or
    pydantic's ValidationError: handlers catching GraphError missed them."""
    graph.add_call(CALL_ID, state="established")
    # 100,000 deep: past every supported Python's decoder (3.13's reads 5,000 deep).
    deep = b"[" * 100_000 + b"]" * 100_000
    graph.route("getCall", lambda _: FakeResponse(status=200, raw=deep))
    call = services.call(CALL_ID)
    snapshot = await call.refresh()  # too deep for the decoder: read as no body at all
    assert snapshot.id is None
    graph.route("getCall", lambda _: FakeResponse(status=200, body={"mediaState": {"audio": 1}}))
    with pytest.raises(GraphError) as unfit:
        await call.refresh()
    assert unfit.value.code == "invalid_response"
    assert "Call" in unfit.value.message
    graph.route(
        "listParticipants", lambda _: FakeResponse(status=200, body={"value": [{"isMuted": 5}]})
    )
    with pytest.raises(GraphError, match="Participant"):
        await call.participants.list()
    odd_operation = {"@odata.type": "#microsoft.graph.playPromptOperation", "status": 5}
    graph.route("getOperation", lambda _: FakeResponse(status=200, body=odd_operation))
    with pytest.raises(GraphError, match="operation"):
        await call.get_operation("op-1")
    graph.route("listAudioRoutingGroups", lambda _: FakeResponse(status=200, body={"value": 5}))
    assert await call.audio_routing_groups.list() == []  # no list of groups: none


async def test_a_created_call_graph_describes_oddly_keeps_its_handle(
    graph: FakeGraph, services: CallServices
) -> None:
    """Graph had made the call, but its answer did not fit the models: the id was lost with
    the ValidationError, and the bot could not even hang up."""
    graph.route(
        "createCall",
        lambda _: FakeResponse(status=201, body={"id": "new-call-1", "mediaState": {"audio": 1}}),
    )
    with capture_logs() as logs:
        call = await services.create_call(Target.user("u1"))
    assert call.id == "new-call-1"
    assert [line["event"] for line in logs if line["log_level"] == "warning"] == [
        "call_created_unreadable"
    ]


async def test_an_access_token_no_header_may_carry_is_refused_not_kept(
    graph: FakeGraph, services: CallServices, clock: Clock
) -> None:
    """Cached, a token with a line break failed every request before any left (so no 401
    ever refreshed it) until it expired."""
    graph.add_call(CALL_ID, state="established")
    assert (await services.call(CALL_ID).refresh()).id == CALL_ID
    graph.revoke_tokens()  # the next request gets 401, and a new token is fetched
    bad = {"access_token": "a\r\nX: 1", "expires_in": 3600, "token_type": "Bearer"}
    graph.fail_next("token", 200, body=bad)
    with pytest.raises(GraphError) as refused:
        await services.call(CALL_ID).refresh()
    assert refused.value.code == "invalid_response"
    await clock.advance(1.0)  # the token endpoint is not asked again before then
    assert (await services.call(CALL_ID).refresh()).id == CALL_ID  # the next token is good


@pytest.mark.parametrize("lost", ["answered 504", "connection cut"])
async def test_an_action_that_only_sets_a_state_is_sent_again_when_its_answer_is_lost(
    graph: FakeGraph, services: CallServices, lost: str
) -> None:
    """Subscribing to tones, muting, unmuting, the recording status, the screen sharing
    role and an audio routing group's update set a state: Graph carrying one out twice
    leaves the call as once. Only keepAlive
    was sent again after a lost answer, so a 504 or a cut connection failed the subscribe a
    digit collection needs, or a mute, with a GraphError, when asking again would have
    done it."""
    call = services.call(CALL_ID)
    graph.add_participant(CALL_ID, {"id": "p-1"})
    group = await call.audio_routing_groups.create(sources=["p-1"], receivers=["p-2"])
    actions: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("subscribeToTone", call.subscribe_to_tone),
        ("mute", call.mute),
        ("unmute", call.unmute),
        ("muteParticipant", lambda: call.participants.mute("p-1")),
        ("updateRecordingStatus", lambda: call.update_recording_status("recording")),
        ("changeScreenSharingRole", lambda: call.change_screen_sharing_role("viewer")),
        (
            "updateAudioRoutingGroup",
            lambda: call.audio_routing_groups.update(group.id or "", receivers=["p-3"]),
        ),
    ]
    for action, send_it in actions:
        if lost == "answered 504":
            graph.fail_next(action, 504, acted=True)
        else:
            graph.drop_next(action, acted=True)
        done = await send_it()
        assert not isinstance(done, Operation) or done.status == "completed"
        first, retry = graph.requests_for(action)
        assert retry.headers.get("Retry-Attempt") == "1"
        assert retry.json == first.json  # the same request, its clientContext included
    # An action whose second run would do it twice is still not sent again.
    graph.drop_next("playPrompt", acted=True)
    with pytest.raises(GraphError):
        await call.play_prompt("https://cdn.example.test/a.wav")
    assert len(graph.requests_for("playPrompt")) == 1


async def test_a_refusal_whose_body_is_cut_off_is_still_a_refusal() -> None:
    """A 429, a 503 or a 4xx says Graph did not act on the request, even when the
    connection is cut before its body is in. Such an answer counted as no answer at all:
    a throttled POST was not sent again and its GraphError said Graph may have acted (a
    transfer then waited for news that would never come)."""
    answers: list[tuple[int, dict[str, str]]] = [
        (429, {"Retry-After": "0"}),
        (503, {}),
        (200, {}),
        (400, {}),
    ]
    seen: list[str] = []

    async def cut_after_the_status(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers["client-request-id"])
        status, headers = answers[len(seen) - 1]
        if status == 200:
            return web.json_response({"id": "op-1", "status": "running"})
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = 100
        await response.prepare(request)
        await response.write(b'{"error": {"code": "')
        assert request.transport is not None
        request.transport.close()
        return response

    async with (
        plain_server(cut_after_the_status) as base,
        aiohttp.ClientSession(trace_configs=[connection_trace()]) as session,
    ):
        url = base + "/v1.0/communications/calls/c-1/playPrompt"
        played = await send(session, "POST", url, policy=FAST, json_body={})
        assert (played.status, played.json(), len(seen)) == (
            200,
            {"id": "op-1", "status": "running"},
            3,
        )
        refused = await send(session, "POST", url, policy=FAST, json_body={})
    assert (refused.status, refused.body, refused.acted_before) == (400, b"", False)
    assert len(seen) == 4


async def test_a_call_handle_used_after_the_bot_stopped_raises_and_opens_no_session() -> None:
    """A handle kept past the bot's stop (a task left running, a handle stored away) acted
    through a session built anew for it, which nothing closed ("Unclosed client session"):
    now it says the bot has stopped, and builds none."""
    bot = CallBot(app_id=APP_ID)
    kept: list[Call] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()
        kept.append(call)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
    [handle] = kept
    graph = handle._services.graph
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="the bot has stopped"):
            await handle.play_prompt("https://x/beep.wav")
        with pytest.raises(RuntimeError, match="the bot has stopped"):
            await handle.keep_alive()
        assert graph._session is None
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
