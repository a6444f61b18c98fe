"""Bounded load: thousands of notifications over hundreds of calls from tens of connections.

Every notification is acknowledged with a 202 and handled exactly once, in
its call's order. Everything runs on 127.0.0.1, the count is fixed, and the
test stops by itself.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import aiohttp

from callbot import Call, events
from callbot._ids import id_key
from callbot.testing import builders as b

from .conftest import BotServer, make_bot, until

CALLS = 300
CONNECTIONS = 24
TONES = 5


def lifecycle(call_id: str) -> list[dict[str, Any]]:
    """One answered call: ten notifications."""
    return [
        b.incoming_call(call_id),
        b.call_state(call_id, "establishing"),
        b.call_state(call_id, "established"),
        *(b.tone(call_id, f"tone{n}", n) for n in range(1, TONES + 1)),
        b.call_state(call_id, "terminating"),
        b.call_terminated(call_id),
    ]


def label(event: events.Event) -> str:
    if isinstance(event, events.ToneReceived):
        return f"tone:{event.tone}"
    if isinstance(event, events.CallStateChanged):
        return event.state
    return type(event).__name__


EXPECTED = [
    "IncomingCall",
    "establishing",
    "established",
    *(f"tone:tone{n}" for n in range(1, TONES + 1)),
    "terminating",
    "terminated",
]


async def test_thousands_of_notifications_are_acknowledged_and_handled_once(
    authority: Any, serve: Any
) -> None:
    bot = make_bot(authority, max_concurrent_handlers=64)
    seen: dict[str, list[str]] = {}
    handled = 0

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        nonlocal handled
        handled += 1
        seen.setdefault(event.call_id, []).append(label(event))
        await asyncio.sleep(0)  # a handler that yields, as real ones do

    server: BotServer = await serve(bot)
    url = server.client.make_url(bot.settings.callback_path)
    headers = {
        "Authorization": f"Bearer {server.token(expires_in=3600)}",
        "Content-Type": "application/json",
    }
    statuses: Counter[int] = Counter()
    opened = 0

    async def connection_opened(*_: Any) -> None:
        nonlocal opened
        opened += 1

    tracing = aiohttp.TraceConfig()
    tracing.on_connection_create_end.append(connection_opened)
    total = CALLS * len(EXPECTED)
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[tracing]) as session:
        calls: asyncio.Queue[str] = asyncio.Queue()
        for n in range(CALLS):
            calls.put_nowait(f"load-{n:04d}")

        async def client() -> None:
            # Each client plays whole calls, one notification after the other, as Graph does.
            while not calls.empty():
                call_id = calls.get_nowait()
                for item in lifecycle(call_id):
                    body = json.dumps(b.notifications(item)).encode()
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        statuses[response.status] += 1

        async with asyncio.timeout(60):
            await asyncio.gather(*(client() for _ in range(CONNECTIONS)))
    assert statuses == {202: total}
    # The load came over many connections, each reused for many requests.
    assert CONNECTIONS // 2 < opened <= CONNECTIONS
    await until(lambda: handled >= total, within=30)
    # Nothing left held or queued: whatever else was to trickle in has been handled.
    keys = [id_key(f"load-{n:04d}") for n in range(CALLS)]
    await until(lambda: all(bot._running().settled(key) for key in keys), within=30)
    assert handled == total
    assert len(seen) == CALLS
    for call_id, labels in seen.items():
        assert labels == EXPECTED, call_id
    text = await (await server.client.get("/metrics")).text()
    assert f'callbot_notifications_total{{outcome="accepted",reason=""}} {float(total)}' in text
    for reason in ("duplicate", "stale", "after_end"):
        assert f'callbot_notifications_total{{outcome="dropped",reason="{reason}"}} 0.0' in text


async def test_batches_for_many_calls_are_split_and_all_handled(authority: Any, serve: Any) -> None:
    bot = make_bot(authority)
    seen: Counter[str] = Counter()

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        seen[event.call_id] += 1

    server: BotServer = await serve(bot)
    # 100 batches, each carrying one step of 20 calls: 2,000 items in all.
    calls = [f"batch-{n:02d}" for n in range(20)]
    steps = [lifecycle(call_id) for call_id in calls]
    connector = aiohttp.TCPConnector(limit=10)
    url = server.client.make_url(bot.settings.callback_path)
    headers = {
        "Authorization": f"Bearer {server.token(expires_in=3600)}",
        "Content-Type": "application/json",
    }
    async with aiohttp.ClientSession(connector=connector) as session:
        for _round in range(10):
            for step in range(len(EXPECTED)):
                body = b.notifications(*(items[step] for items in steps))
                # Each round is a new set of calls, so nothing repeats.
                text = json.dumps(body).replace("batch-", f"r{_round}-batch-")
                async with session.post(url, data=text.encode(), headers=headers) as response:
                    assert response.status == 202
    await until(lambda: sum(seen.values()) >= 10 * len(calls) * len(EXPECTED), within=30)
    assert len(seen) == 10 * len(calls)
    assert set(seen.values()) == {len(EXPECTED)}
