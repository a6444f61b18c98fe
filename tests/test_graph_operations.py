"""Awaiting operations: completion and failure from documented notifications, early
completions, call end, timeouts, correlation by id and by clientContext."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from callbot import OperationFailed, models
from callbot._parse import parse_payload
from callbot.events import OperationUpdated
from callbot.graph import CallServices, Operation, RetryPolicy
from callbot.graph._operations import RECENT_OUTCOME_BYTES, OperationRegistry
from callbot.testing import FakeGraph, FakeResponse, RecordedRequest

FIXTURES = Path(__file__).parent / "fixtures"
# the call and operation of the documented playPrompt / recordResponse exchanges
CALL_ID = "57dab8b1-894c-409a-b240-bd8beae78896"
OPERATION_ID = "0fe0623f-d628-42ed-b4bd-8ac290072cc5"
CONTEXT = "d45324c1-fcb5-430a-902c-f20af696537c"
_OPERATION_PATH = re.compile(r"/?(?:communications|app)/calls/([^/]+)/operations/([^/]+)")


def documented_response(name: str) -> dict[str, Any]:
    data = json.loads((FIXTURES / "operations" / f"{name}.json").read_text(encoding="utf-8"))
    response: dict[str, Any] = data["response"]
    return response


def operation_event(name: str, **changes: Any) -> OperationUpdated:
    """The OperationUpdated event a documented operation notification becomes."""
    body = json.loads((FIXTURES / "notifications" / name).read_text(encoding="utf-8"))
    return event_from_item(body["value"][0], **changes)


def event_from_item(item: dict[str, Any], **changes: Any) -> OperationUpdated:
    url = item.get("resourceUrl") or item["resource"]
    match = _OPERATION_PATH.match(url)
    assert match is not None
    data = dict(item["resourceData"])
    data.update(changes)
    operation = models.parse_operation(data)
    return OperationUpdated(
        call_id=match[1],
        change_type=item["changeType"],
        resource_url=url,
        raw=item,
        operation=operation,
        operation_id=data.get("id") or match[2],
        status=data["status"],
        result_info=operation.result_info,
        client_context=operation.client_context,
    )


@pytest.fixture
async def services(graph: FakeGraph) -> AsyncIterator[CallServices]:
    graph.add_call(CALL_ID, state="established")  # the call the tests act on, offered
    svc = CallServices(graph.settings(), retry=RetryPolicy(total_time=2.0, base_delay=0.01))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


def answer_documented(name: str) -> FakeResponse:
    return FakeResponse(status=200, body=documented_response(name))


async def test_play_prompt_completes_from_documented_notification(
    graph: FakeGraph, services: CallServices
) -> None:
    graph.route("playPrompt", lambda _: answer_documented("playPrompt"))
    op = await services.call(CALL_ID).play_prompt(
        "https://cdn.contoso.com/beep.wav", client_context=CONTEXT
    )
    assert op.id == OPERATION_ID
    assert op.status == "running"
    assert not op.done
    assert services.pending_operations == 1
    # the notification names the operation as 0FE0623FD628... in its path only
    event = operation_event("31-call-playprompt-operation-completed.json")
    assert event.operation_id == "0FE0623FD62842EDB4BD8AC290072CC5"
    services.on_operation(event)
    final = await op.wait(timeout=1)
    assert isinstance(final, models.PlayPromptOperation)
    assert final.status == "completed"
    assert final.result_info is not None
    assert final.result_info.code == 200
    assert op.status == "completed"
    assert op.done
    assert not op.failed
    assert services.pending_operations == 0
    assert await op == final


async def test_record_response_completion_carries_the_recording(
    graph: FakeGraph, services: CallServices
) -> None:
    graph.route("recordResponse", lambda _: answer_documented("recordResponse"))
    call = services.call(CALL_ID)
    op = await call.record_response(max_record_duration=10, client_context=CONTEXT)
    location, token = graph.add_recording(b"caller said yes")
    services.on_operation(
        operation_event(
            "32-call-record-recordresponse-completed.json",
            recordingLocation=location,
            recordingAccessToken=token,
        )
    )
    final = await op.wait(timeout=1)
    assert isinstance(final, models.RecordOperation)
    assert final.recording_location == location
    assert final.result_info is not None
    assert final.result_info.subcode == 8515
    assert await call.download_recording(op) == b"caller said yes"


@pytest.mark.parametrize("outcome", ["before the end", "after the end", "none"])
async def test_a_call_ending_before_the_answer_keeps_an_outcome_within_the_window(
    graph: FakeGraph, services: CallServices, outcome: str
) -> None:
    """A caller hangs up as their recording completes: Graph posts the completion and the
    call's end as requests of their own, in either order, before or after its answer to
    ``recordResponse``. The end failed the operation at once, and the completion was lost
    with the recording's location. An outcome within ``reorder_window`` of the end settles
    it now; with none, the operation fails as before, once the window has passed."""
    location = "https://media.example.test/recording/1"
    reason = models.ResultInfo(code=0, subcode=5001, message="Call ended.")
    completed = operation_event(
        "32-call-record-recordresponse-completed.json", recordingLocation=location
    )

    def late(request: RecordedRequest) -> FakeResponse:
        if outcome == "before the end":
            services.on_operation(completed)  # overtakes the answer, and the end
        services.fail_operations(CALL_ID, reason)  # the caller hung up
        return answer_documented("recordResponse")

    graph.route("recordResponse", late)
    op = await services.call(CALL_ID).record_response(client_context=CONTEXT)
    if outcome == "after the end":
        services.on_operation(completed)
    if outcome == "none":
        with pytest.raises(OperationFailed) as failure:
            await op.wait(timeout=30)
        assert failure.value.call_ended
        assert failure.value.result_info is reason
    else:
        assert op.done
        final = await op.wait(timeout=0)
        assert isinstance(final, models.RecordOperation)
        assert final.recording_location == location
    assert services.pending_operations == 0


async def test_failed_operation_raises_with_result_info(
    graph: FakeGraph, services: CallServices
) -> None:
    graph.route("recordResponse", lambda _: answer_documented("recordResponse"))
    op = await services.call(CALL_ID).record_response(client_context=CONTEXT)
    services.on_operation(
        operation_event("37-call-cancelmediaprocessing-recordresponse-canceled.json")
    )
    with pytest.raises(OperationFailed) as failure:
        await op.wait(timeout=1)
    assert failure.value.result_info.code == 400
    assert failure.value.result_info.subcode == 8508
    assert isinstance(failure.value.operation, models.RecordOperation)
    assert op.failed
    assert op.status == "failed"
    assert op.result_info is not None
    assert op.result_info.subcode == 8508


async def test_completed_in_the_response_resolves_at_once(
    graph: FakeGraph, services: CallServices
) -> None:
    call = services.call(CALL_ID)
    for start in (call.subscribe_to_tone, call.mute, call.unmute):
        op = await start()
        assert op.done
        final = await op.wait(timeout=0)
        assert final.status == "completed"
    assert services.pending_operations == 0


async def test_failed_in_the_response_raises(graph: FakeGraph, services: CallServices) -> None:
    graph.route(
        "mute",
        lambda r: FakeResponse(
            status=200,
            body={
                "@odata.type": "#microsoft.graph.muteParticipantOperation",
                "id": "m1",
                "status": "failed",
                "clientContext": r.json["clientContext"],
                "resultInfo": {"code": 403, "subcode": 7505, "message": "denied"},
            },
        ),
    )
    op = await services.call(CALL_ID).mute()
    with pytest.raises(OperationFailed) as failure:
        await op.wait()
    assert failure.value.result_info.subcode == 7505


async def test_falls_back_to_client_context(graph: FakeGraph, services: CallServices) -> None:
    # an answer without an id (and no Location): only clientContext can match
    graph.route(
        "playPrompt",
        lambda r: FakeResponse(
            status=200,
            body={"@odata.type": "#microsoft.graph.playPromptOperation", "status": "running"},
        ),
    )
    op = await services.call(CALL_ID).play_prompt("https://x/beep.wav")
    assert op.id is None
    event = operation_event(
        "31-call-playprompt-operation-completed.json", clientContext=op.client_context
    )
    services.on_operation(event)
    final = await op.wait(timeout=1)
    assert final.status == "completed"
    assert final.client_context == op.client_context


async def test_running_update_does_not_resolve(graph: FakeGraph, services: CallServices) -> None:
    graph.route("playPrompt", lambda _: answer_documented("playPrompt"))
    op = await services.call(CALL_ID).play_prompt("https://x/beep.wav", client_context=CONTEXT)
    services.on_operation(
        operation_event("31-call-playprompt-operation-completed.json", status="Running")
    )
    assert not op.done
    assert op.status == "running"
    with pytest.raises(TimeoutError):
        await op.wait(timeout=0.01)
    # a timed-out wait leaves the operation pending; its outcome still arrives
    services.on_operation(operation_event("31-call-playprompt-operation-completed.json"))
    assert (await op.wait(timeout=1)).status == "completed"


async def test_completion_before_the_response_matched_by_context(
    graph: FakeGraph, services: CallServices
) -> None:
    def early(request: RecordedRequest) -> FakeResponse:
        # Graph's notification overtakes the action's response
        services.on_operation(operation_event("31-call-playprompt-operation-completed.json"))
        return answer_documented("playPrompt")

    graph.route("playPrompt", early)
    op = await services.call(CALL_ID).play_prompt("https://x/beep.wav", client_context=CONTEXT)
    assert op.done
    assert op.status == "completed"
    assert op.id == OPERATION_ID
    assert (await op.wait(timeout=0)).status == "completed"
    assert services.pending_operations == 0


async def test_completion_before_the_response_matched_by_id(
    graph: FakeGraph, services: CallServices
) -> None:
    def early(request: RecordedRequest) -> FakeResponse:
        # this time the notification carries no clientContext: only the id can match,
        # and the id is only known once the response is read
        services.on_operation(
            operation_event("31-call-playprompt-operation-completed.json", clientContext=None)
        )
        return answer_documented("playPrompt")

    graph.route("playPrompt", early)
    op = await services.call(CALL_ID).play_prompt("https://x/beep.wav", client_context="mine")
    assert op.done
    assert (await op.wait(timeout=0)).status == "completed"


async def test_an_outcome_before_the_response_settles_only_under_the_id_it_names(
    graph: FakeGraph, services: CallServices
) -> None:
    def early(request: RecordedRequest) -> FakeResponse:
        # an outcome with this action's clientContext but another operation's id
        services.on_operation(
            operation_event("31-call-playprompt-operation-completed.json", id="another-op")
        )
        return answer_documented("playPrompt")

    graph.route("playPrompt", early)
    op = await services.call(CALL_ID).play_prompt("https://x/beep.wav", client_context=CONTEXT)
    assert op.id == OPERATION_ID
    assert not op.done
    assert op.status == "running"
    services.on_operation(operation_event("31-call-playprompt-operation-completed.json"))
    assert (await op.wait(timeout=0)).status == "completed"


async def test_an_outcome_before_an_answer_naming_no_id_is_matched_by_context(
    graph: FakeGraph, services: CallServices
) -> None:
    def early(request: RecordedRequest) -> FakeResponse:
        services.on_operation(operation_event("31-call-playprompt-operation-completed.json"))
        body = {"@odata.type": "#microsoft.graph.playPromptOperation", "status": "running"}
        return FakeResponse(status=200, body=body)

    graph.route("playPrompt", early)
    op = await services.call(CALL_ID).play_prompt("https://x/beep.wav", client_context=CONTEXT)
    assert op.done
    assert (await op.wait(timeout=0)).status == "completed"
    assert services.pending_operations == 0


async def test_two_calls_with_the_same_operation_id_keep_their_own_operations(
    graph: FakeGraph, services: CallServices
) -> None:
    # Operation ids are only unique per call: Graph may name the same one in two calls.
    body = {"@odata.type": "#microsoft.graph.playPromptOperation", "id": OPERATION_ID}
    graph.route("playPrompt", lambda r: FakeResponse(status=200, body=dict(body, status="running")))
    other_call = graph.add_call("2f1a1100-b174-40a0-aba7-0b405e01ed92").id
    first = await services.call(CALL_ID).play_prompt("https://x/beep.wav")
    second = await services.call(other_call).play_prompt("https://x/beep.wav")
    item = json.loads(
        (FIXTURES / "notifications" / "31-call-playprompt-operation-completed.json").read_text()
    )["value"][0]
    services.on_operation(event_from_item(item, clientContext=None))
    assert (await first.wait(timeout=0)).status == "completed"
    assert not second.done
    moved = dict(item, resourceUrl=f"/communications/calls/{other_call}/operations/{OPERATION_ID}")
    services.on_operation(event_from_item(moved, clientContext=None))
    assert (await second.wait(timeout=0)).status == "completed"


async def test_fake_graph_posts_completions_through_a_listener(
    graph: FakeGraph, services: CallServices
) -> None:
    # how a simulator plays Graph: after answering, post the operation's outcome
    async def complete(request: RecordedRequest, answer: FakeResponse) -> None:
        if request.action == "playPrompt":
            body = graph.operation_notification(answer.body["id"])
            services.on_operation(event_from_item(body["value"][0]))

    graph.listeners.append(complete)
    op = await services.call(CALL_ID).play_prompt("https://x/beep.wav")
    final = await op.wait(timeout=2)
    assert final.id == op.id
    assert final.result_info is not None
    assert final.result_info.code == 200


async def test_call_end_fails_pending_waits(graph: FakeGraph, services: CallServices) -> None:
    call = services.call(CALL_ID)
    other = services.call(graph.add_call("2f1a1100-b174-40a0-aba7-0b405e01ed92").id)
    prompt = await call.play_prompt("https://x/beep.wav")
    record = await call.record_response()
    elsewhere = await other.play_prompt("https://x/beep.wav")
    waiter = asyncio.ensure_future(prompt.wait())
    await asyncio.sleep(0)
    reason = models.ResultInfo(code=0, subcode=5001, message="Call ended.")
    # the notification path writes the id without dashes in upper case
    services.fail_operations("57DAB8B1894C409AB240BD8BEAE78896", reason)
    with pytest.raises(OperationFailed) as failure:
        await waiter
    assert failure.value.result_info is reason
    with pytest.raises(OperationFailed):
        await record.wait()
    assert not elsewhere.done
    assert services.pending_operations == 1


async def test_close_fails_pending_waits(graph: FakeGraph) -> None:
    graph.add_call(CALL_ID, state="established")
    svc = CallServices(graph.settings())
    op = await svc.call(CALL_ID).play_prompt("https://x/beep.wav")
    await svc.close()
    with pytest.raises(OperationFailed):
        await op.wait()


async def test_action_error_leaves_nothing_pending(
    graph: FakeGraph, services: CallServices
) -> None:
    graph.fail_next("playPrompt", 400)
    with pytest.raises(Exception, match="400"):
        await services.call(CALL_ID).play_prompt("https://x/beep.wav")
    assert services.pending_operations == 0


async def test_operation_typing_and_repr(graph: FakeGraph, services: CallServices) -> None:
    op: Operation[models.InviteParticipantsOperation] = await services.call(
        CALL_ID
    ).participants.invite({"identity": {"user": {"id": "u1"}}})
    # Graph wrote "Running"; the operation reports it in one spelling
    assert op.status == "running"
    assert isinstance(op.result, models.InviteParticipantsOperation)
    assert "invite" in repr(op)
    assert op.call_key == "57dab8b1894c409ab240bd8beae78896"


async def test_unmatched_completions_are_kept_only_briefly_and_bounded() -> None:
    registry = OperationRegistry(recent_limit=3, recent_ttl=60.0)
    item = json.loads(
        (FIXTURES / "notifications" / "31-call-playprompt-operation-completed.json").read_text()
    )["value"][0]
    for n in range(10):
        changed = dict(item, resourceUrl=f"/communications/calls/{CALL_ID}/operations/op{n}")
        registry.on_event(event_from_item(changed, clientContext=f"ctx{n}"))
    assert len(registry._recent) <= 3

    def running(operation_id: str) -> dict[str, Any]:
        return {"@odata.type": "#microsoft.graph.playPromptOperation", "id": operation_id}

    # the newest one still settles an operation whose response names its id
    op = Operation(
        call_id=CALL_ID,
        action="playPrompt",
        client_context="ctx9",
        kind=models.PlayPromptOperation,
    )
    registry.start(op)
    assert not op.done
    registry.accepted(op, running("op9"))
    assert op.done
    stale = Operation(
        call_id=CALL_ID,
        action="playPrompt",
        client_context="ctx0",
        kind=models.PlayPromptOperation,
    )
    registry.start(stale)
    registry.accepted(stale, running("op0"))
    assert not stale.done

    # a negative lifetime makes every kept outcome stale at once: only the newest stays
    expiring = OperationRegistry(recent_ttl=-1.0)
    expiring.on_event(event_from_item(item, clientContext="first"))
    moved = dict(item, resourceUrl=f"/communications/calls/{CALL_ID}/operations/x")
    expiring.on_event(event_from_item(moved, clientContext="second"))
    key = CALL_ID.replace("-", "")
    assert sorted(expiring._recent) == [(key, "x")]


async def test_unmatched_failures_with_long_messages_are_kept_within_their_bytes() -> None:
    """Outcomes no operation matches yet were bounded by count only: 512 failures each
    carrying a message of up to a body's 4 MiB kept 2 GiB for two minutes. They are kept
    within ``RECENT_OUTCOME_BYTES``, the newest whatever its size, and still settle the
    operation whose response names them."""
    registry = OperationRegistry()
    item = json.loads(
        (FIXTURES / "notifications" / "31-call-playprompt-operation-completed.json").read_text()
    )["value"][0]
    long = RECENT_OUTCOME_BYTES // 2
    for n in range(8):
        failed = dict(item, resourceUrl=f"/communications/calls/{CALL_ID}/operations/op{n}")
        data = dict(item["resourceData"], status="failed", clientContext=f"ctx{n}")
        data["resultInfo"] = {"code": 500, "subcode": n, "message": f"{n}" * long}
        registry.on_event(event_from_item(dict(failed, resourceData=data)))
    kept = [outcome.result_info for outcome in registry._recent.values()]
    held = sum(len(info.message or "") for info in kept if info is not None)
    assert 0 < held <= RECENT_OUTCOME_BYTES
    op = Operation(
        call_id=CALL_ID, action="playPrompt", client_context="ctx7", kind=models.PlayPromptOperation
    )
    registry.start(op)
    registry.accepted(op, {"@odata.type": "#microsoft.graph.playPromptOperation", "id": "op7"})
    with pytest.raises(OperationFailed) as failure:
        await op.wait()
    # The operation's handler gets the failure as Graph sent it.
    assert failure.value.result_info.message == "7" * long


async def test_an_early_outcome_is_kept_under_its_own_call_and_id_only() -> None:
    """Kept outcomes were found by ``id:{call}:{operation}``: one posted under call
    ``a:b`` for operation ``c`` settled call ``a``'s operation ``b:c``."""
    registry = OperationRegistry()
    item = json.loads(
        (FIXTURES / "notifications" / "31-call-playprompt-operation-completed.json").read_text()
    )["value"][0]
    posted = dict(item, resourceUrl="/communications/calls/a:b/operations/c")
    registry.on_event(event_from_item(posted, id="c", clientContext="theirs"))
    op = Operation(
        call_id="a", action="playPrompt", client_context="mine", kind=models.PlayPromptOperation
    )
    registry.start(op)
    registry.accepted(op, {"@odata.type": "#microsoft.graph.playPromptOperation", "id": "b:c"})
    assert not op.done


