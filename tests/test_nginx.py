"""The project's nginx template, run for real in front of a bot on 127.0.0.1.

nginx terminates TLS with a certificate made here, passes callbacks to the bot
with X-Forwarded-* headers, and refuses bodies over the bot's limit itself. A bot
named rather than addressed is looked up, while nginx runs, in a DNS server
written here, whose answer a test changes as compose does when it re-creates the
bot's container. Skipped without nginx, unless CALLBOT_TEST_REQUIRE_SERVERS=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple, cast

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs
from yarl import URL

from callbot import Call, CallBot, events
from callbot.testing import TokenAuthority
from callbot.testing import builders as b

from .conftest import BotServer, bot_on_path, ipv6_loopback, make_bot, until
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
UNASKED_RESOLVER = "127.0.0.53"
"""NGINX_RESOLVER when CALLBOT_UPSTREAM is an address: nginx never asks it."""
JSON = {"Content-Type": "application/json"}
OLD, NEW = "127.0.0.1", "127.0.0.3"
"""Where the bot listens before and after its container is re-created."""
BOT_NAME = "localhost"
"""The bot's name in CALLBOT_UPSTREAM: one the system resolves too (to OLD), so that nginx
also starts with a site that resolves it only once, at start, and shows what that does."""


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
    prefix: Path,
    upstream: str,
    listen: str = "127.0.0.1:{port}",
    resolver: str = UNASKED_RESOLVER,
    adapt: Callable[[str], str] | None = None,
) -> AsyncIterator[int]:
    """nginx with the rendered deploy template, proxying to ``upstream`` (CALLBOT_UPSTREAM);
    yields its TLS port.

    ``listen`` is NGINX_LISTEN, with ``{port}`` for the port picked here; ``resolver`` is
    NGINX_RESOLVER; ``adapt`` edits the rendered site."""
    binary = find_nginx()
    certificate, key = write_self_signed(prefix)
    # The port picked may be taken by another process before nginx binds it: try another.
    for _ in range(4):
        port = free_port()
        config = write_nginx_config(
            prefix,
            {
                "CALLBOT_UPSTREAM": upstream,
                "NGINX_RESOLVER": resolver,
                "NGINX_LISTEN": listen.format(port=port),
                "SERVER_NAME": "localhost",
                "TLS_CERTIFICATE": str(certificate),
                "TLS_CERTIFICATE_KEY": str(key),
            },
            adapt,
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


def bot_address(server: BotServer) -> str:
    """CALLBOT_UPSTREAM for a bot served here: its address, which nginx needs no DNS for."""
    return f"127.0.0.1:{upstream_port(server)}"


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
        running_nginx(tmp_path, bot_address(server)) as port,
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


@pytest.mark.parametrize(
    "callback_path", ["/api/calls", "/graph/callback/", "/metrics", "/readyz", "/healthz"]
)
async def test_every_callback_path_the_bot_accepts_passes_through_nginx(
    authority: TokenAuthority, serve: Any, tmp_path: Path, callback_path: str
) -> None:
    """The bot took ``/metrics``, ``/readyz`` or ``/healthz`` as its callback path, which the
    template keeps from the internet: every callback got nginx's 404, never the bot."""
    bot = bot_on_path(authority, callback_path)
    if bot is None:
        return  # refused, naming the setting
    server: BotServer = await serve(bot)
    async with (
        running_nginx(tmp_path, bot_address(server)) as port,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session,
    ):
        posted = URL(bot.settings.callback_url).with_scheme("https").with_port(port)
        body = json.dumps(b.notifications(b.incoming_call("path")))
        async with session.post(
            posted.with_host("127.0.0.1"), data=body, headers=signed_headers("bad")
        ) as response:
            assert response.status == 401  # the bot's answer to a bad token: it was reached


