"""The project's nginx template, run for real in front of a bot on 127.0.0.1.

nginx terminates TLS with a certificate made here, passes callbacks to the bot
with X-Forwarded-* headers, and refuses bodies over the bot's limit itself.
Skipped without nginx, unless CALLBOT_TEST_REQUIRE_SERVERS=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from callbot import Call, CallBot, events
from callbot.testing import TokenAuthority
from callbot.testing import builders as b

from .conftest import BotServer, ipv6_loopback, make_bot, until
from .nginx_support import (
    DEPLOY,
    find_nginx,
    nginx_command,
    write_nginx_config,
    write_self_signed,
)

pytestmark = pytest.mark.nginx

CLIENT_SOURCE = "127.0.0.2"
"""The address test requests come from, so that the real client differs from nginx's."""
BODY_LIMIT = 4 * 1024 * 1024
"""The bot's default max_body_bytes, and the template's client_max_body_size."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def require_client_source() -> None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((CLIENT_SOURCE, 0))
    except OSError as exc:
        pytest.skip(f"cannot send from {CLIENT_SOURCE} here: {exc}")


@contextlib.asynccontextmanager
async def running_nginx(
    prefix: Path, upstream_port: int, listen: str = "127.0.0.1:{port}"
) -> AsyncIterator[int]:
    """nginx with the rendered deploy template, proxying to the bot; yields its TLS port.

    ``listen`` is NGINX_LISTEN, with ``{port}`` for the port picked here."""
    binary = find_nginx()
    certificate, key = write_self_signed(prefix)
    # The port picked may be taken by another process before nginx binds it: try another.
    for _ in range(4):
        port = free_port()
        config = write_nginx_config(
            prefix,
            {
                "CALLBOT_UPSTREAM": f"127.0.0.1:{upstream_port}",
                "NGINX_LISTEN": listen.format(port=port),
                "SERVER_NAME": "localhost",
                "TLS_CERTIFICATE": str(certificate),
                "TLS_CERTIFICATE_KEY": str(key),
            },
        )
        (prefix / "nginx.pid").unlink(missing_ok=True)
        with (prefix / "stderr.log").open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *nginx_command(binary, prefix, config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
            )
        if not await port_was_taken(process, prefix):
            break
    try:
        await wait_listening(process, port, prefix)
        yield port
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()


async def port_was_taken(process: asyncio.subprocess.Process, prefix: Path) -> bool:
    """Whether nginx exited because its port was in use, once it has started (its pid file
    written) or exited."""
    async with asyncio.timeout(10):
        while process.returncode is None and not (prefix / "nginx.pid").exists():  # noqa: ASYNC110 - a file another process writes
            await asyncio.sleep(0.02)
    if process.returncode is None:
        return False
    logs = [prefix / name for name in ("stderr.log", "error.log")]
    return any("Address already in use" in log.read_text() for log in logs if log.exists())


async def wait_listening(process: asyncio.subprocess.Process, port: int, prefix: Path) -> None:
    async with asyncio.timeout(10):
        while True:
            if process.returncode is not None:
                logs = [(prefix / n).read_text() for n in ("stderr.log", "error.log")]
                raise AssertionError(f"nginx exited with {process.returncode}:\n" + "\n".join(logs))
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return


def from_client_source() -> aiohttp.ClientSession:
    """A client sending from CLIENT_SOURCE; certificate checks off for the self-signed one."""
    connector = aiohttp.TCPConnector(ssl=False, local_addr=(CLIENT_SOURCE, 0), force_close=True)
    return aiohttp.ClientSession(connector=connector)


def signed_headers(token: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}


def upstream_port(server: BotServer) -> int:
    port = server.client.server.port
    assert port is not None
    return port


def recording_bot(authority: TokenAuthority) -> tuple[CallBot, list[str]]:
    # nginx runs on this host, so its address is the one trusted proxy.
    bot = make_bot(authority, trusted_proxies=("127.0.0.1/32",))
    handled: list[str] = []

    @bot.on_incoming_call
    async def record(call: Call, event: events.IncomingCall) -> None:
        handled.append(event.call_id)

    return bot, handled


async def logged_client(session: aiohttp.ClientSession, url: str, **headers: str) -> Any:
    """Post with a bad token; return the ``client`` of the refusal the bot logged."""
    body = json.dumps(b.notifications(b.incoming_call("who")))
    with capture_logs() as logs:
        async with session.post(url, data=body, headers={**signed_headers("bad"), **headers}) as r:
            assert r.status == 401
    [refusal] = [entry for entry in logs if entry["event"] == "callback_refused"]
    return refusal.get("client")


async def test_callbacks_through_nginx_reach_handlers_and_log_the_real_client(
    authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    require_client_source()
    bot, handled = recording_bot(authority)
    server: BotServer = await serve(bot)
    bot_url = f"http://127.0.0.1:{upstream_port(server)}/api/calls"
    async with (
        running_nginx(tmp_path, upstream_port(server)) as port,
        from_client_source() as session,
    ):
        proxied_url = f"https://127.0.0.1:{port}/api/calls"
        body = json.dumps(b.notifications(b.incoming_call("via-nginx")))
        async with session.post(
            proxied_url, data=body, headers=signed_headers(server.token())
        ) as response:
            assert response.status == 202
        await until(lambda: handled == ["via-nginx"])

        # nginx connects from 127.0.0.1 (trusted) and forwards the real client's address.
        assert await logged_client(session, proxied_url) == CLIENT_SOURCE
        # A forged X-Forwarded-For sent through nginx: the address nginx saw still wins.
        assert await logged_client(session, proxied_url, **{"X-Forwarded-For": "203.0.113.7"}) == (
            CLIENT_SOURCE
        )
        # Nor does junk, an empty entry or a port written before it hide the client.
        for junk in ("junk", "", "203.0.113.7:443"):
            forged = {"X-Forwarded-For": junk}
            assert await logged_client(session, proxied_url, **forged) == CLIENT_SOURCE, junk
        # The same forgery sent straight to the bot from an untrusted peer is not believed.
        assert await logged_client(session, bot_url, **{"X-Forwarded-For": "203.0.113.7"}) == (
            CLIENT_SOURCE
        )

        # Metrics and probes are not exposed through the proxy.
        for path in ("/metrics", "/readyz", "/healthz"):
            async with session.get(f"https://127.0.0.1:{port}{path}") as response:
                assert response.status == 404, path
    assert handled == ["via-nginx"]


async def test_nginx_refuses_a_body_over_the_bots_limit_before_the_bot_sees_it(
    authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    require_client_source()
    bot, handled = recording_bot(authority)
    assert bot.settings.max_body_bytes == BODY_LIMIT
    server: BotServer = await serve(bot)
    async with (
        running_nginx(tmp_path, upstream_port(server)) as port,
        from_client_source() as session,
    ):
        url = f"https://127.0.0.1:{port}/api/calls"
        before = dict(server.bot.receiver.counts)
        async with session.post(
            url, data=io.BytesIO(b"x" * (BODY_LIMIT + 1)), headers=signed_headers(server.token())
        ) as response:
            assert response.status == 413
            assert "nginx" in await response.text()
        assert dict(server.bot.receiver.counts) == before

        # Exactly the limit passes nginx and reaches the bot (refused there for its token).
        async with session.post(
            url, data=io.BytesIO(b"x" * BODY_LIMIT), headers=signed_headers("bad")
        ) as response:
            assert response.status == 401
        assert server.bot.receiver.counts["auth_failed", "malformed"] == (
            before.get(("auth_failed", "malformed"), 0) + 1
        )
    assert handled == []


def documented_listen_values() -> list[str]:
    """The NGINX_LISTEN examples of deploy/README.md's placeholder table."""
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    row = re.search(r"^\| `NGINX_LISTEN` \|(.*)\|$", readme, re.MULTILINE)
    assert row is not None, "deploy/README.md has no NGINX_LISTEN row"
    values = re.findall(r"`([^`]+)`", row.group(1))
    assert values, row.group(0)
    return values