# -- outcomes that name no operation id -------------------------------------------------------

INVITEES = (
    {"identity": {"user": {"id": "7e1b4346-85a6-4bdd-abe3-d11c5d420efe"}}},
    {"identity": {"user": {"id": "1e126418-44a0-4a94-a6f8-0efe1ad71acb"}}},
)


def invitation_outcome(client_context: str) -> OperationUpdated:
    """Graph's documented outcome of inviting several participants, for ``CALL_ID``: posted
    on ``operations/participants`` with ``"id": null``, through the real parser."""
    text = FIXTURES / "notifications" / "49-participant-invite-ex2-operation-completed.json"
    body = json.loads(text.read_text(encoding="utf-8").replace(DOCUMENTED_INVITE_CALL, CALL_ID))
    body["value"][0]["resourceData"]["clientContext"] = client_context
    (event,) = parse_payload(body)
    assert isinstance(event, OperationUpdated)
    return event


DOCUMENTED_INVITE_CALL = "7531d31f-d10d-44de-802f-c569dbca451c"


def invitation_running(request: RecordedRequest) -> FakeResponse:
    """Graph's documented answer to the invitation, naming its id, with the context sent."""
    body = dict(documented_response("invite-participants-multiple"))
    body["clientContext"] = request.json["clientContext"]
    return FakeResponse(status=200, body=body)


