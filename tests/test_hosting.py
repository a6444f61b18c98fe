"""Hosting: metrics and probes, client addresses behind proxies, tunnels, shutdown.

The shutdown tests serve ``tests.hosting_bot:bot`` with ``callbot run`` as a
real process on 127.0.0.1 and signal it; everything else runs in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import socket
import sys
import unicodedata
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from yarl import URL

from callbot import Call, CallBot, ConfigurationError, configure_logging, events
from callbot._proxy import forwarded_client, trust_proxies
from callbot._tunnel import TunnelError, devtunnel_public_url, ngrok_public_url
from callbot.testing import TokenAuthority
from callbot.testing import builders as b

from .conftest import APP_ID, BotServer, bot_on_path, ipv6_loopback, make_bot, plain_server, until

ROOT = Path(__file__).resolve().parent.parent


# -- metrics and probes ---------------------------------------------------------------


def notification_counts(text: str) -> dict[tuple[str, str], float]:
    """``callbot_notifications_total`` samples of a scrape, by (outcome, reason)."""
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "callbot_notifications_total":
                counts[sample.labels["outcome"], sample.labels["reason"]] = sample.value
    return counts


def sample_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                return sample.value
    raise AssertionError(f"no sample {name} {labels or ''} in the scrape")


async def test_metrics_count_a_known_sequence_of_requests(
    authority: TokenAuthority, serve: Any
) -> None:
    bot = make_bot(authority, max_body_bytes=4096)
    handled: list[str] = []

    @bot.on_incoming_call
    async def record(call: Call, event: events.IncomingCall) -> None:
        handled.append(event.call_id)

    server: BotServer = await serve(bot)
    # Accepted: 1 + 2 items, then the first again (accepted, then dropped as a duplicate).
    accepted = [
        await server.post(b.notifications(b.incoming_call("met-a"))),
        await server.post(b.notifications(b.incoming_call("met-b"), b.incoming_call("met-c"))),
        await server.post(b.notifications(b.incoming_call("met-a"))),
    ]
    # Rejected: no token, an expired one, one that is not a JWT.
    rejected = [
        await server.client.post(
            bot.settings.callback_path,
            data=json.dumps(b.notifications(b.incoming_call("met-x"))),
            headers={"Content-Type": "application/json"},
        ),
        await server.post(
            b.notifications(b.incoming_call("met-x")), token=server.token(expires_in=-3600)
        ),
        await server.post(b.notifications(b.incoming_call("met-x")), token="garbage"),
    ]
    # Malformed: not JSON, not JSON's content type, larger than max_body_bytes.
    malformed = [
        await server.post(None, raw=b"{not json"),
        await server.post(None, raw=b"{}", headers={"Content-Type": "text/plain"}),
        await server.post(None, raw=b'{"value": "' + b"x" * 5000 + b'"}'),
    ]
    assert [r.status for r in accepted] == [202, 202, 202]
    assert [r.status for r in rejected] == [401, 401, 401]
    assert [r.status for r in malformed] == [400, 415, 413]
    await until(lambda: len(handled) == 3)

    text = await (await server.client.get("/metrics")).text()
    assert notification_counts(text) == {
        ("accepted", ""): 4.0,
        ("auth_failed", "missing"): 1.0,
        ("auth_failed", "expired"): 1.0,
        ("auth_failed", "malformed"): 1.0,
        ("malformed", "not_json"): 1.0,
        ("malformed", "bad_content_type"): 1.0,
        ("malformed", "too_large"): 1.0,
        ("dropped", "duplicate"): 1.0,
        ("dropped", "stale"): 0.0,
        ("dropped", "after_end"): 0.0,
        ("dropped", "roster_full"): 0.0,
        ("dropped", "call_forgotten"): 0.0,
    }
    assert sample_value(text, "callbot_deliveries_total") == 3.0
    assert sample_value(text, "callbot_ack_seconds_count") == 3.0
    assert sample_value(text, "callbot_handler_seconds_count", {"outcome": "ok"}) == 3.0
    assert sorted(handled) == ["met-a", "met-b", "met-c"]


async def test_readyz_needs_keys_and_fails_while_draining(
    authority: TokenAuthority, serve: Any
) -> None:
    authority.available = False
    bot = make_bot(authority)
    server: BotServer = await serve(bot)

    health = await server.client.get("/healthz")
    assert health.status == 200
    not_ready = await server.client.get("/readyz")
    assert not_ready.status == 503
    assert await not_ready.json() == {
        "ready": False,
        "running": True,
        "keys_loaded": False,
        "draining": False,
        "store_reachable": True,
    }

    authority.available = True
    ready_status = 0

    async def poll() -> bool:
        nonlocal ready_status
        ready_status = (await server.client.get("/readyz")).status
        return ready_status == 200

    async with asyncio.timeout(10):
        while not await poll():  # noqa: ASYNC110 - polling an HTTP endpoint, no event to wait on
            await asyncio.sleep(0.05)

    await bot.drain()
    draining = await server.client.get("/readyz")
    assert draining.status == 503
    assert (await draining.json())["draining"] is True
    # Liveness is not readiness: a draining bot is alive.
    assert (await server.client.get("/healthz")).status == 200


# -- client addresses behind proxies --------------------------------------------------


async def refused_client(server: BotServer, headers: dict[str, str]) -> Any:
    """Post with a bad token and return the ``client`` the refusal was logged with."""
    with capture_logs() as logs:
        response = await server.post(
            b.notifications(b.incoming_call("px")), token="garbage", headers=headers
        )
    assert response.status == 401
    [refusal] = [entry for entry in logs if entry["event"] == "callback_refused"]
    return refusal.get("client")


@pytest.mark.parametrize(
    ("trusted", "forwarded_for", "expected"),
    [
        # No proxy configured: the headers are ignored.
        ((), "203.0.113.7", "127.0.0.1"),
        # The peer is not a trusted proxy: not believed.
        (("10.0.0.0/8",), "203.0.113.7", "127.0.0.1"),
        # The peer is trusted: the forwarded client is logged.
        (("127.0.0.1/32",), "203.0.113.7", "203.0.113.7"),
        # The right-most address outside the trusted networks is the client.
        (("127.0.0.1/32", "10.0.0.0/8"), "198.51.100.1, 203.0.113.7, 10.1.2.3", "203.0.113.7"),
        # An unreadable header costs only the detail, never the request.
        (("127.0.0.1/32",), "not-an-address", "127.0.0.1"),
        # What the client wrote left of the address its proxy appended changes nothing.
        (("127.0.0.1/32",), "junk, 203.0.113.7", "203.0.113.7"),
        (("127.0.0.1/32",), ", 203.0.113.7", "203.0.113.7"),
        (("127.0.0.1/32", "10.0.0.0/8"), "junk, 203.0.113.7, 10.1.2.3", "203.0.113.7"),
        # Addresses with a port, as some proxies write them (Azure Application Gateway).
        (("127.0.0.1/32",), "203.0.113.7:443", "203.0.113.7"),
        (("127.0.0.1/32",), "[2001:db8::7]:443", "2001:db8::7"),
        (("127.0.0.1/32",), "2001:db8::7", "2001:db8::7"),
        # A dual-stack proxy writes an IPv4 hop as ::ffff:a.b.c.d: the same address.
        (("127.0.0.1/32", "10.0.0.0/8"), "203.0.113.7, ::ffff:10.1.2.3", "203.0.113.7"),
        (("127.0.0.1/32",), "::ffff:203.0.113.7", "203.0.113.7"),
        # Trusted networks written in that form are the same networks.
        (("::ffff:127.0.0.1",), "203.0.113.7", "203.0.113.7"),
        (("::ffff:127.0.0.0/104", "::ffff:10.0.0.0/104"), "203.0.113.7, 10.1.2.3", "203.0.113.7"),
    ],
)
async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    authority: TokenAuthority,
    serve: Any,
    trusted: tuple[str, ...],
    forwarded_for: str,
    expected: str,
) -> None:
    server: BotServer = await serve(make_bot(authority, trusted_proxies=trusted))
    assert await refused_client(server, {"X-Forwarded-For": forwarded_for}) == expected


async def test_forwarded_headers_sent_twice_are_read_as_one_list(
    authority: TokenAuthority, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Two lines of a header are one list (RFC 9110, 5.3): the client is still found, with
    no error line of any logger."""
    bot = make_bot(authority, trusted_proxies=("127.0.0.1/32",))
    server: BotServer = await serve(bot)
    headers = CIMultiDict(
        [
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer garbage"),
            ("X-Forwarded-For", "198.51.100.1"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "http"),
            ("X-Forwarded-Proto", "https"),
        ]
    )
    body = json.dumps(b.notifications(b.incoming_call("px")))
    with caplog.at_level("WARNING"), capture_logs() as logs:
        response = await server.client.post(bot.settings.callback_path, data=body, headers=headers)
    assert response.status == 401
    [refusal] = [entry for entry in logs if entry["event"] == "callback_refused"]
    assert (refusal["client"], refusal["scheme"]) == ("203.0.113.7", "https")
    assert [record.getMessage() for record in caplog.records] == []


