"""Attacks through notifications on a bot served on 127.0.0.1 that acts on a fake Graph.

What a notification names (an operation id, a participant id, a recording URL)
must not make the bot act on another call, another resource, another host; and
no fault on the way out may put a secret into a log line, the recording file,
the metrics or an error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from callbot import Call, CallBot, GraphError, events, models
from callbot._ids import MAX_ID_LENGTH, id_key
from callbot._log import LINES_PER_SECOND
from callbot.graph import CallServices, RetryPolicy
from callbot.testing import FakeGraph, RecordedRequest, TokenAuthority
from callbot.testing import builders as b
from callbot.testing._fake_graph import FakeResponse

from .conftest import BotServer, Clock, plain_server, spin, until

CALL = "4a1f0000-1111-2222-3333-444455556666"
OTHER_CALL = "5b2e0000-1111-2222-3333-444455556666"


def graph_bot(graph: FakeGraph, authority: TokenAuthority, **options: Any) -> CallBot:
    return CallBot(graph.settings(openid_config_url=authority.openid_config_url, **options))


async def start_call(server: BotServer, graph: FakeGraph, call_id: str) -> None:
    graph.add_call(call_id)
    assert (await server.post(b.notifications(b.incoming_call(call_id)))).status == 202
    assert (await server.post(b.notifications(b.call_state(call_id, "established")))).status == 202


async def notification_count(server: BotServer, outcome: str, reason: str) -> float:
    text = await (await server.client.get("/metrics")).text()
    wanted = f'callbot_notifications_total{{outcome="{outcome}",reason="{reason}"}} '
    return next(
        (float(line[len(wanted) :]) for line in text.splitlines() if line.startswith(wanted)), 0.0
    )


# -- 2. an operation outcome belongs to the call in its resourceUrl -------------------------


async def test_an_outcome_posted_under_another_call_is_ignored_and_counted(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    bot = graph_bot(graph, authority)
    outcomes: list[str] = []

    @bot.on_state("established")
    async def prompt(call: Call, event: events.CallStateChanged) -> None:
        if call.id == CALL:
            op = await call.play_prompt("https://cdn.example.test/welcome.wav")
            outcomes.append((await op.wait(timeout=20)).status or "")

    server: BotServer = await serve(bot)
    await start_call(server, graph, OTHER_CALL)
    await start_call(server, graph, CALL)
    request = await graph.wait_for_request("playPrompt")
    body = graph.answer_to(request).body
    assert isinstance(body, dict)
    operation_id = str(body["id"])

    # The attacker's copy: call CALL's operation id, under OTHER_CALL's path.
    forged = b.notifications(b.operation_update(OTHER_CALL, operation_id, status="failed"))
    assert (await server.post(forged)).status == 202
    await until(lambda: bot.services.operations.counts["dropped", "operation_of_other_call"] == 1)
    assert await notification_count(server, "dropped", "operation_of_other_call") == 1
    assert outcomes == []

    # The real outcome, under its own call, still settles the operation.
    assert (await server.post(graph.operation_notification(operation_id))).status == 202
    await until(lambda: outcomes == ["completed"])


async def test_an_outcome_posted_before_the_action_does_not_settle_it(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    bot = graph_bot(graph, authority)
    go = asyncio.Event()
    started: list[Any] = []
    results: list[str | None] = []

    @bot.on_state("established")
    async def ask(call: Call, event: events.CallStateChanged) -> None:
        await go.wait()
        op = await call.record_response(client_context="ask-name")  # a fixed context
        started.append(op)
        results.append((await op.wait(timeout=20)).recording_location)

    def running(request: RecordedRequest) -> FakeResponse:
        body = {"@odata.type": "#microsoft.graph.recordOperation", "id": "genuine-op"}
        return FakeResponse(status=200, body=dict(body, status="running"))

    graph.route("recordResponse", running)
    server: BotServer = await serve(bot)
    await start_call(server, graph, CALL)

    def outcome(operation_id: str, location: str) -> dict[str, Any]:
        update = b.operation_update(
            CALL,
            operation_id,
            operation_type="recordOperation",
            client_context="ask-name",
            recording_location=location,
            recording_access_token="t",
        )
        return b.notifications(update)

    # Posted before the action is even sent: same clientContext, another id.
    forged = outcome("forged-op", "https://attacker.example/rec.wav")
    assert (await server.post(forged)).status == 202
    go.set()
    await until(lambda: bool(started))
    assert not started[0].done
    assert started[0].id == "genuine-op"

    # Once the id is known, the context alone settles nothing either: ignored, counted.
    again = outcome("forged-again", "https://attacker.example/rec.wav")
    assert (await server.post(again)).status == 202
    counts = bot.services.operations.counts
    await until(lambda: counts["dropped", "operation_id_mismatch"] == 1)
    assert not started[0].done

    genuine = outcome("genuine-op", "https://graph.example/rec.wav")
    assert (await server.post(genuine)).status == 202
    await until(lambda: bool(results))
    assert results == ["https://graph.example/rec.wav"]


async def test_another_tenants_outcomes_cannot_push_out_one_waiting_for_its_response(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """An outcome that overtook its action's response was kept only among the last 512
    outcomes of every call: another tenant's token posting 600 of its own calls' pushed it
    out, and the action never settled."""
    bot = graph_bot(graph, authority)
    respond = asyncio.Event()
    results: list[str] = []

    @bot.on_state("established")
    async def prompt(call: Call, event: events.CallStateChanged) -> None:
        op = await call.play_prompt("https://cdn.example.test/welcome.wav")
        results.append((await op.wait(timeout=20)).status or "")

    async def late(request: RecordedRequest) -> FakeResponse:
        await respond.wait()
        context = request.json["clientContext"]
        body = {"@odata.type": "#microsoft.graph.playPromptOperation", "id": "genuine-op"}
        return FakeResponse(status=200, body=dict(body, status="running", clientContext=context))

    graph.route("playPrompt", late)
    server: BotServer = await serve(bot)
    await start_call(server, graph, CALL)
    request = await graph.wait_for_request("playPrompt")
    genuine = b.operation_update(CALL, "genuine-op", client_context=request.json["clientContext"])
    assert (await server.post(b.notifications(genuine))).status == 202

    theirs = server.token(tenant_id="0b1f4c5e-7a2d-4e3b-9c8d-112233445566")
    for batch in range(3):
        flood = [b.operation_update(f"theirs-{batch}-{n}", f"op-{n}") for n in range(200)]
        assert (await server.post(b.notifications(*flood), token=theirs)).status == 202
    respond.set()
    await until(lambda: results == ["completed"])


# -- 6. ids stay one URL path segment -------------------------------------------------------


async def test_dot_ids_never_climb_out_of_their_path(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    bot = graph_bot(graph, authority)
    refused: list[str] = []

    @bot.on_state("established")
    async def climb(call: Call, event: events.CallStateChanged) -> None:
        attempts = [
            call.participants.remove(".."),
            call.participants.get("."),
            call.participants.mute(".."),
            call.audio_routing_groups.get(".."),
            call.audio_routing_groups.delete("."),
            call.get_operation(".."),
        ]
        for attempt in attempts:
            try:
                await attempt
            except ValueError as exc:
                refused.append(str(exc))

    server: BotServer = await serve(bot)
    await start_call(server, graph, CALL)
    await until(lambda: len(refused) == 6)
    # Nothing reached Graph: above all not DELETE /communications/calls/{id}/ (a hang-up).
    assert [r.action for r in graph.requests if r.action != "token"] == []

    # A notification whose call id is '..' is refused before any handler could act on it.
    # So is one no URL can carry (a lone surrogate: valid JSON, no UTF-8 form).
    # Nor one that a server would read as more or less than one segment: a '#' ends the
    # path (so 'victim#x' would address call 'victim'), a decoded '%2F' splits it; an escape
    # spells the call's own id another way (another call to the tenant check, not to Graph).
    alias = f"%{ord(CALL[0]):02X}{CALL[1:]}"
    unsegmented = ("victim#x", "a%2F..%2F..%2Fusers", "a%23b", "a b", "a%5Cb", "a\tb", alias)
    for call_id in ("..", ".", "a\ud800b", "%2e%2e", "%2E.", *unsegmented):
        body = b.notifications(b.incoming_call(call_id))
        response = await server.post(body)
        assert response.status == 400
        assert (await response.json())["error"] == "bad_call_id"
    # Nor may a path climb out of its call after the id: handlers may request resource_url.
    for under in (
        "%2e%2e/%2e%2e/%2e%2e/users/victim",
        "operations/..",
        "participants/%2E",
        "operations/x#y",
        "participants/a%2Fb",
        "participants/%61",
    ):
        item = {
            **b.call_state(CALL, "established"),
            "resourceUrl": f"/communications/calls/{CALL}/{under}",
        }
        response = await server.post(b.notifications(item))
        assert response.status == 400
        assert (await response.json())["error"] == "bad_shape"


async def test_an_id_longer_than_any_graph_gives_is_refused_and_not_echoed(
    authority: TokenAuthority, serve: Any, graph: FakeGraph
) -> None:
    """A call id of any length was taken: it went into every log line, store key and Graph
    URL of its call, and the call kept five times its size in memory. Ids are at most
    256 characters (Graph's are GUIDs): a longer one is refused at the door, with a short
    message, and no Graph path is built from one."""
    bot = graph_bot(graph, authority)
    server: BotServer = await serve(bot)
    longest, too_long = "a" * MAX_ID_LENGTH, "a" * (MAX_ID_LENGTH + 1)
    assert (await server.post(b.notifications(b.incoming_call(longest)))).status == 202
    huge = "b" * 50_000
    with capture_logs() as logs:
        for call_id in (too_long, huge):
            response = await server.post(b.notifications(b.incoming_call(call_id)))
            assert response.status == 400
            answer = await response.json()
            assert answer["error"] == "bad_call_id"
            assert len(json.dumps(answer)) < 400
        under = {**b.call_state(CALL, "established")}
        under["resourceUrl"] = f"/communications/calls/{CALL}/participants/{huge}"
        response = await server.post(b.notifications(under))
        assert (response.status, (await response.json())["error"]) == (400, "bad_shape")
    assert all(len(json.dumps(line, default=str)) < 1000 for line in logs)
    with pytest.raises(ValueError, match="longer than 256"):
        await bot.services.call(CALL).participants.mute(too_long)


async def test_ids_holding_c1_control_characters_are_refused(
    authority: TokenAuthority, serve: Any, graph: FakeGraph
) -> None:
    """Ids may hold no control character, yet only C0 ones (below U+0020) and DEL were
    refused: a call id holding U+009B (the one-character CSI a terminal starts an escape
    sequence with) or U+0085 (a line break to ``str.splitlines`` and many log readers) was
    a new call, carried into every log line and store key of the call."""
    bot = graph_bot(graph, authority)
    server: BotServer = await serve(bot)
    for call_id in ("a\u009b2Jb", "a\u0085b", "\u0080" + CALL, CALL + "\u009f"):
        response = await server.post(b.notifications(b.incoming_call(call_id)))
        assert (response.status, (await response.json())["error"]) == (400, "bad_call_id")
    under = {**b.call_state(CALL, "established")}
    under["resourceUrl"] = f"/communications/calls/{CALL}/participants/a\u009bb"
    response = await server.post(b.notifications(under))
    assert (response.status, (await response.json())["error"]) == (400, "bad_shape")
    # The characters just past them are no control characters: ids as before.
    for call_id in ("a\u00a0b", "caf\u00e9"):
        assert (await server.post(b.notifications(b.incoming_call(call_id)))).status == 202


async def test_an_operation_id_in_the_body_is_held_to_the_rule_of_the_path_s(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """An outcome's ``id`` takes the place of the operation id of its path, yet was taken at
    any length and with any character: 50,000 characters went whole into each line about the
    outcome and became one of the call's 128 latest operations, kept with its record (written
    to Redis at every notification). It is held to the path's rule, and, like the path's,
    names an operation of the path's call only."""
    bot = graph_bot(graph, authority)
    outcomes: list[str] = []

    @bot.on_state("established")
    async def prompt(call: Call, event: events.CallStateChanged) -> None:
        if call.id == OTHER_CALL:
            op = await call.play_prompt("https://cdn.example.test/welcome.wav")
            outcomes.append((await op.wait(timeout=20)).status or "")

    server: BotServer = await serve(bot)
    await start_call(server, graph, CALL)
    await start_call(server, graph, OTHER_CALL)
    request = await graph.wait_for_request("playPrompt")
    answer = graph.answer_to(request).body
    assert isinstance(answer, dict)
    theirs = str(answer["id"])

    def outcome(body_id: str, *, spelling: str = "id", status: str = "completed") -> Any:
        item = b.operation_update(CALL, "4c1e0000-aaaa-bbbb-cccc-ddddeeeeffff", status=status)
        data = item["resourceData"]
        del data["id"]
        data[spelling] = body_id
        return b.notifications(item)

    huge = "o" * 50_000
    unusable = ("o" * (MAX_ID_LENGTH + 1), "op#x", "a/b", "%61", "..", "a\u009bb")
    with capture_logs() as logs:
        for body_id in (huge, *unusable):
            for status in ("running", "completed"):
                response = await server.post(outcome(body_id, status=status))
                body = await response.json()
                assert (response.status, body["error"]) == (400, "bad_shape")
                assert len(json.dumps(body)) < 400
        # However the body spells the property (Teams has capitalised some).
        response = await server.post(outcome(huge, spelling="Id"))
        assert (response.status, (await response.json())["error"]) == (400, "bad_shape")
    assert all(len(json.dumps(line, default=str)) < 1000 for line in logs)
    longest = "o" * MAX_ID_LENGTH
    assert (await server.post(outcome(longest))).status == 202
    record = bot._running().store.known(id_key(CALL))
    assert record is not None
    await until(lambda: id_key(longest) in record.operations)
    assert max(len(key) for key in record.operations) == MAX_ID_LENGTH

    # Another call's operation id in the body of an outcome posted under this call settles
    # nothing: operations are matched within the call of the path, whichever id names them.
    assert (await server.post(outcome(theirs, status="failed"))).status == 202
    await until(lambda: bot.services.operations.counts["dropped", "operation_of_other_call"] == 1)
    assert outcomes == []
    assert (await server.post(graph.operation_notification(theirs))).status == 202
    await until(lambda: outcomes == ["completed"])