def test_an_outcome_on_operations_participants_names_no_operation() -> None:
    event = invitation_outcome("ctx")
    assert event.operation_id is None
    assert event.operation_key is None
    assert event.status == "completed"
    assert event.client_context == "ctx"
    assert isinstance(event.operation, models.InviteParticipantsOperation)


@pytest.mark.parametrize("overtakes_the_answer", [False, True])
async def test_an_outcome_naming_no_id_settles_by_the_context_callbot_generated(
    graph: FakeGraph, services: CallServices, overtakes_the_answer: bool
) -> None:
    """Graph names the invitation's id in its answer, then posts the outcome without one:
    the context callbot generated (no one else knows it) says which operation it ends."""

    def answer(request: RecordedRequest) -> FakeResponse:
        if overtakes_the_answer:
            services.on_operation(invitation_outcome(request.json["clientContext"]))
        return invitation_running(request)

    graph.route("invite", answer)
    op = await services.call(CALL_ID).participants.invite(*INVITEES)
    assert op.id == "eec3812a-fdc3-4fb4-825c-a06c9f35414e"
    if not overtakes_the_answer:
        assert not op.done
        services.on_operation(invitation_outcome(op.client_context))
    done = await op.wait(timeout=0)
    assert done.status == "completed"
    assert done.id == op.id  # Graph's outcome named none: still this operation's
    assert done.participants is not None
    assert len(done.participants) == 2
    assert services.pending_operations == 0