async def test_forwarded_scheme_and_address_without_rewriting_the_request() -> None:
    seen: list[tuple[Any, ...]] = []

    async def handler(request: web.Request) -> web.Response:
        client = forwarded_client(request)
        seen.append((client.address, client.scheme, client.peer, request.remote, request.scheme))
        return web.Response()

    app = web.Application()
    trust_proxies(app, ["127.0.0.0/8"])
    app.router.add_get("/", handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        await client.get(
            "/", headers={"X-Forwarded-For": "192.0.2.9", "X-Forwarded-Proto": "https"}
        )
        await client.get("/")
    assert seen == [
        ("192.0.2.9", "https", "127.0.0.1", "127.0.0.1", "http"),
        ("127.0.0.1", "http", "127.0.0.1", "127.0.0.1", "http"),
    ]


def test_trusted_proxies_must_be_networks(authority: TokenAuthority) -> None:
    with pytest.raises(ConfigurationError, match="CALLBOT_TRUSTED_PROXIES"):
        make_bot(authority, trusted_proxies=("10.0.0.300/8",)).create_app()


@pytest.mark.parametrize(
    "callback_path",
    [
        "/api/calls",
        "/api/calls/",
        "/",
        "/bot/graph-callback",
        "/api/calls?tenant=contoso",
        "/api/calls#here",
        "/api/{tenant}/calls",
        "/api/my%20calls",
        "/api/my calls",
        "//api/calls",
        "/api/./calls",
        "/api/../calls",
    ],
)
async def test_a_callback_path_the_bot_accepts_is_one_graph_s_posts_reach(
    authority: TokenAuthority, serve: Any, callback_path: str
) -> None:
    """A callback path with a query, a fragment, a ``%`` escape, an aiohttp variable or a
    dot segment was accepted, then every callback posted to ``callbackUri`` got 404: the
    route took it literally, or a client rewrote it. Each is refused, or reached."""
    bot = bot_on_path(authority, callback_path)
    if bot is None:
        return  # refused, naming the setting
    server: BotServer = await serve(bot)
    # Where Graph posts: callbackUri, as an HTTP client sends it (the path encoded).
    posted = URL(bot.settings.callback_url)
    response = await server.client.post(URL(posted.raw_path_qs, encoded=True), data=b"{}")
    assert response.status == 401  # the callback's answer to no token: it was reached


# -- tunnels ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_ngrok_agent(document: Any, status: int = 200) -> AsyncIterator[str]:
    """A stand-in for the ngrok agent's local API on 127.0.0.1; yields its base URL."""
    requests: list[str] = []

    async def tunnels(request: web.Request) -> web.Response:
        if (request.method, request.path) != ("GET", "/api/tunnels"):
            return web.Response(status=404)
        requests.append(request.path)
        return web.json_response(document, status=status)

    async with plain_server(tunnels) as base:
        yield base
    assert requests, "the agent's API was never asked"


def ngrok_tunnel(public_url: str, addr: str, proto: str = "https") -> dict[str, Any]:
    return {
        "name": "command_line",
        "uri": "/api/tunnels/command_line",
        "public_url": public_url,
        "proto": proto,
        "config": {"addr": addr, "inspect": True},
    }


@pytest.mark.parametrize(
    "addr",
    ["http://localhost:8080", "localhost:8080", "127.0.0.1:8080", "8080", "https://[::1]:8080"],
)
async def test_ngrok_tunnel_to_the_bots_port_is_found(addr: str) -> None:
    document = {
        "tunnels": [
            ngrok_tunnel("https://other.ngrok.example", "http://localhost:9090"),
            ngrok_tunnel("http://plain.ngrok.example", addr, proto="http"),
            ngrok_tunnel("https://bot.ngrok.example", addr),
        ],
        "uri": "/api/tunnels",
    }
    async with fake_ngrok_agent(document) as api:
        assert await ngrok_public_url(8080, api_url=api) == "https://bot.ngrok.example"


@pytest.mark.parametrize(
    ("listen_host", "addr"),
    [
        ("192.0.2.5", "192.0.2.5:8080"),
        ("2001:db8::5", "[2001:db8::5]:8080"),
        ("[2001:db8::5]", "[2001:db8::5]:8080"),
        ("[2001:db8::5]", "https://[2001:db8:0::5]:8080"),
    ],
)
async def test_ngrok_tunnel_to_the_address_the_bot_listens_on_is_found(
    listen_host: str, addr: str
) -> None:
    """The bot's own address, in brackets as ``--host [2001:db8::5]`` takes it or spelled
    otherwise, was not the same address as the tunnel's: no tunnel was found."""
    document = {"tunnels": [ngrok_tunnel("https://bot.ngrok.example", addr)]}
    async with fake_ngrok_agent(document) as api:
        found = await ngrok_public_url(8080, api_url=api, listen_host=listen_host)
    assert found == "https://bot.ngrok.example"


async def test_ngrok_without_tunnels_says_how_to_start_one() -> None:
    async with fake_ngrok_agent({"tunnels": [], "uri": "/api/tunnels"}) as api:
        with pytest.raises(
            TunnelError, match=r"no tunnels running: start one with `ngrok http 8080`"
        ):
            await ngrok_public_url(8080, api_url=api)


async def test_ngrok_with_tunnels_elsewhere_lists_them() -> None:
    document = {"tunnels": [ngrok_tunnel("https://other.ngrok.example", "http://localhost:9090")]}
    async with fake_ngrok_agent(document) as api:
        with pytest.raises(TunnelError, match=r"no https ngrok tunnel points at port 8080") as info:
            await ngrok_public_url(8080, api_url=api)
    assert "https://other.ngrok.example -> http://localhost:9090" in str(info.value)


async def test_ngrok_tunnel_to_another_machine_is_not_taken() -> None:
    document = {"tunnels": [ngrok_tunnel("https://lan.ngrok.example", "http://192.0.2.10:8080")]}
    async with fake_ngrok_agent(document) as api:
        with pytest.raises(TunnelError, match="no https ngrok tunnel points at port 8080"):
            await ngrok_public_url(8080, api_url=api)


async def test_no_ngrok_agent_is_a_clear_error() -> None:
    api = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TunnelError, match=r"no ngrok agent answers at .*ngrok http 8080"):
        await ngrok_public_url(8080, api_url=api)