async def test_every_documented_listen_address_takes_callbacks_over_ipv4(
    authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    """Graph reaches a host name with an A record over IPv4: nginx's ``[::]:443`` alone
    listens on IPv6 only (ipv6only=on), so a value for both must say ipv6only=off."""
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    bot, handled = recording_bot(authority)
    server: BotServer = await serve(bot)
    expected: list[str] = []
    for number, value in enumerate(documented_listen_values()):
        assert "443" in value, value
        hosts = ["127.0.0.1", "[::1]"] if "[::]" in value else ["127.0.0.1"]
        prefix = tmp_path / str(number)
        prefix.mkdir()
        async with (
            running_nginx(prefix, upstream_port(server), value.replace("443", "{port}")) as port,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session,
        ):
            for host in hosts:
                call_id = f"listen-{number}-{host}"
                body = json.dumps(b.notifications(b.incoming_call(call_id)))
                try:
                    async with session.post(
                        f"https://{host}:{port}/api/calls",
                        data=body,
                        headers=signed_headers(server.token()),
                    ) as response:
                        status = response.status
                except aiohttp.ClientConnectionError as exc:
                    raise AssertionError(
                        f"NGINX_LISTEN={value!r}: nothing at {host}: {exc}"
                    ) from None
                assert status == 202, (value, host)
                expected.append(call_id)
    await until(lambda: sorted(handled) == sorted(expected))
