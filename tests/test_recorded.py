"""Notifications recorded from a live Teams tenant, and older published shapes.

Every file in ``fixtures/recorded`` goes through the real HTTP path and must
give the typed event a bot author expects; the recorded calls are replayed as
whole calls, in published order and shuffled (with duplicates), and each
handler must see exactly that call's transitions, updates, tones, rosters and
outcomes, once.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
from collections.abc import Callable
from typing import Any

import pytest

from callbot import Call, CallBot, events, models

from .conftest import FIXTURES, BotServer, make_bot, normalized_json

RECORDED = FIXTURES / "recorded"
# A window no test reaches: a held state is only ever released by its predecessor.
NEVER = 300.0


def recorded_body(name: str) -> Any:
    """A recorded file's body; the three published ``.txt`` bodies are repaired first."""
    text = (RECORDED / name).read_text(encoding="utf-8")
    if name.endswith(".json"):
        return json.loads(text)
    if text.lstrip().startswith('"value"'):
        # Published without its enclosing braces, the item's braces included.
        inner = text.strip()[len('"value": [') : -1]
        return {"value": [normalized_json("{" + inner + "}")]}
    return normalized_json(text)


# What each body alone gives a handler: the event class and, for state events, the state.
EXPECTED: dict[str, tuple[type[events.Event], str | None]] = {
    "gdh01-beta-call-transfer-2018.json": (events.OperationUpdated, None),
    "gdh02-beta-call-transfer-2018.json": (events.OperationUpdated, None),
    "gdh03-beta-call-transfer-2018.json": (events.CallTerminated, "terminated"),
    "gdh04-beta-call-redirect-2018.json": (events.CallStateChanged, "redirecting"),
    "gdh05-beta-call-redirect-2018.json": (events.CallTerminated, "terminated"),
    "gdh06-beta-call-redirect-2018.json": (events.IncomingCall, None),
    "gdh07-beta-call-delete-2018.json": (events.CallStateChanged, "terminating"),
    "gdh08-beta-call-delete-2018.json": (events.CallTerminated, "terminated"),
    "gdh09-beta-call-reject-2018.json": (events.CallTerminated, "terminated"),
    "gdh10-beta-participant-invite-2018.json": (events.ParticipantsUpdated, None),
    "gdh11-beta-participant-mute-2018.json": (events.ParticipantsUpdated, None),
    "gdh12-beta-participant-invitewithreplaces-2018.json": (events.CallStateChanged, "established"),
    "gdh13-beta-participant-invitewithreplaces-2018.json": (
        events.CallStateChanged,
        "establishing",
    ),
    "gdh14-beta-participant-invitewithreplaces-2018.json": (events.CallStateChanged, "established"),
    "gdh15-beta-participant-invitewithreplaces-2018.json": (events.OperationUpdated, None),
    "gdh16-beta-participant-invitewithreplaces-2018.json": (events.CallTerminated, "terminated"),
    "gdh17-beta-call-answer-2018.txt": (events.CallStateChanged, "establishing"),
    "gdh18-beta-call-answer-2018.txt": (events.CallStateChanged, "established"),
    "gdh19-beta-call-answer-2018.json": (events.CallStateChanged, "established"),
    "gdh20-beta-call-cancelmediaprocessing-2018.json": (events.OperationUpdated, None),
    "gdh21-beta-commsnotification-2018.json": (events.ParticipantsUpdated, None),
    "gdh22-beta-call-record-2018.json": (events.OperationUpdated, None),
    "gdh23-beta-application-post-calls-2019.json": (events.CallStateChanged, "establishing"),
    "gdh24-beta-application-post-calls-2019.json": (events.CallStateChanged, "established"),
    "gdh25-beta-participant-invite-2019.json": (events.OperationUpdated, None),
    "gdh26-beta-call-playprompt-2019.json": (events.OperationUpdated, None),
    "gdh27-beta-call-record-2019.json": (events.OperationUpdated, None),
    "gdh28-beta-call-transfer-2019.json": (events.CallStateChanged, "transferring"),
    "gdh29-beta-call-transfer-2019.json": (events.CallStateChanged, "established"),
    "gdh30-beta-participant-invite-2019.json": (events.ParticipantsUpdated, None),
    "gdh31-beta-commsnotifications-2019.json": (events.IncomingCall, None),
    "gdh32-beta-commsnotifications-2019.json": (events.ParticipantsUpdated, None),
    "gdh33-beta-participant-configuremixer-2019.json": (events.OperationUpdated, None),
    "gdh34-beta-application-post-calls-2020.json": (events.CallStateChanged, "established"),
    "sb01-p2p-simpletest-p2ptest1event1callestablishing.json": (
        events.CallStateChanged,
        "establishing",
    ),
    "sb02-p2p-simpletest-p2ptest1event2callestablished.json": (
        events.CallStateChanged,
        "established",
    ),
    "sb03-p2p-simpletest-p2ptest1event3callestablishedwithaudio.json": (
        events.CallStateChanged,
        "established",
    ),
    "sb04-p2p-simpletest-p2ptest1event4tonepress.json": (events.ToneReceived, None),
    "sb05-p2p-simpletest-p2ptest1event5playpromptfinish.json": (events.OperationUpdated, None),
    "sb06-p2p-simpletest-p2ptest1event6hangup.json": (events.CallTerminated, "terminated"),
    "sb07-p2p-callupdates-p2ptest2event1establishing.json": (
        events.CallStateChanged,
        "establishing",
    ),
    "sb08-p2p-callupdates-p2ptest2event2established.json": (
        events.CallStateChanged,
        "established",
    ),
    "sb09-p2p-callupdates-p2ptest2event3updatedwithmediastate.json": (
        events.CallStateChanged,
        "established",
    ),
    "sb10-p2p-callupdates-p2ptest2event4updatedwithchatinfo.json": (
        events.CallStateChanged,
        "established",
    ),
    "sb11-p2p-callupdates-p2ptest2event5updatedwithrandomshit.json": (
        events.CallStateChanged,
        "established",
    ),
    "sb12-p2p-callupdates-p2ptest2event6userjoin.json": (events.ParticipantsUpdated, None),
    "sb13-groupcalls-groupcallestablishing.json": (events.CallStateChanged, "establishing"),
    "sb14-groupcalls-groupcallestablished.json": (events.CallStateChanged, "established"),
    "sb15-groupcalls-groupcallbotjoin.json": (events.ParticipantsUpdated, None),
    "sb16-groupcalls-groupcalluserjoin.json": (events.ParticipantsUpdated, None),
    "sb17-groupcalls-groupcallend.json": (events.CallTerminated, "terminated"),
    "sb18-failedp2p-callestablishing.json": (events.CallStateChanged, "establishing"),
    "sb19-failedp2p-calldeleted.json": (events.CallTerminated, "terminated"),
    "seed001-beta-create-call-establishing.json": (events.CallStateChanged, "establishing"),
    "seed001-beta-create-call-ringing.json": (events.CallStateChanged, "ringing"),
    "seed001-beta-create-call-established.json": (events.CallStateChanged, "established"),
    "teamsdocs01-call-notifications-auth-example.txt": (events.CallStateChanged, "established"),
}


