"""The bot the Redis tests run as separate ``callbot run`` processes (it holds no tests).

Every handler run appends one JSON line to the Redis list ``test:log:{call_key}``
on the store's server: what the event was, which process ran it, and whether it
was a re-run (``callbot.current_attempt()``). The append is fenced by the run's
epoch, as a bot author would fence a write of their own: a run that lost its call
to another instance appends to ``test:late:{call_key}`` instead. A failed append
is retried (Redis may be restarting), as a careful handler would; with
``CALLBOT_STORE_REPLICAS`` set, until that many replicas hold it.

With ``CALLBOT_TEST_HANDLER_DELAY`` set, each run first sleeps that long, so that a
process killed mid-flight has work in hand. With ``CALLBOT_TEST_FREEZE=1``, once
the key ``test:freeze:{pid}`` exists, each run of this process appends its line and
then never returns (until the process is killed).

It also runs on the package of an earlier tree (``OLDER_TREE`` in tests/test_redis.py):
it uses nothing that package lacks.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

import callbot
from callbot import Call, CallBot, current_attempt, events
from callbot.store._redis import connect, follow_primary

__all__ = ["bot", "label", "log_key"]

bot = CallBot.from_env()
_delay = float(os.environ.get("CALLBOT_TEST_HANDLER_DELAY", "0") or 0)
_freeze = os.environ.get("CALLBOT_TEST_FREEZE") == "1"
_client: Any = None
# Which callbot this process runs: two trees share one Redis in the rolling-upgrade test.
_PACKAGE = str(Path(callbot.__file__).resolve().parent)

# KEYS: the call's fence, its log, its late log, ids of lines written;
# ARGV: epoch (0: not fenced), line, its id (a retried append is not written twice)
_FENCED_APPEND = """
if redis.call('SADD', KEYS[4], ARGV[3]) == 0 then
  return 2
end
if ARGV[1] ~= '0' and redis.call('HGET', KEYS[1], 'n') ~= ARGV[1] then
  redis.call('RPUSH', KEYS[3], ARGV[2])
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""


def log_key(call_key: str, kind: str = "log") -> str:
    """Where lines of a call go (its hash tag: the slot of the call's own keys)."""
    return f"test:{kind}:{{{call_key}}}"


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
        _client = connect(bot.settings.store)[0]
    attempt = current_attempt()
    line: dict[str, Any] = {
        "label": label(event),
        "previous": getattr(event, "previous_state", None),
        "pid": os.getpid(),
        "t": time.time(),
        "redelivered": attempt is not None and attempt.redelivered,
        "epoch": attempt.epoch if attempt is not None else 0,
        "package": _PACKAGE,
    }
    frozen = _freeze and bool(await _retry(_client.exists, f"test:freeze:{os.getpid()}"))
    line["frozen"] = frozen
    fence = f"callbot:{bot.settings.app_id}:{{{event.call_key}}}:fence"
    keys = (fence, *(log_key(event.call_key, kind) for kind in ("log", "late", "ids")))
    entry = attempt.entry if attempt is not None else ""
    line_id = f"{os.getpid()}/{line['epoch']}/{entry}/{line['label']}"
    await _retry(_append, keys, line["epoch"], json.dumps(line), line_id)
    if frozen:
        await asyncio.Event().wait()


async def _append(keys: tuple[str, ...], *args: Any) -> None:
    """The fenced append, held by as many replicas as the store's own writes."""
    replicas = bot.settings.store_replicas
    if not replicas:
        await _client.eval(_FENCED_APPEND, len(keys), *keys, *args)
        return
    async with _client.pipeline(transaction=False) as pipe:  # WAIT: this connection's writes
        pipe.eval(_FENCED_APPEND, len(keys), *keys, *args)
        pipe.wait(replicas, 1000)
        _, held = await pipe.execute()
    if held < replicas:
        raise RedisError(f"{held} of {replicas} replicas hold the line")  # written again


async def _retry(step: Any, *args: Any) -> Any:
    while True:
        try:
            await follow_primary(_client)
            return await step(*args)
        except (RedisError, OSError, AttributeError, TypeError):
            # Redis restarting or failing over (AttributeError: redis-py's cluster client
            # while it reconnects; TypeError: from Python 3.12 on, asyncio's writelines on
            # a connection that was closed meanwhile); the write is idempotent, so it is
            # tried again
            await asyncio.sleep(0.1)
