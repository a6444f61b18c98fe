"""What runs when: transitions, updates, every call state, enum spellings, delta rosters."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from callbot import Call, CallBot, events, models
from callbot.testing import builders as b

from .conftest import BotServer, make_bot, until

# A window no test reaches: a held state is only ever released by its predecessor or an end.
NEVER = 300.0
CALL = "4a1f0b00-1111-4c2e-9d3f-0123456789ab"


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.changed = asyncio.Event()

    def add(self, line: str) -> None:
        self.lines.append(line)
        self.changed.set()

    async def until(self, line: str, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while line not in self.lines:
                self.changed.clear()
                await self.changed.wait()


def labelled_bot(authority: Any, **options: Any) -> tuple[CallBot, Log]:
    bot = make_bot(authority, **options)
    log = Log()

    @bot.on_state(*models.CALL_STATES)
    async def state(call: Call, event: events.CallStateChanged) -> None:
        log.add(f"{event.previous_state}->{event.state}")

    @bot.on_call_updated
    async def updated(call: Call, event: events.CallUpdated) -> None:
        log.add(f"update:{event.state}:{','.join(sorted(event.changed))}")

    @bot.on_tone
    async def tone(call: Call, event: events.ToneReceived) -> None:
        log.add(f"tone:{event.tone}")

    @bot.on_participants
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        joined = ",".join(p.id or "?" for p in event.joined)
        left = ",".join(p.id or "?" for p in event.left)
        updated = ",".join(p.id or "?" for p in event.updated)
        log.add(f"roster:+{joined}:-{left}:~{updated}:{','.join(sorted(call.roster))}")

    return bot, log


async def post_all(server: BotServer, *items: dict[str, Any]) -> None:
    for item in items:
        response = await server.post(b.notifications(item))
        assert response.status == 202


def test_on_state_accepts_every_call_state_in_any_case(authority: Any) -> None:
    bot = make_bot(authority)
    for state in models.CALL_STATES:

        @bot.on_state(state, state.upper())
        async def handler(call: Call, event: events.CallStateChanged) -> None: ...

    with pytest.raises(ValueError, match="unknown call state"):
        bot.on_state("ringin")


async def test_on_state_incoming_runs_once_with_the_incoming_call(
    authority: Any, serve: Any
) -> None:
    """The move into ``incoming`` is the IncomingCall: ``on_state("incoming")`` runs with it
    (``state`` and ``previous_state`` read as on a move), once, however often Graph sends it."""
    bot = make_bot(authority)
    moves: list[tuple[str, str | None, str, models.ResultInfo | None]] = []

    @bot.on_state("Incoming", "established")
    async def moved(call: Call, event: events.CallStateChanged | events.IncomingCall) -> None:
        moves.append((type(event).__name__, event.previous_state, event.state, event.result_info))

    server: BotServer = await serve(bot)
    incoming = b.incoming_call("arriving-call")
    await post_all(server, incoming, incoming, b.call_state("arriving-call", "established"))
    await until(lambda: len(moves) == 2)
    assert moves == [
        ("IncomingCall", None, "incoming", None),
        ("CallStateChanged", "incoming", "established", None),
    ]


def test_the_call_states_are_one_list_in_lifecycle_order() -> None:
    assert models.CALL_STATES[:5] == (
        "incoming",
        "redirecting",
        "establishing",
        "ringing",
        "established",
    )
    assert models.CALL_STATES[-2:] == ("terminating", "terminated")
    assert "unknownFutureValue" in models.CALL_STATES
    assert len(set(models.CALL_STATES)) == len(models.CALL_STATES)


async def test_a_repeated_state_is_an_update_and_runs_no_state_handler(
    authority: Any, serve: Any
) -> None:
    bot, log = labelled_bot(authority)
    server: BotServer = await serve(bot)
    await post_all(
        server,
        b.call_state(CALL, "establishing"),
        b.call_state(CALL, "established"),
        b.call_state(CALL, "established", media_state=models.CallMediaState(audio="active")),
        b.tone(CALL, "tone1", 1),
        b.call_state(CALL, "established", subject="renamed"),
        b.call_terminated(CALL),
    )
    await log.until("established->terminated")
    assert log.lines == [
        "None->establishing",
        "establishing->established",
        "update:established:media_state",
        "tone:tone1",
        "update:established:subject",
        "established->terminated",
    ]


async def test_states_in_another_case_are_graphs_own(authority: Any, serve: Any) -> None:
    bot, log = labelled_bot(authority)
    server: BotServer = await serve(bot)
    establishing = b.call_state(CALL, "Establishing")
    established = b.call_state(CALL, "ESTABLISHED")
    established["changeType"] = "Updated"
    ended = b.call_terminated(CALL)
    ended["changeType"] = "Deleted"
    ended["resourceData"]["state"] = "Terminated"
    await post_all(server, establishing, established, ended)
    await log.until("established->terminated")
    assert log.lines == [
        "None->establishing",
        "establishing->established",
        "established->terminated",
    ]


async def test_an_outgoing_call_rings_between_establishing_and_established(
    authority: Any, serve: Any
) -> None:
    bot, log = labelled_bot(authority, reorder_window=NEVER)
    server: BotServer = await serve(bot)
    # Everything after establishing arrives first: held until its predecessor comes.
    await post_all(
        server,
        b.call_state(CALL, "established"),
        b.call_state(CALL, "ringing"),
        b.call_state(CALL, "establishing"),
    )
    await log.until("ringing->established")
    assert log.lines == ["None->establishing", "establishing->ringing", "ringing->established"]


async def test_an_ending_releases_what_waits_for_establishing(authority: Any, serve: Any) -> None:
    bot, log = labelled_bot(authority, reorder_window=NEVER)
    server: BotServer = await serve(bot)
    await post_all(server, b.call_state(CALL, "established"), b.call_terminated(CALL))
    await log.until("established->terminated")
    assert log.lines == ["None->established", "established->terminated"]


async def test_a_state_graph_adds_later_reaches_generic_handlers(
    authority: Any, serve: Any
) -> None:
    bot, log = labelled_bot(authority)
    seen: list[str] = []

    @bot.on(events.CallStateChanged, matches=lambda e: e.state == "parked")
    async def parked(call: Call, event: events.CallStateChanged) -> None:
        seen.append(event.state)
        log.add("parked")

    server: BotServer = await serve(bot)
    await post_all(
        server,
        b.call_state(CALL, "establishing"),
        b.call_state(CALL, "established"),
        b.call_state(CALL, "parked"),
        # Graph's notifications of a return differ from the first (a bare repeat is a retry).
        b.call_state(CALL, "established", subject="back"),
    )
    await log.until("parked->established")
    assert seen == ["parked"]


async def test_a_legacy_format_body_is_answered_204_and_counted(authority: Any, serve: Any) -> None:
    bot, _ = labelled_bot(authority)
    server: BotServer = await serve(bot)
    with capture_logs() as logs:
        response = await server.post({"id": "abc", "callState": "established"})
    assert response.status == 204
    assert bot.receiver.counts["resend_requested", "legacy_format"] == 1
    assert [line["event"] for line in logs if line["event"].startswith("callback")] == [
        "callback_resend_requested"
    ]


def person(participant_id: str, **options: Any) -> models.Participant:
    return b.participant(participant_id, display_name=participant_id.title(), **options)


async def test_delta_rosters_keep_joined_left_and_updated_right(authority: Any, serve: Any) -> None:
    bot, log = labelled_bot(authority)
    server: BotServer = await serve(bot)
    await post_all(
        server,
        b.delta_roster(
            CALL, [person("ann"), person("bob")], sequence_number=1, change_type="created"
        ),
        b.delta_roster(CALL, [person("cat")], sequence_number=2, change_type="created"),
        b.delta_roster(CALL, [person("bob", muted=True)], sequence_number=3),
        b.delta_roster(CALL, [person("ann")], sequence_number=4, change_type="deleted"),
        # An older delta that arrives late, about someone who changed since, changes nothing.
        b.delta_roster(CALL, [person("ann", muted=True)], sequence_number=3),
        b.delta_roster(CALL, [person("cat", removed_reason="left")], sequence_number=5),
    )
    await log.until("roster:+:-cat:~:bob")
    assert log.lines == [
        "roster:+ann,bob:-:~:ann,bob",
        "roster:+cat:-:~:ann,bob,cat",
        "roster:+:-:~bob:ann,bob,cat",
        "roster:+:-ann:~:bob,cat",
        "roster:+:-cat:~:bob",
    ]


async def test_plain_rosters_of_a_call_with_delta_rosters_are_deltas(
    authority: Any, serve: Any
) -> None:
    bot, log = labelled_bot(authority)
    server: BotServer = await serve(bot)
    options = models.IncomingCallOptions(is_delta_roster_enabled=True)
    await post_all(
        server,
        b.call_state(CALL, "establishing", call_options=options),
        b.roster(CALL, [person("ann"), person("bob")]),
        b.roster(CALL, [person("cat")]),
        b.roster(CALL, [person("ann", removed_reason="left")]),
    )
    await log.until("roster:+:-ann:~:bob,cat")
    assert log.lines[1:] == [
        "roster:+ann,bob:-:~:ann,bob",
        "roster:+cat:-:~:ann,bob,cat",
        "roster:+:-ann:~:bob,cat",
    ]