def write_fake_devtunnel(directory: Path, stdout: str, exit_code: int = 0) -> Path:
    """A ``devtunnel`` program that records its arguments and prints ``stdout``."""
    program = directory / "devtunnel"
    program.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, sys\n"
        f"pathlib.Path({str(directory / 'argv.json')!r}).write_text(json.dumps(sys.argv[1:]))\n"
        f"sys.stdout.write({stdout!r})\n"
        f"sys.stderr.write('fake devtunnel error\\n' if {exit_code} else '')\n"
        f"sys.exit({exit_code})\n"
    )
    program.chmod(0o755)
    return directory / "argv.json"


def test_devtunnel_port_url_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shown = {
        "tunnel": {
            "tunnelId": "quiet-river-123.euw",
            "ports": [
                {
                    "portNumber": 9090,
                    "protocol": "auto",
                    "portForwardingUris": ["https://x-9090.euw.devtunnels.ms/"],
                },
                {
                    "portNumber": 8080,
                    "protocol": "auto",
                    "portForwardingUris": ["https://quiet-river-123-8080.euw.devtunnels.ms/"],
                },
            ],
        }
    }
    argv = write_fake_devtunnel(tmp_path, json.dumps(shown))
    monkeypatch.setenv("PATH", str(tmp_path))
    url = devtunnel_public_url(8080, tunnel_id="quiet-river-123")
    assert url == "https://quiet-river-123-8080.euw.devtunnels.ms/"
    assert json.loads(argv.read_text()) == ["show", "quiet-river-123", "--json"]


def test_devtunnel_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TunnelError, match="devtunnel CLI is not installed"):
        devtunnel_public_url(8080)

    write_fake_devtunnel(tmp_path, "Tunnel ID : quiet-river-123\n")
    with pytest.raises(TunnelError, match=r"could not read the output .* as JSON"):
        devtunnel_public_url(8080)

    write_fake_devtunnel(tmp_path, json.dumps({"tunnel": {"ports": [{"portNumber": 9090}]}}))
    with pytest.raises(
        TunnelError, match=r"has no port 8080 \(it lists ports \[9090\]\)"
    ) as no_port:
        devtunnel_public_url(8080)
    # The tunnel it says to create is one Graph can reach: anonymous, not private to its owner.
    assert "`devtunnel create --allow-anonymous`" in str(no_port.value)

    write_fake_devtunnel(tmp_path, "", exit_code=1)
    with pytest.raises(TunnelError, match=r"failed \(fake devtunnel error\)"):
        devtunnel_public_url(8080)


# -- the bot as a process ---------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on at the moment, on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class BotProcess:
    """``callbot run tests.hosting_bot:bot`` on 127.0.0.1, its stderr read as it comes."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        port: int,
        log: asyncio.StreamReader | None = None,
        log_pipe: tuple[Path, asyncio.ReadTransport] | None = None,
    ) -> None:
        self.process = process
        self._port = port
        self.lines: list[str] = []
        self._log_pipe = log_pipe
        self._reader = asyncio.ensure_future(self._read(log or process.stderr))

    @property
    def port(self) -> int:
        """The port the bot listens on: with none asked for, the one its ``listening`` line
        names (the system picked it, so no other process can have taken it meanwhile)."""
        if self._port == 0:
            bound = [e["port"] for e in self.events() if e.get("event") == "listening"]
            assert bound, f"the bot has not said where it listens yet:\n{self.output()}"
            self._port = int(bound[0])
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(
        cls,
        env: Mapping[str, str],
        *extra: str,
        port: int | None = None,
        log_fifo: Path | None = None,
    ) -> BotProcess:
        """Start the bot; with ``log_fifo``, its stderr is a named pipe made there, which
        the test may stop reading (:meth:`hold_log`)."""
        port = 0 if port is None else port
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
        clean.update(env)
        clean.setdefault("CALLBOT_LOG_FORMAT", "json")
        command = [
            *(sys.executable, "-m", "callbot", "run", "tests.hosting_bot:bot"),
            *("--host", "127.0.0.1", "--port", str(port), *extra),
        ]
        options: dict[str, Any] = {
            "cwd": ROOT,
            "env": clean,
            "stdin": asyncio.subprocess.DEVNULL,
            "stdout": asyncio.subprocess.DEVNULL,
        }
        if log_fifo is None:
            process = await asyncio.create_subprocess_exec(
                *command, stderr=asyncio.subprocess.PIPE, **options
            )
            return cls(process, port)
        os.mkfifo(log_fifo)
        # Opened for reading first: a writer may then open it, and the reader sees no end
        # of file until the last writer is gone.
        read_end = os.open(log_fifo, os.O_RDONLY | os.O_NONBLOCK)
        write_end = os.open(log_fifo, os.O_WRONLY)
        log = asyncio.StreamReader()
        pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(log), os.fdopen(read_end, "rb", buffering=0)
        )
        try:
            process = await asyncio.create_subprocess_exec(*command, stderr=write_end, **options)
        except BaseException:
            pipe.close()
            raise
        finally:
            os.close(write_end)
        return cls(process, port, log, (log_fifo, pipe))

    def hold_log(self) -> None:
        """Stop reading the bot's log and fill its pipe: the bot's next line then waits, and
        the bot with it, until :meth:`release_log`."""
        assert self._log_pipe is not None, "start the bot with log_fifo to hold its log"
        path, pipe = self._log_pipe
        pipe.pause_reading()
        # A writer of its own, not blocking: the bot's stays as it is.
        filler = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            for chunk in (b"\n" * 4096, b"\n"):
                with contextlib.suppress(BlockingIOError):
                    while True:
                        os.write(filler, chunk)
        finally:
            os.close(filler)

    def release_log(self) -> None:
        """Read the bot's log again (the empty lines :meth:`hold_log` wrote are left out)."""
        assert self._log_pipe is not None
        self._log_pipe[1].resume_reading()

    async def _read(self, log: asyncio.StreamReader | None) -> None:
        assert log is not None
        async for raw in log:
            line = raw.decode(errors="replace").rstrip("\n")
            if line:
                self.lines.append(line)

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        parsed = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    parsed.append(entry)
        return parsed

    def output(self) -> str:
        return "\n".join(self.lines)

    def _says_where(self) -> bool:
        return any(e.get("event") == "listening" for e in self.events())

    async def wait_ready(self, session: aiohttp.ClientSession, within: float = 20.0) -> None:
        async with asyncio.timeout(within):
            while True:
                if self.process.returncode is not None:
                    await self._reader
                    raise AssertionError(f"the bot exited early:\n{self.output()}")
                if not self._says_where():
                    # Not before the bot says it listens: another process may hold the port
                    # picked for it and answer, and a signal sent then would find no handler.
                    await asyncio.sleep(0.05)
                    continue
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.base_url + "/readyz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.05)

    async def wait_exit(self, within: float = 20.0) -> int:
        async with asyncio.timeout(within):
            code = await self.process.wait()
            await self._reader
        return code

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._log_pipe is not None:
            self.release_log()  # a test that failed holding it: read on to the end
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 5)