async def test_a_failed_outcome_naming_no_id_says_which_operation_failed(
    graph: FakeGraph, services: CallServices
) -> None:
    graph.route("invite", invitation_running)
    op = await services.call(CALL_ID).participants.invite(*INVITEES)
    failed = invitation_outcome(op.client_context)
    failed = failed.model_copy(
        update={
            "status": "failed",
            "operation": failed.operation.model_copy(update={"status": "failed"}),
        }
    )
    services.on_operation(failed)
    with pytest.raises(OperationFailed, match="eec3812a-fdc3-4fb4-825c-a06c9f35414e"):
        await op.wait(timeout=0)


@pytest.mark.parametrize("overtakes_the_answer", [False, True])
async def test_an_outcome_naming_no_id_settles_nothing_by_a_context_the_bot_chose(
    graph: FakeGraph, services: CallServices, overtakes_the_answer: bool
) -> None:
    """A context the bot chose may be known to others: with the id known, an outcome that
    names none is ignored, counted and logged, before or after the action's answer."""

    def answer(request: RecordedRequest) -> FakeResponse:
        if overtakes_the_answer:
            services.on_operation(invitation_outcome("mine"))
        return invitation_running(request)

    graph.route("invite", answer)
    with capture_logs() as logs:
        op = await services.call(CALL_ID).participants.invite(*INVITEES, client_context="mine")
        if not overtakes_the_answer:
            services.on_operation(invitation_outcome("mine"))
    assert not op.done
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["graph_operation_unproven"]
    assert services.operations.counts["dropped", "operation_unproven"] == 1
    services.on_operation(invitation_outcome("mine").model_copy(update={"operation_id": op.id}))
    assert (await op.wait(timeout=0)).status == "completed"


