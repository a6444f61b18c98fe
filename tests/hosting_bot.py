"""A bot for the hosting tests, served as a real process: ``callbot run tests.hosting_bot:bot``.

Settings come from ``CALLBOT_*`` variables. Its one handler, for incoming
calls, appends ``start CALL_ID`` to the file named by ``HOSTING_BOT_OUTPUT``,
sleeps ``HOSTING_BOT_SLEEP`` seconds, then appends ``done CALL_ID``; so a test
can signal the process while a handler runs and see whether it finished.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from callbot import Call, CallBot, events

__all__ = ["bot"]

bot = CallBot.from_env()


def _append(line: str) -> None:
    path = os.environ.get("HOSTING_BOT_OUTPUT")
    if path:
        with Path(path).open("a", encoding="utf-8") as out:
            out.write(line + "\n")


@bot.on_incoming_call
async def slow_handler(call: Call, event: events.IncomingCall) -> None:
    """Take a while, writing down when it starts and when it is done."""
    _append(f"start {event.call_id}")
    await asyncio.sleep(float(os.environ.get("HOSTING_BOT_SLEEP", "1.5")))
    _append(f"done {event.call_id}")