async def test_a_participant_id_is_held_to_the_rule_of_the_path_s(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """A participant's ``id`` keys the call's roster, kept with its record, and handlers give
    it to Graph (``participants.mute``), yet was taken at any length and with any character:
    a roster keyed by 50,000-character ids was kept, and each could only make a handler's
    request raise. It is held to the path's rule, in every shape a roster comes in."""
    bot = graph_bot(graph, authority)
    named: list[str | None] = []

    @bot.on(events.ParticipantsUpdated)
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        named.extend(p.id for p in event.participants)

    server: BotServer = await serve(bot)
    await start_call(server, graph, CALL)

    def shapes(participant_id: str) -> list[dict[str, Any]]:
        people = [b.participant("9d1f0000-1111-2222-3333-444455556666"), b.participant("x")]
        people[1] = people[1].model_copy(update={"id": participant_id})
        # An invitation's invitees, as Graph posted them on operations/participants.
        invited = b.roster(CALL, people)
        invited["resourceUrl"] = f"/communications/calls/{CALL}/operations/participants"
        one = b.delta_roster(CALL, people[1:], sequence_number=1)
        one["resourceUrl"] = f"/communications/calls/{CALL}/participants/9d1f0000"
        return [
            b.roster(CALL, people),
            b.delta_roster(CALL, people, sequence_number=1, change_type="created"),
            invited,
            one,
        ]

    huge = "p" * 50_000
    with capture_logs() as logs:
        for participant_id in (huge, "p" * (MAX_ID_LENGTH + 1), "p#x", "a/b", "..", "a\u0085b"):
            for item in shapes(participant_id):
                response = await server.post(b.notifications(item))
                body = await response.json()
                assert (response.status, body["error"]) == (400, "bad_shape")
                assert len(json.dumps(body)) < 400
    assert all(len(json.dumps(line, default=str)) < 1000 for line in logs)
    assert named == []
    longest = "p" * MAX_ID_LENGTH
    assert (await server.post(b.notifications(shapes(longest)[0]))).status == 202
    await until(lambda: longest in named)


async def test_a_participant_id_spelt_as_its_odata_id_is_held_to_the_rule_of_the_path_s(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """Graph's 2018 rosters name a participant by its ``@odata.id`` alone (recorded gdh10:
    ``/app/calls/{call}/participants/{id}``, no ``id``); the id ending that path keys the
    call's roster, yet was not held to the rule a participant's ``id`` is: ``a b``, 300
    characters or ``a%2F..%2Fb`` keyed ``call.roster``. It is refused alike, and a handler
    reads the path's id as the participant's ``id`` (it read ``None``)."""
    bot = graph_bot(graph, authority)
    seen: list[tuple[list[str | None], list[str]]] = []

    @bot.on(events.ParticipantsUpdated)
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        seen.append(([p.id for p in event.participants], list(call.roster)))

    server: BotServer = await serve(bot)
    await start_call(server, graph, CALL)
    recorded = Path(__file__).parent / "fixtures" / "recorded"
    gdh10 = (recorded / "gdh10-beta-participant-invite-2018.json").read_text()
    gdh10 = gdh10.replace("57DAB8B1894C409AB240BD8BEAE78896", CALL)

    def named(participant_id: str) -> Any:
        body = json.loads(gdh10)
        first = body["value"][0]["resourceData"][0]
        assert "id" not in first
        first["@odata.id"] = f"/app/calls/{CALL}/participants/{participant_id}"
        return body

    huge = "p" * 50_000
    unusable = ("p" * (MAX_ID_LENGTH + 1), "a b", "a%2F..%2Fb", "p#x", "..", "a\u0085b")
    with capture_logs() as logs:
        for participant_id in (huge, *unusable):
            response = await server.post(named(participant_id))
            assert response.status == 400, f"accepted {participant_id[:40]!r}"
            body = await response.json()
            assert (response.status, body["error"]) == (400, "bad_shape")
            assert len(json.dumps(body)) < 400
    assert all(len(json.dumps(line, default=str)) < 1000 for line in logs)
    assert seen == []
    longest = "P" * MAX_ID_LENGTH
    assert (await server.post(named(longest))).status == 202
    await until(lambda: bool(seen))
    ((ids, keys),) = seen
    assert ids == [longest, "123456W77E24E4D85F80597083CB830"]
    assert sorted(keys) == sorted(id_key(i) for i in ids if i is not None)


async def test_a_content_sharing_session_id_in_the_body_is_held_to_the_rule_of_the_path_s(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """A content-sharing notification on ``.../contentsharingsessions`` (documented 03) names
    its session in the body, whose ``id`` becomes the event's ``session_id`` as the path's
    would (documented 13), yet only the path's was held to the rule of ids: ``a b`` or 300
    characters reached handlers as the session's id. Every session's id is held to it, as
    every participant's is."""
    bot = graph_bot(graph, authority)
    sessions: list[str | None] = []

    @bot.on(events.ContentSharingUpdated)
    async def sharing(call: Call, event: events.ContentSharingUpdated) -> None:
        sessions.append(event.session_id)

    server: BotServer = await serve(bot)
    await start_call(server, graph, CALL)
    good = "F7D9EF30FF0A9BD3F64B274387FB8FF8E96B6CFBA8F87F8305A74DE99AF007BC"

    def shapes(session_id: str) -> list[dict[str, Any]]:
        in_body = b.content_sharing(CALL, [session_id])
        also_in_path = b.content_sharing(CALL, [session_id], change_type="updated")
        also_in_path["resourceUrl"] += f"/{good}"
        return [in_body, also_in_path]

    huge = "s" * 50_000
    unusable = ("s" * (MAX_ID_LENGTH + 1), "a b", "..", "x#y", "a%2F..%2Fb", "a\u009bb")
    with capture_logs() as logs:
        for session_id in (huge, *unusable):
            for item in shapes(session_id):
                response = await server.post(b.notifications(item))
                assert response.status == 400, f"accepted {session_id[:40]!r}"
                body = await response.json()
                assert (response.status, body["error"]) == (400, "bad_shape")
                assert len(json.dumps(body)) < 400
    assert all(len(json.dumps(line, default=str)) < 1000 for line in logs)
    assert sessions == []
    longest = "s" * MAX_ID_LENGTH
    assert (await server.post(b.notifications(shapes(longest)[0]))).status == 202
    assert (await server.post(b.notifications(shapes(longest)[1]))).status == 202
    await until(lambda: len(sessions) == 2)
    assert sessions == [longest, good]


async def test_a_change_type_is_held_to_the_rule_of_the_path_s(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """``changeType`` decides what an item is (a new call, an end, a roster delta), yet any
    string was taken as one and handed on whole: 50,000 characters in the item's event, and
    in the line about any property the item left out. It is held to the path's rule (Graph's
    are ``created``, ``updated`` and ``deleted``)."""
    bot = graph_bot(graph, authority)
    server: BotServer = await serve(bot)
    await start_call(server, graph, CALL)
    for change in ("u" * 50_000, "u" * (MAX_ID_LENGTH + 1), "", "updated\u009b", "up/dated"):
        item = b.call_state(CALL, "established")
        item["changeType"] = change
        response = await server.post(b.notifications(item))
        body = await response.json()
        assert (response.status, body["error"]) == (400, "bad_shape")
        assert len(json.dumps(body)) < 400
    item = b.call_state(CALL, "established")
    item["changeType"] = "Updated"
    assert (await server.post(b.notifications(item))).status == 202


async def test_states_and_statuses_graph_does_not_document_are_cut_short_in_log_lines(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """A call state or operation status Graph does not document is kept as sent (Graph adds
    them), and was written whole into the lines about it: a 50,000-character state, sent
    once, went into the line of each stale notification of the call after it. A log line
    shows its first 256 characters; handlers still see all of it."""
    bot = graph_bot(graph, authority)
    states: list[str] = []

    @bot.on(events.CallStateChanged)
    async def seen(call: Call, event: events.CallStateChanged) -> None:
        states.append(event.state)

    server: BotServer = await serve(bot)
    await start_call(server, graph, CALL)
    invented = "s" * 50_000
    with capture_logs() as logs:
        assert (await server.post(b.notifications(b.call_state(CALL, invented)))).status == 202
        await until(lambda: invented in states)
        for n in range(3):
            stale = b.notifications(b.call_state(CALL, "establishing", subject=f"stale {n}"))
            assert (await server.post(stale)).status == 202
        assert (await server.post(b.notifications(b.operation_update(CALL, "op-1")))).status == 202
        later = b.operation_update(CALL, "op-1", status="r" * 50_000)
        assert (await server.post(b.notifications(later))).status == 202

        def shown() -> list[str]:
            # What each stale notification's line says the call's state, or its status, is.
            dropped = [line for line in logs if line["event"] == "notification_dropped"]
            return [str(line.get("current_state") or line.get("status")) for line in dropped]

        await until(lambda: len(shown()) == 4)
    prefixes = [value[:MAX_ID_LENGTH] for value in shown()]
    assert prefixes == ["s" * MAX_ID_LENGTH] * 3 + ["r" * MAX_ID_LENGTH]
    assert all(len(json.dumps(line, default=str)) < 1000 for line in logs)


# -- 3. recordings come only from allowed https hosts, bounded in size ----------------------


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, signer: Any
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(
            issuer.subject
            if issuer
            else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        )
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    # The extensions a strict verifier requires (Python 3.13 verifies with
    # VERIFY_X509_STRICT): the CA's key usage and key identifiers, the leaf's authority key.
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
    return builder.sign(signer, hashes.SHA256())


class RecordingHosts:
    """An https server on 127.0.0.1 (own CA) and a plain internal one that must stay unreached."""

    def __init__(self, directory: Path) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("callbot test CA", ca_key, None, ca_key)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate("127.0.0.1", key, ca, ca_key)
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        cert_file, key_file = directory / "cert.pem", directory / "key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(cert_file, key_file)
        self.token = "recording-access-token-7f3c"
        self.data = b"RIFF....WAVEfmt recording"
        self.internal_hits = 0
        self.endless_sent = 0
        self.endless_done = asyncio.Event()
        self.trickle_done = asyncio.Event()
        self._runners: list[web.AppRunner] = []
        self.https = ""
        self.internal = ""

    async def start(self) -> None:
        public = web.Application()
        public.router.add_get("/ok", self._ok)
        public.router.add_get("/loop", self._loop)
        public.router.add_get("/to-internal", self._to_internal)
        public.router.add_get("/endless", self._endless)
        public.router.add_get("/trickle", self._trickle)
        internal = web.Application()
        internal.router.add_route("*", "/{tail:.*}", self._internal)
        self.https = await self._serve(public, self._tls)
        self.internal = await self._serve(internal, None)

    async def _serve(self, app: web.Application, tls: ssl.SSLContext | None) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        self._runners.append(runner)
        return f"{'https' if tls else 'http'}://127.0.0.1:{site.port}"

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    async def _ok(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401)
        return web.Response(body=self.data, content_type="audio/wav")

    async def _loop(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{self.https}/loop")

    async def _to_internal(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{self.internal}/admin")

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        # A 1 GiB answer without Content-Length, sent until the client hangs up.
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"\0" * 65536
        try:
            # Over TLS a write after the peer left neither fails nor yields: watch the
            # connection, and let the loop (which the bot shares) see the peer leave.
            while self.endless_sent < 1024**3 and request.protocol.transport is not None:
                await response.write(chunk)
                await asyncio.sleep(0)
                self.endless_sent += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.endless_done.set()
        return response

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        # A byte at a time, each well within the read timeout, for at most 60 s.
        response = web.StreamResponse()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            for _ in range(600):
                if request.protocol.transport is None:
                    break
                await response.write(b"\0")
                await asyncio.sleep(0.1)
        self.trickle_done.set()
        return response

    async def _internal(self, request: web.Request) -> web.Response:
        self.internal_hits += 1
        return web.Response(text="internal secrets")


@pytest.fixture
async def hosts(tmp_path: Path) -> AsyncIterator[RecordingHosts]:
    servers = RecordingHosts(tmp_path)
    await servers.start()
    try:
        yield servers
    finally:
        await servers.close()


def downloading_bot(
    graph: FakeGraph,
    authority: TokenAuthority,
    hosts: RecordingHosts,
    to_files: Path,
    **settings: Any,
) -> tuple[CallBot, dict[str, Any]]:
    """A bot that downloads each finished recording (named by its operation id) and keeps
    what it got or raised; a name ending ``-to-file`` goes to a file in ``to_files``."""
    bot = graph_bot(
        graph,
        authority,
        recording_hosts=frozenset({"127.0.0.1"}),
        recording_ca_file=str(hosts.ca_file),
        **settings,
    )
    results: dict[str, Any] = {}

    @bot.on_operation
    async def download(call: Call, event: events.OperationUpdated) -> None:
        assert isinstance(event.operation, models.RecordOperation)
        name = event.operation.id or ""
        try:
            if name.endswith("-to-file"):
                results[name] = await call.download_recording(event.operation, to_files / name)
            else:
                results[name] = await call.download_recording(event.operation)
        except (ValueError, GraphError) as exc:
            results[name] = exc

    return bot, results


def recording_done(hosts: RecordingHosts, name: str, location: str) -> dict[str, Any]:
    """The notification of a finished recording at ``location``."""
    return b.notifications(
        b.operation_update(
            CALL,
            name,
            operation_type="recordOperation",
            recording_location=location,
            recording_access_token=hosts.token,
        )
    )


async def test_recordings_come_only_from_allowed_https_hosts_within_a_size_cap(
    graph: FakeGraph,
    authority: TokenAuthority,
    serve: Any,
    hosts: RecordingHosts,
    tmp_path: Path,
) -> None:
    bot, results = downloading_bot(
        graph, authority, hosts, tmp_path, max_recording_bytes=1024 * 1024
    )
    server: BotServer = await serve(bot)
    await start_call(server, graph, CALL)
    locations = {
        "ok": f"{hosts.https}/ok",
        "plain-http": f"{hosts.internal}/admin",
        "loopback-http": f"http://localhost:{hosts.internal.rsplit(':', 1)[1]}/admin",
        "other-host": "https://internal.example.test/recording",
        "redirect-off-list": f"{hosts.https}/to-internal",
        "redirect-loop": f"{hosts.https}/loop",
        "endless": f"{hosts.https}/endless",
        "endless-to-file": f"{hosts.https}/endless",
        "refused-to-file": f"{hosts.internal}/admin",
    }
    # A file the bot wrote before: a refused download used to truncate, then delete it.
    (tmp_path / "refused-to-file").write_bytes(b"an earlier recording")
    for name, location in locations.items():
        assert (await server.post(recording_done(hosts, name, location))).status == 202
    await until(lambda: len(results) == len(locations), within=30)

    assert results["ok"] == hosts.data
    for name in ("plain-http", "loopback-http", "redirect-off-list"):
        assert isinstance(results[name], ValueError), (name, results[name])
        assert "not https" in str(results[name])
    assert "not in recording_hosts" in str(results["other-host"])
    assert "redirects" in str(results["redirect-loop"])
    assert "max_recording_bytes" in str(results["endless"])
    # Streamed to a file, the same answer is cut at the cap and leaves no partial file.
    assert "max_recording_bytes" in str(results["endless-to-file"])
    assert not (tmp_path / "endless-to-file").exists()
    assert "not https" in str(results["refused-to-file"])
    assert (tmp_path / "refused-to-file").read_bytes() == b"an earlier recording"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]
    # The internal service was never reached, and the endless answer was cut short.
    assert hosts.internal_hits == 0
    async with asyncio.timeout(10):
        await hosts.endless_done.wait()
    assert hosts.endless_sent < 64 * 1024 * 1024


# -- 5. no secret leaves through logs, recordings, metrics or error bodies ------------------


async def test_no_secret_reaches_logs_recording_metrics_or_error_bodies(
    graph: FakeGraph,
    authority: TokenAuthority,
    serve: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    record_path = tmp_path / "notifications.jsonl"
    bot = graph_bot(
        graph,
        authority,
        record_path=str(record_path),
        graph_retry_time=0.5,
        graph_request_timeout=0.5,
    )
    location, recording_token = graph.add_recording(b"RIFF")
    steps: list[str] = []

    @bot.on_state("established")
    async def act(call: Call, event: events.CallStateChanged) -> None:
        # Each fault path in turn; the handler lets every error reach the dispatcher's log.
        step = len(steps)
        steps.append("started")
        if step == 0:
            await call.play_prompt("https://cdn.example.test/redirected.wav")
        elif step == 1:
            await call.play_prompt("https://cdn.example.test/failing.wav")
        elif step == 2:
            missing = location + "-missing"
            await call.download_recording(
                {"recordingLocation": missing, "recordingAccessToken": recording_token}
            )
        elif step == 3:
            await call.download_recording(
                {
                    "recordingLocation": "http://169.254.169.254/latest",
                    "recordingAccessToken": recording_token,
                }
            )
        else:
            # 4: Graph never answers; 5: the token is revoked and the token endpoint fails.
            await call.play_prompt("https://cdn.example.test/unanswered.wav")

    def redirect_loop(request: Any) -> FakeResponse:
        return FakeResponse(status=307, headers={"Location": graph.graph_url + request.path})

    server: BotServer = await serve(bot)
    inbound = server.token()
    bodies: list[str] = []
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        graph.route("playPrompt", redirect_loop)
        await start_call(server, graph, "secret-call-0")
        await until(lambda: len(steps) == 1)
        await until(lambda: any(e.get("event") == "handler_failed" for e in logs), within=10)
        graph.route("playPrompt", lambda _: FakeResponse(status=500, body={"error": {}}))

        def failed() -> int:
            return sum(e.get("event") == "handler_failed" for e in logs)

        for n in (1, 2, 3, 4, 5):
            if n == 4:
                graph.hang_next("playPrompt")
            if n == 5:
                graph.revoke_tokens()
                graph.fail_next("token", 500)
            await start_call(server, graph, f"secret-call-{n}")
            await until(lambda: failed() == n + 1, within=10)  # noqa: B023 - awaited at once
        # Inbound faults: a bad scheme, a broken token, two tokens in one header.
        for value in (f"Basic {inbound}", f"Bearer {inbound}x", f"Bearer {inbound} {inbound}"):
            response = await server.post(
                b.notifications(b.incoming_call("x")), headers={"Authorization": value}
            )
            assert response.status == 401
            bodies.append(await response.text())
        metrics = await (await server.client.get("/metrics")).text()

    secrets = {
        "inbound token": inbound,
        "app secret": "fake-graph-secret",
        "recording access token": recording_token,
        **{f"bearer {i} Graph saw": r.bearer for i, r in enumerate(graph.requests) if r.bearer},
    }
    assert len(set(secrets.values())) >= 4
    places = {
        "structured log": "\n".join(json.dumps(e, default=repr) for e in logs),
        "stdlib log": caplog.text,
        "recording": record_path.read_text(encoding="utf-8"),
        "metrics": metrics,
        "error bodies": "\n".join(bodies),
    }
    for place, text in places.items():
        for name, secret in secrets.items():
            assert secret not in text, f"{name} found in {place}"
    # The fault paths were really taken.
    failures = [e for e in logs if e.get("event") == "handler_failed"]
    assert len(failures) == 6
    assert "307" in failures[0]["error"]
    assert "connectionFailed" in failures[4]["error"]
    assert "token" in failures[5]["error"].lower()


# -- 7. the app token goes to Graph's origin and nowhere else --------------------------------


@pytest.fixture
async def elsewhere() -> AsyncIterator[tuple[str, list[str]]]:
    """A plain server on 127.0.0.1 (another port than Graph's): its URL and the tokens it got."""
    tokens: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        tokens.append(request.headers.get("Authorization", ""))
        return web.json_response({"value": []})

    async with plain_server(anything) as base:
        yield base, tokens


async def test_a_next_link_off_graph_is_refused_before_the_token_is_sent(
    graph: FakeGraph,
    authority: TokenAuthority,
    serve: Any,
    elsewhere: tuple[str, list[str]],
) -> None:
    base, tokens = elsewhere
    graph.route(
        "listParticipants",
        lambda r: FakeResponse(
            status=200, body={"value": [], "@odata.nextLink": base + "/v1.0/participants"}
        ),
    )
    bot = graph_bot(graph, authority)
    errors: list[GraphError] = []

    @bot.on_state("established")
    async def listing(call: Call, event: events.CallStateChanged) -> None:
        try:
            await call.participants.list()
        except GraphError as exc:
            errors.append(exc)

    server: BotServer = await serve(bot)
    with capture_logs() as logs:
        await start_call(server, graph, CALL)
        await until(lambda: bool(errors))
    assert errors[0].code == "urlNotOnGraph"
    assert tokens == []
    refused = [line for line in logs if line["event"] == "graph_url_refused"]
    assert len(refused) == 1
    assert refused[0]["url"] == base + "/v1.0/participants"
    assert refused[0]["call_id"] == CALL


async def test_only_absolute_urls_on_graphs_origin_carry_the_token(
    graph: FakeGraph, elsewhere: tuple[str, list[str]]
) -> None:
    base, tokens = elsewhere
    services = CallServices(graph.settings(), retry=RetryPolicy(total_time=1.0))
    graph_origin = graph.graph_url.split("/v1.0")[0]
    port = graph_origin.rsplit(":", 1)[1]
    off_graph = [
        base + "/v1.0/communications/calls",  # same host, another port
        graph_origin.replace("http://", "https://") + "/v1.0/communications/calls",
        f"http://localhost:{port}/v1.0/communications/calls",  # same address, another host
        f"http://user@127.0.0.1:{port}/v1.0/communications/calls",
        # Unreadable ones raised ValueError or UnicodeError from deep in the URL parser.
        "http://127.0.0.1:x/v1.0/next",
        "https://evil.com\u3002graph.microsoft.com/v1.0/next",
    ]
    try:
        for url in off_graph:
            with pytest.raises(GraphError) as refused:
                await services.graph.request("GET", url)
            assert refused.value.code == "urlNotOnGraph", url
            assert refused.value.status == 0
        # An absolute URL on Graph's own origin is sent.
        graph.add_call(CALL, state="established")
        on_graph = f"{graph.graph_url}/communications/calls/{CALL}"
        assert (await services.graph.request("GET", on_graph)).body["id"] == CALL
    finally:
        await services.close()
    assert tokens == []
    assert [r.action for r in graph.requests if r.action != "token"] == ["getCall"]


async def test_participant_pages_are_followed_on_graph_and_bounded(graph: FakeGraph) -> None:
    services = CallServices(graph.settings(), retry=RetryPolicy(total_time=1.0))
    graph.add_call(CALL, state="established")
    first = graph.add_participant(CALL, {"info": {"identity": {"user": {"id": "u1"}}}})
    pages_url = f"{graph.graph_url}/communications/calls/{CALL}/participants"

    def paged(request: RecordedRequest) -> FakeResponse:
        page = int(request.query.get("$skiptoken", "1"))
        return FakeResponse(
            status=200,
            body={"value": [dict(first, id=f"p{page}")], "@odata.nextLink": next_link(page)},
        )

    try:
        # Three pages, the last with no next link.
        def next_link(page: int) -> str | None:
            return f"{pages_url}?$skiptoken={page + 1}" if page < 3 else None

        graph.route("listParticipants", paged)
        listed = await services.call(CALL).participants.list()
        assert [p.id for p in listed] == ["p1", "p2", "p3"]

        # A next link that comes back to a page already read.
        def next_link(page: int) -> str | None:  # noqa: F811
            return f"{pages_url}?$skiptoken=2"

        with pytest.raises(GraphError, match="repeats a page") as looped:
            await services.call(CALL).participants.list()
        assert looped.value.code == "tooManyPages"

        # A chain that never ends stops at max_pages.
        def next_link(page: int) -> str | None:  # noqa: F811
            return f"{pages_url}?$skiptoken={page + 1}"

        services.graph.max_pages = 5
        before = len(graph.requests)
        with pytest.raises(GraphError, match="past 5 pages") as endless:
            await services.call(CALL).participants.list()
        assert endless.value.code == "tooManyPages"
        assert [r.action for r in graph.requests[before:]] == ["listParticipants"] * 5

        # Pages held whole: the listing stops once max_listing_bytes were read (a hostile
        # Graph's 1,000 pages of 16 MiB were all kept), with the page past it not fetched.
        services.graph.max_pages = 1000
        name = "x" * 20_000

        def paged_large(request: RecordedRequest) -> FakeResponse:
            page = int(request.query.get("$skiptoken", "1"))
            item = {
                "id": f"p{page}",
                "info": {"identity": {"user": {"id": "u", "displayName": name}}},
            }
            return FakeResponse(
                status=200,
                body={"value": [item], "@odata.nextLink": f"{pages_url}?$skiptoken={page + 1}"},
            )

        graph.route("listParticipants", paged_large)
        services.graph.max_listing_bytes = 50_000
        before = len(graph.requests)
        with pytest.raises(GraphError, match="past 50000 bytes") as large:
            await services.call(CALL).participants.list()
        assert large.value.code == "tooManyPages"
        assert [r.action for r in graph.requests[before:]] == ["listParticipants"] * 3
    finally:
        await services.close()


async def test_an_item_that_does_not_fit_names_the_page_it_came_in(graph: FakeGraph) -> None:
    """Graph's request-id is what its support asks for: the error of an item on the second
    page names that page's, not the first's."""
    services = CallServices(graph.settings(), retry=RetryPolicy(total_time=1.0))
    graph.add_call(CALL, state="established")
    pages_url = f"{graph.graph_url}/communications/calls/{CALL}/participants"
    request_ids = ["first-page", "second-page"]

    def paged(request: RecordedRequest) -> FakeResponse:
        if "$skiptoken" not in request.query:
            body = {"value": [{"id": "p1"}], "@odata.nextLink": f"{pages_url}?$skiptoken=2"}
            return FakeResponse(status=200, body=body, headers={"request-id": request_ids[0]})
        # "info" must be an object.
        body = {"value": [{"id": "p2", "info": "not an object"}]}
        return FakeResponse(status=200, body=body, headers={"request-id": request_ids[1]})

    graph.route("listParticipants", paged)
    try:
        with pytest.raises(GraphError) as refused:
            await services.call(CALL).participants.list()
    finally:
        await services.close()
    assert refused.value.code == "invalid_response"
    assert refused.value.request_id == "second-page"


async def test_a_recording_trickled_past_the_download_deadline_raises(
    graph: FakeGraph,
    authority: TokenAuthority,
    serve: Any,
    hosts: RecordingHosts,
    tmp_path: Path,
) -> None:
    # Every read arrives within graph_request_timeout; only the deadline in all stops it.
    bot, results = downloading_bot(
        graph, authority, hosts, tmp_path, recording_download_timeout=1.0
    )
    server: BotServer = await serve(bot)
    await start_call(server, graph, CALL)
    trickled = recording_done(hosts, "trickled-to-file", f"{hosts.https}/trickle")
    with capture_logs() as logs:
        assert (await server.post(trickled)).status == 202
        await until(lambda: "trickled-to-file" in results, within=30)
    error = results["trickled-to-file"]
    assert isinstance(error, GraphError), error
    assert (error.status, error.code) == (0, "connectionFailed")
    assert "recording_download_timeout" in error.message
    assert [e["event"] for e in logs if e["event"] == "recording_download_failed"] == [
        "recording_download_failed"
    ]
    assert not (tmp_path / "trickled-to-file").exists()
    # The sender saw the bot hang up, long before its own 60 s were over.
    async with asyncio.timeout(30):
        await hosts.trickle_done.wait()


async def test_calls_a_sender_invents_write_a_bounded_number_of_lines(
    authority: TokenAuthority, graph: FakeGraph, serve: Any, clock: Clock
) -> None:
    """Each invented call a handler answered wrote two lines: Graph refused the answer
    (``graph_request_failed``: no such call) and the handler was stopped by the call's end
    (``handler_stopped_call_ended``). One valid token's request of 200 calls: 400 lines."""
    bot = graph_bot(graph, authority)

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    server: BotServer = await serve(bot)
    invented = [b.incoming_call(f"invented-{n}") for n in range(200)]
    dispatcher = bot._running().dispatcher
    with capture_logs() as logs:
        assert (await server.post(b.notifications(*invented))).status == 202
        await spin(lambda: dispatcher.counts["call_ended"] == 200)
        written = Counter(entry["event"] for entry in logs)
        await clock.advance(1.0)  # the second ends: its last line left out says the rest
    assert len(graph.requests_for("answer")) == 200
    for event in ("graph_request_failed", "handler_stopped_call_ended"):
        assert written[event] == LINES_PER_SECOND
        lines = [entry for entry in logs if entry["event"] == event]
        assert sum(1 + entry.get("suppressed", 0) for entry in lines) == 200


async def test_an_id_a_notification_carries_as_data_stays_in_its_path(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """Ids a notification carries as data (an incoming call's ``incomingContext``, a session's
    id) are not held to the rule of the ids callbot routes by, and reached Graph paths
    percent-encoded: ``../../{victim}`` went out as ``..%2F..%2F{victim}``, which a server
    decoding ``%2F`` (FakeGraph's aiohttp does) reads as two segments climbing to another
    call. One rule holds every id, in a notification or in a path: nothing is sent."""
    bot = graph_bot(graph, authority)
    victim = "5b2f0000-1111-2222-3333-444455556666"
    climbing = f"../../{victim}"
    refused: list[str] = []

    @bot.on_incoming_call
    async def act(call: Call, event: events.IncomingCall) -> None:
        context = event.call.incoming_context
        assert context is not None
        assert context.observed_participant_id is not None
        attempts = [
            call.participants.remove(context.observed_participant_id),
            call.participants.get("a\\..\\b"),
            call.participants.mute("x?y"),
            call.get_operation("x#y"),
            call.audio_routing_groups.get("%2e%2e"),
            call.audio_routing_groups.delete("a b"),
            bot.services.call(f"{CALL}/participants").keep_alive(),
        ]
        for attempt in attempts:
            try:
                await attempt
            except (ValueError, GraphError) as exc:
                refused.append(f"{type(exc).__name__}: {exc}")

    server: BotServer = await serve(bot)
    graph.add_call(CALL)
    item = b.incoming_call(CALL)
    # Data, not an id callbot routes by: the notification is accepted as Graph sent it.
    item["resourceData"]["incomingContext"] = {"observedParticipantId": climbing}
    assert (await server.post(b.notifications(item))).status == 202
    await until(lambda: len(refused) == 7)
    assert [r.path for r in graph.requests if r.action != "token"] == []
    assert all(reason.startswith("ValueError: ") for reason in refused)
    assert all("not a usable id" in reason for reason in refused)
