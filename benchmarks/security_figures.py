"""The memory and loop-time figures of SECURITY.md's attack table.

``python -m benchmarks.security_figures [TOKENS]`` serves a bot on 127.0.0.1 and
reports: the memory kept after TOKENS distinct valid tokens (7 KB each) were
each used once; what a 10,000-item body costs; how long the largest accepted
body (``max_body_bytes`` of roster items, 4 MiB by default) takes to parse in one
loop turn, and the longest the loop waits between its parts when the bot serves it; what
leaving out properties that do not fit the model costs against the same body fitting;
what a bot holds once 999 bodies of 1 MB were posted to one call while its handler
waits, with the memory store and on the Redis store's owner (a redis-server started
here, as ``bench_store`` does); what remembering an ended call costs once the memory
store's bound is reached, with the bound shared by 500 tenants against kept by one; what
the bot keeps of call ids one token invents straight past ringing (``invented-established
N`` measures that alone;
``invented-established-redis N`` measures it on the Redis store, with what an instance
started afterwards takes up). ``slow-bodies N`` serves a bot with ``bot.serve()`` and
``max_connections`` N, and reports what N callback bodies of 4 MiB held, sent with another
tenant's token one byte short of their end, and whether Graph's callback then got in.
``charsets N`` reports what the bot keeps after N bodies that are not UTF-8, each labelled
with a charset of a name no codec has, of 8,000 characters and each another.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from benchmarks._inproc import InProcessBot
from benchmarks.bench_store import redis_server
from callbot import Call, CallBot, Settings, events, models
from callbot._lifecycle import _MAX_ENDED, Lifecycle, _ByTenant
from callbot._log import configure_logging
from callbot._parse import parse_body, parse_body_in_parts
from callbot.store._redis import RedisStore
from callbot.testing import TEST_TENANT_ID, TokenAuthority
from callbot.testing import builders as b

APP_ID = "6c4a7c4e-2b1a-4d7e-9a53-7a1bfb4c0d11"


async def token_memory(url: str, authority: TokenAuthority, count: int) -> str:
    tokens = [
        authority.mint(audience=APP_ID, extra_claims={"pad": "x" * 5000, "n": i})
        for i in range(count)
    ]
    body = json.dumps(b.notifications(b.call_state("cache-call", "establishing"))).encode()
    async with aiohttp.ClientSession() as session:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for token in tokens:
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            async with session.post(url, data=body, headers=headers) as response:
                assert response.status == 202, response.status
        size = len(tokens[0])
        del tokens, token, headers
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    return f"{count} distinct tokens of {size} characters: {kept / 2**20:.1f} MiB kept"


async def many_items(url: str, authority: TokenAuthority) -> str:
    items = [
        {"changeType": "updated", "resourceUrl": f"/communications/calls/many-{i}"}
        for i in range(10_000)
    ]
    body = json.dumps({"value": items}).encode()
    headers = {
        "Authorization": f"Bearer {authority.mint(audience=APP_ID)}",
        "Content-Type": "application/json",
    }
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as response:
            status = response.status
        took = time.perf_counter() - started
    return f"10,000 items ({len(body)} bytes): {status} in {took * 1000:.0f} ms"


def _invented_bodies(count: int) -> Iterator[bytes]:
    """Bodies naming ``count`` invented call ids, 100 a body, each ``establishing`` then
    ``established``."""
    for start in range(0, count, 100):
        items = [
            b.call_state(f"invented-{n}", state)
            for n in range(start, start + 100)
            for state in ("establishing", "established")
        ]
        yield json.dumps(b.notifications(*items)).encode()


async def invented_established(
    url: str, authority: TokenAuthority, bot: CallBot, count: int
) -> str:
    """``count`` call ids one valid token invents past ringing (200 items per request: each
    call ``establishing``, then ``established``, as Graph tells a call the bot answered): the
    calls the bot keeps, and their memory, once every reorder window passed."""
    token = authority.mint(audience=APP_ID, expires_in=3600)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    lifecycle = bot._running().lifecycle
    async with aiohttp.ClientSession() as session:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for body in _invented_bodies(count):
            async with session.post(url, data=body, headers=headers) as response:
                assert response.status == 202, response.status
        # What a window holds is delivered (or let go) once it passed.
        await asyncio.sleep(3 * bot.settings.reorder_window + 1.0)
        kept_calls = len(lifecycle)
        active = sum(1 for _ in lifecycle.active())
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    return (
        f"{count:,} invented established calls: {kept_calls:,} kept ({active:,} active),"
        f" {kept / 2**20:.1f} MiB traced"
    )


async def invented_established_redis(count: int, pending_ttl: float = 5.0) -> str:
    """The same on the Redis store (a redis-server started here), with ``pending_call_ttl``
    shortened to ``pending_ttl``: what the instance that ran the calls keeps (its lifecycle,
    its list of the cluster's calls), the ``active`` index, and what an instance started
    afterwards takes up, once the pending time and a refresh of that list passed."""
    with redis_server() as url:
        settings: dict[str, Any] = {
            "store": url,
            "keep_alive": False,
            "pending_call_ttl": pending_ttl,
            "tenant_id": TEST_TENANT_ID,
        }
        async with InProcessBot(**settings) as owner:
            assert owner.bot is not None
            runtime = owner.bot._running()
            store = runtime.store
            assert isinstance(store, RedisStore)
            active = store._keys.active
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for body in _invented_bodies(count):
                assert await owner.post(body) == 202
            # Every call run, then its pending time and a refresh of the list of calls passed.
            runnable = store._keys.runnable
            while store._owned or await store._batch.run("ZCARD", runnable):  # noqa: ASYNC110 - in Redis
                await asyncio.sleep(0.5)
            await asyncio.sleep(pending_ttl + 3 * owner.bot.settings.reorder_window + 5.0)
            kept_calls, known = len(runtime.lifecycle), len(store._known)
            indexed = int(await store._batch.run("SCARD", active))
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
        async with InProcessBot(**settings) as restarted:
            assert restarted.bot is not None
            later = restarted.bot._running()
            assert isinstance(later.store, RedisStore)
            while not later.store._rehydrated:  # noqa: ASYNC110 - the store has no event for it
                await asyncio.sleep(0.1)
            adopted, relisted = len(later.lifecycle), len(later.store._known)
    return (
        f"{count:,} invented established calls, Redis store, pending_call_ttl={pending_ttl:g}:"
        f" {kept_calls:,} kept in the lifecycle, {known:,} listed, {indexed:,} in the active"
        f" index, {kept / 2**20:.1f} MiB traced; an instance started then: {adopted:,} adopted,"
        f" {relisted:,} listed"
    )


def _compact_participant(participant_id: str) -> models.Participant:
    """A participant with one audio stream and no more: a live Teams client's (four streams,
    about 1.6 KB) would not let a roster's worth of them fit under ``max_body_bytes``."""
    return models.Participant.model_validate(
        {
            "@odata.type": "#microsoft.graph.participant",
            "id": participant_id,
            "info": {
                "@odata.type": "#microsoft.graph.participantInfo",
                "identity": {"user": {"id": participant_id, "displayName": "x" * 40}},
            },
            "mediaStreams": [
                {
                    "mediaType": "audio",
                    "label": "main-audio",
                    "sourceId": "1",
                    "direction": "sendReceive",
                    "serverMuted": False,
                }
            ],
            "isMuted": False,
            "isInLobby": False,
        }
    )