def test_every_recorded_file_has_an_expectation() -> None:
    files = {p.name for p in RECORDED.iterdir() if p.suffix in (".json", ".txt")}
    assert files == set(EXPECTED)


class Seen:
    """What the handlers of a bot saw, by decorator."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self.updates: list[events.CallUpdated] = []
        self.tones: list[str] = []
        self.rosters: list[events.ParticipantsUpdated] = []
        self.operations: list[events.OperationUpdated] = []
        self.terminated: list[events.CallTerminated] = []
        self.everything: list[events.Event] = []
        self.changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def watching_bot(authority: Any) -> tuple[CallBot, Seen]:
    bot = make_bot(authority, reorder_window=NEVER)
    seen = Seen()

    @bot.on_state(*models.CALL_STATES)
    async def state(call: Call, event: events.CallStateChanged) -> None:
        seen.states.append(event.state)

    @bot.on_call_updated
    async def updated(call: Call, event: events.CallUpdated) -> None:
        seen.updates.append(event)

    @bot.on_tone
    async def tone(call: Call, event: events.ToneReceived) -> None:
        seen.tones.append(event.tone)

    @bot.on_participants
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        seen.rosters.append(event)

    @bot.on_operation
    async def operation(call: Call, event: events.OperationUpdated) -> None:
        seen.operations.append(event)

    @bot.on_terminated
    async def ended(call: Call, event: events.CallTerminated) -> None:
        seen.terminated.append(event)

    @bot.on(events.Event)
    async def everything(call: Call, event: events.Event) -> None:
        seen.everything.append(event)
        seen.changed.set()

    return bot, seen


def call_path(body: Any) -> str:
    item = body["value"][0]
    path = item.get("resourceUrl") or item.get("resource")
    match = re.search(r"calls/([^/]+)", path)
    assert match is not None
    return f"/communications/calls/{match.group(1)}"


def ending(body: Any) -> dict[str, Any]:
    """A termination of the call ``body`` belongs to (for recordings that stop before it)."""
    return {
        "value": [
            {
                "changeType": "deleted",
                "resourceUrl": call_path(body),
                "resourceData": {"@odata.type": "#microsoft.graph.call", "state": "terminated"},
            }
        ]
    }


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_each_recorded_body_gives_its_typed_event(
    authority: Any, serve: Any, name: str
) -> None:
    bot = make_bot(authority, reorder_window=0.05)
    seen: list[events.Event] = []
    arrived = asyncio.Event()

    @bot.on(events.Event)
    async def everything(call: Call, event: events.Event) -> None:
        seen.append(event)
        arrived.set()

    server: BotServer = await serve(bot)
    response = await server.post(recorded_body(name))
    assert response.status == 202
    async with asyncio.timeout(10):
        await arrived.wait()
    event = seen[0]
    kind, state = EXPECTED[name]
    assert type(event) is kind, (name, event)
    if state is not None:
        assert isinstance(event, events.CallStateChanged)
        assert event.state == state
    # The path's id is the call's, whichever dialect and case Graph used.
    assert event.resource_url.startswith("/communications/calls/")


# -- whole calls ----------------------------------------------------------------------------


class RecordedCall:
    """A call as recorded, and what its handlers must see."""

    def __init__(
        self,
        files: list[str],
        *,
        states: list[str],
        updates: int,
        tones: list[str] = (),  # type: ignore[assignment]
        rosters: int = 0,
        operations: int = 0,
    ) -> None:
        self.files = files
        self.states = states
        self.updates = updates
        self.tones = list(tones)
        self.rosters = rosters
        self.operations = operations

    def bodies(self) -> list[Any]:
        bodies = [recorded_body(name) for name in self.files]
        if self.states[-1] == "terminated" and "terminated" not in (
            _state_of(body) for body in bodies
        ):
            bodies.append(ending(bodies[0]))
        return bodies


def _is_roster(body: Any) -> bool:
    item = body["value"][0]
    return "/participants" in (item.get("resourceUrl") or item.get("resource"))


def _state_of(body: Any) -> str | None:
    data = body["value"][0].get("resourceData")
    return data.get("state") if isinstance(data, dict) else None


CALLS = {
    # Recorded: established three times (once with audio, once with the tone).
    "p2p-simple": RecordedCall(
        [
            "sb01-p2p-simpletest-p2ptest1event1callestablishing.json",
            "sb02-p2p-simpletest-p2ptest1event2callestablished.json",
            "sb03-p2p-simpletest-p2ptest1event3callestablishedwithaudio.json",
            "sb04-p2p-simpletest-p2ptest1event4tonepress.json",
            "sb05-p2p-simpletest-p2ptest1event5playpromptfinish.json",
            "sb06-p2p-simpletest-p2ptest1event6hangup.json",
        ],
        states=["establishing", "established", "terminated"],
        updates=1,
        tones=["tone1"],
        operations=1,
    ),
    # Recorded: established four times, each adding media state, chat or meeting info.
    "p2p-updates": RecordedCall(
        [
            "sb07-p2p-callupdates-p2ptest2event1establishing.json",
            "sb08-p2p-callupdates-p2ptest2event2established.json",
            "sb09-p2p-callupdates-p2ptest2event3updatedwithmediastate.json",
            "sb10-p2p-callupdates-p2ptest2event4updatedwithchatinfo.json",
            "sb11-p2p-callupdates-p2ptest2event5updatedwithrandomshit.json",
            "sb12-p2p-callupdates-p2ptest2event6userjoin.json",
        ],
        states=["establishing", "established", "terminated"],
        updates=3,
        rosters=1,
    ),
    "group": RecordedCall(
        [
            "sb13-groupcalls-groupcallestablishing.json",
            "sb14-groupcalls-groupcallestablished.json",
            "sb15-groupcalls-groupcallbotjoin.json",
            "sb16-groupcalls-groupcalluserjoin.json",
            "sb17-groupcalls-groupcallend.json",
        ],
        states=["establishing", "established", "terminated"],
        updates=0,
        rosters=2,
    ),
    "failed-p2p": RecordedCall(
        ["sb18-failedp2p-callestablishing.json", "sb19-failedp2p-calldeleted.json"],
        states=["establishing", "terminated"],
        updates=0,
    ),
    # The beta "Create call" page: an outgoing call rings before it is established.
    "outgoing-ringing": RecordedCall(
        [
            "seed001-beta-create-call-establishing.json",
            "seed001-beta-create-call-ringing.json",
            "seed001-beta-create-call-established.json",
        ],
        states=["establishing", "ringing", "established", "terminated"],
        updates=0,
    ),
}


async def replay(server: BotServer, seen: Seen, bodies: list[Any]) -> None:
    for body in bodies:
        response = await server.post(body)
        assert response.status == 202
    # After the termination's handlers ran nothing of the call can still be delivered.
    await seen.until(lambda: len(seen.terminated) >= 1)


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_a_recorded_call_in_published_order(authority: Any, serve: Any, name: str) -> None:
    call = CALLS[name]
    bot, seen = watching_bot(authority)
    server: BotServer = await serve(bot)
    await replay(server, seen, call.bodies())
    assert seen.states == call.states
    assert len(seen.updates) == call.updates
    assert all(u.state == "established" for u in seen.updates)
    assert seen.tones == call.tones
    assert len(seen.rosters) == call.rosters
    assert len(seen.operations) == call.operations
    assert len(seen.terminated) == 1


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("seed", range(6))
async def test_a_recorded_call_shuffled_and_duplicated(
    authority: Any, serve: Any, name: str, seed: int
) -> None:
    call = CALLS[name]
    bodies = call.bodies()
    *middle, last = bodies
    rng = random.Random(seed)
    rng.shuffle(middle)
    shuffled: list[Any] = []
    for body in middle:
        shuffled.append(body)
        if _is_roster(body):
            # A full roster carries no sequence number: its retry is told from a real change
            # back to an earlier roster only by following the original, as Graph's retries do.
            shuffled.append(body)
    for body in middle:
        if not _is_roster(body):
            after = next(i for i, other in enumerate(shuffled) if other is body)
            shuffled.insert(rng.randint(after + 1, len(shuffled)), body)
    bot, seen = watching_bot(authority)
    server: BotServer = await serve(bot)
    await replay(server, seen, [*shuffled, last])

    # Transitions: each once, in lifecycle order, never backwards.
    order = list(models.CALL_STATES)
    assert seen.states == sorted(set(seen.states), key=order.index)
    # ringing is lost only when it arrives after the call was already established.
    assert set(call.states) - set(seen.states) <= {"ringing"}
    # Every repeat of a state the call is in is an update, and each is delivered once.
    assert len(seen.updates) == call.updates
    assert seen.tones == call.tones
    assert len(seen.rosters) == call.rosters
    assert len(seen.operations) == call.operations
    assert len(seen.terminated) == 1


async def test_the_group_call_s_first_roster_delivered_before_established(
    authority: Any, serve: Any
) -> None:
    """The recorded group call with the bot's own roster delivered between ``establishing``
    and ``established`` (Graph swaps them as it swaps those two): handlers see the call
    established before its roster, and the roster with the call established."""
    bot, seen = watching_bot(authority)
    states_at_roster: list[str | None] = []

    @bot.on_participants
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        states_at_roster.append(call.state)

    server: BotServer = await serve(bot)
    establishing, established, bot_joins, user_joins, end = CALLS["group"].bodies()
    await replay(server, seen, [establishing, bot_joins, established, user_joins, end])
    kinds = [
        event.state if isinstance(event, events.CallStateChanged) else type(event).__name__
        for event in seen.everything
    ]
    assert kinds == [
        "establishing",
        "established",
        "ParticipantsUpdated",
        "ParticipantsUpdated",
        "terminated",
    ]
    assert states_at_roster == ["established", "established"]


async def test_updates_say_what_changed(authority: Any, serve: Any) -> None:
    bot, seen = watching_bot(authority)
    server: BotServer = await serve(bot)
    await replay(server, seen, CALLS["p2p-updates"].bodies())
    media, chat, more = seen.updates
    assert "media_state" in media.changed
    assert media.call.media_state is not None
    assert media.call.media_state.audio == "active"
    assert "chat_info" in chat.changed
    assert more.changed  # tokenMeetingInfo, meeting capability, ...
    # Each update is delivered with the call as it stands after it.
    assert seen.states == ["establishing", "established", "terminated"]


async def test_a_meeting_roster_of_a_thousand_people_fits_the_default_limits(
    authority: Any, serve: Any
) -> None:
    """A full roster of 1,000 people, each as the recorded Teams user was sent (about 2.2 KB),
    is accepted with the default settings: at 1 MiB the body limit refused it (413), and
    Graph's retries could not deliver it."""
    bot, seen = watching_bot(authority)
    server: BotServer = await serve(bot)
    body = recorded_body("sb16-groupcalls-groupcalluserjoin.json")
    item = body["value"][0]
    user = next(p for p in item["resourceData"] if p["info"]["identity"].get("user"))
    people = []
    for n in range(1000):
        person = json.loads(json.dumps(user))
        person["id"] = f"{n:08d}-0000-4000-8000-000000000000"
        person["info"]["identity"]["user"]["id"] = f"{n:08d}-1111-4000-8000-000000000000"
        people.append(person)
    roster = {"value": [dict(item, resourceData=people)]}
    posted = json.dumps(roster, separators=(",", ":")).encode()
    assert 2_000_000 < len(posted) < bot.settings.max_body_bytes
    # A file-like body: aiohttp warns about large raw bytes on the client side.
    response = await server.client.post(
        bot.settings.callback_path,
        data=io.BytesIO(posted),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {server.token()}"},
    )
    assert response.status == 202
    await seen.until(lambda: len(seen.rosters) == 1)
    assert len(seen.rosters[0].joined) == 1000


