"""Scripted calls ``callbot simulate`` plays against a bot (or a test plays against its own).

Each scenario is ``async def scenario(sim, options)``. Unless ``options.blind``,
a scenario waits for the bot's Graph requests (its answer, its
``subscribeToTone``, the call it places), so the bot must send them to the
simulator (``CALLBOT_GRAPH_URL``); ``blind`` scenarios post Graph's side
regardless (``outgoing-call`` has none without the bot's request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import builders as build
from ._simulator import ONLY_ONE_LEFT, DeliveryOptions, SimulatedCall, Simulator, SimulatorError

__all__ = ["SCENARIOS", "TAKES", "Scenario", "ScenarioOptions"]


@dataclass(frozen=True, kw_only=True)
class ScenarioOptions:
    """How a scenario plays: ``blind`` (do not wait for the bot), how long it
    waits for the bot (``timeout``), how long calls last (``hold``), which
    keys the caller presses (``keys``), and whether the caller calls the bot's
    application instance (``to_instance``, as :meth:`Simulator.incoming_call` takes it)."""

    blind: bool = False
    timeout: float = 15.0
    hold: float = 1.0
    keys: str = "1"
    to_instance: bool | None = None


Scenario = Callable[[Simulator, ScenarioOptions], Awaitable[None]]


async def _connect(call: SimulatedCall, options: ScenarioOptions) -> bool:
    """Get the call established; ``False`` when the bot rejected or redirected it."""
    if options.blind:
        await call.establish()
        call.subscribed_to_tones = True
        return True
    response = await call.wait_for_answer(options.timeout)
    if response != "answer":
        await call.wait_until_ended(options.timeout)
        return False
    await call.wait_for_state("established", options.timeout)
    return True


async def _end(call: SimulatedCall) -> None:
    if not call.ended:
        await call.hangup()


async def incoming_call(sim: Simulator, options: ScenarioOptions) -> None:
    """A caller calls, the bot answers (establishing, established, roster), the caller hangs up."""
    call = await sim.incoming_call(from_user="Adele Vance", to_instance=options.to_instance)
    if await _connect(call, options):
        await asyncio.sleep(options.hold)
        await _end(call)


async def dtmf(sim: Simulator, options: ScenarioOptions) -> None:
    """A caller calls and presses ``options.keys`` one by one (once the bot subscribed)."""
    call = await sim.incoming_call(from_user="Adele Vance", to_instance=options.to_instance)
    if not await _connect(call, options):
        return
    for key in options.keys:
        if call.ended:
            return
        await call.press(key, timeout=options.timeout)
        await asyncio.sleep(min(options.hold, 0.5))
    await asyncio.sleep(options.hold)
    await _end(call)


async def meeting_roster(sim: Simulator, options: ScenarioOptions) -> None:
    """The bot is in a meeting: people join, then everyone leaves; the meeting ends."""
    sim.meeting_attendees = ["Megan Bowen"]
    call = await sim.meeting_call()
    pause = options.hold / 2
    for name in ("Alice Smith", "Lee Gu"):
        await asyncio.sleep(pause)
        await call.join(name)
    for name in ("Alice Smith", "Megan Bowen", "Lee Gu"):
        await asyncio.sleep(pause)
        await call.leave(name)
    # A bot that leaves empty meetings hangs up now; otherwise the meeting ends, as a
    # recorded Teams group call did when only the bot was left (200/5010).
    try:
        await call.wait_until_ended(max(options.hold, 2.0))
    except SimulatorError:
        if not call.ended:
            await call.hangup(subcode=5010, message=ONLY_ONE_LEFT)


async def outgoing_call(sim: Simulator, options: ScenarioOptions) -> None:
    """The bot places a call or joins a meeting (within ``options.timeout``): the callee
    picks up (establishing, established, roster) and hangs up ``options.hold`` later."""
    if options.blind:
        # Only the bot's createCall names the call: there is nothing to play without it.
        raise SimulatorError("outgoing-call waits for the bot's createCall: it cannot be blind")
    call = await sim.wait_for_outgoing_call(options.timeout)
    await call.wait_for_state("established", options.timeout)
    await asyncio.sleep(options.hold)
    await _end(call)


async def out_of_order(sim: Simulator, options: ScenarioOptions) -> None:
    """Graph at its worst: every quirk of :meth:`DeliveryOptions.realistic`, a stale state,
    a straggler after the end."""
    call = await sim.incoming_call(
        from_user="Adele Vance",
        delivery=DeliveryOptions.realistic(),
        to_instance=options.to_instance,
    )
    if not await _connect(call, options):
        return
    await call.notify(build.call_state(call.id, "establishing"))
    if call.subscribed_to_tones and not call.ended:
        await call.press(options.keys[:1] or "1", timeout=options.timeout)
    await asyncio.sleep(options.hold)
    await _end(call)
    straggler = build.notifications(build.call_state(call.id, "established"))
    status = await sim.post(straggler, call_id=call.id)
    if not 200 <= status < 300:
        # Graph gets 202 for it; the bot drops it (after_end).
        raise SimulatorError(f"the bot answered {status} to a notification after the call ended")


SCENARIOS: dict[str, Scenario] = {
    "incoming-call": incoming_call,
    "dtmf": dtmf,
    "meeting-roster": meeting_roster,
    "outgoing-call": outgoing_call,
    "out-of-order": out_of_order,
}

TAKES: dict[str, frozenset[str]] = {
    "incoming-call": frozenset({"blind", "to_instance"}),
    "dtmf": frozenset({"blind", "keys", "to_instance"}),
    "meeting-roster": frozenset(),
    # Only the bot's createCall names the call: nothing to play blind, no caller to direct.
    "outgoing-call": frozenset(),
    "out-of-order": frozenset({"blind", "keys", "to_instance"}),
}
"""The :class:`ScenarioOptions` each scenario plays by, beside ``timeout`` and ``hold``
(which every one takes): another one given to it is refused before it plays."""
"""Scenario name -> scenario, as ``callbot simulate`` names them."""