@pytest.fixture
async def bot_processes() -> AsyncIterator[list[BotProcess]]:
    """Processes started by a test; killed at teardown if still running."""
    started: list[BotProcess] = []
    yield started
    for process in started:
        await process.close()


def bot_env(authority: TokenAuthority, output: Path, **extra: str) -> dict[str, str]:
    return {
        "CALLBOT_APP_ID": APP_ID,
        "CALLBOT_OPENID_CONFIG_URL": authority.openid_config_url,
        "CALLBOT_PUBLIC_URL": "https://bot.example.test",
        "CALLBOT_KEEP_ALIVE": "0",
        "HOSTING_BOT_OUTPUT": str(output),
        **extra,
    }


async def post_signed(
    session: aiohttp.ClientSession, bot: BotProcess, authority: TokenAuthority, call_id: str
) -> int:
    async with session.post(
        bot.base_url + "/api/calls",
        data=json.dumps(b.notifications(b.incoming_call(call_id))),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {authority.mint(audience=APP_ID)}",
        },
    ) as response:
        return response.status


async def signal_twice(bot: BotProcess, signum: signal.Signals) -> None:
    """Send ``signum``, and once the bot says it drains, send it again."""
    bot.process.send_signal(signum)
    await until(lambda: any(e.get("event") == "draining" for e in bot.events()), within=20)
    bot.process.send_signal(signum)


async def bot_running_a_handler(
    authority: TokenAuthority,
    bot_processes: list[BotProcess],
    output: Path,
    call_id: str,
    *,
    log_fifo: Path | None = None,
    **env: str,
) -> BotProcess:
    """A bot (handlers held until released) whose handler for ``call_id`` has started."""
    bot = await BotProcess.start(
        bot_env(authority, output, HOSTING_BOT_RELEASE="1", **env), log_fifo=log_fifo
    )
    bot_processes.append(bot)
    async with client_session() as session:
        await bot.wait_ready(session)
        assert await post_signed(session, bot, authority, call_id) == 202
        await wait_for_line(output, f"start {call_id}", bot)
    return bot


async def wait_for_line(path: Path, line: str, bot: BotProcess, within: float = 10.0) -> None:
    def written() -> bool:
        return path.exists() and line in path.read_text().splitlines()

    try:
        await until(written, within)
    except TimeoutError:
        raise AssertionError(f"{line!r} never written; bot output:\n{bot.output()}") from None


async def poll_readyz_until_exit(
    session: aiohttp.ClientSession, bot: BotProcess, *, release: bool = False
) -> list[int | str]:
    """Ask /readyz as fast as possible until the process exits; return what it said.

    With ``release``, the handler is let go (SIGUSR1) once /readyz said 503."""
    seen: list[int | str] = []
    async with asyncio.timeout(30):
        while bot.process.returncode is None:
            try:
                async with session.get(
                    bot.base_url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)
                ) as response:
                    seen.append(response.status)
            except (aiohttp.ClientError, TimeoutError):
                seen.append("no answer")
            if release and 503 in seen:
                release = False
                bot.process.send_signal(signal.SIGUSR1)
            await asyncio.sleep(0.01)
    return seen


def client_session() -> aiohttp.ClientSession:
    # A fresh connection per request: a kept-alive one may be closed under us by the exit.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def test_sigterm_drains_lets_the_handler_finish_and_exits_zero(
    authority: TokenAuthority, bot_processes: list[BotProcess], tmp_path: Path
) -> None:
    output = tmp_path / "handled.txt"
    bot = await BotProcess.start(bot_env(authority, output, HOSTING_BOT_RELEASE="1"))
    bot_processes.append(bot)
    async with client_session() as session:
        await bot.wait_ready(session)
        assert await post_signed(session, bot, authority, "drain-1") == 202
        await wait_for_line(output, "start drain-1", bot)

        bot.process.send_signal(signal.SIGTERM)
        # The handler finishes only once readiness has failed: no race with the drain.
        readyz = await poll_readyz_until_exit(session, bot, release=True)

    assert await bot.wait_exit() == 0, bot.output()
    assert output.read_text().splitlines() == ["start drain-1", "done drain-1"]
    # Readiness failed after the signal, while the process still answered.
    assert 503 in readyz, readyz
    names = [entry.get("event") for entry in bot.events()]
    assert names.index("shutdown_requested") < names.index("draining") < names.index("bot_stopped")
    assert "notification_abandoned" not in names


