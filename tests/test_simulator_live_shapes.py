"""What the simulator posts for each step of a call, against what a live Teams tenant posted
for the same step (``fixtures/recorded/sb*``): nothing a live call's notification lacks, so a
bot that passes against the simulator does not lean on a field Teams does not send."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from pydantic import BaseModel

from callbot import Call, CallBot, Operation, OperationFailed, events, models
from callbot._ids import id_key
from callbot._parse import parse_payload
from callbot.graph import Target, media_prompt
from callbot.testing import (
    TEST_TENANT_ID,
    Simulator,
    SimulatorError,
    builders,
    run_with_simulator,
)

from .conftest import (
    APP_ID,
    FIXTURES,
    load_notification_text,
    normalized_json,
    plain_server,
    until,
)

RECORDED = FIXTURES / "recorded"


def recorded_item(name: str) -> dict[str, Any]:
    """The one item of a notification recorded from a live Teams call."""
    [item] = json.loads((RECORDED / name).read_text(encoding="utf-8"))["value"]
    assert isinstance(item, dict)
    return item


def posted_items(traffic: list[Any]) -> list[dict[str, Any]]:
    return [item for t in traffic if t.kind == "notification" for item in t.body["value"]]


def keys_beyond(posted: dict[str, Any], recorded: dict[str, Any]) -> set[str]:
    """The item's and its resource's fields that the recorded notification has not."""
    extra = {key for key in posted if key not in recorded}
    data, live = posted.get("resourceData"), recorded.get("resourceData")
    if isinstance(data, dict) and isinstance(live, dict):
        extra |= {f"resourceData.{key}" for key in data if key not in live}
    return extra


def bot_seeing_established() -> tuple[CallBot, list[events.CallStateChanged]]:
    """A bot that places or joins calls and keeps each ``established`` it is told."""
    bot = CallBot(app_id=APP_ID)
    established: list[events.CallStateChanged] = []

    @bot.on_state("established")
    async def connected(call: Call, event: events.CallStateChanged) -> None:
        established.append(event)

    return bot, established


def bot_answering_with_rosters() -> tuple[CallBot, list[events.ParticipantsUpdated]]:
    """A bot that answers every call and keeps each roster it is told."""
    bot, _, rosters = bot_answering_with_offers()
    return bot, rosters


def bot_answering_with_offers() -> tuple[
    CallBot, list[events.IncomingCall], list[events.ParticipantsUpdated]
]:
    """The same, keeping each incoming call it was offered too."""
    bot = CallBot(app_id=APP_ID)
    offered: list[events.IncomingCall] = []
    rosters: list[events.ParticipantsUpdated] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        offered.append(event)
        await call.answer()

    @bot.on_participants
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        rosters.append(event)

    return bot, offered, rosters


async def test_a_tone_carries_what_a_live_teams_tone_carries_and_no_chain_id() -> None:
    """A tone from a live Teams call (sb04) has no ``callChainId``, unlike the call's state
    updates: the simulator put one on every tone, so a tone handler reading
    ``event.call.call_chain_id`` passed under test and got ``None`` from Teams."""
    bot = CallBot(app_id=APP_ID)
    tones: list[events.ToneReceived] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def subscribe(call: Call, event: events.CallStateChanged) -> None:
        await call.subscribe_to_tone()

    @bot.on_tone
    async def heard(call: Call, event: events.ToneReceived) -> None:
        tones.append(event)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.press("1")
        await until(lambda: bool(tones))
        await call.settled()
        posted = posted_items(sim.traffic)
    [tone] = [i for i in posted if "toneInfo" in (i.get("resourceData") or {})]
    recorded = recorded_item("sb04-p2p-simpletest-p2ptest1event4tonepress.json")
    assert keys_beyond(tone, recorded) == set()
    # The first key numbered as the recorded call's (6), not as Graph's docs show one (1).
    assert tone["resourceData"]["toneInfo"] == recorded["resourceData"]["toneInfo"]
    assert tones[0].call.call_chain_id is None
    # The call's states still carry it, as recorded (sb01, sb02).
    states = [i["resourceData"] for i in posted if "state" in (i.get("resourceData") or {})]
    assert {d.get("callChainId") for d in states if "toneInfo" not in d} == {call.chain_id}


async def test_a_placed_call_has_one_chain_id_in_graphs_answer_and_its_notifications() -> None:
    """Graph names one ``callChainId`` for a call: the one in its answer to ``create_call``
    is the one its notifications carry. The simulator answered with one and posted another,
    so a bot matching them (to join its logs with Graph's) failed only under test."""
    bot, established = bot_seeing_established()
    async with run_with_simulator(bot) as sim:
        placed = await bot.create_call(Target.user("user-1", "Lee Gu"))
        call = await sim.wait_for_outgoing_call()
        await until(lambda: bool(established))
        fetched = await placed.refresh()
    assert placed.snapshot is not None
    answered = placed.snapshot.call_chain_id
    assert answered is not None
    assert call.chain_id == answered
    assert established[0].call.call_chain_id == answered
    assert fetched.call_chain_id == answered


def documented_operation(name: str) -> dict[str, Any]:
    """A documented request and Graph's answer to it (``fixtures/operations``)."""
    documented = json.loads((FIXTURES / "operations" / name).read_text(encoding="utf-8"))
    assert isinstance(documented, dict)
    return documented


def without_nulls(value: Any) -> Any:
    """``value`` without the keys Graph writes ``null``: nothing it knows to send."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return [without_nulls(v) for v in value] if isinstance(value, list) else value


async def test_a_placed_call_is_answered_naming_the_bots_application_as_its_source() -> None:
    """Graph's answer to Create call names the application that placed the call as its
    ``source``, though the request named none (the documented create-call answer). FakeGraph
    answered with no ``source``, so a bot reading ``placed.snapshot.source`` passed under
    test with ``None`` and read the application on Graph."""
    documented = documented_operation("create-call.json")
    assert "source" not in documented["request"]
    bot, established = bot_seeing_established()
    async with run_with_simulator(bot) as sim:
        placed = await bot.create_call(Target.user("user-1", "Lee Gu"))
        await sim.wait_for_outgoing_call()
        await until(lambda: bool(established))
        [(request, answer)] = [(r, a) for r, a in sim.graph.answers if r.action == "createCall"]
    assert "source" not in request.json
    assert placed.snapshot is not None
    assert placed.snapshot.source is not None
    assert placed.snapshot.source.identity is not None
    application = placed.snapshot.source.identity.application
    assert application is not None
    assert (application.id, application.display_name) == (APP_ID, sim.bot_name)
    assert key_paths(answer.body["source"]) == key_paths(
        without_nulls(documented["response"]["source"])
    )


async def test_an_incoming_call_has_one_chain_id_in_its_notifications_and_on_graph() -> None:
    """Graph's copy of an incoming call (``GET`` the call) has the chain id its
    notifications carry; the simulator's had none."""
    bot = CallBot(app_id=APP_ID)
    incoming: list[events.IncomingCall] = []
    fetched: list[models.Call] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        incoming.append(event)
        await call.answer()

    @bot.on_state("established")
    async def look(call: Call, event: events.CallStateChanged) -> None:
        fetched.append(await call.refresh())

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await until(lambda: bool(fetched))
    assert incoming[0].call.call_chain_id == call.chain_id
    assert fetched[0].call_chain_id == call.chain_id


async def test_every_notification_comes_with_the_headers_graph_sends() -> None:
    """Requests captured from Graph (``fixtures/captured/*.headers``) carry the call's chain
    id, Graph's user agent and ``Accept``, and a notification sent again the first sending's
    message id. The simulator sent none of these: a bot correlating its logs by chain id, or
    telling a resent notification by it, could not be tested."""
    received: list[CIMultiDictProxy[str]] = []

    async def answering(request: web.Request) -> web.StreamResponse:
        received.append(request.headers)
        if len(received) == 2:  # busy once: Graph sends it again
            return web.Response(status=503, headers={"Retry-After": "0"})
        return web.Response(status=202)

    other_call = "491f0b00-ffff-4bc9-a43e-b226498ec22a"
    async with plain_server(answering) as base, Simulator(app_id=APP_ID) as sim:
        sim.callback_url = f"{base}/api/calls"
        call = await sim.incoming_call()
        await call.notify(builders.call_state(call.id, "establishing"))
        await sim.post(builders.notifications(builders.call_state(other_call, "established")))
        other_chain = sim.graph.calls[id_key(other_call)].resource.get("callChainId")
    assert len(received) == 4
    for headers in received:
        assert headers["User-Agent"] == "Microsoft-Skype/3.0,(Calling/1.0)"
        assert headers["Accept"] == "application/json"
        assert headers["Content-Type"] == "application/json"
        assert headers["Authorization"].startswith("Bearer ")
    assert [h["X-Microsoft-Skype-Chain-ID"] for h in received[:3]] == [call.chain_id] * 3
    # A call the simulator does not play has a chain id too, the one Graph's copy has.
    assert received[3]["X-Microsoft-Skype-Chain-ID"] == other_chain
    assert other_chain is not None
    message_ids = [h["X-Microsoft-Skype-Message-ID"] for h in received]
    assert len(set(message_ids)) == 4
    originals = [h.get("X-Microsoft-Skype-Original-Message-ID") for h in received]
    assert originals == [None, None, message_ids[1], None]


MEETING_URL = (
    "https://teams.microsoft.com/l/meetup-join/19%3ameeting_abc%40thread.v2/0"
    "?context=%7b%22Tid%22%3a%22t-1%22%2c%22Oid%22%3a%22o-1%22%7d"
)


@pytest.mark.parametrize(
    ("meeting", "recorded"),
    [
        (False, "sb02-p2p-simpletest-p2ptest1event2callestablished.json"),
        (True, "sb14-groupcalls-groupcallestablished.json"),
    ],
    ids=["placed-call", "joined-meeting"],
)
async def test_a_call_the_bot_placed_is_established_as_a_live_one_with_its_direction(
    meeting: bool, recorded: str
) -> None:
    """A call a bot placed (sb02, sb08) or a meeting it joined (sb14) was recorded
    ``established`` with ``direction: outgoing``; the simulator's said no direction, so a
    handler telling the calls it placed by it was wrong only under test."""
    bot, established = bot_seeing_established()
    async with run_with_simulator(bot) as sim:
        if meeting:
            await bot.join_meeting(MEETING_URL)
        else:
            await bot.create_call(Target.user("user-1", "Lee Gu"))
        call = await sim.wait_for_outgoing_call()
        await until(lambda: bool(established))
        await call.settled()
        posted = posted_items(sim.traffic)
    assert established[0].call.direction == "outgoing"
    calls = [i for i in posted if isinstance(i.get("resourceData"), dict)]
    first = next(i for i in calls if i["resourceData"].get("state") == "established")
    live = recorded_item(recorded)
    assert set(live["resourceData"]) <= set(first["resourceData"])
    # A joined meeting's also names the meeting, as captured joins do (below).
    beyond = set(first["resourceData"]) - set(live["resourceData"])
    assert beyond == ({"chatInfo", "meetingInfo"} if meeting else set())
    assert set(first) == set(live)
    assert first["resourceData"]["callChainId"] == call.chain_id


async def test_a_rejected_call_ends_as_graph_documents_it_with_no_state() -> None:
    """Graph tells a bot that rejected a call only that the call was deleted: no state, no
    result (documents 17, and the 2018 page). The simulator said ``terminated``, which a
    handler reading ``event.call.state`` would not get from Graph."""
    bot = CallBot(app_id=APP_ID)
    ended: list[events.CallTerminated] = []

    @bot.on_incoming_call
    async def refuse(call: Call, event: events.IncomingCall) -> None:
        await call.reject("busy")

    @bot.on_terminated
    async def gone(call: Call, event: events.CallTerminated) -> None:
        ended.append(event)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_until_ended()
        await until(lambda: bool(ended))
        await call.settled()
        posted = posted_items(sim.traffic)
    assert call.states == ["incoming", "terminated"]
    assert ended[0].state == "terminated"
    assert ended[0].call.state is None
    assert ended[0].result_info is None
    documented = json.loads(
        (FIXTURES / "notifications" / "17-call-reject-call-deleted.json").read_text()
    )["value"][0]
    assert posted[-1]["changeType"] == documented["changeType"] == "deleted"
    assert set(posted[-1]["resourceData"]) <= {*documented["resourceData"], "callChainId"}


@pytest.mark.parametrize(
    "documented",
    [
        "19-call-redirect-ex1-call-terminated-deleted.json",
        "21-call-redirect-ex2-call-terminated-deleted.json",
    ],
)
async def test_a_redirected_call_ends_naming_the_call_as_graph_documents_it(
    documented: str,
) -> None:
    """Graph ends a call the bot redirected with the call itself: its direction, caller,
    targets, ``myParticipantId``, id and ``callbackUri`` beside ``terminated`` (documents 19,
    21, 23). The simulator posted the state alone, so a bot reading who was redirected in its
    ``on_terminated`` handler failed under test and worked on Graph."""
    bot = CallBot(app_id=APP_ID)
    ended: list[events.CallTerminated] = []

    @bot.on_incoming_call
    async def forward(call: Call, event: events.IncomingCall) -> None:
        await call.redirect(Target.user(str(uuid.uuid4()), "Lee Gu"))

    @bot.on_terminated
    async def gone(call: Call, event: events.CallTerminated) -> None:
        ended.append(event)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call(from_user="Adele Vance")
        await call.wait_until_ended()
        await until(lambda: bool(ended))
        await call.settled()
        posted = posted_items(sim.traffic)
    data = normalized_json(load_notification_text(documented))["value"][0]["resourceData"]
    assert set(data) <= set(posted[-1]["resourceData"])
    told = ended[0].call
    assert (told.state, told.direction, told.id) == ("terminated", "incoming", call.id)
    assert told.source is not None
    assert told.source.identity is not None
    assert told.source.identity.user is not None
    assert told.source.identity.user.display_name == "Adele Vance"
    assert told.my_participant_id == call.bot_participant_id
    assert told.callback_uri == call.callback_url
    assert ended[0].result_info is None
    # Only the end of a redirect to a phone number is documented naming who answered (23).
    assert "answeredBy" not in data
    assert told.answered_by is None


async def test_a_call_redirected_to_a_phone_ends_naming_who_answered_as_graph_documents() -> None:
    """Graph ends a call the bot redirected to a phone number naming who answered it, by an
    ``encrypted`` identity (document 23, and the redirect it follows asks for a phone). The
    simulator named no one, so a bot reading ``event.call.answered_by`` in its
    ``on_terminated`` handler passed under test with ``None``."""
    documented = normalized_json(
        load_notification_text("23-call-redirect-ex3-pstn-call-terminated-answeredby.json")
    )["value"][0]["resourceData"]
    [asked] = documented_operation("redirect-pstn.json")["request"]["targets"]
    assert "phone" in asked["identity"]
    bot = CallBot(app_id=APP_ID)
    ended: list[events.CallTerminated] = []

    @bot.on_incoming_call
    async def forward(call: Call, event: events.IncomingCall) -> None:
        await call.redirect(Target.phone(asked["identity"]["phone"]["id"]))

    @bot.on_terminated
    async def gone(call: Call, event: events.CallTerminated) -> None:
        ended.append(event)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call(from_phone="+14255550100")
        await call.wait_until_ended()
        await until(lambda: bool(ended))
        await call.settled()
        posted = posted_items(sim.traffic)
    answered = posted[-1]["resourceData"]["answeredBy"]
    assert key_paths(answered) == key_paths(documented["answeredBy"])
    told = ended[0].call.answered_by
    assert told is not None
    assert told.identity is not None
    assert told.identity.encrypted is not None
    assert told.identity.encrypted.id == answered["identity"]["encrypted"]["id"]


@pytest.mark.parametrize("beta", [False, True], ids=["v1.0", "beta"])
async def test_a_recording_that_ran_its_full_length_ends_as_graph_documents_it(
    beta: bool,
) -> None:
    """Graph's v1.0 documents the end of a recording that reached its maximum duration with
    ``resultInfo`` 200/8515 and no ``completionReason`` (document 32; the reason is in the
    beta schema only): the simulator named ``maxRecordDurationReached`` on v1.0 too, so a
    bot reading ``completion_reason`` passed under test and read ``None`` on Graph."""
    bot = CallBot(app_id=APP_ID)
    if beta:  # a bot written for Graph's beta stays on the simulator's beta
        bot.configure(graph_url="https://graph.microsoft.com/beta")
    results: list[models.RecordOperation] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def record(call: Call, event: events.CallStateChanged) -> None:
        results.append(await (await call.record_response(max_record_duration=5)).wait(timeout=5))

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await until(lambda: bool(results))
        await call.settled()
        posted = posted_items(sim.traffic)
    [outcome] = [i["resourceData"] for i in posted if "/operations/" in i["resourceUrl"]]
    name = "32-call-record-recordresponse-completed.json"
    documented = normalized_json(load_notification_text(name))["value"][0]["resourceData"]
    beyond = set(outcome) - (set(documented) - {"@odata.id", "@odata.etag"})
    assert beyond == ({"completionReason"} if beta else set())
    assert results[0].result_info is not None
    assert (results[0].result_info.code, results[0].result_info.subcode) == (200, 8515)
    assert results[0].completion_reason == ("maxRecordDurationReached" if beta else None)


@pytest.mark.parametrize(
    ("how", "documented"),
    [
        ("failed_transfer", "27-call-transfer-transfer-failed-7000.json"),
        (
            "failed_consultative_transfer",
            "29-call-transfer-ex2-consultative-failed-7700-replacescontext.json",
        ),
        ("hang_up", "41-call-delete-call-terminated-5001.json"),
    ],
)
async def test_a_result_info_is_written_as_graph_documents_it(how: str, documented: str) -> None:
    """Graph writes a failed transfer's ``subCode`` so cased (documents 27, 29, 30, 58) and
    the codes of a call the bot hung up as strings (documents 41, 57); the simulator wrote
    ``subcode`` and numbers, so a bot reading an event's ``raw`` body passed under test and
    missed them on Graph. What the bot's models read is the same either way."""
    bot = CallBot(app_id=APP_ID)
    told: list[models.ResultInfo] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def act(call: Call, event: events.CallStateChanged) -> None:
        if event.result_info is not None:
            told.append(event.result_info)
        elif how == "hang_up":
            await call.hangup()
        elif event.previous_state != "transferring":
            consultative = how == "failed_consultative_transfer"
            await call.transfer(
                Target.user(str(uuid.uuid4()), "Agent"),
                replaces_call_id=str(uuid.uuid4()) if consultative else None,
            )

    @bot.on_terminated
    async def gone(call: Call, event: events.CallTerminated) -> None:
        if event.result_info is not None:
            told.append(event.result_info)

    async with run_with_simulator(bot) as sim:
        sim.transfer_outcome = "failed"
        call = await sim.incoming_call()
        await until(lambda: bool(told))
        await call.settled()
        posted = posted_items(sim.traffic)
    [info] = [
        i["resourceData"]["resultInfo"]
        for i in posted
        if isinstance(i.get("resourceData"), dict) and "resultInfo" in i["resourceData"]
    ]
    expected = normalized_json(load_notification_text(documented))["value"][0]["resourceData"]
    assert {key: type(value) for key, value in info.items()} == {
        key: type(value) for key, value in expected["resultInfo"].items()
    }
    wanted = models.ResultInfo.model_validate(expected["resultInfo"])
    assert (told[0].code, told[0].subcode) == (wanted.code, wanted.subcode)


@pytest.mark.looptime
async def test_a_looping_prompt_on_beta_plays_until_cancelled_and_never_completes() -> None:
    """Graph's beta plays a prompt asked with ``loop: true`` "infinitely", and then posts no
    ``completed`` (its playPrompt page, whose outcome is document 68); callbot's
    ``play_prompt`` says it repeats until ``cancel_media_processing``. The simulator played
    it once and completed it, so a bot holding a caller on looping music saw it end under
    test. On simulated time: an hour of it passes with the prompt still playing."""
    bot = CallBot(app_id=APP_ID)
    bot.configure(graph_url="https://graph.microsoft.com/beta")
    held: list[tuple[Call, Operation[models.PlayPromptOperation]]] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def hold(call: Call, event: events.CallStateChanged) -> None:
        held.append((call, await call.play_prompt("https://cdn.contoso.com/hold.wav", loop=True)))

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await until(lambda: bool(held))
        with pytest.raises(SimulatorError, match="still plays media"):
            await call.listen(timeout=3600)
        on_call, looping = held[0]
        await on_call.cancel_media_processing()
        with pytest.raises(OperationFailed) as failed:
            await looping.wait(timeout=5)
        await call.settled()
        posted = posted_items(sim.traffic)
    assert failed.value.result_info is not None
    assert (failed.value.result_info.code, failed.value.result_info.subcode) == (400, 8508)
    outcomes = [i["resourceData"] for i in posted if "/operations/" in i["resourceUrl"]]
    assert [o["status"] for o in outcomes if o["id"] == looping.id] == ["failed"]


@pytest.mark.parametrize(
    ("to_phone", "documented"),
    [
        (False, "29-call-transfer-ex2-consultative-failed-7700-replacescontext.json"),
        (True, "30-call-transfer-ex4-consultative-pstn-failed-7700.json"),
    ],
    ids=["to-a-user", "to-a-phone"],
)
async def test_a_failed_consultative_transfer_names_what_it_replaces_as_graph_documents(
    to_phone: bool, documented: str
) -> None:
    """Graph tells a bot that a consultative transfer to a user failed naming the call's
    ``replacesContext`` beside the 500/7700 (document 29); one to a phone, without it
    (document 30). The simulator named it for neither, so a bot resuming the call by it
    passed under test with ``None``."""
    expected = normalized_json(load_notification_text(documented))["value"][0]["resourceData"]
    bot = CallBot(app_id=APP_ID)
    failed: list[events.CallStateChanged] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def transfer(call: Call, event: events.CallStateChanged) -> None:
        if event.result_info is not None:
            failed.append(event)
        elif event.previous_state != "transferring":
            target = Target.phone("+12345678901") if to_phone else Target.user("u-1", "Agent")
            await call.transfer(target, replaces_call_id=str(uuid.uuid4()))

    async with run_with_simulator(bot) as sim:
        sim.transfer_outcome = "failed"
        call = await sim.incoming_call()
        await until(lambda: bool(failed))
        await call.settled()
        posted = posted_items(sim.traffic)
    [data] = [
        i["resourceData"]
        for i in posted
        if isinstance(i.get("resourceData"), dict) and "resultInfo" in i["resourceData"]
    ]
    assert ("replacesContext" in data) == ("replacesContext" in expected) == (not to_phone)
    assert failed[0].call.replaces_context == data.get("replacesContext")


# Each operation's documented outcome: a playPrompt's has a resultInfo (as the live one,
# sb05), the others none (a recording ended by a stop tone: Graph's beta page, 2018 and now).
DOCUMENTED_OUTCOMES = {
    "playPromptOperation": "31-call-playprompt-operation-completed.json",
    "sendDtmfTonesOperation": "34-call-senddtmftones-operation-completed-success.json",
    "inviteParticipantsOperation": "47-participant-invite-ex1-operation-completed.json",
    "startHoldMusicOperation": "43-participant-startholdmusic-operation-completed.json",
    "stopHoldMusicOperation": "44-participant-stopholdmusic-operation-completed.json",
    "addLargeGalleryViewOperation": "45-call-addlargegalleryview-operation-completed.json",
    "recordOperation": "69-beta-call-record-recordresponse-completed-stoptonedetected.json",
}


async def test_an_operation_ends_with_a_result_info_only_where_graph_documents_one() -> None:
    """Graph documents the end of ``sendDtmfTones``, an invitation, hold music, the large
    gallery view and a recording ended by a stop tone with no ``resultInfo`` (documents 34-36,
    43-45, 47-55, 69); the simulator gave each a 200/0 one, so a bot reading
    ``result.result_info.code`` passed under test and raised on Graph."""
    bot = CallBot(app_id=APP_ID)
    results: dict[str, models.CommsOperation] = {}
    recording: list[Any] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def operate(call: Call, event: events.CallStateChanged) -> None:
        # The caller, a user (the bot is an application).
        roster = await call.participants.list()
        [caller] = [p.id for p in roster if p.info and p.info.identity and p.info.identity.user]
        assert caller is not None
        ops: list[Operation[Any]] = [
            await call.play_prompt("https://cdn.contoso.com/hello.wav"),
            await call.send_dtmf_tones("1"),
            await call.participants.invite(Target.user(str(uuid.uuid4()), "Lee Gu")),
            await call.participants.start_hold_music(caller),
            await call.participants.stop_hold_music(caller),
            await call.add_large_gallery_view(),
        ]
        for op in ops:
            result = await op.wait(timeout=5)
            results[type(result).__name__] = result
        recording.append(await call.record_response(stop_tones=["#"]))
        result = await recording[0].wait(timeout=5)
        results[type(result).__name__] = result

    # A recording longer than the test: only the stop tone ends it.
    async with run_with_simulator(bot, record_duration=600) as sim:
        call = await sim.incoming_call()
        await until(lambda: bool(recording))
        await call.press("#")
        await until(lambda: len(results) == len(DOCUMENTED_OUTCOMES))
        await call.settled()
        posted = posted_items(sim.traffic)
    outcomes = {
        item["resourceData"]["@odata.type"].rsplit(".", 1)[-1]: item["resourceData"]
        for item in posted
        if "/operations/" in item["resourceUrl"]
    }
    assert set(outcomes) == set(DOCUMENTED_OUTCOMES)
    for kind, name in DOCUMENTED_OUTCOMES.items():
        documented = normalized_json(load_notification_text(name))["value"][0]["resourceData"]
        assert ("resultInfo" in outcomes[kind], kind) == ("resultInfo" in documented, kind)
    assert {kind for kind, result in results.items() if result.result_info is not None} == {
        "PlayPromptOperation"
    }
    assert {result.status for result in results.values()} == {"completed"}


async def test_a_joined_meeting_is_establishing_and_established_with_its_chat_and_meeting() -> None:
    """Joining a meeting, Graph's ``establishing`` (captured from a live bot, 2023 and 2019)
    and ``established`` (documents 06, 07) carry the meeting's ``chatInfo`` and
    ``meetingInfo``; the simulator's carried neither, so a bot reading the meeting's chat
    thread when it got in could not be tested."""
    bot = CallBot(app_id=APP_ID)
    moves: list[events.CallStateChanged] = []

    @bot.on_state("establishing", "established")
    async def moved(call: Call, event: events.CallStateChanged) -> None:
        moves.append(event)

    async with run_with_simulator(bot) as sim:
        await bot.join_meeting(MEETING_URL)
        call = await sim.wait_for_outgoing_call()
        await until(lambda: len(moves) == 2)
        await call.settled()
        posted = posted_items(sim.traffic)
    for event in moves:
        assert event.call.chat_info is not None
        assert event.call.chat_info.thread_id == "19:meeting_abc@thread.v2"
        assert event.call.meeting_info is not None
    captured = json.loads(
        (FIXTURES / "captured" / "gh-comms-samples-632-2023-establishing.json").read_text()
    )["value"][0]["resourceData"]
    establishing = next(
        i["resourceData"]
        for i in posted
        if isinstance(i.get("resourceData"), dict)
        and i["resourceData"].get("state") == "establishing"
    )
    assert set(establishing) == set(captured)
    assert establishing["meetingInfo"]["@odata.type"] == captured["meetingInfo"]["@odata.type"]


def key_paths(value: Any, path: str = "") -> set[str]:
    """Every key path in ``value``, each ``@odata.type`` with its value. A list's items are
    under ``[]``, but a roster's participants under ``[who]`` (``user``, ``application``,
    ...) and their streams under ``[mediaType]``: Teams lists other fields for a person than
    for a bot, and other streams."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            here = f"{path}.{key}" if path else key
            if key == "@odata.type":
                paths.add(f"{here}={inner}")
            else:
                paths |= {here, *key_paths(inner, here)}
    elif isinstance(value, list):
        for inner in value:
            paths |= key_paths(inner, f"{path}[{_label(inner)}]")
    return paths


def _label(value: Any) -> str:
    """A participant's kind of identity, or a stream's media type; else nothing."""
    if not isinstance(value, dict):
        return ""
    identity = value.get("info", {}).get("identity", {})
    return next((kind for kind in identity if not kind.startswith("@")), "") or str(
        value.get("mediaType", "")
    )


def step_of(item: dict[str, Any]) -> str:
    """Which step of a call a posted item is, as the recorded files are named."""
    if item["resourceUrl"].endswith("/participants"):
        return "roster"
    data = item["resourceData"]
    kind = str(data["@odata.type"])
    if kind != "#microsoft.graph.call":
        return kind.rsplit(".", 1)[-1]
    if "toneInfo" in data:
        return "tone"
    if "mediaState" in data:
        return "media flowing"
    return "ended" if data.get("state") == "terminated" else str(data.get("state"))


async def placed_call() -> list[Any]:
    """A P2P call the bot places, as sb01-sb06 recorded one: connected, media flowing, the
    roster, a prompt played, a key pressed, the callee hanging up."""
    bot, _ = bot_seeing_established()
    played: list[events.OperationUpdated] = []

    @bot.on_state("established")
    async def started(call: Call, event: events.CallStateChanged) -> None:
        if event.call.media_state is None:
            await call.subscribe_to_tone()
            # With a resourceId, as the recorded bot played its prompt (sb05).
            prompt = media_prompt(
                "https://cdn.contoso.com/hello.wav", resource_id=str(uuid.uuid4())
            )
            await call.play_prompt(prompt)

    @bot.on_operation
    async def done(call: Call, event: events.OperationUpdated) -> None:
        played.append(event)

    async with run_with_simulator(bot) as sim:
        await bot.create_call(Target.user(str(uuid.uuid4()), "Lee Gu"))
        call = await sim.wait_for_outgoing_call()
        await until(lambda: bool(played))
        await call.press("1")
        await call.hangup()
        await call.wait_until_ended()
        return [t.body for t in sim.traffic if t.kind == "notification"]


async def declined_call() -> list[Any]:
    """A P2P call the callee turns down (sb18, sb19): establishing, then ended."""
    bot, _ = bot_seeing_established()
    async with run_with_simulator(bot) as sim:
        sim.queue_outgoing("decline")
        await bot.create_call(Target.user(str(uuid.uuid4()), "Lee Gu"))
        call = await sim.wait_for_outgoing_call()
        await call.settled()  # the end posted, and kept in the traffic
        assert call.ended
        return [t.body for t in sim.traffic if t.kind == "notification"]


# The application instance a bot places calls from (a resource account's object id).
INSTANCE_ID = "3d913abb-aec0-4964-8fa6-3c6850c4f278"


async def group_call() -> list[Any]:
    """A group call the bot places from its application instance, as sb13-sb17 recorded one:
    connected, the bot joins (sb15: the roster has only the bot), the callees (sb16), and
    it ends (sb17)."""
    bot, _ = bot_seeing_established()
    async with run_with_simulator(bot) as sim:
        await bot.create_call(
            Target.user(str(uuid.uuid4()), "Sam2"),
            Target.user(str(uuid.uuid4()), "Lee Gu"),
            source=Target.application_instance(INSTANCE_ID, "CallAndRedirectBot"),
        )
        call = await sim.wait_for_outgoing_call()
        await call.wait_for_state("established")
        await call.hangup()
        await call.wait_until_ended()
        return [t.body for t in sim.traffic if t.kind == "notification"]


async def joined_meeting() -> list[Any]:
    """A meeting the bot joins first (the roster has only the bot), someone joins, and it
    ends."""
    bot, _ = bot_seeing_established()
    async with run_with_simulator(bot) as sim:
        sim.meeting_attendees = []
        await bot.join_meeting(MEETING_URL)
        call = await sim.wait_for_outgoing_call()
        await call.wait_for_state("established")
        await call.join("Sam2")
        await call.hangup()
        await call.wait_until_ended()
        return [t.body for t in sim.traffic if t.kind == "notification"]


async def escalated_call() -> list[Any]:
    """A P2P call the bot places and grows by inviting someone once it is established, as the
    bot recorded in sb07-sb12 did (its code called the first attendee and invited the rest
    once the call was established): connected, media flowing, the meeting Teams makes of it
    (sb10: its chat; sb11: its token too), the invitee joining, and the callee hanging up."""
    bot = CallBot(app_id=APP_ID)
    invited: list[Any] = []

    @bot.on_state("established")
    async def grow(call: Call, event: events.CallStateChanged) -> None:
        operation = await call.participants.invite(Target.user(str(uuid.uuid4()), "Sam2"))
        invited.append(await operation.wait(timeout=10))

    async with run_with_simulator(bot) as sim:
        await bot.create_call(Target.user(str(uuid.uuid4()), "Sam"))
        call = await sim.wait_for_outgoing_call()
        await until(lambda: bool(invited))
        await until(lambda: len(call.roster) == 3)
        await call.hangup()
        await call.wait_until_ended()
        return [t.body for t in sim.traffic if t.kind == "notification"]


SCENARIOS = {
    "placed": placed_call,
    "declined": declined_call,
    "group": group_call,
    "meeting": joined_meeting,
    "escalated": escalated_call,
}


# Each step the simulator posts, and the live recording of the same step: (scenario, step,
# which of the scenario's items of that step, recorded file).
LIVE_STEPS = [
    ("placed", "establishing", 0, "sb01-p2p-simpletest-p2ptest1event1callestablishing.json"),
    ("placed", "established", 0, "sb02-p2p-simpletest-p2ptest1event2callestablished.json"),
    (
        "placed",
        "media flowing",
        0,
        "sb03-p2p-simpletest-p2ptest1event3callestablishedwithaudio.json",
    ),
    ("placed", "roster", 0, "sb12-p2p-callupdates-p2ptest2event6userjoin.json"),
    ("placed", "tone", 0, "sb04-p2p-simpletest-p2ptest1event4tonepress.json"),
    ("placed", "playPromptOperation", 0, "sb05-p2p-simpletest-p2ptest1event5playpromptfinish.json"),
    ("placed", "ended", 0, "sb06-p2p-simpletest-p2ptest1event6hangup.json"),
    ("declined", "establishing", 0, "sb18-failedp2p-callestablishing.json"),
    ("declined", "ended", 0, "sb19-failedp2p-calldeleted.json"),
    ("group", "establishing", 0, "sb13-groupcalls-groupcallestablishing.json"),
    ("group", "established", 0, "sb14-groupcalls-groupcallestablished.json"),
    ("group", "roster", 0, "sb15-groupcalls-groupcallbotjoin.json"),
    ("group", "roster", 1, "sb16-groupcalls-groupcalluserjoin.json"),
    ("group", "ended", 0, "sb17-groupcalls-groupcallend.json"),
    ("escalated", "establishing", 0, "sb07-p2p-callupdates-p2ptest2event1establishing.json"),
    ("escalated", "established", 0, "sb08-p2p-callupdates-p2ptest2event2established.json"),
    (
        "escalated",
        "media flowing",
        0,
        "sb09-p2p-callupdates-p2ptest2event3updatedwithmediastate.json",
    ),
    (
        "escalated",
        "media flowing",
        1,
        "sb10-p2p-callupdates-p2ptest2event4updatedwithchatinfo.json",
    ),
    (
        "escalated",
        "media flowing",
        2,
        "sb11-p2p-callupdates-p2ptest2event5updatedwithrandomshit.json",
    ),
    ("escalated", "roster", 1, "sb12-p2p-callupdates-p2ptest2event6userjoin.json"),
]


@pytest.mark.parametrize(
    ("scenario", "step", "index", "recorded"),
    LIVE_STEPS,
    ids=[f"{scenario}-{step}-{recorded[:4]}" for scenario, step, _, recorded in LIVE_STEPS],
)
async def test_each_step_has_the_key_paths_a_live_teams_call_had(
    scenario: str, step: str, index: int, recorded: str
) -> None:
    """Each notification the simulator posts has every key path (with its ``@odata.type``s)
    that the same step of a live Teams call had, and none it had not. The simulator's lacked
    the nested ``@odata.type``s of a roster and a ``resultInfo``, a roster's endpoint, client,
    replacement link, published states, meeting role and typed streams (each ``sourceId``
    ``1``), the empty ``meetingCapability`` and ``coOrganizers`` of a call once media flows and
    at its end, and a group call's ``tokenMeetingInfo`` at its end; it added an ``@odata.id``
    to an operation's outcome; a group call placed from an application instance had the bot
    as an ``application``, with the callees in its first roster; a P2P call the bot invited
    someone to never named the meeting Teams made of it (sb10, sb11). A bot reading any of
    these passed under test and broke on Teams."""
    bodies = await SCENARIOS[scenario]()
    items = [item for body in bodies for item in body["value"]]
    posted = [item for item in items if step_of(item) == step][index]
    live = recorded_item(recorded)
    posted_paths = key_paths(posted)
    live_paths = key_paths(live)
    assert (sorted(live_paths - posted_paths), sorted(posted_paths - live_paths)) == ([], [])


def untyped_fields(value: Any, path: str = "") -> Iterator[str]:
    """The fields of a parsed event's models that no model declares (kept only as extras)."""
    if isinstance(value, BaseModel):
        for name in value.model_extra or {}:
            yield f"{path}.{name}"
        for name in type(value).model_fields:
            if not (isinstance(value, events.Event) and name == "raw"):
                yield from untyped_fields(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for n, inner in enumerate(value):
            yield from untyped_fields(inner, f"{path}[{n}]")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_the_bot_reads_every_field_the_simulator_posts_into_its_models(
    scenario: str,
) -> None:
    """Every body the simulator posts, live-shaped, parses into typed events whose models
    declare each field sent: nothing is left as an unknown extra or an unknown
    notification."""
    bodies = await SCENARIOS[scenario]()
    parsed = [event for body in bodies for event in parse_payload(body)]
    assert not [e for e in parsed if isinstance(e, events.UnknownNotification)]
    assert [path for event in parsed for path in untyped_fields(event)] == []


async def test_each_media_stream_of_a_call_has_a_source_id_of_its_own() -> None:
    """In a live roster each stream has its own ``sourceId`` (sb12, sb16): a bot maps the
    audio it receives to a speaker by it. Every simulated stream was source ``1``."""
    bodies = await joined_meeting()
    parsed = [event for body in bodies for event in parse_payload(body)]
    rosters = [e for e in parsed if isinstance(e, events.ParticipantsUpdated)]
    sources = [
        stream.source_id
        for participant in rosters[-1].participants
        for stream in participant.media_streams or []
    ]
    assert len(sources) == len(set(sources)) == 5  # the bot's audio, and Sam2's four streams


async def test_someone_of_another_tenant_is_in_the_roster_with_their_own_tenant() -> None:
    """A person called or invited with the tenant of their own (``Target.user(id, name,
    tenant_id)``) was listed with the simulator's tenant, which Teams would not do."""
    other, invited = str(uuid.uuid4()), str(uuid.uuid4())
    bot, _ = bot_seeing_established()
    rosters: list[events.ParticipantsUpdated] = []

    @bot.on_participants
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        rosters.append(event)
        if len(rosters) == 1:
            await call.participants.invite(Target.user(invited, "Megan Bowen", other))

    async with run_with_simulator(bot) as sim:
        await bot.create_call(Target.user(str(uuid.uuid4()), "Lee Gu", other))
        call = await sim.wait_for_outgoing_call()
        await until(lambda: len(rosters) >= 2)
        await call.hangup()
        await call.wait_until_ended()
    tenants = {
        p.display_name: p.info.identity.user.tenant_id
        for event in rosters
        for p in event.participants
        if p.info is not None and p.info.identity is not None and p.info.identity.user
    }
    assert tenants == {"Lee Gu": other, "Megan Bowen": other}


def bot_in(roster: events.ParticipantsUpdated, my_id: str | None) -> models.Participant:
    """The bot's own entry in a roster (the one with the call's ``myParticipantId``)."""
    [me] = [p for p in roster.participants if p.id == my_id]
    return me


PLACED_FROM = {
    "p2p": ((Target.user("user-1", "Lee Gu"),), None),
    "p2p-from-instance": (
        (Target.user("user-1", "Lee Gu"),),
        Target.application_instance(INSTANCE_ID, "Contoso Line"),
    ),
    "group": ((Target.user("user-1", "Lee Gu"), Target.user("user-2", "Sam2")), None),
    "group-from-instance": (
        (Target.user("user-1", "Lee Gu"), Target.user("user-2", "Sam2")),
        Target.application_instance(INSTANCE_ID, "Contoso Line"),
    ),
    "meeting": ((), None),
}


@pytest.mark.parametrize("placed", sorted(PLACED_FROM))
async def test_the_bot_is_in_the_roster_as_the_identity_it_placed_the_call_from(
    placed: str,
) -> None:
    """Teams names the bot in a roster by the identity the call was placed from, not by the
    kind of call: a call placed from an application instance (the create call's ``source``)
    has the bot as that instance, with the id and name the source gave (sb15, sb16: the
    recorded group call's bot code named the instance so); any other has it as the
    ``application``, named ``28:<app id>`` (sb12; document 08 has a joined meeting's bot as
    an ``application`` too). Either way its client names the bot's app (sb12, sb15). The
    simulator made the bot an ``applicationInstance`` in a joined meeting only, named by the
    simulator's ``bot_name``, and its client by the instance's id."""
    bot = CallBot(app_id=APP_ID)
    rosters: list[events.ParticipantsUpdated] = []

    @bot.on_participants
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        rosters.append(event)

    targets, source = PLACED_FROM[placed]
    async with run_with_simulator(bot, bot_name="Contoso Bot") as sim:
        if placed == "meeting":
            await bot.join_meeting(MEETING_URL)
        else:
            await bot.create_call(*targets, source=source)
        call = await sim.wait_for_outgoing_call()
        await until(lambda: bool(rosters))
    me = bot_in(rosters[0], call.bot_participant_id)
    assert me.info is not None
    identity = me.info.identity
    assert identity is not None
    if source is not None:
        assert identity.application is None
        assert identity.application_instance is not None
        assert identity.application_instance.id == INSTANCE_ID
        assert identity.application_instance.display_name == "Contoso Line"
    else:
        assert identity.application_instance is None
        assert identity.application is not None
        assert identity.application.id == APP_ID
        assert identity.application.display_name == f"28:{APP_ID}"
    assert me.info.client_version == f"Contoso Bot (appid:{APP_ID})"


async def test_a_p2p_call_the_bot_answered_names_the_bot_as_teams_does() -> None:
    """A P2P call's roster names the bot ``28:<app id>`` (sb12), not by the simulator's
    ``bot_name``, which a bot's own handler would never see from Teams."""
    bot, rosters = bot_answering_with_rosters()

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await until(lambda: bool(rosters))
    me = bot_in(rosters[0], call.bot_participant_id)
    live = next(
        p
        for p in recorded_item("sb12-p2p-callupdates-p2ptest2event6userjoin.json")["resourceData"]
        if "application" in p["info"]["identity"]
    )
    recorded_app = live["info"]["identity"]["application"]
    assert recorded_app["displayName"] == f"28:{recorded_app['id']}"
    assert me.display_name == f"28:{APP_ID}"


@pytest.mark.parametrize("callees", [1, 2], ids=["p2p", "group"])
async def test_a_group_call_ends_naming_the_meeting_teams_made_of_it(callees: int) -> None:
    """A group call the bot placed ended with a ``tokenMeetingInfo`` (sb17), whose token's
    ``activityId`` is the call's chain id; a P2P call's end has no meeting (sb06, sb19).
    The simulator named a meeting only at the end of one the bot joined, so a bot keeping
    the group call's meeting token when it ended got ``None`` under test."""
    bot = CallBot(app_id=APP_ID)
    ended: list[events.CallTerminated] = []

    @bot.on_terminated
    async def gone(call: Call, event: events.CallTerminated) -> None:
        ended.append(event)

    targets = [Target.user(str(uuid.uuid4()), name) for name in ("Sam2", "Lee Gu")[:callees]]
    async with run_with_simulator(bot) as sim:
        await bot.create_call(*targets)
        call = await sim.wait_for_outgoing_call()
        await call.wait_for_state("established")
        await call.hangup()
        await until(lambda: bool(ended))
    meeting = ended[0].call.meeting_info
    if callees == 1:
        assert meeting is None
        return
    assert isinstance(meeting, models.TokenMeetingInfo)
    assert meeting.token is not None
    claims = meeting.token.split(".")[1]
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    recorded = recorded_item("sb17-groupcalls-groupcallend.json")["resourceData"]
    live_claims = recorded["meetingInfo"]["token"].split(".")[1]
    live = json.loads(base64.urlsafe_b64decode(live_claims + "=" * (-len(live_claims) % 4)))
    assert set(decoded) == set(live)
    assert live["activityId"] == recorded["callChainId"]
    assert decoded["activityId"] == call.chain_id
    assert decoded["appId"] == APP_ID


@pytest.mark.parametrize("removed", [False, True], ids=["they-leave", "the-bot-removes-them"])
async def test_a_group_call_ends_once_only_the_bot_is_left_in_it(removed: bool) -> None:
    """Teams ended a group call the bot placed when only one participant was left in it
    (sb17: 200/5010, "only one participant was remaining"). In the simulator such a call went
    on after everyone else had left, so a bot saying goodbye to an empty call (a prompt, a
    hang-up) passed under test and got 404 from Graph, and one waiting for its end hung."""
    bot = CallBot(app_id=APP_ID)
    ended: list[events.CallTerminated] = []

    @bot.on_terminated
    async def gone(call: Call, event: events.CallTerminated) -> None:
        ended.append(event)

    async with run_with_simulator(bot) as sim:
        placed = await bot.create_call(
            Target.user(str(uuid.uuid4()), "Sam2"), Target.user(str(uuid.uuid4()), "Lee Gu")
        )
        call = await sim.wait_for_outgoing_call()
        await call.wait_for_state("established")
        others = [pid for pid in call.roster if pid != call.bot_participant_id]
        assert len(others) == 2
        for n, participant_id in enumerate(others):
            if removed:
                await placed.participants.remove(participant_id)
            else:
                await call.leave(participant_id)
            await call.settled()
            assert call.ended == (n == 1)  # the bot and someone else: the call goes on
        await call.wait_until_ended()
        await until(lambda: bool(ended))
    live = recorded_item("sb17-groupcalls-groupcallend.json")["resourceData"]["resultInfo"]
    info = ended[0].result_info
    assert info is not None
    assert (info.code, info.subcode, info.message) == (
        live["code"],
        live["subcode"],
        live["message"],
    )
    assert isinstance(ended[0].call.meeting_info, models.TokenMeetingInfo)


async def test_streams_the_simulator_adds_come_after_a_roster_the_test_posted() -> None:
    """A roster a test posts (``call.notify``) is the call's own from then on, and so are its
    streams' ``sourceId``s: someone joining later got the ids the test's roster used, so two
    participants shared a source and a bot mapping audio to speakers mixed them up."""
    bodies: list[Any] = []
    bot = CallBot(app_id=APP_ID)

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await call.settled()
        me = call.roster[call.bot_participant_id]
        [mine] = [int(stream.source_id or 0) for stream in me.media_streams or []]
        # Her streams numbered after the bot's, as a test gives each participant its range.
        guest = builders.participant(
            str(uuid.uuid4()), display_name="Megan Bowen", first_source_id=mine + 1
        )
        await call.notify(builders.roster(call.id, [me, guest]))
        await call.join("Sam2")
        await call.settled()
        bodies = [t.body for t in sim.traffic if t.kind == "notification"]
    parsed = [event for body in bodies for event in parse_payload(body)]
    last = [e for e in parsed if isinstance(e, events.ParticipantsUpdated)][-1]
    sources = [
        stream.source_id
        for participant in last.participants
        for stream in participant.media_streams or []
    ]
    assert len(sources) == len(set(sources)) == 9  # the bot's audio; Megan's and Sam2's four


P2P_GROWN = [
    "sb07-p2p-callupdates-p2ptest2event1establishing.json",
    "sb08-p2p-callupdates-p2ptest2event2established.json",
    "sb09-p2p-callupdates-p2ptest2event3updatedwithmediastate.json",
    "sb10-p2p-callupdates-p2ptest2event4updatedwithchatinfo.json",
    "sb11-p2p-callupdates-p2ptest2event5updatedwithrandomshit.json",
    "sb12-p2p-callupdates-p2ptest2event6userjoin.json",
]


async def test_a_p2p_call_grown_by_an_invitation_names_its_meeting_as_the_live_one_did() -> None:
    """Inviting someone to a P2P call makes Teams escalate it into a meeting: the recorded call
    (sb07-sb12) was ``established`` again naming the meeting's chat and what the call
    replaces (sb10), then its ``tokenMeetingInfo`` too (sb11), before the roster (sb12). The
    simulator only added the invitee, so a bot keeping the meeting a call grew into got
    nothing under test. Every recorded step comes, in the recorded order, with its key
    paths; what the call replaces is the callee's ``replacementLink`` (as sb10's is the
    callee's in sb12), and the meeting's token is the call's, named again at its end."""
    bodies = await escalated_call()
    posted = [item for body in bodies for item in body["value"]]
    remaining = iter(posted)
    found: list[dict[str, Any]] = []
    for name in P2P_GROWN:
        wanted = key_paths(recorded_item(name))
        match = next((item for item in remaining if key_paths(item) == wanted), None)
        assert match is not None, f"nothing posted after the step before is shaped as {name}"
        found.append(match)
    chatting, tokened = (item["resourceData"] for item in found[3:5])
    assert chatting["chatInfo"] == tokened["chatInfo"]
    assert chatting["replacesContext"] == tokened["replacesContext"]
    callee = next(
        p
        for p in found[5]["resourceData"]
        if p["info"]["identity"].get("user", {}).get("displayName") == "Sam"
    )
    assert base64.b64decode(tokened["replacesContext"]).decode() == callee["replacementLink"]
    claims = tokened["meetingInfo"]["token"].split(".")[1]
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    assert decoded["activityId"] == tokened["callChainId"]
    ended = next(item["resourceData"] for item in posted if step_of(item) == "ended")
    assert ended["meetingInfo"] == tokened["meetingInfo"]


async def test_a_bot_told_of_the_meeting_its_p2p_call_grew_into_reads_its_chat() -> None:
    """The bot's handlers get the escalated call's chat and meeting in ``CallUpdated``, and
    Graph's copy of the call names them (``GET``), as reported of live escalated calls."""
    bot = CallBot(app_id=APP_ID)
    updates: list[events.CallUpdated] = []
    fetched: list[models.Call] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def grow(call: Call, event: events.CallStateChanged) -> None:
        await (await call.participants.invite(Target.user("user-2", "Lee Gu"))).wait(timeout=10)
        fetched.append(await call.refresh())

    @bot.on_call_updated
    async def updated(call: Call, event: events.CallUpdated) -> None:
        updates.append(event)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await until(lambda: bool(fetched))
        await call.settled()
    chats = [e.call.chat_info for e in updates if e.call.chat_info is not None]
    meetings = [e.call.meeting_info for e in updates if e.call.meeting_info is not None]
    assert len(chats) == 2
    assert [type(m) for m in meetings] == [models.TokenMeetingInfo]
    assert fetched[0].chat_info == chats[0]
    assert fetched[0].meeting_info == meetings[0]
    assert fetched[0].replaces_context is not None


async def test_a_p2p_call_whose_invitation_failed_is_not_grown_into_a_meeting() -> None:
    """A P2P call grows into a meeting when someone joins it (sb10-sb12: the meeting named,
    then the invitee in the roster). With ``sim.invite_outcome = "failed"`` nobody joins, yet
    the simulator named a meeting all the same: ``established`` again with its chat, its
    properties and what the call replaces, Graph's copy of the call naming them, and the
    call's end its token. A bot keeping the meeting a call grew into kept one from nothing."""
    bot = CallBot(app_id=APP_ID)
    updates: list[events.CallUpdated] = []
    failed: list[OperationFailed] = []
    fetched: list[models.Call] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def grow(call: Call, event: events.CallStateChanged) -> None:
        operation = await call.participants.invite(Target.user("user-2", "Lee Gu"))
        try:
            await operation.wait(timeout=10)
        except OperationFailed as exc:
            failed.append(exc)
        fetched.append(await call.refresh())

    @bot.on_call_updated
    async def updated(call: Call, event: events.CallUpdated) -> None:
        updates.append(event)

    async with run_with_simulator(bot) as sim:
        sim.invite_outcome = "failed"
        call = await sim.incoming_call()
        await until(lambda: bool(fetched))
        await call.hangup()
        await call.wait_until_ended()
        await call.settled()
        posted = posted_items(sim.traffic)
    assert len(failed) == 1
    assert len(call.roster) == 2  # the caller and the bot: nobody joined
    grown = {"chatInfo", "meetingProperties", "replacesContext", "meetingInfo"}
    calls = [item["resourceData"] for item in posted if step_of(item) != "roster"]
    assert [data for data in calls if isinstance(data, dict) and grown & set(data)] == []
    assert [e for e in updates if e.call.chat_info is not None] == []
    assert (fetched[0].chat_info, fetched[0].meeting_info) == (None, None)


async def test_a_bot_called_on_its_application_instance_is_that_instance_in_the_roster() -> None:
    """A call to an application instance (document 22: a PSTN call to one) names it as the
    call's target, with the bot's ``myParticipantId`` as that target's id: the bot is that
    instance in the call, as a call placed from one has it (sb15). The simulator had the bot
    answering it as the ``application``, ``28:<app id>``. Its roster entry has the key paths
    of the recorded instance's (sb15), with the instance's id, name and tenant."""
    incoming = normalized_json(
        load_notification_text("22-call-redirect-ex3-pstn-incoming-call-created.json")
    )
    data = incoming["value"][0]["resourceData"]
    [target] = data["targets"]
    instance = target["identity"]["applicationInstance"]
    bot, rosters = bot_answering_with_rosters()

    async with run_with_simulator(bot, tenant_id=data["tenantId"]) as sim:
        await sim.post(incoming)
        await until(lambda: bool(rosters))
        await sim.settled()
        bodies = [t.body for t in sim.traffic if t.kind == "notification"]
    me = bot_in(rosters[0], data["myParticipantId"])
    assert me.id == target["id"]
    assert me.info is not None
    assert me.info.identity is not None
    assert me.info.identity.application is None
    mine = me.info.identity.application_instance
    assert mine is not None
    assert (mine.id, mine.display_name, mine.tenant_id) == (
        instance["id"],
        instance["displayName"],
        instance["tenantId"],
    )
    [posted] = [
        entry
        for body in bodies
        for item in body["value"]
        if step_of(item) == "roster"
        for entry in item["resourceData"]
        if entry["id"] == data["myParticipantId"]
    ]
    [live] = recorded_item("sb15-groupcalls-groupcallbotjoin.json")["resourceData"]
    assert key_paths(posted) == key_paths(live)


# What document 22's target has that the simulator models for nobody: a region, and a null.
UNMODELLED_TARGET_PATHS = {"languageId"}  # null in document 22: nothing to send


def documented_call_to_an_instance() -> dict[str, Any]:
    """Document 22: an incoming call to an application instance, as Graph posts it."""
    body = normalized_json(
        load_notification_text("22-call-redirect-ex3-pstn-incoming-call-created.json")
    )
    assert isinstance(body, dict)
    return body


@pytest.mark.parametrize("id_given", [True, False], ids=["given-id", "made-id"])
def test_an_incoming_call_to_an_application_instance_is_built_as_graph_documents_it(
    id_given: bool,
) -> None:
    """``builders.incoming_call`` made every call to the bot's ``application``. With
    ``bot_instance_id`` it is made to that application instance, as document 22's: the
    target typed down to the instance's identity with its tenant, and the target's ``id`` the
    bot's ``myParticipantId`` (one is made when none is given)."""
    documented = documented_call_to_an_instance()["value"][0]["resourceData"]
    [target] = documented["targets"]
    instance = target["identity"]["applicationInstance"]
    item = builders.incoming_call(
        "c",
        caller_id="+14255550100",
        caller_name=None,
        caller_kind="phone",
        bot_instance_id=instance["id"],
        bot_name=instance["displayName"],
        tenant_id=documented["tenantId"],
        my_participant_id=documented["myParticipantId"] if id_given else None,
    )
    [built] = item["resourceData"]["targets"]
    assert key_paths(built) == key_paths(target) - UNMODELLED_TARGET_PATHS
    assert built["identity"] == target["identity"]
    assert built["id"] == item["resourceData"]["myParticipantId"]
    if id_given:
        assert built["id"] == documented["myParticipantId"]
    (event,) = parse_payload(builders.notifications(item))
    assert isinstance(event, events.IncomingCall)
    [parsed] = event.call.targets or []
    assert parsed.identity is not None
    assert parsed.identity.application is None
    assert parsed.identity.application_instance is not None
    assert parsed.identity.application_instance.id == instance["id"]


def documented_call_to_the_application() -> dict[str, Any]:
    """Document 18: an incoming call to the bot's application, as Graph posts it."""
    body = normalized_json(
        load_notification_text("18-call-redirect-ex1-incoming-call-created.json")
    )
    assert isinstance(body, dict)
    data = body["value"][0]["resourceData"]
    assert isinstance(data, dict)
    return data


def test_a_call_to_the_bots_application_is_built_as_graph_documents_it() -> None:
    """Document 18 names the application a call is made to as a ``participantInfo`` target
    typed down to the identity; ``builders.incoming_call`` made an
    ``invitationParticipantInfo`` whose identity set and identity were untyped."""
    documented = documented_call_to_the_application()
    [target] = documented["targets"]
    application = target["identity"]["application"]
    item = builders.incoming_call(
        "c", bot_app_id=application["id"], bot_name=application["displayName"]
    )
    [built] = item["resourceData"]["targets"]
    assert built == target


async def test_a_call_to_the_bots_application_names_it_as_graph_documents() -> None:
    """The simulator's call to the bot's application has document 18's target, typed down
    to the application's identity, and the bot reads it so: every field in a model, each
    ``@odata.type`` kept. So does document 18 itself."""
    [documented] = documented_call_to_the_application()["targets"]
    bot, offered, _ = bot_answering_with_offers()

    async with run_with_simulator(bot, bot_name="test bot") as sim:
        call = await sim.incoming_call("Lee Gu")
        await call.wait_for_state("established")
        await call.hangup()
        await call.wait_until_ended()
        posted = next(item["resourceData"] for item in posted_items(sim.traffic))
    [target] = posted["targets"]
    assert key_paths(target) == key_paths(documented)
    assert target["identity"]["application"] == {
        "@odata.type": "#microsoft.graph.identity",
        "id": sim.app_id,
        "displayName": "test bot",
    }
    [told] = offered[0].call.targets or []
    assert told.odata_type == "#microsoft.graph.participantInfo"
    assert told.identity is not None
    assert told.identity.odata_type == "#microsoft.graph.identitySet"
    application = told.identity.application
    assert application is not None
    assert application.odata_type == "#microsoft.graph.identity"
    assert (application.id, application.display_name) == (sim.app_id, "test bot")
    assert list(untyped_fields(offered[0])) == []
    (event,) = parse_payload(
        normalized_json(load_notification_text("18-call-redirect-ex1-incoming-call-created.json"))
    )
    assert isinstance(event, events.IncomingCall)
    assert list(untyped_fields(event)) == []
    [parsed] = event.call.targets or []
    assert parsed.identity is not None
    assert parsed.identity.application is not None
    assert parsed.identity.application.display_name == "test bot"


@pytest.mark.parametrize(
    ("to_instance", "documented"),
    [
        (True, documented_call_to_an_instance()["value"][0]["resourceData"]),
        (False, documented_call_to_the_application()),
    ],
    ids=["to-instance-document-22", "to-app-document-18"],
)
def test_a_caller_is_in_the_tenant_where_graph_documents_it(
    to_instance: bool, documented: dict[str, Any]
) -> None:
    """Document 22's caller (a user calling an application instance) is in the call's
    tenant: its identity has ``tenantId``, which ``builders.incoming_call`` left out.
    Document 18's (a user calling the bot's application) names none, nor does any other
    documented call to an application. The built caller has each one's key paths."""
    [target] = documented["targets"]
    instance = target["identity"].get("applicationInstance")
    user = documented["source"]["identity"]["user"]
    item = builders.incoming_call(
        "c",
        caller_id=user["id"],
        caller_name=None,
        tenant_id=TEST_TENANT_ID,
        bot_instance_id=instance["id"] if to_instance else None,
    )
    source = item["resourceData"]["source"]
    assert key_paths(source) == key_paths(documented["source"])
    assert source["identity"]["user"].get("tenantId") == (TEST_TENANT_ID if to_instance else None)


async def test_a_user_calling_the_bots_application_instance_is_in_the_tenant_as_documented() -> (
    None
):
    """The simulator's user calling the bot's application instance is in the simulator's
    tenant, as document 22's caller is in the call's: the bot reads the caller's tenant. A
    phone has no tenant (Graph documents none for a phone, document 54)."""
    bot, offered, _ = bot_answering_with_offers()

    async with run_with_simulator(bot) as sim:
        for caller in (
            {"from_user": "Lee Gu", "to_instance": True},
            {"from_phone": "+14255550100"},
        ):
            call = await sim.incoming_call(**caller)
            await call.wait_for_state("established")
            await call.hangup()
            await call.wait_until_ended()
        posted = [
            item["resourceData"]["source"]["identity"]
            for item in posted_items(sim.traffic)
            if item["changeType"] == "created"
        ]
    assert [identity["user"]["tenantId"] for identity in posted[:1]] == [sim.tenant_id]
    assert "tenantId" not in posted[1]["phone"]
    callers = [event.call.source.identity for event in offered if event.call.source]
    assert [c.user.tenant_id if c and c.user else None for c in callers] == [sim.tenant_id, None]


def identity_of(participant: models.Participant) -> models.IdentitySet:
    assert participant.info is not None
    assert participant.info.identity is not None
    return participant.info.identity


@pytest.mark.parametrize("instance_id", [None, INSTANCE_ID], ids=["derived", "given"])
async def test_a_phone_call_reaches_the_bot_through_its_application_instance(
    instance_id: str | None,
) -> None:
    """A phone call reaches a bot through its application instance, the resource account with
    the number (document 22: the call's target is the instance, and the target's id is the
    bot's ``myParticipantId``). ``sim.incoming_call(from_phone=...)`` made the call to the
    bot's ``application``, so a bot reading which instance was called got nothing under test.
    The instance is the simulator's ``application_instance_id`` (by default derived from the
    app id); the target has document 22's key paths, and the bot is the instance in the
    roster with the key paths of a recorded instance's entry (sb15), beside the caller."""
    documented = documented_call_to_an_instance()["value"][0]["resourceData"]
    [documented_target] = documented["targets"]
    bot, offered, rosters = bot_answering_with_offers()

    async with run_with_simulator(
        bot, bot_name="Contoso Line", application_instance_id=instance_id
    ) as sim:
        call = await sim.incoming_call(from_phone="+14255550100")
        await until(lambda: bool(rosters))
        await call.settled()
        bodies = [t.body for t in sim.traffic if t.kind == "notification"]
    expected = instance_id or sim.application_instance_id
    [target] = offered[0].call.targets or []
    assert target.identity is not None
    assert target.identity.application is None
    called = target.identity.application_instance
    assert called is not None
    assert (called.id, called.display_name, called.tenant_id) == (
        expected,
        "Contoso Line",
        sim.tenant_id,
    )
    assert target.id == offered[0].call.my_participant_id == call.bot_participant_id
    if instance_id is None:
        # Derived from the app id: the same instance whenever the bot is tested.
        assert Simulator(app_id=APP_ID).application_instance_id == expected != APP_ID
    [posted_target] = next(
        item["resourceData"]["targets"] for body in bodies for item in body["value"]
    )
    assert key_paths(posted_target) == key_paths(documented_target) - UNMODELLED_TARGET_PATHS
    me = identity_of(bot_in(rosters[0], call.bot_participant_id))
    assert me.application_instance is not None
    assert me.application_instance.id == expected
    [caller] = [identity_of(p) for p in rosters[0].participants if p.id != call.bot_participant_id]
    assert caller.phone is not None
    assert caller.phone.id == "+14255550100"
    [posted_me] = [
        entry
        for body in bodies
        for item in body["value"]
        if step_of(item) == "roster"
        for entry in item["resourceData"]
        if entry["id"] == call.bot_participant_id
    ]
    [live] = recorded_item("sb15-groupcalls-groupcallbotjoin.json")["resourceData"]
    assert key_paths(posted_me) == key_paths(live)


async def test_a_user_calling_the_bots_application_instance_reaches_it_as_graph_documents() -> None:
    """A Teams user calling a bot's resource account (document 22: a user's call whose target
    is the application instance, as a receptionist bot behind one receives it):
    ``sim.incoming_call(to_instance=True)`` makes the call to the simulator's
    ``application_instance_id``, with document 22's key paths and the bot's
    ``myParticipantId`` as the target's id; the bot is that instance in the roster, with
    the key paths of a recorded instance's entry (sb15), beside the user who called.
    Without it a user's call could only reach the bot's ``application``."""
    documented = documented_call_to_an_instance()["value"][0]["resourceData"]
    [documented_target] = documented["targets"]
    bot, offered, rosters = bot_answering_with_offers()

    async with run_with_simulator(
        bot, bot_name="Reception", application_instance_id=INSTANCE_ID
    ) as sim:
        call = await sim.incoming_call("Lee Gu", to_instance=True)
        await until(lambda: bool(rosters))
        await call.settled()
        bodies = [t.body for t in sim.traffic if t.kind == "notification"]
    [target] = offered[0].call.targets or []
    assert target.identity is not None
    assert target.identity.application is None
    called = target.identity.application_instance
    assert called is not None
    assert (called.id, called.display_name, called.tenant_id) == (
        INSTANCE_ID,
        "Reception",
        sim.tenant_id,
    )
    assert target.id == offered[0].call.my_participant_id == call.bot_participant_id
    source = offered[0].call.source
    assert source is not None
    assert source.identity is not None
    assert source.identity.user is not None
    assert source.identity.user.display_name == "Lee Gu"
    posted_call = next(item["resourceData"] for body in bodies for item in body["value"])
    [posted_target] = posted_call["targets"]
    assert key_paths(posted_target) == key_paths(documented_target) - UNMODELLED_TARGET_PATHS
    # The caller is a user, as document 22's is.
    assert {k for k in posted_call["source"]["identity"] if not k.startswith("@")} == {"user"}
    assert "user" in documented["source"]["identity"]
    me = identity_of(bot_in(rosters[0], call.bot_participant_id))
    assert me.application is None
    assert me.application_instance is not None
    assert me.application_instance.id == INSTANCE_ID
    [caller] = [identity_of(p) for p in rosters[0].participants if p.id != call.bot_participant_id]
    assert caller.user is not None
    assert caller.user.display_name == "Lee Gu"
    [posted_me] = [
        entry
        for body in bodies
        for item in body["value"]
        if step_of(item) == "roster"
        for entry in item["resourceData"]
        if entry["id"] == call.bot_participant_id
    ]
    [live] = recorded_item("sb15-groupcalls-groupcallbotjoin.json")["resourceData"]
    assert key_paths(posted_me) == key_paths(live)


def odata_types(value: Any) -> set[str]:
    """The ``@odata.type`` key paths in ``value``, each with its type."""
    return {path for path in key_paths(value) if "@odata.type=" in path}


@pytest.mark.parametrize(
    ("from_phone", "to_instance"),
    [(None, False), (None, True), ("+14255550100", True)],
    ids=["user-to-app", "user-to-instance", "phone"],
)
async def test_the_caller_of_an_incoming_call_is_typed_down_to_its_identity(
    from_phone: str | None, to_instance: bool
) -> None:
    """Graph types an incoming call's ``source`` down to the caller's identity (document 22:
    the identity set and the identity each with an ``@odata.type``; so do documents 18 and
    20). The simulator typed the ``participantInfo`` only."""
    documented = documented_call_to_an_instance()["value"][0]["resourceData"]["source"]
    bot, offered, _ = bot_answering_with_offers()

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call("Lee Gu", from_phone=from_phone, to_instance=to_instance)
        await call.wait_for_state("established")
        await call.hangup()
        posted = next(
            item["resourceData"]
            for t in sim.traffic
            if t.kind == "notification"
            for item in t.body["value"]
        )
    kind = "phone" if from_phone else "user"
    expected = {path.replace(".user.", f".{kind}.") for path in odata_types(documented)}
    assert odata_types(posted["source"]) == expected
    source = offered[0].call.source
    assert source is not None
    assert source.identity is not None
    assert source.identity.display_name == "Lee Gu"


@pytest.mark.parametrize("to_instance", [False, True], ids=["to-app", "to-instance"])
async def test_an_incoming_call_names_the_region_of_its_caller_as_graph_documents(
    to_instance: bool,
) -> None:
    """Every incoming call Graph documents names its caller's ``region`` (documents 09, 12,
    16, 18, 20, 22; ``amer`` in the current ones), and a call to an application instance its
    target's too (document 22); the simulator's named none, so a bot choosing a deployment by
    the caller's region could not be tested. Rosters keep none: no live roster has one."""
    documented = documented_call_to_an_instance()["value"][0]["resourceData"]
    bot, offered, rosters = bot_answering_with_offers()

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call("Lee Gu", to_instance=to_instance)
        await until(lambda: bool(rosters))
        await call.hangup()
        posted = next(
            item["resourceData"]
            for t in sim.traffic
            if t.kind == "notification"
            for item in t.body["value"]
        )
    assert posted["source"]["region"] == documented["source"]["region"] == "amer"
    source = offered[0].call.source
    assert source is not None
    assert source.region == "amer"
    [target] = posted["targets"]
    if to_instance:
        assert target["region"] == documented["targets"][0]["region"]
    else:
        assert "region" not in target  # document 18's target, the bot's application, has none
    assert all(p.info is not None and p.info.region is None for p in rosters[0].participants)


@pytest.mark.parametrize(
    ("from_phone", "to_instance", "called"),
    [
        (None, None, "application"),
        (None, False, "application"),
        ("+14255550100", None, "applicationInstance"),
        ("+14255550100", True, "applicationInstance"),
        (None, True, "applicationInstance"),
    ],
    ids=["user", "user-to-app", "phone", "phone-to-instance", "user-to-instance"],
)
async def test_to_instance_picks_whom_an_incoming_call_is_made_to(
    from_phone: str | None, to_instance: bool | None, called: str
) -> None:
    """``to_instance`` says whether a call is made to the bot's application instance or its
    ``application``; by default a phone caller calls the instance and a user the
    application. The target and the bot's own roster entry name the same identity."""
    bot, rosters = bot_answering_with_rosters()

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call(from_phone=from_phone, to_instance=to_instance)
        await until(lambda: bool(rosters))
        await call.settled()
        posted = next(
            item["resourceData"]
            for t in sim.traffic
            if t.kind == "notification"
            for item in t.body["value"]
        )
    [target] = posted["targets"]
    assert [k for k in target["identity"] if not k.startswith("@")] == [called]
    me = identity_of(bot_in(rosters[0], call.bot_participant_id))
    assert (me.application_instance is not None) == (called == "applicationInstance")
    assert (me.application is not None) == (called == "application")


async def test_a_phone_call_to_the_bots_application_is_refused_naming_the_fix() -> None:
    """Graph puts a phone call through to a bot only by its application instance (document
    22); ``incoming_call(from_phone=..., to_instance=False)`` made one to the bot's
    ``application``, a call no bot gets. It is refused before anything is posted."""
    bot, offered, _ = bot_answering_with_offers()

    async with run_with_simulator(bot) as sim:
        with pytest.raises(ValueError, match=r"application instance.*to_instance=True") as raised:
            await sim.incoming_call(from_phone="+14255550100", to_instance=False)
        assert not sim.calls
        assert not [t for t in sim.traffic if t.kind == "notification"]
    assert "from_user" in str(raised.value)
    assert not offered


def recorded_person() -> dict[str, Any]:
    """A person's entry in a live P2P roster (sb12)."""
    return next(
        p
        for p in recorded_item("sb12-p2p-callupdates-p2ptest2event6userjoin.json")["resourceData"]
        if "user" in p["info"]["identity"]
    )


async def test_the_caller_of_an_incoming_call_a_test_posted_is_in_the_roster() -> None:
    """A test that posts an incoming call itself (``sim.post``) got, once the bot answered, a
    roster with the bot alone: the caller the call's ``source`` names was missing, though
    the caller of ``sim.incoming_call`` is there. Posting document 22, the caller is its
    source's user, in the tenant it names, listed with a live roster's key paths for a person
    (sb12) but a name, which the source does not give."""
    incoming = documented_call_to_an_instance()
    data = incoming["value"][0]["resourceData"]
    user = data["source"]["identity"]["user"]
    bot, rosters = bot_answering_with_rosters()

    async with run_with_simulator(bot, tenant_id=data["tenantId"]) as sim:
        await sim.post(incoming)
        await until(lambda: bool(rosters))
        played = sim.find_call(data["id"])
        assert played is not None
        await played.settled()
        bodies = [t.body for t in sim.traffic if t.kind == "notification"]
    assert {p.id for p in rosters[0].participants} == set(played.roster)
    [caller] = [p for p in rosters[0].participants if p.id != data["myParticipantId"]]
    called_by = identity_of(caller).user
    assert called_by is not None
    assert (called_by.id, called_by.tenant_id) == (user["id"], user["tenantId"])
    [posted] = [
        entry
        for body in bodies
        for item in body["value"]
        if step_of(item) == "roster"
        for entry in item["resourceData"]
        if entry["id"] == caller.id
    ]
    # Document 22's caller has no name: the roster names them by none either.
    assert "displayName" not in user
    assert key_paths(posted) == key_paths(recorded_person()) - {"info.identity.user.displayName"}


async def test_a_phone_caller_a_test_posted_is_in_the_roster() -> None:
    """The same for a phone call to an instance that a test builds and posts itself
    (``builders.incoming_call(..., caller_kind="phone", bot_instance_id=...)``): the roster
    has the bot as that instance and the phone that called."""
    bot, rosters = bot_answering_with_rosters()

    call_id = str(uuid.uuid4())
    async with run_with_simulator(bot) as sim:
        item = builders.incoming_call(
            call_id,
            caller_id="+14255550100",
            caller_name=None,
            caller_kind="phone",
            bot_instance_id=INSTANCE_ID,
            tenant_id=sim.tenant_id,
            callback_uri=sim.callback_url,
        )
        await sim.post(builders.notifications(item))
        await until(lambda: bool(rosters))
    mine = item["resourceData"]["myParticipantId"]
    me = identity_of(bot_in(rosters[0], mine))
    assert me.application_instance is not None
    assert me.application_instance.id == INSTANCE_ID
    [caller] = [identity_of(p) for p in rosters[0].participants if p.id != mine]
    assert caller.phone is not None
    assert caller.phone.id == "+14255550100"


def documented_phone_participant() -> dict[str, Any]:
    """Document 54: the one roster entry for a phone Graph documents (no live roster has one)."""
    body = normalized_json(
        load_notification_text("54-participant-invite-ex4-pstn-roster-added.json")
    )
    [phone] = body["value"][0]["resourceData"]
    assert isinstance(phone, dict)
    return phone


async def test_a_phone_in_the_roster_has_the_fields_graph_documents_for_one() -> None:
    """A phone in the roster (the caller of a phone call, and one the bot invited, as document
    54's) had a Teams client's fields: an endpoint and participant id, a language, replacement
    links, published states, a meeting role, a labelled stream. Graph documents a phone's entry
    with its typed identity, its endpoint type and one audio stream only, and no recorded
    roster has a phone: a bot reading a client's field of a phone passed here and broke live."""
    documented = documented_phone_participant()
    bot, rosters = bot_answering_with_rosters()
    invited: list[Any] = []

    @bot.on_state("established")
    async def invite_a_phone(call: Call, event: events.CallStateChanged) -> None:
        if event.call.media_state is None:
            operation = await call.participants.invite(Target.phone("+12345678901"))
            invited.append(await operation.wait(timeout=10))

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call(from_phone="+14255550100")
        await until(lambda: bool(invited))
        await until(lambda: len(call.roster) == 3)
        await call.settled()
        bodies = [t.body for t in sim.traffic if t.kind == "notification"]
    phones = {
        entry["info"]["identity"]["phone"]["id"]: entry
        for body in bodies
        for item in body["value"]
        if step_of(item) == "roster"
        for entry in item["resourceData"]
        if "phone" in entry["info"]["identity"]
    }
    assert sorted(phones) == ["+12345678901", "+14255550100"]
    for entry in phones.values():
        assert key_paths(entry) == key_paths(documented)
    told = [identity_of(p).phone for p in rosters[-1].participants]
    assert sorted(phone.id or "" for phone in told if phone is not None) == sorted(phones)


async def test_a_bot_joining_a_meeting_as_a_guest_waits_in_the_lobby_as_that_guest() -> None:
    """Joining a meeting as a guest (beta Create call, example 8: the create call's ``source``
    a ``guest`` identity, as ``join_meeting(..., source=Target.guest(...))`` sends it), Graph
    lists the bot as that guest, waiting in the lobby, and nobody else until it is let in
    (document 65, and the note after it). The simulator had the bot as the ``application``,
    admitted, with the meeting's attendees. Its entry has the documented key paths and, as
    every bot's recorded entry (sb15), the client's, with one audio stream."""
    documented = json.loads(
        (
            FIXTURES / "notifications" / "65-beta-application-post-calls-guest-in-lobby-roster.json"
        ).read_text(encoding="utf-8")
    )
    [guest] = documented["value"][0]["resourceData"]
    given = guest["info"]["identity"]["guest"]
    bot = CallBot(app_id=APP_ID)
    rosters: list[events.ParticipantsUpdated] = []

    @bot.on_participants
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        rosters.append(event)

    async with run_with_simulator(bot) as sim:
        placed = await bot.join_meeting(
            MEETING_URL, source=Target.guest(given["id"], given["displayName"])
        )
        call = await sim.wait_for_outgoing_call()
        await until(lambda: bool(rosters))
        await call.settled()
        bodies = [t.body for t in sim.traffic if t.kind == "notification"]
    assert placed.snapshot is not None
    [me] = rosters[0].participants
    assert me.id == placed.snapshot.my_participant_id == call.bot_participant_id
    assert me.is_in_lobby is True
    assert me.info is not None
    assert me.info.identity is not None
    assert me.info.identity.application is None
    assert me.info.identity.guest is not None
    assert (me.info.identity.guest.id, me.info.identity.guest.display_name) == (
        given["id"],
        given["displayName"],
    )
    [posted] = [
        entry
        for body in bodies
        for item in body["value"]
        if step_of(item) == "roster"
        for entry in item["resourceData"]
    ]
    [live] = recorded_item("sb15-groupcalls-groupcallbotjoin.json")["resourceData"]
    expected = key_paths(guest) | {
        path for path in key_paths(live) if not path.startswith("info.identity.")
    }
    assert key_paths(posted) == expected
