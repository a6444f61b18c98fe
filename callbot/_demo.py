"""``callbot demo``: a sample IVR bot and the Graph simulator play three calls on 127.0.0.1.

The bot is the IVR of ``callbot/samples/ivr`` in short: answer, a menu
(``call.menu``), 1 for an agent (transfer), 2 for voicemail (record,
download, goodbye, hang up). It is
shipped in the package so the demo runs on a fresh install, with no account
and no network. Every notification and Graph request is printed as it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any, TextIO

from . import events
from ._bot import CallBot
from ._diagram import SequenceDiagram
from ._display import TrafficPrinter
from ._errors import CallEnded, OperationFailed
from ._log import configure_logging
from .graph import Call, Target
from .testing._simulator import Simulator, SimulatorError, run_with_simulator

__all__ = ["build_demo_bot", "run_demo"]

DEMO_APP_ID = "0d3e0b07-0000-4000-8000-000000000001"
PROMPTS = "https://contoso.example/prompts"
WELCOME = f"{PROMPTS}/welcome.wav"
INVALID_CHOICE = f"{PROMPTS}/invalid-choice.wav"
TRANSFERRING = f"{PROMPTS}/transferring.wav"
LEAVE_A_MESSAGE = f"{PROMPTS}/leave-a-message.wav"
GOODBYE = f"{PROMPTS}/goodbye.wav"
AGENT = Target.user("6e0b8a2d-5e8c-4a4f-9d1b-1f2e3d4c5b6a", "Agent")


def build_demo_bot() -> CallBot:
    """The demo IVR (a new bot each time)."""
    bot = CallBot(app_id=DEMO_APP_ID, shutdown_timeout=2.0)

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer(prefetch=[WELCOME])

    @bot.on_state("established")
    async def main_menu(call: Call, event: events.CallStateChanged) -> None:
        choice = await call.menu(
            WELCOME, {"1": "agent", "2": "voicemail"}, invalid_prompt=INVALID_CHOICE
        )
        if choice == "agent":
            await (await call.play_prompt(TRANSFERRING)).wait(timeout=30)
            await call.transfer(AGENT)
        elif choice == "voicemail":
            recording = await call.record_response(
                prompts=[LEAVE_A_MESSAGE], play_beep=True, max_record_duration=60
            )
            try:
                await recording.wait(timeout=90)
                await call.download_recording(recording)
                await (await call.play_prompt(GOODBYE)).wait(timeout=30)
                await call.hangup()
            except (OperationFailed, CallEnded):
                return  # the caller hung up first

    return bot


async def _script(printer: TrafficPrinter, sim: Simulator, wait: float) -> None:
    printer.note("Call 1: Adele Vance calls, presses a wrong key, then 1 for an agent")
    call = await sim.incoming_call(from_user="Adele Vance")
    await call.wait_for_request("playPrompt", timeout=wait)
    await call.listen(timeout=wait)
    await call.press("7", timeout=wait)
    await call.wait_for_request("playPrompt", timeout=wait)  # that is not a choice
    await call.wait_for_request("playPrompt", timeout=wait)  # the menu again
    await call.listen(timeout=wait)
    await call.press("1", timeout=wait)
    await call.wait_for_request("transfer", timeout=wait)
    await call.wait_until_ended(timeout=wait)
    # Ended means the bot was told, before its 202 came back and was printed; settled waits.
    await call.settled(timeout=wait)

    printer.note("Call 2: a caller from +1 425 555 0100 presses 2 and leaves a voicemail")
    call = await sim.incoming_call(from_phone="+14255550100")
    await call.wait_for_request("playPrompt", timeout=wait)
    await call.listen(timeout=wait)
    await call.press("2", timeout=wait)
    await call.wait_for_request("recordResponse", timeout=wait)
    await call.wait_until_ended(timeout=wait)
    await call.settled(timeout=wait)

    printer.note("Call 3: Lee Gu calls and hangs up during the welcome menu")
    call = await sim.incoming_call(from_user="Lee Gu")
    await call.wait_for_request("playPrompt", timeout=wait)
    await call.hangup()
    await call.settled(timeout=wait)


async def _hang_up(sim: Simulator, within: float) -> None:
    """The callers of the calls still up hang up, and the bot's handlers end with them, for at
    most ``within`` seconds; a handler still running after is abandoned as the bot stops."""
    with contextlib.suppress(TimeoutError, SimulatorError):
        async with asyncio.timeout(within):
            await asyncio.gather(*(call.hangup() for call in sim.calls))
            await sim.settled(within)


async def run_demo(
    stream: TextIO | None = None,
    *,
    fmt: str = "auto",
    pace: float = 0.3,
    verbose: bool = False,
    diagram: SequenceDiagram | None = None,
) -> int:
    """Play the demo calls; returns the exit status (0 when every call went as scripted).

    ``diagram`` (when given) sees the traffic too, to draw the calls.
    """
    printer = TrafficPrinter(stream or sys.stdout, fmt=fmt)
    configure_logging(
        "json" if printer.format == "json" else "console", "info" if verbose else "error"
    )
    bot = build_demo_bot()
    options: dict[str, Any] = {
        "prompt_duration": pace,
        "record_duration": pace,
        "transfer_duration": pace / 2,
        "step_delay": pace / 10,
        "bot_name": "Contoso IVR",
    }
    printer.note("callbot demo: a sample IVR bot and a simulated Microsoft Graph, all on 127.0.0.1")
    observers: list[Any] = [printer] if diagram is None else [printer, diagram]
    async with run_with_simulator(bot, observers=observers, **options) as sim:
        printer.detail(f"bot callback  {sim.callback_url}")
        printer.detail(f"Graph         {sim.graph_url}")
        printer.detail(f"signing keys  {sim.openid_config_url}")
        try:
            await _script(printer, sim, 10.0 + 20 * pace)
        except SimulatorError as exc:
            printer.note(f"demo failed: {exc}")
            return 1
        except asyncio.CancelledError:
            # Ctrl-C: the calls in progress end before the bot stops, so no handler is cut off.
            printer.note("interrupted: the callers hang up, then the bot stops")
            await _hang_up(sim, bot.settings.shutdown_timeout)
            raise
        refused = sim.failed_deliveries
        errors = bot.metrics.sources.handled() if bot.metrics.sources.handled else None
        handler_errors = int(errors["handler_errors"]) if errors is not None else 0
        notifications = sum(1 for t in sim.traffic if t.kind == "notification")
        requests = sum(1 for t in sim.traffic if t.kind == "request")
    if refused or handler_errors:
        printer.note(
            f"demo failed: {len(refused)} notification(s) refused, "
            f"{handler_errors} handler error(s)"
        )
        return 1
    printer.note(
        f"demo finished: 3 calls, {notifications} notifications to the bot, "
        f"{requests} requests to Graph"
    )
    printer.detail(
        "Next: `callbot sample ivr my_ivr` writes this IVR with its tests to my_ivr/; "
        "then `python -m pytest my_ivr` and, in my_ivr/, `callbot run bot:bot`."
    )
    return 0


def main(
    fmt: str = "auto",
    pace: float = 0.3,
    verbose: bool = False,
    diagram: SequenceDiagram | None = None,
) -> int:
    """Run the demo in a fresh event loop."""
    return asyncio.run(run_demo(fmt=fmt, pace=pace, verbose=verbose, diagram=diagram))
