"""Shared fixtures: a local token authority and a bot served on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from callbot import CallBot, ConfigurationError
from callbot.testing import TEST_TENANT_ID, FakeGraph, TokenAuthority

FIXTURES = Path(__file__).parent / "fixtures"
APP_ID = "6c4a7c4e-2b1a-4d7e-9a53-7a1bfb4c0d11"


def pytest_configure(config: pytest.Config) -> None:
    # A suite started as a background job of a script inherits SIGINT ignored, and so would
    # the processes its Ctrl-C tests interrupt: they get it as from a terminal instead.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def load_notification_text(name: str) -> str:
    """The documented body exactly as written (possibly not strict JSON)."""
    return (FIXTURES / "notifications" / name).read_text(encoding="utf-8")


def normalized_json(text: str) -> Any:
    """Documented bodies with // comments and trailing commas removed, parsed."""
    out: list[str] = []
    in_string = escaped = False
    i = 0
    while i < len(text):
        ch = text[i]
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif text.startswith("//", i):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        else:
            out.append(ch)
        i += 1
    return json.loads(re.sub(r",(\s*[}\]])", r"\1", "".join(out)))


@contextlib.asynccontextmanager
async def plain_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """``handler`` answering every path on 127.0.0.1 (a free port): its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class Clock:
    """The running loop's clock, stopped where it stands and moved on by hand.

    Real servers on 127.0.0.1 still answer; only what reads the loop's time (timers,
    sleeps, timeouts, back-offs) waits for :meth:`advance`. ``until`` would wait for ever.
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.now = loop.time()
        loop.time = lambda: self.now  # type: ignore[method-assign]

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for _ in range(5):  # due timers, then the tasks they start
            await asyncio.sleep(0)


@pytest.fixture(scope="session", autouse=True)
def current_event_loop() -> Iterator[None]:
    """A current event loop for the session, closed at its end. pytest-asyncio asks for the
    current loop around each async test, and where none is set (a synchronous test ran
    first) makes one it never closes, whose ResourceWarning then fails a later test
    (pytest-asyncio issue 724): ``pytest tests/test_recorded.py`` failed so."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture
async def clock() -> AsyncIterator[Clock]:
    """The loop's clock, moved by hand (see :class:`Clock`); request it after servers."""
    loop = asyncio.get_running_loop()
    real = loop.time
    yield Clock()
    loop.time = real  # type: ignore[method-assign]


async def spin(predicate: Callable[[], bool], turns: int = 200_000) -> None:
    """Wait until ``predicate()`` holds, with the loop's clock stopped (no timer runs)."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until ``predicate()`` holds; fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polling state that has no event to wait on
            await asyncio.sleep(0.01)


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """For a test that configures logging as ``callbot run`` does: put things back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**saved)
    logging.captureWarnings(False)


def notification_files() -> list[str]:
    return sorted(p.name for p in (FIXTURES / "notifications").glob("*.json"))


@pytest.fixture
async def authority() -> AsyncIterator[TokenAuthority]:
    issuer = TokenAuthority()
    await issuer.start()
    try:
        yield issuer
    finally:
        await issuer.close()


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    """A FakeGraph on 127.0.0.1 for the test."""
    async with FakeGraph() as fake:
        yield fake


class BotServer:
    """A bot served on 127.0.0.1, and a way to post signed notifications to it."""

    def __init__(self, bot: CallBot, client: TestClient[Any, Any], authority: TokenAuthority):
        self.bot = bot
        self.client = client
        self.authority = authority

    def token(self, **claims: Any) -> str:
        return self.authority.mint(audience=self.bot.settings.app_id, **claims)

    async def post(
        self,
        body: Any,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> ClientResponse:
        data = raw if raw is not None else json.dumps(body).encode()
        all_headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token or self.token()}",
        }
        all_headers.update(headers or {})
        # Graph does not follow a 302 as a browser would: the test reads the bot's answer.
        return await self.client.post(
            self.bot.settings.callback_path,
            data=data,
            headers=all_headers,
            allow_redirects=False,
        )


BotFactory = Callable[..., "AsyncIterator[BotServer]"]


def make_bot(authority: TokenAuthority, **options: Any) -> CallBot:
    settings: dict[str, Any] = {
        "app_id": APP_ID,
        "tenant_id": TEST_TENANT_ID,
        "openid_config_url": authority.openid_config_url,
        "public_url": "https://bot.example.test",
        "keep_alive": False,
        "reorder_window": 0.2,
        "termination_grace": 5.0,
        "shutdown_timeout": 2.0,
    }
    settings.update(options)
    return CallBot(**settings)


def bot_on_path(authority: TokenAuthority, callback_path: str) -> CallBot | None:
    """A bot whose callback path is ``callback_path``, or ``None`` when the settings refuse
    it (the refusal naming ``CALLBOT_CALLBACK_PATH``)."""
    try:
        return make_bot(authority, callback_path=callback_path)
    except ConfigurationError as exc:
        refusal = str(exc)
    assert "CALLBOT_CALLBACK_PATH" in refusal
    return None


@pytest.fixture
async def serve(
    authority: TokenAuthority,
) -> AsyncIterator[Callable[..., Any]]:
    """``await serve(bot)`` starts the bot's app on 127.0.0.1 and returns a BotServer."""
    clients: list[TestClient[Any, Any]] = []

    async def start(bot: CallBot) -> BotServer:
        client: TestClient[Any, Any] = TestClient(TestServer(bot.create_app(), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return BotServer(bot, client, authority)

    yield start
    for client in clients:
        await client.close()


def ipv6_loopback() -> bool:
    """Whether this host can listen on the IPv6 loopback (``::1``)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True
