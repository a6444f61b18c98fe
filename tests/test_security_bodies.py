"""Callback bodies sent slowly with a valid token of any tenant, to ``bot.serve()`` on 127.0.0.1.

Anyone whose tenant may consent to the bot holds such tokens (``allowed_tenants`` is empty by
default), and the token is checked before the body is read. Each body a sender keeps
unfinished held up to ``max_body_bytes`` for ``body_timeout``, and its connection counted as
busy: 1,000 of them held 4 GiB, and at ``max_connections`` Graph's own callbacks were refused.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from structlog.testing import capture_logs

from callbot import CallBot
from callbot._receiver import CALLBACK_BODIES_AT_ONCE, TENANT_BODIES_AT_ONCE
from callbot.testing import TEST_TENANT_ID, TokenAuthority
from callbot.testing import builders as b

from .conftest import make_bot, until
from .test_hosting import serving_in_process

OTHER_TENANT = "0b1f4c5e-7a2d-4e3b-9c8d-112233445566"
THIRD_TENANT = "7d3e2f1a-5b4c-4d6e-8f90-a1b2c3d4e5f6"
LARGEST = 1024
"""The bots' ``max_body_bytes``: each slow body declares this much."""

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def genuine_body() -> bytes:
    """An incoming call as Graph posts it, naming no tenant (the token's is taken)."""
    return json.dumps(b.notifications(b.incoming_call("genuine-call"))).encode()


def head(bot: CallBot, token: str, length: int) -> bytes:
    return (
        f"POST {bot.settings.callback_path} HTTP/1.1\r\nHost: bot\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def start_body(port: int, bot: CallBot, token: str, length: int = LARGEST) -> Connection:
    """A callback whose headers are all sent, and one byte of its body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(bot, token, length) + b"{")
    await writer.drain()
    return reader, writer


async def first_answer(connections: list[Connection]) -> tuple[int, bytes]:
    """Which of ``connections`` is answered first, and the head of its answer (status line
    and headers); every other one has not been answered yet."""
    heads = [asyncio.ensure_future(reader.readuntil(b"\r\n\r\n")) for reader, _ in connections]
    try:
        async with asyncio.timeout(20):
            done, _ = await asyncio.wait(heads, return_when=asyncio.FIRST_COMPLETED)
        [answered] = done
        return heads.index(answered), answered.result()
    finally:
        for task in heads:
            task.cancel()
        await asyncio.gather(*heads, return_exceptions=True)  # the readers free to read again


def close(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.close()


async def test_one_tenant_s_slow_bodies_take_its_share_and_keep_no_callback_out(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """At ``max_connections`` slow callback bodies of another tenant refused Graph's callback
    (``every open connection is busy``), and each held what it sent. A tenant's bodies hold
    at most its share of the callbacks' budget (past it 503, its body unread), and a
    connection still sending a callback's body is closed for a new one as an idle one is."""
    share = TENANT_BODIES_AT_ONCE
    bot = make_bot(authority, max_connections=share + 1, max_body_bytes=LARGEST, body_timeout=60)
    stranger = authority.mint(audience=bot.settings.app_id, tenant_id=OTHER_TENANT)
    graph = authority.mint(audience=bot.settings.app_id, tenant_id=TEST_TENANT_ID)
    async with serving_in_process(bot) as port:
        with capture_logs() as logs:
            # One body more than the tenant's share, each declaring the most a body may be.
            strangers = [await start_body(port, bot, stranger) for _ in range(share + 1)]
            refused, answer = await first_answer(strangers)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"\r\nRetry-After: 1\r\n" in answer
        [line] = [e for e in logs if e["event"] == "callback_refused"]
        assert (line["status"], line["reason"], line["tenant_id"]) == (
            503,
            "bodies_busy",
            OTHER_TENANT,
        )
        assert bot.receiver.counts["unavailable", "bodies_busy"] == 1
        # Refused once the others held the tenant's share, and none of them more.
        assert bot.receiver.bodies.held == share * LARGEST
        # Its connection closes once its sender stops (the bot closed it by then).
        reader, writer = strangers.pop(refused)
        writer.write_eof()
        async with asyncio.timeout(20):
            await reader.read()
        writer.close()

        # Another tenant's slow body is read all the same: the last place under the bound.
        body = genuine_body()
        own = await start_body(port, bot, graph, len(body))
        await until(lambda: bot.receiver.bodies.held_by(TEST_TENANT_ID) == len(body), within=20)

        # Every connection busy receiving a body: Graph's callback closes the one sending
        # its body longest (a stranger's), and is accepted.
        with capture_logs() as logs:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"http://127.0.0.1:{port}{bot.settings.callback_path}",
                    data=genuine_body(),
                    headers={
                        "Authorization": f"Bearer {graph}",
                        "Content-Type": "application/json",
                    },
                ) as response,
            ):
                assert response.status == 202
        [evicted] = [e for e in logs if e["event"] == "connection_closed"]
        assert evicted["reason"] == "evicted"
        assert "still sending a callback's body" in evicted["why"], evicted
        gone, which = await first_read([*strangers, own])
        assert (gone, which < len(strangers)) == (b"", True)  # a stranger's, closed unanswered
        # What it held is free again.
        await until(
            lambda: bot.receiver.bodies.held_by(OTHER_TENANT) == (share - 1) * LARGEST, within=20
        )

        reader, writer = own
        writer.write(body[1:])
        async with asyncio.timeout(20):
            assert (await reader.readline()).startswith(b"HTTP/1.1 202 ")
        close([*strangers, own])
        await until(lambda: bot.receiver.bodies.held == 0, within=20)


