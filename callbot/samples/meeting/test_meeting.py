"""The meeting bot against the Graph simulator, through callbot's pytest plugin."""

from __future__ import annotations

import pytest

from callbot import CallBot
from callbot.testing import Simulator, builders

from . import bot as meeting

JOIN_URL = (
    "https://teams.microsoft.com/l/meetup-join/"
    "19%3ameeting_NTg0NmQ3NTctZDVkZC00YzRhLThmNmEtOGQ3M2E0ODdmZDZk%40thread.v2/0"
    "?context=%7b%22Tid%22%3a%2272f988bf-86f1-41af-91ab-2d7cd011db47%22%2c%22Oid%22%3a"
    "%224b444206-207c-42f8-92a6-e332b41c88a2%22%7d"
)


@pytest.fixture
def callbot_bot() -> CallBot:
    return meeting.bot


async def test_joins_by_url_logs_the_roster_and_leaves_when_alone(sim: Simulator) -> None:
    call = await meeting.join(JOIN_URL)
    created = await sim.wait_for_request("createCall")
    assert created.json["chatInfo"]["threadId"].startswith("19:meeting_")
    assert created.json["meetingInfo"]["organizer"]["user"]["id"].startswith("4b444206")

    in_meeting = await sim.wait_for_outgoing_call()
    await in_meeting.wait_for_state("established")
    await in_meeting.join("Alice Smith")
    await in_meeting.leave("Megan Bowen")
    await in_meeting.settled()  # the bot's handlers ran for all of that
    assert ("left", "Megan Bowen") in meeting.attendance[call.key]
    assert not sim.requests_for("deleteCall")  # Alice is still there
    await in_meeting.leave("Alice Smith")

    assert await sim.wait_for_request("deleteCall")
    await in_meeting.wait_until_ended()
    assert meeting.attendance[call.key] == [
        ("joined", "Megan Bowen"),
        ("joined", "Alice Smith"),
        ("left", "Megan Bowen"),
        ("left", "Alice Smith"),
    ]


async def test_stays_while_someone_is_there(sim: Simulator) -> None:
    sim.meeting_attendees = ["Megan Bowen", "Lee Gu"]
    call = await meeting.join(JOIN_URL)
    in_meeting = await sim.wait_for_outgoing_call()
    await in_meeting.wait_for_state("established")
    await in_meeting.leave("Lee Gu")
    await in_meeting.settled()
    assert ("left", "Lee Gu") in meeting.attendance[call.key]
    await in_meeting.hangup(message="The meeting ended.")
    assert not sim.requests_for("deleteCall")


async def test_someone_waiting_in_the_lobby_is_not_in_the_meeting(sim: Simulator) -> None:
    call = await meeting.join(JOIN_URL)
    in_meeting = await sim.wait_for_outgoing_call()
    await in_meeting.wait_for_state("established")
    waiting = builders.participant("guest-1", display_name="Kim Guest", kind="guest", in_lobby=True)
    await in_meeting.notify(builders.roster(in_meeting.id, [*in_meeting.roster.values(), waiting]))
    await in_meeting.settled()
    assert ("joined", "Kim Guest") not in meeting.attendance[call.key]
    # Only the organizer or a presenter lets someone in: with the last person gone, so is the bot.
    await in_meeting.leave("Megan Bowen")
    assert await sim.wait_for_request("deleteCall")
    assert meeting.attendance[call.key] == [("joined", "Megan Bowen"), ("left", "Megan Bowen")]


async def test_someone_let_in_from_the_lobby_joins_then(sim: Simulator) -> None:
    call = await meeting.join(JOIN_URL)
    in_meeting = await sim.wait_for_outgoing_call()
    await in_meeting.wait_for_state("established")
    waiting = builders.participant("guest-1", display_name="Kim Guest", kind="guest", in_lobby=True)
    await in_meeting.notify(builders.roster(in_meeting.id, [*in_meeting.roster.values(), waiting]))
    await in_meeting.join("Lee Gu")
    others = [p for p in in_meeting.roster.values() if p.id != waiting.id]
    let_in = waiting.model_copy(update={"is_in_lobby": False})
    await in_meeting.notify(builders.roster(in_meeting.id, [*others, let_in]))
    muted = let_in.model_copy(update={"is_muted": True})  # a change, not a second join
    await in_meeting.notify(builders.roster(in_meeting.id, [*others, muted]))
    await in_meeting.leave("Megan Bowen")
    await in_meeting.leave("Lee Gu")
    await in_meeting.settled()
    assert not sim.requests_for("deleteCall")  # Kim is in
    assert meeting.attendance[call.key] == [
        ("joined", "Megan Bowen"),
        ("joined", "Lee Gu"),
        ("joined", "Kim Guest"),
        ("left", "Megan Bowen"),
        ("left", "Lee Gu"),
    ]
