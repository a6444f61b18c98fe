"""The bot the Redis tests run as separate ``callbot run`` processes (it holds no tests).

Every handler run appends one JSON line to the Redis list ``test:log:{call_key}``
on the store's server: what the event was, and which process ran it. With
``CALLBOT_TEST_HANDLER_DELAY`` set, each run first sleeps that long, so that a
process killed mid-flight has work in hand.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import redis.asyncio as aioredis

from callbot import Call, CallBot, events

__all__ = ["LOG_PREFIX", "bot", "label"]

LOG_PREFIX = "test:log:"

bot = CallBot.from_env()
_delay = float(os.environ.get("CALLBOT_TEST_HANDLER_DELAY", "0") or 0)
_client: aioredis.Redis | None = None


def label(event: events.Event) -> str:
    """A short name for what a handler saw: the state, the tone, or the event type."""
    if isinstance(event, events.ToneReceived):
        return f"tone:{event.tone}"
    if isinstance(event, events.CallStateChanged):
        return event.state
    return type(event).__name__


@bot.on(events.Event)
async def log_every_event(call: Call, event: events.Event) -> None:
    global _client
    if _delay:
        await asyncio.sleep(_delay)
    if _client is None:
        _client = aioredis.Redis.from_url(bot.settings.store, decode_responses=True)
    line = {
        "label": label(event),
        "previous": getattr(event, "previous_state", None),
        "pid": os.getpid(),
        "t": time.time(),
    }
    await _client.rpush(LOG_PREFIX + event.call_key, json.dumps(line))