async def test_a_cancel_answered_with_the_cancelled_operation_s_id_leaves_it_waiting(
    graph: FakeGraph, services: CallServices
) -> None:
    """Graph's documented cancelMediaProcessing response carries the id of the operation it
    cancels (the recording's; its Location names another). The recording keeps its place:
    its outcome (document 37) still ends its wait, though the bot reused its context."""
    graph.route(
        "recordResponse",
        lambda _: FakeResponse(status=200, body=documented_response("recordResponse")),
    )
    graph.route(
        "cancelMediaProcessing",
        lambda _: FakeResponse(status=200, body=documented_response("cancelMediaProcessing")),
    )
    call = services.call(CALL_ID)
    recording = await call.record_response(client_context="voicemail")
    await call.cancel_media_processing()
    again = {
        "@odata.type": "#microsoft.graph.recordOperation",
        "id": "11111111-2222-3333-4444-555555555555",
        "status": "running",
    }
    graph.route("recordResponse", lambda _: FakeResponse(status=200, body=again))
    await call.record_response(client_context="voicemail")  # starts over, the same context
    services.on_operation(
        operation_event(
            "37-call-cancelmediaprocessing-recordresponse-canceled.json",
            clientContext="voicemail",
        )
    )
    with pytest.raises(OperationFailed) as failed:
        await recording.wait(timeout=5)
    assert failed.value.result_info.subcode == 8508
