"""Attacks without a token on ``callbot run``, a real process listening on 127.0.0.1.

Connections that never finish a request, a flood of them, malformed requests
and exhausted file descriptors must be closed, bounded, answered without
echoing headers, and logged as one counted line each, not as tracebacks.
Deadlines are set low by ``CALLBOT_*`` variables so the tests wait for
conditions (a closed socket, a counter) that take well under a second to meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import resource
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from callbot import Settings
from callbot._serving import MAX_HEADER_BYTES
from callbot.testing import TokenAuthority
from callbot.testing import builders as b

from .conftest import APP_ID
from .test_hosting import ROOT, BotProcess, bot_env

SECRET = "eyJsecret.token.value"


@pytest.fixture
async def processes() -> AsyncIterator[list[BotProcess]]:
    started: list[BotProcess] = []
    yield started
    for process in started:
        await process.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def start_bot(
    authority: TokenAuthority,
    tmp_path: Path,
    processes: list[BotProcess],
    session: aiohttp.ClientSession,
    **env: str,
) -> BotProcess:
    bot = await BotProcess.start(bot_env(authority, tmp_path / "handled.txt", **env))
    processes.append(bot)
    await bot.wait_ready(session)
    return bot


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Read until the bot closes the connection (whatever it answered first)."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass
    return True


async def status_line_of(bot: BotProcess, request: bytes) -> bytes:
    """Send ``request`` on a connection of its own: the answer's status line, once the bot
    has closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bot.port)
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(20):
        status_line = await reader.readline()
        await closed_by_peer(reader)
    writer.close()
    return status_line


async def metric(session: aiohttp.ClientSession, bot: BotProcess, line_start: str) -> float:
    async with session.get(bot.base_url + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def metric_reaches(
    session: aiohttp.ClientSession, bot: BotProcess, line_start: str, value: float
) -> None:
    async with asyncio.timeout(20):
        while await metric(session, bot, line_start) < value:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.05)


def closed_total(reason: str) -> str:
    return f'callbot_connections_closed_total{{reason="{reason}"}}'


async def test_idle_and_slow_header_connections_are_closed(
    authority: TokenAuthority,
    tmp_path: Path,
    processes: list[BotProcess],
    session: aiohttp.ClientSession,
) -> None:
    bot = await start_bot(
        authority,
        tmp_path,
        processes,
        session,
        CALLBOT_IDLE_TIMEOUT="1",
        CALLBOT_HEADER_TIMEOUT="0.5",
    )
    idle = [await asyncio.open_connection("127.0.0.1", bot.port) for _ in range(5)]
    slow = [await asyncio.open_connection("127.0.0.1", bot.port) for _ in range(5)]
    for _, writer in slow:
        # Headers that never end: the old server waited for the rest for ever.
        writer.write(b"POST /api/calls HTTP/1.1\r\nHost: bot\r\nX-Padding: ")
        await writer.drain()
    async with asyncio.timeout(20):
        await asyncio.gather(*(closed_by_peer(reader) for reader, _ in idle + slow))
    for _, writer in idle + slow:
        writer.close()
    await metric_reaches(session, bot, closed_total("header_timeout"), 5)


async def test_a_body_that_never_completes_gets_408(
    authority: TokenAuthority,
    tmp_path: Path,
    processes: list[BotProcess],
    session: aiohttp.ClientSession,
) -> None:
    bot = await start_bot(authority, tmp_path, processes, session, CALLBOT_BODY_TIMEOUT="0.5")
    token = authority.mint(audience=APP_ID)
    status_line = await status_line_of(
        bot,
        b"POST /api/calls HTTP/1.1\r\nHost: bot\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n".encode()
        + b'{"value": [',
    )
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    await metric_reaches(
        session, bot, 'callbot_notifications_total{outcome="malformed",reason="body_timeout"}', 1
    )


async def test_connections_beyond_the_bound_close_the_longest_idle_ones(
    authority: TokenAuthority,
    tmp_path: Path,
    processes: list[BotProcess],
    session: aiohttp.ClientSession,
) -> None:
    bot = await start_bot(
        authority,
        tmp_path,
        processes,
        session,
        CALLBOT_MAX_CONNECTIONS="20",
        CALLBOT_IDLE_TIMEOUT="120",
        CALLBOT_HEADER_TIMEOUT="120",
    )
    await session.close()  # its pooled connection would count among the 20
    held = [await asyncio.open_connection("127.0.0.1", bot.port) for _ in range(60)]
    # The 40 oldest are closed to make room for the newer ones.
    async with asyncio.timeout(20):
        await asyncio.gather(*(closed_by_peer(reader) for reader, _ in held[:40]))
    # A real request still gets through: it displaces an idle attacker instead of waiting.
    async with aiohttp.ClientSession() as fresh:
        async with fresh.get(bot.base_url + "/healthz") as response:
            assert response.status == 200
        assert await metric(fresh, bot, "callbot_open_connections") <= 20
        assert await metric(fresh, bot, closed_total("evicted")) >= 40
    for _, writer in held:
        writer.close()