async def test_nginx_refuses_a_body_over_the_bots_limit_before_the_bot_sees_it(
    authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    require_client_source()
    bot, handled = recording_bot(authority)
    assert bot.settings.max_body_bytes == BODY_LIMIT
    server: BotServer = await serve(bot)
    async with (
        running_nginx(tmp_path, bot_address(server)) as port,
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
            running_nginx(prefix, bot_address(server), value.replace("443", "{port}")) as port,
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


class NameServer(asyncio.DatagramProtocol):
    """A DNS server on 127.0.0.1 that knows one name: its A query gets ``addresses`` (none:
    NXDOMAIN, as for a bot container that is gone); other queries get no address."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name.lower()
        self.addresses = addresses
        self.answered: list[list[str]] = []
        """The addresses of each A answer for the name, in order."""
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's own UDP transport does not subclass DatagramTransport, though it is one.
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        answer = self.answer(data)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)

    def answer(self, query: bytes) -> bytes | None:
        if len(query) < 12:
            return None
        ident, flags, questions = struct.unpack("!HHH", query[:6])
        if flags & 0x8000 or questions != 1:
            return None
        labels: list[str] = []
        end = 12
        while end < len(query) and query[end]:
            labels.append(query[end + 1 : end + 1 + query[end]].decode("ascii", "replace"))
            end += 1 + query[end]
        end += 1
        if end + 4 > len(query):
            return None
        qtype, qclass = struct.unpack("!HH", query[end : end + 4])
        question = query[12 : end + 4]
        ours = ".".join(labels).lower() == self.name
        asks_ipv4 = qtype == 1 and qclass == 1
        addresses = list(self.addresses) if ours and asks_ipv4 else []
        records = b""
        for address in addresses:
            # A pointer to the question's name, A, IN, a TTL nginx's valid= overrides, 4 bytes.
            records += struct.pack("!HHHIH", 0xC00C, 1, 1, 600, 4) + socket.inet_aton(address)
        if ours and asks_ipv4:
            self.answered.append(addresses)
        not_found = not ours or (asks_ipv4 and not addresses)
        # A response (QR), authoritative (AA), the query's RD echoed; rcode 3 is NXDOMAIN.
        reply_flags = 0x8400 | (flags & 0x0100) | (3 if not_found else 0)
        header = struct.pack("!HHHHHH", ident, reply_flags, 1, len(addresses), 0, 0)
        return header + question + records


@contextlib.asynccontextmanager
async def name_server(name: str, addresses: list[str]) -> AsyncIterator[tuple[NameServer, str]]:
    """A NameServer listening on 127.0.0.1; yields it and its NGINX_RESOLVER value."""
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: NameServer(name, addresses), local_addr=("127.0.0.1", 0)
    )
    try:
        port = transport.get_extra_info("sockname")[1]
        yield server, f"127.0.0.1:{port}"
    finally:
        transport.close()


class Received(NamedTuple):
    """A request as a backend got it from nginx."""

    host: str
    port: int
    """Which backend got it."""
    raw_path: str
    headers: dict[str, str]
    connection: tuple[str, int]
    """nginx's end of the TCP connection it came over."""


@contextlib.asynccontextmanager
async def recording_backends(
    hosts: list[str], same_port: bool
) -> AsyncIterator[tuple[list[int], list[Received]]]:
    """An http server on each of ``hosts`` answering every request 202 and recording it;
    yields their ports (one port for all with ``same_port``) and the list of requests."""
    received: list[Received] = []

    def recorder(host: str, port: int) -> web.Application:
        async def record(request: web.Request) -> web.Response:
            await request.read()
            peer = request.transport.get_extra_info("peername") if request.transport else None
            assert peer is not None
            received.append(
                Received(host, port, request.raw_path, dict(request.headers), (peer[0], peer[1]))
            )
            return web.Response(status=202, text="accepted")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        return app

    sockets = bound_sockets(hosts, same_port)
    runners: list[web.AppRunner] = []
    try:
        for host, sock in zip(hosts, sockets, strict=True):
            runner = web.AppRunner(recorder(host, sock.getsockname()[1]), access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.SockSite(runner, sock).start()
        yield [sock.getsockname()[1] for sock in sockets], received
    finally:
        for runner in runners:
            await runner.cleanup()
        for sock in sockets:
            sock.close()


def bound_sockets(hosts: list[str], same_port: bool) -> list[socket.socket]:
    """A TCP socket bound on each host; with ``same_port``, one port free on every host."""
    for _ in range(8):
        sockets: list[socket.socket] = []
        port = 0
        try:
            for host in hosts:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((host, port))
                if same_port:
                    port = sock.getsockname()[1]
        except OSError:
            # That port is taken on another host: pick another.
            for sock in sockets:
                sock.close()
            continue
        return sockets
    raise AssertionError(f"no port free on all of {hosts}")


def require_loopback(*hosts: str) -> None:
    for host in hosts:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((host, 0))
        except OSError as exc:
            pytest.skip(f"cannot listen on {host} here: {exc}")


def for_a_test_name_server(site: str) -> str:
    """The rendered site with nginx keeping DNS answers 1 s instead of a few, to be quick, and
    waiting 30 s for one, as the test's DNS server shares a loop that a busy machine slows."""
    site = re.sub(r"\bvalid=\d+s\b", "valid=1s", site)
    return re.sub(r"\bresolver_timeout \d+s;", "resolver_timeout 30s;", site)


async def post_until(
    session: aiohttp.ClientSession, url: str, done: Callable[[], bool], what: str
) -> list[tuple[int, str]]:
    """Post one request after another until ``done()``, at most 400 in 60 s; return the
    status and body of each."""
    answers: list[tuple[int, str]] = []
    try:
        async with asyncio.timeout(60):
            while not done() and len(answers) < 400:
                async with session.post(url, data=b"{}", headers=JSON) as response:
                    answers.append((response.status, await response.text()))
                if not done():
                    # Pacing between requests while nginx's cached answer ages.
                    await asyncio.sleep(0.05)
    except TimeoutError:
        pass
    assert done(), f"{what}: not after {len(answers)} requests, the last {answers[-3:]}"
    return answers


async def test_a_bot_at_a_new_address_gets_the_callbacks_once_its_name_says_so(
    tmp_path: Path,
) -> None:
    """compose re-creates the bot's container at a new address under the same name; nginx,
    asking Docker's DNS again, sends the next callbacks there, without a restart."""
    require_client_source()
    require_loopback(OLD, NEW)
    async with (
        recording_backends([OLD, NEW], same_port=True) as ([port, _], received),
        name_server(BOT_NAME, [OLD]) as (dns, resolver),
    ):
        async with (
            running_nginx(
                tmp_path, f"{BOT_NAME}:{port}", resolver=resolver, adapt=for_a_test_name_server
            ) as nginx_port,
            from_client_source() as session,
        ):
            # The URI as sent, %-escapes and query included, reaches the bot unchanged.
            path = "/api/calls/%7Eodd%2Fpath?validationToken=a%2Fb%20c&x"
            url = URL(f"https://127.0.0.1:{nginx_port}{path}", encoded=True)
            async with session.post(url, data=b"{}", headers=JSON) as response:
                assert response.status == 202
            [first] = received
            assert first.host == OLD
            assert first.raw_path == path
            assert first.headers["Host"] == "127.0.0.1"
            assert first.headers["X-Forwarded-For"] == CLIENT_SOURCE
            assert first.headers["X-Forwarded-Proto"] == "https"
            assert first.headers["X-Forwarded-Host"] == "127.0.0.1"

            # The container is re-created: the name now says NEW, and OLD still answers, as
            # another container given the old address could.
            dns.addresses = [NEW]
            calls = f"https://127.0.0.1:{nginx_port}/api/calls"
            answers = await post_until(
                session,
                calls,
                lambda: received[-1].host == NEW,
                f"nginx still sends to {OLD} after the name says {NEW}",
            )
            assert {status for status, _ in answers} == {202}
            assert dns.answered[-1] == [NEW]
            before = len(received)
            for _ in range(3):
                async with session.post(calls, data=b"{}", headers=JSON) as response:
                    assert response.status == 202
            assert [r.host for r in received[before:]] == [NEW] * 3

            # The bot's container is gone and its name with it: a clear 502 at once, which
            # Graph retries, rather than a wait.
            dns.addresses = []
            answers = await post_until(
                session, calls, lambda: dns.answered[-1] == [], "nginx never asked again"
            )
            status, body = answers[-1]
            assert status == 502, answers[-1]
            assert "the bot could not be reached" in body
        error_log = (tmp_path / "error.log").read_text()
        assert f"{BOT_NAME} could not be resolved" in error_log


async def test_a_name_with_several_addresses_shares_the_callbacks_among_them(
    tmp_path: Path,
) -> None:
    """``docker compose up --scale bot=2``: the name has an address per container, each of
    which gets callbacks."""
    require_loopback(OLD, NEW)
    async with (
        recording_backends([OLD, NEW], same_port=True) as ([port, _], received),
        name_server(BOT_NAME, [OLD, NEW]) as (dns, resolver),
        running_nginx(
            tmp_path, f"{BOT_NAME}:{port}", resolver=resolver, adapt=for_a_test_name_server
        ) as nginx_port,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session,
    ):
        answers = await post_until(
            session,
            f"https://127.0.0.1:{nginx_port}/api/calls",
            lambda: {r.host for r in received} == {OLD, NEW},
            "one of the addresses never got a callback",
        )
        assert {status for status, _ in answers} == {202}
        assert dns.answered[0] == [OLD, NEW]


def documented_upstream_block(ports: list[int]) -> tuple[str, str]:
    """deploy/README.md's upstream block for several instances, at ``ports``: its name and
    text."""
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    [block] = re.findall(r"^```nginx\n(upstream .*?)^```$", readme, re.MULTILINE | re.DOTALL)
    documented = re.findall(r"^\s*server 127\.0\.0\.1:(\d+);", block, re.MULTILINE)
    assert len(documented) == len(ports), block
    for documented_port, port in zip(documented, ports, strict=True):
        block = block.replace(f"127.0.0.1:{documented_port};", f"127.0.0.1:{port};")
    name = re.match(r"upstream (\w+) \{", block)
    assert name is not None, block
    return name.group(1), block


async def test_an_upstream_block_named_in_callbot_upstream_reuses_connections_to_each_instance(
    tmp_path: Path,
) -> None:
    """Several instances on one host: CALLBOT_UPSTREAM names an upstream block added to the
    site, as deploy/README.md shows, and nginx keeps its connections to each open."""
    async with recording_backends(["127.0.0.1", "127.0.0.1"], same_port=False) as (
        ports,
        received,
    ):
        name, block = documented_upstream_block(ports)
        async with (
            running_nginx(tmp_path, name, adapt=lambda site: block + site) as nginx_port,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session,
        ):
            for _ in range(8):
                async with session.post(
                    f"https://127.0.0.1:{nginx_port}/api/calls", data=b"{}", headers=JSON
                ) as response:
                    assert response.status == 202
    assert len(received) == 8
    assert {r.port for r in received} == set(ports)
    # Kept open: fewer connections than callbacks (without keepalive, one each).
    assert len({r.connection for r in received}) < len(received)


async def test_nginx_says_when_nothing_listens_at_the_bots_address(tmp_path: Path) -> None:
    """A bot that is down: nginx's 502 names the bot, and Graph sends the callback again."""
    # A port just freed, on which nothing listens.
    async with (
        running_nginx(tmp_path, f"127.0.0.1:{free_port()}") as nginx_port,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session,
        session.post(f"https://127.0.0.1:{nginx_port}/api/calls", data=b"{}", headers=JSON) as r,
    ):
        assert r.status == 502
        assert r.content_type == "text/plain"
        assert "the bot could not be reached" in await r.text()


def with_the_address_in_proxy_pass(address: str) -> Callable[[str], str]:
    """The rendered site passing to a fixed ``address`` instead of through the variable, as
    an operator may write it for an address that needs no DNS."""

    def adapt(site: str) -> str:
        fixed, count = re.subn(
            r"proxy_pass \$callbot_upstream;", f"proxy_pass http://{address};", site
        )
        assert count == 1, "the template no longer passes through $callbot_upstream"
        return fixed

    return adapt


@pytest.mark.parametrize("proxy_pass", ["variable", "address"])
async def test_the_location_of_the_bots_redirect_reaches_graph_as_the_bot_wrote_it(
    authority: TokenAuthority, serve: Any, tmp_path: Path, proxy_pass: str
) -> None:
    """A call sent to another deployment: Graph must post it to the very URL the chooser
    gave. nginx's default proxy_redirect (in force when proxy_pass names an address) would
    turn a Location that begins with the bot's own address into one on this proxy, Graph
    then posting the call back here, to a path the bot does not serve."""
    bot, handled = recording_bot(authority)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/status")

    # A route of the author's own that redirects: a relative Location stays relative.
    bot.add_routes([web.get("/moved", moved)])
    server: BotServer = await serve(bot)
    address = bot_address(server)
    # Another deployment on the internet, and one on this host (plain http only on loopback).
    elsewhere = {
        "to-eu": "https://bot-eu.example.test/api/calls",
        "to-local": f"http://{address}/eu/api/calls",
    }

    @bot.choose_deployment
    def choose(event: events.IncomingCall) -> str | None:
        return elsewhere[event.call_id]

    adapt = with_the_address_in_proxy_pass(address) if proxy_pass == "address" else None
    async with (
        running_nginx(tmp_path, address, adapt=adapt) as port,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session,
    ):
        for call_id, location in elsewhere.items():
            body = json.dumps(b.notifications(b.incoming_call(call_id)))
            async with session.post(
                f"https://127.0.0.1:{port}/api/calls",
                data=body,
                headers=signed_headers(server.token()),
                allow_redirects=False,
            ) as response:
                assert (response.status, response.headers.get("Location")) == (302, location)
        async with session.get(
            f"https://127.0.0.1:{port}/moved", allow_redirects=False
        ) as response:
            assert (response.status, response.headers.get("Location")) == (302, "/status")
    assert handled == []