async def test_a_handler_outliving_the_shutdown_timeout_is_logged_as_abandoned(
    authority: TokenAuthority, bot_processes: list[BotProcess], tmp_path: Path
) -> None:
    output = tmp_path / "handled.txt"
    env = bot_env(authority, output, HOSTING_BOT_SLEEP="60", CALLBOT_SHUTDOWN_TIMEOUT="0.5")
    bot = await BotProcess.start(env)
    bot_processes.append(bot)
    async with client_session() as session:
        await bot.wait_ready(session)
        assert await post_signed(session, bot, authority, "abandon-1") == 202
        await wait_for_line(output, "start abandon-1", bot)
        bot.process.send_signal(signal.SIGTERM)

    assert await bot.wait_exit() == 0, bot.output()
    assert output.read_text().splitlines() == ["start abandon-1"]
    abandoned = [e for e in bot.events() if e.get("event") == "notification_abandoned"]
    assert len(abandoned) == 1, bot.output()
    assert abandoned[0]["call_id"] == "abandon-1"
    assert abandoned[0]["level"] == "error"
    assert abandoned[0]["kind"] == "IncomingCall"


async def test_a_second_signal_stops_the_drain_and_abandons_the_running_handler(
    authority: TokenAuthority, bot_processes: list[BotProcess], tmp_path: Path
) -> None:
    """Ctrl-C twice: the first drains, the second stops waiting for the handler (which
    would otherwise have all of a shutdown_timeout that outlasts the test)."""
    output = tmp_path / "handled.txt"
    bot = await bot_running_a_handler(
        authority, bot_processes, output, "hurry-1", CALLBOT_SHUTDOWN_TIMEOUT="600"
    )
    await signal_twice(bot, signal.SIGINT)

    assert await bot.wait_exit() == 0, bot.output()
    assert output.read_text().splitlines() == ["start hurry-1"]
    entries = bot.events()
    hurried = [e for e in entries if e.get("event") == "shutdown_hurried"]
    assert len(hurried) == 1, bot.output()
    assert hurried[0]["signal"] == "SIGINT"
    abandoned = [e for e in entries if e.get("event") == "notification_abandoned"]
    assert [(e["call_id"], e["kind"]) for e in abandoned] == [("hurry-1", "IncomingCall")]
    names = [e.get("event") for e in entries]
    assert names.index("draining") < names.index("shutdown_hurried") < names.index("bot_stopped")


