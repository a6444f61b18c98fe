"""A meeting bot: join a Teams meeting by its join URL, log who comes and goes, leave when alone.

Run it with ``python bot.py "https://teams.microsoft.com/l/meetup-join/..."``
(see README.md), or test it against the simulator with ``pytest``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import structlog

from callbot import Call, CallBot, events, models

log = structlog.get_logger("meeting")
bot = CallBot.from_env()

attendance: dict[str, list[tuple[str, str]]] = {}
"""Per call (by ``call.key``): ``("joined" | "left", name)`` in the order it happened."""
inside: dict[str, set[str]] = {}
"""Per call (by ``call.key``): the participant ids of the people logged as joined."""
left_a_meeting = asyncio.Event()
"""Set when the bot is out of a meeting (``main`` stops then)."""


async def join(join_url: str) -> Call:
    """Join the meeting a Teams join URL points to."""
    call = await bot.join_meeting(join_url)
    log.info("joining_meeting", call_id=call.id)
    return call


def is_bot(participant: models.Participant) -> bool:
    """Whether a participant is an application (this bot, or another one)."""
    identity = participant.info.identity if participant.info is not None else None
    return identity is not None and (
        identity.application is not None or identity.application_instance is not None
    )


def name_of(participant: models.Participant) -> str:
    """A participant's display name, else their id."""
    identity = participant.info.identity if participant.info is not None else None
    for who in (
        identity.user if identity else None,
        identity.phone if identity else None,
        identity.guest if identity else None,
    ):
        if who is not None:
            return who.display_name or who.id or "someone"
    return participant.id or "someone"


def is_in(participant: models.Participant) -> bool:
    """Whether a participant is a person in the meeting: no bot, nor waiting in its lobby."""
    return not is_bot(participant) and not participant.is_in_lobby


@bot.on_participants
async def roster_changed(call: Call, event: events.ParticipantsUpdated) -> None:
    """Log joins and departures; hang up once the last person has left."""
    record = attendance.setdefault(call.key, [])
    here = inside.setdefault(call.key, set())
    # Someone let in from the lobby keeps their participant id: an update, not a join.
    for participant in [*event.joined, *event.updated]:
        if is_in(participant) and participant.id and participant.id not in here:
            here.add(participant.id)
            record.append(("joined", name_of(participant)))
            log.info("participant_joined", call_id=call.id, name=name_of(participant))
    for participant in event.left:
        if participant.id in here:
            here.discard(participant.id)
            record.append(("left", name_of(participant)))
            log.info("participant_left", call_id=call.id, name=name_of(participant))
    people = [p for p in call.roster.values() if is_in(p)]
    if event.left and not people and not call.ended:
        log.info("leaving_empty_meeting", call_id=call.id)
        await call.hangup()  # returns as well when the meeting ended meanwhile


@bot.on_terminated
async def left(call: Call, event: events.CallTerminated) -> None:
    """Log that the bot is out of the meeting."""
    log.info("left_meeting", call_id=call.id, result=event.result_info)
    left_a_meeting.set()


async def main(join_url: str) -> bool:
    """Serve the bot, join the meeting once it serves, and stop once the bot has left it.

    Returns whether it joined (a join Graph refused is logged as ``handler_failed``).
    """
    stop = asyncio.Event()
    joined = False

    @bot.on_started
    async def join_the_meeting(started: CallBot) -> None:
        nonlocal joined
        try:
            await join(join_url)
            joined = True
            await left_a_meeting.wait()
        finally:
            stop.set()  # out of the meeting, or never in it

    await bot.serve(stop=stop)
    return joined


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("join_url", help="the meeting's Teams join URL")
    sys.exit(0 if asyncio.run(main(parser.parse_args().join_url)) else 1)