async def test_malformed_requests_get_a_bare_400_and_one_counted_line(
    authority: TokenAuthority,
    tmp_path: Path,
    processes: list[BotProcess],
    session: aiohttp.ClientSession,
) -> None:
    bot = await start_bot(authority, tmp_path, processes, session)
    malformed = [
        f"Authorization: Bearer {SECRET}\x01\r\n",  # a control character in the value
        f"Authorization Bearer {SECRET}\r\n",  # no colon
        f"Content-Length: {SECRET}\r\n",  # not a number
    ]
    answers: list[bytes] = []
    for n in range(30):
        reader, writer = await asyncio.open_connection("127.0.0.1", bot.port)
        header = malformed[n % len(malformed)]
        writer.write(f"POST /api/calls HTTP/1.1\r\nHost: bot\r\n{header}\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(20):
            answers.append(await reader.read())
        writer.close()
    for answer in answers:
        assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer
        assert SECRET.encode() not in answer
    await metric_reaches(session, bot, closed_total("bad_request"), 30)
    output = bot.output()
    assert SECRET not in output
    assert "Traceback" not in output
    lines = [e for e in bot.events() if e.get("event") == "connection_closed"]
    # Rate-limited: one line, then at most one a second with what it left out.
    assert 1 <= len(lines) < 30
    assert sum(1 + e.get("suppressed", 0) for e in lines) <= 30
    assert all(e["reason"] == "bad_request" and e["status"] == 400 for e in lines)


async def test_headers_past_their_bound_get_431_while_a_large_body_is_read_whole(
    authority: TokenAuthority,
    tmp_path: Path,
    processes: list[BotProcess],
    session: aiohttp.ClientSession,
) -> None:
    """aiohttp takes 128 headers of 8 KiB each: a sender without a token, sending them
    slower than the header deadline on each of 1,000 connections, held 2 MB of the bot's
    memory on each (2 GB). A request's line and headers take at most ``MAX_HEADER_BYTES``
    (64 KiB; Graph's take a few KB), however they arrive; the body is not counted."""
    # The deadline far away: only the bound can close these connections within the test.
    bot = await start_bot(authority, tmp_path, processes, session, CALLBOT_HEADER_TIMEOUT="300")
    padding = "x" * 8000
    # Empty lines before the request line count too: 40 KB of them, then 32 KB of headers.
    for leading, headers in ((b"", 9), (b"\r\n" * 20_000, 4)):
        reader, writer = await asyncio.open_connection("127.0.0.1", bot.port)
        writer.write(leading + b"POST /api/calls HTTP/1.1\r\nHost: bot\r\n")
        # 72 KB, one header at a time, never ended: the last one goes past the bound (the
        # connection closed while its sender still writes would be reset, its 431 lost)
        for n in range(headers):
            writer.write(f"X-Padding-{n}: {padding}\r\n".encode())
            await writer.drain()
        async with asyncio.timeout(20):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    await metric_reaches(session, bot, closed_total("headers_too_large"), 2)

    # Headers near the bound, then a body many times it, sent at once: read whole.
    item = b.incoming_call("large-body-call")
    item["resourceData"]["padding"] = "p" * 1_000_000
    body = json.dumps(b.notifications(item)).encode()
    token = authority.mint(audience=APP_ID)
    head = (
        "POST /api/calls HTTP/1.1\r\nHost: bot\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n"
        + "".join(f"X-Padding-{n}: {padding}\r\n" for n in range(7))
        + "Connection: close\r\n\r\n"
    ).encode()
    status_line = await status_line_of(bot, head + body)
    assert status_line.startswith(b"HTTP/1.1 202"), status_line
    assert await metric(session, bot, closed_total("headers_too_large")) == 2


async def test_the_rest_of_a_refused_body_is_no_next_request_s_headers(
    authority: TokenAuthority,
    tmp_path: Path,
    processes: list[BotProcess],
    session: aiohttp.ClientSession,
) -> None:
    """A request is answered once its headers are in, and aiohttp reads the rest of its body
    after the answer: those bytes were counted as the next request's headers, so past 64 KiB
    of them the bot wrote a bare 431 after its answer, closed the connection, and logged and
    counted ``headers_too_large`` for a request that had none."""
    bot = await start_bot(authority, tmp_path, processes, session)
    reader, writer = await asyncio.open_connection("127.0.0.1", bot.port)
    size = 4 * MAX_HEADER_BYTES
    writer.write(
        b"POST /api/calls HTTP/1.1\r\nHost: bot\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {size}\r\n\r\n".encode()
    )
    await writer.drain()
    async with asyncio.timeout(20):
        # No token: refused before any of the body is sent.
        answer = await reader.readuntil(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        length = int(answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        # The body, then another request on the same connection.
        writer.write(b" " * size + b"GET /healthz HTTP/1.1\r\nHost: bot\r\n\r\n")
        await writer.drain()
        after = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert after.startswith(b"HTTP/1.1 200 "), after
    assert await metric(session, bot, closed_total("headers_too_large")) == 0
    refusals = [e for e in bot.events() if e.get("event") == "callback_refused"]
    assert [e["reason"] for e in refusals] == ["missing"]
    assert not [e for e in bot.events() if e.get("event") == "connection_closed"]


async def test_running_out_of_file_descriptors_is_one_counted_line(
    authority: TokenAuthority, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    env.update(bot_env(authority, tmp_path / "handled.txt", CALLBOT_LOG_FORMAT="json"))

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "callbot",
        "run",
        "tests.hosting_bot:bot",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=few_descriptors,
    )
    bot = BotProcess(process, 0)
    held: list[Any] = []
    try:
        await bot.wait_ready(session)
        await session.close()
        # More connections than the bot has descriptors: the kernel queues them, accept fails.
        for _ in range(100):
            held.append(await asyncio.open_connection("127.0.0.1", bot.port))
        async with asyncio.timeout(20):

            def refused() -> bool:
                return any(e.get("event") == "connection_accept_failed" for e in bot.events())

            while not refused():  # noqa: ASYNC110 - the log of another process
                await asyncio.sleep(0.05)
        for _, writer in held:
            writer.close()
        async with aiohttp.ClientSession() as fresh:
            async with asyncio.timeout(20):
                while True:
                    with contextlib.suppress(aiohttp.ClientError):
                        if await metric(fresh, bot, closed_total("accept_failed")) >= 1:
                            break
                    await asyncio.sleep(0.05)
        output = bot.output()
        assert "Traceback" not in output
        assert "socket.accept() out of system resource" not in output
        for line in bot.lines:
            json.loads(line)  # every line is one structured record
    finally:
        for _, writer in held:
            writer.close()
        await bot.close()


def test_the_default_deadlines_and_bound_are_finite() -> None:
    settings = Settings()
    assert settings.header_timeout <= 30
    assert settings.idle_timeout <= 120
    assert settings.body_timeout <= 60
    assert settings.max_connections <= 10_000


async def test_a_compressed_body_is_never_inflated(
    authority: TokenAuthority,
    tmp_path: Path,
    processes: list[BotProcess],
    session: aiohttp.ClientSession,
) -> None:
    """aiohttp inflated a ``Content-Encoding: deflate`` body before any token was checked,
    and went on inflating it for the 10 s it reads the rest of a refused body: 4 MB sent
    without a token (4 GiB inflated) cost the bot 1-2 s of CPU, its event loop held up to
    1.3 s. Graph does not compress callbacks: a coded body is refused, never inflated."""
    bot = await start_bot(authority, tmp_path, processes, session)
    notification = json.dumps(b.notifications(b.incoming_call("coded-call"))).encode()
    signed = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {authority.mint(audience=APP_ID)}",
    }
    for coding, body in (
        ("gzip", gzip.compress(notification)),
        ("deflate", zlib.compress(notification)),
    ):
        async with session.post(
            bot.base_url + "/api/calls", data=body, headers={**signed, "Content-Encoding": coding}
        ) as response:
            assert response.status == 415
            assert (await response.json())["error"] == "bad_content_encoding"
    # A stream that breaks at once: aiohttp, inflating it before the receiver ran, refused the
    # request as unparsable HTTP; read as sent, it is a request without a token like any other.
    async with session.post(
        bot.base_url + "/api/calls",
        data=b"\x78\x9c" + b"\xff" * 1024,
        headers={"Content-Type": "application/json", "Content-Encoding": "deflate"},
    ) as response:
        assert response.status == 401
        assert (await response.json())["error"] == "missing"
    await metric_reaches(
        session,
        bot,
        'callbot_notifications_total{outcome="malformed",reason="bad_content_encoding"}',
        2,
    )
    refusals = [e for e in bot.events() if e.get("event") == "callback_refused"]
    assert [e["reason"] for e in refusals] == ["bad_content_encoding"] * 2 + ["missing"]
    assert not (tmp_path / "handled.txt").exists()