def largest_body() -> str:
    """The costliest body the defaults accept: as many roster items as a request may carry,
    listing together as many participants as a roster may hold."""
    items = Settings.max_items_per_request
    each = Settings.max_roster_size // items
    rosters = [
        b.roster(f"call-{n}", [_compact_participant(f"p{n}-{i}") for i in range(each)])
        for n in range(items)
    ]
    body = json.dumps(b.notifications(*rosters)).encode()
    assert len(body) <= Settings.max_body_bytes
    started = time.perf_counter()
    parse_body(body)
    whole = time.perf_counter() - started
    longest, parts = 0.0, 0
    parsing = parse_body_in_parts(body, max_participants=Settings.max_roster_size)
    while True:
        # The receiver lets the event loop run between parts: the longest part is the wait.
        started = time.perf_counter()
        if next(parsing, None) is None:
            break
        longest, parts = max(longest, time.perf_counter() - started), parts + 1
    return (
        f"{items} roster items, {items * each} participants ({len(body)} bytes): parsed in"
        f" {whole * 1000:.0f} ms; in {parts} parts, the longest {longest * 1000:.0f} ms"
    )


def _one_participant_streams(count: int, fitting: bool) -> bytes:
    """One roster: a participant listing ``count`` media streams, whose ``mediaType`` fits the
    model or not, beside empty participants buying the room (16 objects each)."""
    stream = {"mediaType": "audio" if fitting else 1}
    participants = [{"id": "p0", "mediaStreams": [dict(stream) for _ in range(count)]}]
    participants += [{} for _ in range(-(-count // 15))]
    item = {
        "changeType": "updated",
        "resourceUrl": "/communications/calls/misfits/participants",
        "resourceData": participants,
    }
    return json.dumps({"value": [item]}).encode()


def misfit_streams() -> str:
    """What properties that do not fit the model cost to leave out, against the same body
    fitting: one participant's streams, as many as a body may carry (each left out, up to
    ``_MISFITS``; past it the item is unknown at once)."""
    lines = []
    for count in (5_000, 74_000):
        took = {}
        for fitting in (True, False):
            body = _one_participant_streams(count, fitting)
            parts = parse_body_in_parts(body, max_participants=Settings.max_roster_size)
            started = time.perf_counter()
            kinds = [type(event).__name__ for part in parts for event in part]
            took[fitting] = time.perf_counter() - started, kinds[0], len(body)
        (fit, _, _), (misfit, kind, size) = took[True], took[False]
        lines.append(
            f"{count} streams not fitting ({size} bytes): {misfit * 1000:.0f} ms, a {kind};"
            f" misfit/fitting: {misfit / fit:.2f}"
        )
    return "\n".join(lines)


def remembered_past_the_bound(tenants: int, adds: int) -> float:
    """CPU seconds per ended call remembered once ``tenants`` tenants keep the bound of
    ended calls between them, each call ended by the next tenant in turn (so each is at the
    bound, and gives up its own oldest)."""
    names = [f"tenant-{n}" for n in range(tenants)]
    memory = _ByTenant(_MAX_ENDED)
    now = asyncio.get_running_loop().time()
    for n in range(_MAX_ENDED):
        memory.add(f"filled-{n}", now, names[n % tenants])
    started = time.process_time()
    for n in range(adds):
        Lifecycle._remember(memory, f"call-{n}", names[n % tenants])
    return (time.process_time() - started) / adds


def many_tenants_at_the_bound(rounds: int = 5, adds: int = 20_000) -> str:
    """Tokens of many tenants each ending invented calls: who gives up a call was found by
    looking at every tenant, at each call remembered past the bound."""
    fastest = {1: float("inf"), 500: float("inf")}
    for _ in range(rounds):  # the two sizes in turns, the fastest of each
        for tenants in fastest:
            fastest[tenants] = min(fastest[tenants], remembered_past_the_bound(tenants, adds))
    return (
        f"ended calls remembered past the bound ({_MAX_ENDED:,}): {fastest[500] * 1e6:.2f} µs"
        f" each with 500 tenants at it, {fastest[1] * 1e6:.2f} µs with one;"
        f" 500 tenants/1 tenant: {fastest[500] / fastest[1]:.2f}"
    )


async def held_behind_a_blocked_handler(bodies: int, size: int, **settings: Any) -> tuple[int, int]:
    """Of ``bodies`` notifications (each ``size`` characters of data) posted to one call while
    its handler waits, how many the bot accepted, and the bytes it then held (traced)."""
    call = "blocked"
    release, waiting = asyncio.Event(), asyncio.Event()

    async def wait_for_the_prompt(_: Call, event: events.Event) -> None:
        if isinstance(event, events.UnknownNotification):
            waiting.set()
            await release.wait()

    async with InProcessBot(on_event=wait_for_the_prompt, keep_alive=False, **settings) as bot:
        answered = [b.call_state(call, state) for state in ("establishing", "established")]
        for setup in (b.incoming_call(call), *answered):
            assert await bot.post(json.dumps(b.notifications(setup)).encode()) == 202
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            accepted = 0
            for n in range(bodies):
                data = {"n": n, "text": "x" * size}
                item = b.unknown(call, f"/someFutureResource{n}", resource_data=data)
                accepted += await bot.post(json.dumps(b.notifications(item)).encode()) == 202
            del data, item
            await waiting.wait()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            release.set()
    return accepted, held


async def blocked_handler_backlog(bodies: int = 999, size: int = 1_000_000) -> str:
    accepted, memory = await held_behind_a_blocked_handler(bodies, size)
    with redis_server() as url:
        _, owner = await held_behind_a_blocked_handler(bodies, size, store=url)
    return (
        f"{bodies} bodies of {size:,} characters to a call whose handler waits: {accepted}"
        f" accepted; {memory / 2**20:.0f} MiB held (memory store),"
        f" {owner / 2**20:.0f} MiB (Redis store's owner), traced"
    )


async def unknown_charsets(url: str, authority: TokenAuthority, count: int) -> str:
    """What ``count`` bodies that are not UTF-8 leave behind, each naming a charset no codec
    has (8,000 characters, each name another), once aiohttp's caches of the last
    ``Content-Type`` headers it parsed are full."""
    body = b'{"value": [], "name": "Jos\xe9"}'
    names = [f"x-{n}-" + "a" * 8000 for n in range(100 + count)]
    token = authority.mint(audience=APP_ID, tenant_id="0b1f4c5e-7a2d-4e3b-9c8d-112233445566")
    statuses: Counter[int] = Counter()
    async with aiohttp.ClientSession() as session:

        async def post(name: str) -> None:
            headers = {
                "Authorization": f"Bearer {token}",
                "Content-Type": f"application/json; charset={name}",
            }
            async with session.post(url, data=body, headers=headers) as response:
                statuses[response.status] += 1

        gc.collect()
        tracemalloc.start()
        try:
            for name in names[:100]:
                await post(name)
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for name in names[100:]:
                await post(name)
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    answers = ", ".join(f"{n} x {status}" for status, n in sorted(statuses.items()))
    return (
        f"{count} bodies naming a charset no codec has, 8,000 characters each another: "
        f"{kept / 2**20:.1f} MiB kept ({kept / count / 1024:.1f} KiB each); answers {answers}"
    )


async def _settled_traced_memory() -> int:
    """The traced bytes once they stopped growing for half a second (what the bot reads off
    its sockets arrives at its own pace)."""
    last = -1
    while (now := tracemalloc.get_traced_memory()[0]) != last:
        last = now
        await asyncio.sleep(0.5)
        gc.collect()
    return last


def _bot(authority: TokenAuthority, **settings: Any) -> CallBot:
    """The bot measured: trusting ``authority``'s tokens, sending no keep-alives."""
    return CallBot(
        app_id=APP_ID,
        tenant_id=TEST_TENANT_ID,
        openid_config_url=authority.openid_config_url,
        public_url="https://bot.example.test",
        keep_alive=False,
        **settings,
    )


async def slow_bodies(count: int) -> str:
    """What ``count`` callback bodies of ``max_body_bytes`` (4 MiB) hold, each sent with a
    valid token of another tenant but its last byte, on every connection ``max_connections``
    allows; then how Graph's own callback fares."""
    authority = TokenAuthority()
    await authority.start()
    bot = _bot(authority, log_level="critical", max_connections=count)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    stop = asyncio.Event()
    serving = asyncio.create_task(bot.serve("127.0.0.1", port, stop=stop))
    size = bot.settings.max_body_bytes
    url = f"http://127.0.0.1:{port}/api/calls"
    stranger = authority.mint(audience=APP_ID, tenant_id="0b1f4c5e-7a2d-4e3b-9c8d-112233445566")
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def send_all_but_the_last_byte() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connections.append((reader, writer))
        writer.write(
            f"POST /api/calls HTTP/1.1\r\nHost: bot\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {stranger}\r\nContent-Length: {size}\r\n\r\n".encode()
        )
        with contextlib.suppress(ConnectionError):  # refused and closed, if the bot does so
            for start in range(0, size - 1, 65536):
                writer.write(b" " * min(65536, size - 1 - start))
                await writer.drain()

    async def answer(reader: asyncio.StreamReader) -> str:
        try:
            line = await asyncio.wait_for(reader.readline(), 0.1)
        except TimeoutError:
            return "none yet"
        except ConnectionError:
            return "reset"
        return line.decode().split(" ", 2)[1] if line else "closed"

    try:
        async with aiohttp.ClientSession() as session:
            while True:  # until it listens
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.05)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await asyncio.gather(*(send_all_but_the_last_byte() for _ in range(count)))
            held = await _settled_traced_memory() - before
        finally:
            tracemalloc.stop()
        answers = Counter([await answer(reader) for reader, _ in connections])
        body = json.dumps(b.notifications(b.incoming_call("genuine-call"))).encode()
        headers = {
            "Authorization": f"Bearer {authority.mint(audience=APP_ID)}",
            "Content-Type": "application/json",
        }
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(url, data=body, headers=headers) as response,
            ):
                genuine = f"HTTP {response.status}"
        except aiohttp.ClientError as exc:
            genuine = type(exc).__name__
    finally:
        for _, writer in connections:
            writer.close()
        stop.set()
        await serving
        await authority.close()
    shown = ", ".join(f"{n} {what}" for what, n in sorted(answers.items()))
    return (
        f"{count} callback bodies of {size:,} bytes but one, another tenant's token, at"
        f" max_connections={count}: {held / 2**20:.0f} MiB traced; answers: {shown};"
        f" Graph's callback then: {genuine}"
    )


async def main(count: int, invented: int | None = None, charsets: int | None = None) -> None:
    # create_app() leaves logging to its host: here, this script.
    configure_logging("json", "error")
    authority = TokenAuthority()
    await authority.start()
    bot = _bot(authority, log_level="error")
    server = TestServer(bot.create_app(), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("/api/calls"))
    try:
        if invented is not None:
            print(await invented_established(url, authority, bot, invented))
            return
        if charsets is not None:
            print(await unknown_charsets(url, authority, charsets))
            return
        print(await token_memory(url, authority, count))
        print(await many_items(url, authority))
        print(largest_body())
        print(misfit_streams())
        print(await blocked_handler_backlog())
        print(many_tenants_at_the_bound())
    finally:
        await server.close()
        await authority.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["charsets"]:
        asyncio.run(main(0, charsets=int(sys.argv[2]) if len(sys.argv) > 2 else 3000))
    elif sys.argv[1:2] == ["slow-bodies"]:
        print(asyncio.run(slow_bodies(int(sys.argv[2]) if len(sys.argv) > 2 else 40)))
    elif sys.argv[1:2] == ["invented-established-redis"]:
        configure_logging("json", "error")
        calls = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
        print(asyncio.run(invented_established_redis(calls)))
    elif sys.argv[1:2] == ["invented-established"]:
        asyncio.run(main(0, int(sys.argv[2]) if len(sys.argv) > 2 else 20_000))
    else:
        asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000))