async def first_read(connections: list[Connection]) -> tuple[bytes, int]:
    """What the first of ``connections`` to be answered or closed reads (``b""``: closed),
    and which one it is."""
    reads = [asyncio.ensure_future(reader.read(1)) for reader, _ in connections]
    try:
        async with asyncio.timeout(20):
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
        [first] = done
        return first.result(), reads.index(first)
    finally:
        for task in reads:
            task.cancel()
        await asyncio.gather(*reads, return_exceptions=True)


async def test_callback_bodies_of_all_tenants_hold_at_most_the_budget(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """Two tenants' slow bodies fill the budget (each its share): a third tenant's is refused,
    as is a body with no length, counted as the most a body may be."""
    share, budget = TENANT_BODIES_AT_ONCE, CALLBACK_BODIES_AT_ONCE
    assert 2 * share == budget  # two tenants fill it
    bot = make_bot(authority, max_body_bytes=LARGEST, body_timeout=60)
    held: list[Connection] = []
    async with serving_in_process(bot) as port:
        for tenant in (OTHER_TENANT, TEST_TENANT_ID):
            token = authority.mint(audience=bot.settings.app_id, tenant_id=tenant)
            bodies = [await start_body(port, bot, token) for _ in range(share + 1)]
            refused, answer = await first_answer(bodies)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            held += [c for i, c in enumerate(bodies) if i != refused]
            close(bodies[refused : refused + 1])
        assert bot.receiver.bodies.held == budget * LARGEST
        third = authority.mint(audience=bot.settings.app_id, tenant_id=THIRD_TENANT)
        with capture_logs() as logs:
            small = await start_body(port, bot, third, length=10)
            _, answer = await first_answer([small])
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        [line] = [e for e in logs if e["event"] == "callback_refused"]
        assert line["reason"] == "bodies_busy"
        assert "every tenant" in line["detail"], line
        close([small])
        # A body of unknown length (chunked) counts as the most a body may be.
        close(held[:2])
        await until(lambda: bot.receiver.bodies.held == (budget - 2) * LARGEST, within=20)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            head(bot, third, 0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
            + b"1\r\n{\r\n"
        )
        await writer.drain()
        await until(lambda: bot.receiver.bodies.held_by(THIRD_TENANT) == LARGEST, within=20)
        writer.close()
        close(held)
        await until(lambda: bot.receiver.bodies.held == 0, within=20)
