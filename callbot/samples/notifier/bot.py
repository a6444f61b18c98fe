"""An outbound notifier: call a Teams user or a phone number, play a message, retry on no answer.

``python bot.py +14255550123`` (or a user's object id) serves the bot, places
the call, and exits once the message was heard or every attempt went unanswered
(see README.md). ``notify()`` does the same from your own code.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import structlog

from callbot import Call, CallBot, OperationFailed, events
from callbot.graph import Target

MESSAGE_URL = os.environ.get(
    "NOTIFIER_MESSAGE_URL", "https://contoso.example/prompts/server-down.wav"
)
"""The message played to whoever picks up."""
APP_INSTANCE_ID = os.environ.get("NOTIFIER_APP_INSTANCE_ID")
"""The bot's application instance (resource account with a phone number), to call phones."""

log = structlog.get_logger("notifier")
bot = CallBot.from_env()

# Each placed call's outcome, settled when the call has ended (so that the bot stops only
# after Graph's last notification about it). notify() awaits it.
_outcomes: dict[str, asyncio.Future[str]] = {}
# What became of the message, noted while the call was up.
_heard: dict[str, str] = {}


def _outcome(call: Call) -> asyncio.Future[str]:
    return _outcomes.setdefault(call.key, asyncio.get_running_loop().create_future())


def _settle(call: Call, result: str) -> None:
    future = _outcome(call)
    if not future.done():
        future.set_result(result)


def target_for(recipient: str) -> Target:
    """A phone number (``+`` and digits) or a Teams user's object id."""
    if recipient.startswith("+"):
        return Target.phone(recipient)
    return Target.user(recipient)


@bot.on_state("established")
async def play_message(call: Call, event: events.CallStateChanged) -> None:
    """Someone picked up: play the message, then hang up."""
    try:
        await (await call.play_prompt(MESSAGE_URL)).wait(timeout=300)
    except OperationFailed:
        _heard[call.key] = "interrupted"  # they hung up during the message
        return
    _heard[call.key] = "delivered"
    await call.hangup()  # returns as well when they hung up first


@bot.on_terminated
async def call_ended(call: Call, event: events.CallTerminated) -> None:
    """The call ended: settle its outcome (if nobody picked up, say why)."""
    info = event.result_info
    unanswered = f"not answered (code {info.code})" if info is not None else "not answered"
    _settle(call, _heard.pop(call.key, unanswered))
    # notify() may still be about to look the outcome up: forget it a little later.
    asyncio.get_running_loop().call_later(60.0, _outcomes.pop, call.key, None)


async def notify(
    recipient: str,
    *,
    attempts: int = 3,
    retry_delay: float = 60.0,
    timeout: float = 120.0,
) -> bool:
    """Call ``recipient`` until the message was played, at most ``attempts`` times.

    Returns whether someone heard the whole message. ``retry_delay`` is the
    pause between attempts, ``timeout`` how long one attempt may take.
    """
    target = target_for(recipient)
    phone = target.kind == "phone"
    for attempt in range(1, attempts + 1):
        call = await bot.create_call(
            target,
            source=Target.application_instance(APP_INSTANCE_ID)
            if phone and APP_INSTANCE_ID
            else None,
            tenant_id=bot.settings.tenant_id if phone else None,
        )
        try:
            result = await asyncio.wait_for(asyncio.shield(_outcome(call)), timeout)
        except TimeoutError:
            # No termination came (the hang-up after the message failed, say): what the
            # call got to is what was noted while it was up.
            result = _heard.get(call.key, "timed out")
            if not call.ended:
                await call.hangup()
        log.info("notify_attempt", recipient=recipient, attempt=attempt, result=result)
        if result == "delivered":
            return True
        if attempt < attempts:
            await asyncio.sleep(retry_delay)
    return False


async def main(recipient: str, attempts: int, retry_delay: float) -> bool:
    """Serve the bot just long enough to deliver one notification."""
    stop = asyncio.Event()
    delivered = False

    @bot.on_started
    async def deliver(started: CallBot) -> None:
        nonlocal delivered
        try:
            delivered = await notify(recipient, attempts=attempts, retry_delay=retry_delay)
        finally:
            stop.set()  # delivered, given up, or failed (logged as handler_failed)

    await bot.serve(stop=stop)
    return delivered


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipient", help="a phone number (+14255550123) or a user's object id")
    parser.add_argument("--attempts", type=int, default=3)
    parser.add_argument("--retry-delay", type=float, default=60.0, help="seconds between attempts")
    arguments = parser.parse_args()
    delivered = asyncio.run(main(arguments.recipient, arguments.attempts, arguments.retry_delay))
    sys.exit(0 if delivered else 1)
