"""CallServices: call handles, operation hooks, the session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

import callbot
import callbot.graph
from callbot import models
from callbot.graph import CallServices, RetryPolicy
from callbot.testing import FakeGraph

CALL_ID = "57dab8b1-894c-409a-b240-bd8beae78896"
FAST = RetryPolicy(total_time=1.0, base_delay=0.001, max_delay=0.01)


@pytest.fixture
def graph(graph: FakeGraph) -> FakeGraph:
    """The FakeGraph of every test, offering the call these tests act on."""
    graph.add_call(CALL_ID, state="established")
    return graph


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
        "TEAMS_HOSTS",
        "AccessToken",
        "AsyncTokenCredential",
        "AudioRoutingGroups",
        "Call",
        "CallServices",
        "CertificateCredential",
        "ClientSecretCredential",
        "EndpointType",
        "GraphClient",
        "GraphResponse",
        "InvitationOptions",
        "Meeting",
        "Modality",
        "Operation",
        "Participants",
        "RecordingStatus",
        "RejectReason",
        "RetryPolicy",
        "Roster",
        "RoutingMode",
        "RoutingPolicy",
        "ScreenSharingRole",
        "Target",
        "TokenCache",
        "ToneName",
        "media_info",
        "media_prompt",
        "parse_join_url",
    }
    assert callbot.Call is callbot.graph.Call
    assert callbot.Operation is callbot.graph.Operation
    assert callbot.Roster is callbot.graph.Roster
    assert callbot.Meeting is callbot.graph.Meeting


async def test_handles_of_one_call_are_equal(make_services: Callable[..., CallServices]) -> None:
    svc = make_services()
    call = svc.call(CALL_ID)
    assert svc.call("57DAB8B1894C409AB240BD8BEAE78896") == call
    assert len({call, svc.call(CALL_ID)}) == 1
    assert call.key == "57dab8b1894c409ab240bd8beae78896"
    assert call.state is None
    assert not call.ended, "without a lifecycle nothing has ended"
    # One scenario id per call, the same in every process that acts on it.
    assert svc.call(CALL_ID.upper()).scenario_id == call.scenario_id
    snapshot = models.Call(id=CALL_ID, state="established")
    participant = models.Participant(id="p1", is_muted=False)
    seen = svc.call(CALL_ID, snapshot=snapshot, roster={"p1": participant})
    assert (seen.snapshot, seen.state, dict(seen.roster)) == (
        snapshot,
        "established",
        {"p1": participant},
    )
    assert call.snapshot is None, "a handle's snapshot is its own"


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