# -- operations reported running, then done ------------------------------------------------

# Calls whose operation Graph reported in two requests: running, then its outcome. The
# recording's two name the operation differently: the path's upper-case id without dashes,
# then the body's id with them.
OPERATION_CALLS = {
    "transfer-2018": RecordedCall(
        [
            "gdh17-beta-call-answer-2018.txt",
            "gdh18-beta-call-answer-2018.txt",
            "gdh01-beta-call-transfer-2018.json",
            "gdh02-beta-call-transfer-2018.json",
            "gdh03-beta-call-transfer-2018.json",
        ],
        states=["establishing", "established", "terminated"],
        updates=0,
        operations=2,
    ),
    "recording-2019": RecordedCall(
        [
            "gdh23-beta-application-post-calls-2019.json",
            "gdh24-beta-application-post-calls-2019.json",
            "gdh27-beta-call-record-2019.json",
            "../notifications/32-call-record-recordresponse-completed.json",
        ],
        states=["establishing", "established", "terminated"],
        updates=0,
        operations=2,
    ),
}


def _progress_and_outcome(bodies: list[Any]) -> tuple[int, int]:
    """Where a call's operation was reported running, and where it was reported done."""
    statuses = [(body["value"][0].get("resourceData") or {}).get("status") for body in bodies]
    return statuses.index("running"), statuses.index("completed")


