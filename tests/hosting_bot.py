"""A bot for the hosting tests, served as a real process: ``callbot run tests.hosting_bot:bot``.

Settings come from ``CALLBOT_*`` variables. Its one handler, for incoming
calls, appends ``start CALL_ID`` to the file named by ``HOSTING_BOT_OUTPUT``,
waits for SIGUSR1 when ``HOSTING_BOT_RELEASE`` is set (else sleeps
``HOSTING_BOT_SLEEP`` seconds), then appends ``done CALL_ID``; so a test can
signal the process while a handler runs and see whether it finished.

With ``HOSTING_BOT_OWN_ROUTES`` set, it also serves ``POST /echo`` (the JSON body
back) and appends ``started`` once its ``on_started`` hook runs.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from aiohttp import web

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
    if os.environ.get("HOSTING_BOT_RELEASE"):
        released = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, released.set)
        await released.wait()
    else:
        await asyncio.sleep(float(os.environ.get("HOSTING_BOT_SLEEP", "1.5")))
    _append(f"done {event.call_id}")


if os.environ.get("HOSTING_BOT_OWN_ROUTES"):
    routes = web.RouteTableDef()

    @routes.post("/echo")
    async def echo(request: web.Request) -> web.Response:
        """The JSON body back, and whether the bot is ready."""
        return web.json_response({"echo": await request.json(), "ready": bot.ready})

    bot.add_routes(routes)

    @bot.on_started
    async def started(started_bot: CallBot) -> None:
        """Write down that the bot serves."""
        _append("started")
