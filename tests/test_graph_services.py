"""CallServices hooks: call handles, keep-alive loops, the answer-deadline warning."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

import callbot
import callbot.graph
from callbot import models
from callbot.graph import CallServices, RetryPolicy
from callbot.testing import FakeGraph

from .conftest import until

CALL_ID = "57dab8b1-894c-409a-b240-bd8beae78896"
FAST = RetryPolicy(total_time=1.0, base_delay=0.001, max_delay=0.01)


@pytest.fixture
async def make_services(graph: FakeGraph) -> AsyncIterator[Callable[..., CallServices]]:
    made: list[CallServices] = []

    def make(**settings: Any) -> CallServices:
        svc = CallServices(graph.settings(**settings), retry=FAST)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        await svc.close()


def test_public_names() -> None:
    assert set(callbot.graph.__all__) == {
        "AccessToken",
        "AsyncTokenCredential",
        "AudioRoutingGroups",
        "Call",
        "CallServices",
        "CertificateCredential",
        "ClientSecretCredential",
        "GraphClient",
        "GraphResponse",
        "InvitationOptions",
        "Meeting",
        "Operation",
        "Participants",
        "RetryPolicy",
        "Target",
        "TokenCache",
        "media_info",
        "media_prompt",
        "parse_join_url",
    }
    assert callbot.Call is callbot.graph.Call
    assert callbot.Operation is callbot.graph.Operation


async def test_one_handle_per_call(make_services: Callable[..., CallServices]) -> None:
    svc = make_services()
    call = svc.call(CALL_ID)
    assert svc.call("57DAB8B1894C409AB240BD8BEAE78896") is call
    assert call.key == "57dab8b1894c409ab240bd8beae78896"
    snapshot = models.Call(id=CALL_ID, state="established")
    call._set_snapshot(snapshot)
    assert (call.snapshot, call.state) == (snapshot, "established")
    participant = models.Participant(id="p1", is_muted=False)
    call._set_roster({"p1": participant})
    assert call.roster == {"p1": participant}
    call._set_snapshot(None)
    assert call.state is None

    svc.on_ended(call.key, None)
    assert call.ended
    assert svc.call(CALL_ID) is call, "kept until its handlers are done"
    svc.release(call.key)
    fresh = svc.call(CALL_ID)
    assert fresh is not call
    assert not fresh.ended


async def test_handle_asked_for_after_the_end_is_ended(
    make_services: Callable[..., CallServices],
) -> None:
    svc = make_services()
    svc.on_ended("2F1A1100B17440A0ABA70B405E01ED92", None)
    late = svc.call("2f1a1100-b174-40a0-aba7-0b405e01ed92")
    assert late.ended
    svc.release(late.key)
    assert svc.call("2f1a1100-b174-40a0-aba7-0b405e01ed92") is not late


async def test_ended_handle_is_forgotten_without_release(
    make_services: Callable[..., CallServices],
) -> None:
    svc = make_services(termination_grace=0.0)
    call = svc.call(CALL_ID)
    svc.on_ended(call.key, None)
    await until(lambda: svc.call(CALL_ID) is not call)


async def test_keep_alive_loop_until_the_call_is_gone(
    graph: FakeGraph, make_services: Callable[..., CallServices]
) -> None:
    svc = make_services(keep_alive=True, keep_alive_interval=0.01)
    gone: list[str] = []

    async def call_gone(key: str) -> None:
        gone.append(key)

    svc.on_call_gone = call_gone
    call = svc.call(CALL_ID)
    svc.on_established(call)
    svc.on_established(call)  # a repeated "established" starts no second loop
    first = await graph.wait_for_request("keepAlive")
    second = await graph.wait_for_request("keepAlive")
    assert first.path == f"/communications/calls/{CALL_ID}/keepAlive"
    assert first.body == b""
    assert second.scenario_id == first.scenario_id == call.scenario_id
    graph.end_call(CALL_ID)
    with capture_logs() as logs:
        await until(lambda: not svc.is_keeping_alive(CALL_ID))
    assert {"event": "keep_alive_call_gone", "call_id": CALL_ID, "log_level": "info"} in logs
    # Graph forgot the call: it ends here, and the store is told to let it go.
    assert gone == [call.key]
    assert call.ended
    sent = len(graph.requests_for("keepAlive"))
    await asyncio.sleep(0.05)
    assert len(graph.requests_for("keepAlive")) == sent


async def test_keep_alive_survives_errors_and_stops_when_the_call_ends(
    graph: FakeGraph, make_services: Callable[..., CallServices]
) -> None:
    svc = make_services(keep_alive=True, keep_alive_interval=0.01)
    graph.fail_next("keepAlive", 500)
    call = svc.call(CALL_ID)
    with capture_logs() as logs:
        svc.on_established(call)
        await graph.wait_for_request("keepAlive")
        await graph.wait_for_request("keepAlive")
    assert any(e["event"] == "keep_alive_failed" and e["status"] == 500 for e in logs)
    assert svc.is_keeping_alive(CALL_ID)
    svc.on_ended(call.key, models.ResultInfo(code=0, subcode=5001))
    assert not svc.is_keeping_alive(CALL_ID)
    svc.on_established(call)
    assert not svc.is_keeping_alive(CALL_ID), "an ended call is not kept alive"


async def test_keep_alive_can_be_turned_off(make_services: Callable[..., CallServices]) -> None:
    svc = make_services(keep_alive=False, keep_alive_interval=0.01)
    svc.on_established(svc.call(CALL_ID))
    assert not svc.is_keeping_alive(CALL_ID)


async def test_close_stops_keep_alives(
    graph: FakeGraph, make_services: Callable[..., CallServices]
) -> None:
    svc = make_services(keep_alive=True, keep_alive_interval=0.01)
    svc.on_established(svc.call(CALL_ID))
    await graph.wait_for_request("keepAlive")
    await svc.close()
    assert not svc.is_keeping_alive(CALL_ID)


async def test_unanswered_incoming_call_is_warned_about(
    make_services: Callable[..., CallServices],
) -> None:
    svc = make_services(answer_warning_after=0.01)
    call = svc.call(CALL_ID)
    with capture_logs() as logs:
        svc.on_incoming(call)
        await until(lambda: any(e["event"] == "incoming_call_not_answered" for e in logs))
    warning = next(e for e in logs if e["event"] == "incoming_call_not_answered")
    assert warning["call_id"] == CALL_ID
    assert warning["log_level"] == "warning"
    assert warning["deadline"] == 15.0


@pytest.mark.parametrize("respond", ["answer", "reject", "redirect"])
async def test_responding_in_time_cancels_the_warning(
    make_services: Callable[..., CallServices], respond: str
) -> None:
    svc = make_services(answer_warning_after=0.05)
    call = svc.call(CALL_ID)
    with capture_logs() as logs:
        svc.on_incoming(call)
        if respond == "answer":
            await call.answer()
        elif respond == "reject":
            await call.reject("busy")
        else:
            await call.redirect({"identity": {"user": {"id": "u"}}})
        await asyncio.sleep(0.1)
        svc.on_incoming(call)  # a late duplicate of the incoming call changes nothing
        await asyncio.sleep(0.1)
    assert not any(e["event"] == "incoming_call_not_answered" for e in logs)


async def test_call_ending_unanswered_is_not_warned_about(
    make_services: Callable[..., CallServices],
) -> None:
    svc = make_services(answer_warning_after=0.02)
    call = svc.call(CALL_ID)
    with capture_logs() as logs:
        svc.on_incoming(call)
        svc.on_ended(call.key, None)
        await asyncio.sleep(0.1)
    assert not any(e["event"] == "incoming_call_not_answered" for e in logs)


async def test_hooks_never_raise(make_services: Callable[..., CallServices]) -> None:
    svc = make_services()
    with capture_logs() as logs:
        svc.on_operation(None)  # type: ignore[arg-type]
    assert any(e["event"] == "graph_operation_match_failed" for e in logs)


async def test_services_as_context_manager(graph: FakeGraph) -> None:
    async with CallServices(graph.settings(), retry=FAST) as svc:
        await svc.call(CALL_ID).keep_alive()
        assert svc.pending_operations == 0
    assert len(graph.token_requests) == 1