@pytest.mark.parametrize("name", sorted(OPERATION_CALLS))
async def test_an_operation_reported_running_then_done(
    authority: Any, serve: Any, name: str
) -> None:
    bot, seen = watching_bot(authority)
    server: BotServer = await serve(bot)
    await replay(server, seen, OPERATION_CALLS[name].bodies())
    assert [(o.status, o.operation_key) for o in seen.operations] == [
        ("running", "0fe0623fd62842edb4bd8ac290072cc5"),
        ("completed", "0fe0623fd62842edb4bd8ac290072cc5"),
    ]
    assert seen.states == ["establishing", "established", "terminated"]


@pytest.mark.parametrize("name", sorted(OPERATION_CALLS))
async def test_an_operation_s_progress_arriving_after_its_outcome_is_stale(
    authority: Any, serve: Any, name: str
) -> None:
    """Graph posts an operation's progress and its outcome as separate requests: swapped,
    or the progress sent again after the outcome, handlers still see the operation go
    forward only, its outcome once."""
    bodies = OPERATION_CALLS[name].bodies()
    running, done = _progress_and_outcome(bodies)
    swapped = list(bodies)
    swapped[running], swapped[done] = swapped[done], swapped[running]
    again = [*bodies[: done + 1], bodies[running], *bodies[done + 1 :]]
    for order, statuses in ((swapped, ["completed"]), (again, ["running", "completed"])):
        bot, seen = watching_bot(authority)
        server: BotServer = await serve(bot)
        await replay(server, seen, order)
        assert [o.status for o in seen.operations] == statuses
        assert seen.states == ["establishing", "established", "terminated"]
