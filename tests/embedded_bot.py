"""An application that serves a bot inside its own ``asyncio.run``, for the shutdown tests:
``python -m tests.embedded_bot``, with settings from ``CALLBOT_*`` variables.

Before serving it installs SIGINT and SIGTERM handlers of its own, as
``EMBEDDED_BOT_HANDLERS`` says: ``loop`` adds them to the event loop
(``loop.add_signal_handler``), ``signal`` sets them with ``signal.signal``, and
``none`` keeps Python's. It writes one line to stdout at each step, for the test to wait
on: ``serving`` once the bot serves, ``serve returned``, then ``own handler SIGTERM``
(or ``SIGINT``) for each signal its own handlers get, or ``KeyboardInterrupt`` when
``asyncio.run`` raised it.
"""

from __future__ import annotations

import asyncio
import os
import signal

from callbot import CallBot

__all__ = ["bot"]

bot = CallBot.from_env()


def say(line: str) -> None:
    # Unbuffered: the test waits for each line before it sends the next signal.
    os.write(1, (line + "\n").encode())


@bot.on_started
async def serving(started: CallBot) -> None:
    """Say that the bot serves: its signal handlers are in place."""
    say("serving")


async def main() -> None:
    loop = asyncio.get_running_loop()
    handled = asyncio.Event()

    def own(signum: signal.Signals) -> None:
        say(f"own handler {signum.name}")
        handled.set()

    def from_python(signum: int, frame: object) -> None:
        loop.call_soon_threadsafe(own, signal.Signals(signum))

    for signum in (signal.SIGINT, signal.SIGTERM):
        if os.environ.get("EMBEDDED_BOT_HANDLERS") == "loop":
            loop.add_signal_handler(signum, own, signum)
        elif os.environ.get("EMBEDDED_BOT_HANDLERS") == "signal":
            signal.signal(signum, from_python)
    await bot.serve("127.0.0.1", 0)
    say("serve returned")
    await handled.wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        say("KeyboardInterrupt")