async def test_a_request_still_in_progress_after_the_drain_does_not_hold_the_exit(
    authority: TokenAuthority, bot_processes: list[BotProcess], tmp_path: Path
) -> None:
    """A signed callback whose body stops halfway: after the drain it is cut (Graph retries
    it) instead of being waited for, here for as long as its 600 s body timeout."""
    bot = await BotProcess.start(
        bot_env(authority, tmp_path / "handled.txt", CALLBOT_BODY_TIMEOUT="600")
    )
    bot_processes.append(bot)
    async with client_session() as session:
        await bot.wait_ready(session)
    body = json.dumps(b.notifications(b.incoming_call("half-1"))).encode()
    token = authority.mint(audience=APP_ID)
    reader, writer = await asyncio.open_connection("127.0.0.1", bot.port)
    try:
        writer.write(
            b"POST /api/calls HTTP/1.1\r\nHost: bot\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Expect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        # aiohttp says 100 Continue once the request has reached the app: it is in progress.
        async with asyncio.timeout(20):
            assert await reader.readline() == b"HTTP/1.1 100 Continue\r\n"
            assert await reader.readline() == b"\r\n"
        writer.write(body[: len(body) // 2])
        await writer.drain()
        bot.process.send_signal(signal.SIGTERM)

        assert await bot.wait_exit() == 0, bot.output()
        async with asyncio.timeout(20):
            rest = await reader.read()
        assert b"202" not in rest, rest
    finally:
        writer.close()
    names = [e.get("event") for e in bot.events()]
    assert names.index("draining") < names.index("bot_stopped"), bot.output()


async def test_a_path_or_method_the_bot_does_not_serve_is_logged_and_counted(
    authority: TokenAuthority, bot_processes: list[BotProcess], tmp_path: Path
) -> None:
    """Graph set to post to the wrong path got aiohttp's 404 and not one line (the access log
    is off): the author saw nothing. The answers stay aiohttp's; each kind of refusal writes
    one line a second at most, however many scanners ask."""
    bot = await BotProcess.start(bot_env(authority, tmp_path / "handled.txt"))
    bot_processes.append(bot)
    secret = "query-secret-value"
    async with client_session() as session:
        await bot.wait_ready(session)
        async with session.post(
            bot.base_url + f"/api/call?code={secret}",
            data=json.dumps(b.notifications(b.incoming_call("lost-1"))),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {authority.mint(audience=APP_ID)}",
            },
        ) as response:
            assert (response.status, await response.text()) == (404, "404: Not Found")
        async with session.get(bot.base_url + "/api/calls") as response:
            assert (response.status, response.headers["Allow"]) == (405, "POST")
        async with session.post(
            bot.base_url + "/api/calls", data=b"{}", headers={"Expect": "the-moon"}
        ) as response:
            assert response.status == 417
        for n in range(30):
            async with session.get(bot.base_url + f"/wp-login-{n}.php") as response:
                assert response.status == 404
        async with session.get(bot.base_url + "/metrics") as response:
            text = await response.text()
    closed = "callbot_connections_closed_total"
    assert sample_value(text, closed, {"reason": "path_not_served"}) == 31
    assert sample_value(text, closed, {"reason": "method_not_allowed"}) == 1
    assert sample_value(text, closed, {"reason": "expectation_failed"}) == 1

    def logged(event: str) -> list[dict[str, Any]]:
        return [e for e in bot.events() if e.get("event") == event]

    await until(
        lambda: all(
            logged(event)
            for event in ("path_not_served", "method_not_allowed", "expectation_failed")
        ),
        20,
    )
    served = ["POST /api/calls", "GET /healthz", "GET /readyz", "GET /metrics"]
    lost = logged("path_not_served")
    assert {k: lost[0][k] for k in ("level", "status", "method", "path", "served")} == {
        "level": "warning",
        "status": 404,
        "method": "POST",
        "path": "/api/call",
        "served": served,
    }
    # One line, then at most one a second, saying how many it left out.
    assert 1 <= len(lost) < 31
    assert sum(1 + e.get("suppressed", 0) for e in lost) <= 31
    [wrong_method] = logged("method_not_allowed")
    assert {k: wrong_method[k] for k in ("status", "method", "path", "allowed", "served")} == {
        "status": 405,
        "method": "GET",
        "path": "/api/calls",
        "allowed": ["POST"],
        "served": served,
    }
    [expectation] = logged("expectation_failed")
    assert {k: expectation[k] for k in ("status", "method", "path", "expect")} == {
        "status": 417,
        "method": "POST",
        "path": "/api/calls",
        "expect": "the-moon",
    }
    assert secret not in bot.output()
    assert not (tmp_path / "handled.txt").exists()


async def idle_connection(bot: BotProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the bot that has had its answer and is kept open, idle."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bot.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: bot\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(20):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
    return reader, writer


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_while_the_bot_closes_after_the_drain_is_one_line(
    authority: TokenAuthority,
    bot_processes: list[BotProcess],
    tmp_path: Path,
    signum: signal.Signals,
) -> None:
    """After the drain the bot closes its connections, store and sessions with no handler
    for SIGINT or SIGTERM: a Ctrl-C then was a KeyboardInterrupt traceback (exit -2), a
    SIGTERM the end of the process before it had closed (exit -15). The bot is held there
    by its own log: the test stops reading it, so its last line waits."""
    output = tmp_path / "handled.txt"
    bot = await bot_running_a_handler(
        authority,
        bot_processes,
        output,
        "closing-1",
        log_fifo=tmp_path / "bot.log",
        CALLBOT_IDLE_TIMEOUT="600",
    )
    # Closed by the bot once the drain is over, as the first thing it closes.
    reader, writer = await idle_connection(bot)
    try:
        bot.process.send_signal(signal.SIGTERM)
        await until(lambda: any(e.get("event") == "draining" for e in bot.events()), within=20)
        bot.hold_log()
        bot.process.send_signal(signal.SIGUSR1)  # the handler finishes, and the drain with it
        async with asyncio.timeout(20):
            assert await reader.read() == b""
        # The bot is closing, and stays there until its log is read again.
        bot.process.send_signal(signum)
        bot.release_log()
        assert await bot.wait_exit() == 0, bot.output()
    finally:
        writer.close()
    assert output.read_text().splitlines() == ["start closing-1", "done closing-1"]
    assert "Traceback" not in bot.output()
    entries = bot.events()
    ignored = [e for e in entries if e.get("event") == "shutdown_signal_ignored"]
    assert [(e["signal"], e["level"]) for e in ignored] == [(signum.name, "info")], bot.output()
    assert "already closing" in ignored[0]["detail"]
    names = [e.get("event") for e in entries]
    assert "shutdown_hurried" not in names
    assert names.index("draining") < names.index("bot_stopped")


async def test_a_signal_after_the_one_that_hurried_the_drain_is_one_line(
    authority: TokenAuthority, bot_processes: list[BotProcess], tmp_path: Path
) -> None:
    """A third signal said nothing (or, once the bot was closing, ended the process). The
    second and third are sent while the bot's log is not read, so that it stops at its
    next line, and are different signals, so that the two cannot merge into one."""
    output = tmp_path / "handled.txt"
    bot = await bot_running_a_handler(
        authority,
        bot_processes,
        output,
        "third-1",
        log_fifo=tmp_path / "bot.log",
        CALLBOT_SHUTDOWN_TIMEOUT="600",
    )
    bot.process.send_signal(signal.SIGINT)
    await until(lambda: any(e.get("event") == "draining" for e in bot.events()), within=20)
    bot.hold_log()
    bot.process.send_signal(signal.SIGINT)
    bot.process.send_signal(signal.SIGTERM)
    bot.release_log()

    assert await bot.wait_exit() == 0, bot.output()
    assert "Traceback" not in bot.output()
    entries = bot.events()
    said = [(e["event"], e["signal"]) for e in entries if "signal" in e]
    # Two signals sent together arrive in either order: one hurries, the other is ignored.
    assert [event for event, _ in said] == ["shutdown_hurried", "shutdown_signal_ignored"]
    assert sorted(name for _, name in said) == ["SIGINT", "SIGTERM"]
    abandoned = [e["call_id"] for e in entries if e.get("event") == "notification_abandoned"]
    assert abandoned == ["third-1"]


@pytest.mark.parametrize("handlers", ["loop", "signal", "none"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_once_serve_returns_the_application_s_own_signal_handlers_are_back(
    authority: TokenAuthority, tmp_path: Path, handlers: str, signum: signal.Signals
) -> None:
    """An application serving the bot in its own event loop had handlers for SIGINT and
    SIGTERM before ``serve``: the bot's replace them while it serves, and once ``serve``
    returns the application's get the signals again. Those added to the loop
    (``loop.add_signal_handler``) were lost: a SIGTERM then did nothing at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    env.update(bot_env(authority, tmp_path / "handled.txt"), EMBEDDED_BOT_HANDLERS=handlers)
    env["CALLBOT_LOG_FORMAT"] = "json"
    log = tmp_path / "bot.log"
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tests.embedded_bot"),
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
        )
    assert process.stdout is not None

    async def next_line() -> str:
        async with asyncio.timeout(30):
            line = await process.stdout.readline()  # type: ignore[union-attr]
        assert line, f"no more output; the bot's log:\n{log.read_text()}"
        return line.decode().rstrip("\n")

    try:
        assert await next_line() == "serving"
        process.send_signal(signal.SIGTERM)  # the bot's: it stops, not the application
        assert await next_line() == "serve returned"
        process.send_signal(signum)
        if handlers != "none":
            assert await next_line() == f"own handler {signum.name}"
        elif signum is signal.SIGINT:
            assert await next_line() == "KeyboardInterrupt"  # asyncio.run's own, as before
        async with asyncio.timeout(30):
            code = await process.wait()
        # Python's default for SIGTERM ends the process.
        assert code == (-signal.SIGTERM if (handlers, signum) == ("none", signal.SIGTERM) else 0)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("public_url_set", [False, True])
async def test_run_with_ngrok_takes_the_public_url_from_the_agent(
    authority: TokenAuthority, bot_processes: list[BotProcess], tmp_path: Path, public_url_set: bool
) -> None:
    """A ``CALLBOT_PUBLIC_URL`` set all the same is replaced, and a warning says so (it was
    replaced silently)."""
    env = bot_env(authority, tmp_path / "handled.txt")
    set_before = env.pop("CALLBOT_PUBLIC_URL")
    if public_url_set:
        env["CALLBOT_PUBLIC_URL"] = set_before
    # The fake agent needs the bot's port before the bot starts: pick it here.
    port = free_port()
    document = {
        "tunnels": [ngrok_tunnel("https://dev-bot.ngrok.example", f"http://localhost:{port}")]
    }
    async with fake_ngrok_agent(document) as api, client_session() as session:
        env["CALLBOT_NGROK_API"] = api
        bot = await BotProcess.start(env, "--tunnel", "ngrok", port=port)
        bot_processes.append(bot)
        await bot.wait_ready(session)
        bot.process.send_signal(signal.SIGTERM)
        assert await bot.wait_exit() == 0, bot.output()
    found = [e for e in bot.events() if e.get("event") == "tunnel_found"]
    assert [(e["kind"], e["public_url"]) for e in found] == [
        ("ngrok", "https://dev-bot.ngrok.example")
    ]
    replaced = [e for e in bot.events() if e.get("event") == "public_url_replaced_by_tunnel"]
    expected = [(set_before, "https://dev-bot.ngrok.example")] if public_url_set else []
    assert [(e["was"], e["now"]) for e in replaced] == expected


async def test_run_with_ngrok_but_no_agent_stops_with_a_message(
    authority: TokenAuthority, bot_processes: list[BotProcess], tmp_path: Path
) -> None:
    env = bot_env(authority, tmp_path / "handled.txt")
    env["CALLBOT_NGROK_API"] = f"http://127.0.0.1:{free_port()}"
    bot = await BotProcess.start(env, "--tunnel", "ngrok", port=8080)
    bot_processes.append(bot)
    assert await bot.wait_exit() == 2
    assert "callbot: no ngrok agent answers at" in bot.output()
    assert "ngrok http 8080" in bot.output()


async def test_a_tunnel_needs_a_fixed_port(
    authority: TokenAuthority, bot_processes: list[BotProcess], tmp_path: Path
) -> None:
    bot = await BotProcess.start(bot_env(authority, tmp_path / "handled.txt"), "--tunnel", "ngrok")
    bot_processes.append(bot)
    assert await bot.wait_exit() == 2
    assert bot.output() == "callbot: a tunnel forwards to a fixed port: give --port a number, not 0"


async def test_port_0_listens_on_a_free_port_and_says_which(
    authority: TokenAuthority, bot_processes: list[BotProcess], tmp_path: Path
) -> None:
    bot = await BotProcess.start(bot_env(authority, tmp_path / "handled.txt"))
    bot_processes.append(bot)
    async with client_session() as session:
        await bot.wait_ready(session)
    listening = [e for e in bot.events() if e.get("event") == "listening"]
    assert len(listening) == 1
    assert listening[0]["port"] == bot.port != 0
    assert listening[0]["host"] == "127.0.0.1"


async def test_the_forwarded_scheme_is_logged_only_from_a_trusted_proxy(
    authority: TokenAuthority, serve: Any
) -> None:
    headers = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    for trusted, scheme in (((), "http"), (("127.0.0.1/32",), "https")):
        server: BotServer = await serve(make_bot(authority, trusted_proxies=trusted))
        with capture_logs() as logs:
            await server.post(
                b.notifications(b.incoming_call("s")), token="garbage", headers=headers
            )
        [refusal] = [e for e in logs if e["event"] == "callback_refused"]
        assert refusal["scheme"] == scheme


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_redis_unreachable_at_start_is_logged(authority: TokenAuthority) -> None:
    bot = make_bot(authority, store=f"redis://127.0.0.1:{unused_port()}/0")
    with capture_logs() as logs:
        await bot.start()
        try:
            assert not bot.ready
        finally:
            await bot.stop()
    assert [e["event"] for e in logs if e["event"] == "store_unreachable"] == ["store_unreachable"]


async def test_an_unreadable_certificate_stops_the_start(
    authority: TokenAuthority, tmp_path: Path
) -> None:
    """It was a warning, then a bot ready for callbacks that could answer no call."""
    bot = make_bot(authority, certificate_path=str(tmp_path / "missing.pem"))
    try:
        with pytest.raises(ConfigurationError, match="certificate"):
            await bot.start()
    finally:
        await bot.stop()


async def test_the_bot_listens_and_obeys_stop_while_the_token_endpoint_hangs(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """The app token is fetched in the background: a token endpoint that never answers
    keeps the bot neither from listening (liveness probes, Graph) nor from stopping."""
    asked, released = asyncio.Event(), asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        asked.set()
        await released.wait()
        return web.Response(status=503)

    async with plain_server(hang) as url:
        bot = make_bot(
            authority,
            app_secret="secret",
            authority_url=url,
            graph_request_timeout=3600.0,
            graph_retry_time=3600.0,
        )
        port = unused_port()
        stop = asyncio.Event()
        serving = asyncio.create_task(bot.serve("127.0.0.1", port, stop=stop))

        try:
            await asyncio.wait_for(asked.wait(), 30)  # the token request is in flight
            async with asyncio.timeout(30):  # bounded: before the fix it never listened
                # A socket to poll, no event to wait on.
                while not await healthz_answers(f"http://127.0.0.1:{port}"):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(asyncio.shield(serving), 30)
        finally:
            released.set()
            stop.set()
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving
            await bot.stop()


async def test_deeply_nested_junk_from_the_ngrok_agent_is_a_tunnel_error() -> None:
    async def junk(request: web.Request) -> web.Response:
        return web.Response(text="[" * 100_000 + "]" * 100_000)

    async with plain_server(junk) as url:
        with pytest.raises(TunnelError, match="did not answer JSON"):
            await ngrok_public_url(8080, api_url=url)


async def healthz_answers(base_url: str) -> bool:
    """Whether a server at ``base_url`` answers ``/healthz`` with 200 (not at all: False)."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base_url}/healthz") as response,
        ):
            return response.status == 200
    except aiohttp.ClientError:
        return False


def dual_stack_loopback() -> bool:
    """Whether this host has IPv6 loopback and sockets that take both families."""
    return socket.has_dualstack_ipv6() and ipv6_loopback()


@contextlib.asynccontextmanager
async def serving_on_every_address(bot: CallBot) -> AsyncIterator[int]:
    """``bot.serve("::", port)`` until the block ends; yields the port, once [::1] answers."""
    if not dual_stack_loopback():
        pytest.skip("no IPv6 loopback or no dual-stack sockets here")
    async with serving_in_process(bot, "::", "[::1]") as port:
        yield port


@contextlib.asynccontextmanager
async def serving_in_process(
    bot: CallBot, host: str = "127.0.0.1", probe_host: str = "127.0.0.1"
) -> AsyncIterator[int]:
    """``bot.serve(host, port)`` until the block ends; yields the port, once it answers."""
    port = unused_port()
    stop = asyncio.Event()
    serving = asyncio.create_task(bot.serve(host, port, stop=stop))

    async def answers() -> bool:
        if serving.done():
            serving.result()  # the bot failed to serve: say why
        return await healthz_answers(f"http://{probe_host}:{port}")

    try:
        async with asyncio.timeout(30):
            while not await answers():  # noqa: ASYNC110 - a socket, no event to wait on
                await asyncio.sleep(0.05)
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)


async def test_a_417_an_authors_route_answers_itself_is_not_an_expect_refusal(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """Every 417 was logged and counted as ``expectation_failed``, the bot's refusal of an
    ``Expect`` it does not take, a 417 that a route the author added answered included."""
    reserved: list[str | None] = []

    class ReservingBot(CallBot):
        def create_app(self) -> web.Application:
            app = super().create_app()

            async def reserve(request: web.Request) -> web.Response:
                reserved.append(request.headers.get("Expect"))
                raise web.HTTPExpectationFailed(text="the slot is taken")

            app.router.add_post("/reservations", reserve)
            return app

    bot = ReservingBot(make_bot(authority).settings)
    async with serving_in_process(bot) as port, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/reservations"
        with capture_logs() as logs:
            async with session.post(url, data=b"{}") as response:
                assert response.status == 417
            async with session.post(url, data=b"{}", expect100=True) as response:
                assert response.status == 417
            # aiohttp's own answer to an Expect it does not take: the handler never runs.
            async with session.post(url, data=b"{}", headers={"Expect": "the-moon"}) as response:
                assert response.status == 417
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    assert reserved == [None, "100-continue"]
    closed = "callbot_connections_closed_total"
    assert sample_value(text, closed, {"reason": "expectation_failed"}) == 1
    refusals = [e for e in logs if e["event"] == "expectation_failed"]
    assert [(e["path"], e["expect"]) for e in refusals] == [("/reservations", "the-moon")]


async def test_listening_on_every_ipv6_address_takes_ipv4_clients_too(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """``::`` is every address, as in other servers: a bot set to it still answers the
    image's health check on 127.0.0.1, and a proxy that connects over IPv4."""
    async with (
        serving_on_every_address(make_bot(authority)) as port,
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as response,
    ):
        assert response.status == 200


async def test_an_ipv6_address_in_brackets_is_listened_on(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """``CALLBOT_HOST=[::1]``, as URLs and the bot's own messages write an IPv6 address, failed
    to listen (``Name or service not known``), while ``[::]`` worked."""
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    bot = make_bot(authority, host="[::1]")
    async with serving_in_process(bot, bot.settings.host, "[::1]") as port:
        assert await healthz_answers(f"http://[::1]:{port}")


async def test_a_trusted_ipv4_proxy_is_trusted_on_every_address(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """On ``::`` an IPv4 proxy connects as ``::ffff:127.0.0.1``: still the trusted 127.0.0.1."""
    bot = make_bot(authority, trusted_proxies=("127.0.0.1/32",))
    async with serving_on_every_address(bot) as port, aiohttp.ClientSession() as session:
        logged: list[Any] = []
        for forwarded_for in ("203.0.113.7", None):
            headers = {"Content-Type": "application/json", "Authorization": "Bearer garbage"}
            if forwarded_for is not None:
                headers["X-Forwarded-For"] = forwarded_for
            with capture_logs() as logs:
                async with session.post(
                    f"http://127.0.0.1:{port}/api/calls",
                    data=json.dumps(b.notifications(b.incoming_call("v4"))),
                    headers=headers,
                ) as response:
                    assert response.status == 401
            [refusal] = [e for e in logs if e["event"] == "callback_refused"]
            logged.append(refusal.get("client"))
    # Without a forwarded address, the proxy itself, written as IPv4.
    assert logged == ["203.0.113.7", "127.0.0.1"]


async def test_a_path_not_served_names_the_client_a_trusted_proxy_forwarded(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """Behind a proxy, a wrong callback path was logged with the proxy's own address (and,
    on ``::``, in its IPv6 form), while the callback's lines name the forwarded client."""
    bot = make_bot(authority, trusted_proxies=("127.0.0.1/32",))
    async with serving_on_every_address(bot) as port, aiohttp.ClientSession() as session:
        with capture_logs() as logs:
            async with session.post(
                f"http://127.0.0.1:{port}/api/call", headers={"X-Forwarded-For": "203.0.113.7"}
            ) as response:
                assert response.status == 404
            # Another kind of refusal: each kind writes one line a second at most.
            async with session.get(f"http://127.0.0.1:{port}/api/calls") as response:
                assert response.status == 405
    clients = {
        e["event"]: e.get("client")
        for e in logs
        if e["event"] in ("path_not_served", "method_not_allowed")
    }
    assert clients == {"path_not_served": "203.0.113.7", "method_not_allowed": "127.0.0.1"}


async def test_an_expect_refusal_and_a_malformed_request_name_the_client_as_every_line_does(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """aiohttp refuses an ``Expect`` before any middleware runs: its line named the trusted
    proxy, not the client it forwarded; and a malformed request's line named an IPv4 peer
    of a dual-stack socket in its IPv6 form (``::ffff:127.0.0.1``)."""
    bot = make_bot(authority, trusted_proxies=("127.0.0.1/32",))
    async with serving_on_every_address(bot) as port, aiohttp.ClientSession() as session:
        with capture_logs() as logs:
            async with session.post(
                f"http://127.0.0.1:{port}/api/calls",
                data=b"{}",
                headers={"Expect": "the-moon", "X-Forwarded-For": "203.0.113.7"},
            ) as response:
                assert response.status == 417
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"NOT HTTP\r\n\r\n")
            answer = await reader.read()  # until the bot closes the connection
            writer.close()
    assert answer.split(b"\r\n", 1)[0].endswith(b"400 Bad Request")
    clients = {
        e.get("reason", e["event"]): e.get("client")
        for e in logs
        if e["event"] in ("expectation_failed", "connection_closed")
    }
    assert clients == {"expectation_failed": "203.0.113.7", "bad_request": "127.0.0.1"}


async def test_console_lines_show_control_characters_escaped(
    authority: TokenAuthority,
    serve: Any,
    logging_restored: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Console lines (``callbot run`` on a terminal, as behind the quickstart's tunnel) wrote
    a value as it came unless it held a space, a quote or a line break: U+009B, a terminal's
    one-character CSI, in a tracing header anyone may send without a token, and an escape
    sequence in a caller's name a handler logs, reached the terminal as escape sequences."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging("console", "info")
    bot = make_bot(authority)
    names: list[str] = []

    @bot.on(events.IncomingCall)
    async def greet(call: Call, event: events.IncomingCall) -> None:
        source = event.call.source
        name = (source.identity.display_name if source and source.identity else None) or ""
        structlog.get_logger("mybot").info("caller_named", name=name)
        logging.getLogger("mybot").info("caller %s joined", name)
        names.append(name)

    server: BotServer = await serve(bot)
    body = b.notifications(b.incoming_call("console-call", caller_name="Eve\x1b]0;owned\x07"))
    headers = {"X-Microsoft-Skype-Chain-ID": "chain\u009b2J"}
    assert (await server.post(body, token="garbage", headers=headers)).status == 401
    assert (await server.post(body)).status == 202
    await until(lambda: len(names) == 1)
    text = out.getvalue()
    for shown in ("callback_refused", "chain\\x9b2J", "Eve\\x1b]0;owned\\x07"):
        assert shown in text, shown
    # Lines end with a line break: no other control character reaches the terminal.
    assert {c for c in text if unicodedata.category(c) == "Cc"} <= {"\n"}
