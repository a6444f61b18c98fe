"""A bot driven in-process through its real receiver, without sockets.

:class:`InProcessBot` starts a :class:`callbot.CallBot` against a local
:class:`~callbot.testing.TokenAuthority` and hands each body to the bot's own
``Receiver.handle`` inside a minimal stand-in for an aiohttp request, so
authentication, parsing, sequencing, dispatch and the handler all run as in
production while the HTTP stack (the same for every bot) stays out of the figures.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, cast

from aiohttp import web
from multidict import CIMultiDict

from benchmarks._common import APP_ID, CALLBACK_PATH
from callbot import Call, CallBot, events
from callbot.testing import TokenAuthority


class _Content:
    def __init__(self, body: bytes) -> None:
        self._body = body

    async def readany(self) -> bytes:
        return self.read_nowait()

    def is_eof(self) -> bool:
        return True  # the whole body is here, as it usually is when a request is handled

    def read_nowait(self) -> bytes:
        body, self._body = self._body, b""
        return body


class _Request:
    """The parts of ``aiohttp.web.Request`` the receiver reads."""

    content_type = "application/json"
    charset: str | None = None  # the receiver reads it: no charset named, as JSON is UTF-8
    remote = "127.0.0.1"
    scheme = "https"

    def __init__(self, body: bytes, headers: CIMultiDict[str]) -> None:
        self.headers = headers
        self.content_length = len(body)
        self.content = _Content(body)

    app: Mapping[object, object] = MappingProxyType({})  # trusts no proxy


class InProcessBot:
    """A started bot with a counting no-op handler; ``post`` runs one request through it."""

    def __init__(
        self,
        *,
        on_event: Callable[[Call, events.Event], Awaitable[None]] | None = None,
        **settings: Any,
    ) -> None:
        self.authority = TokenAuthority()
        self.handled = 0
        self._settings = settings
        self._on_event = on_event
        self.bot: CallBot | None = None
        self._headers: CIMultiDict[str] | None = None

    async def __aenter__(self) -> InProcessBot:
        await self.authority.start()
        options: dict[str, Any] = {
            "app_id": APP_ID,
            "openid_config_url": self.authority.openid_config_url,
            "public_url": "https://bot.example.test",
            "callback_path": CALLBACK_PATH,
            # Calls here are never answered; their warnings would only add noise.
            "answer_warning_after": 3600.0,
        }
        options.update(self._settings)
        bot = CallBot(**options)
        extra = self._on_event

        @bot.on(events.Event)
        async def count(call: Call, event: events.Event) -> None:
            self.handled += 1
            if extra is not None:
                await extra(call, event)

        await bot.start()
        self.bot = bot
        token = self.authority.mint(audience=APP_ID, expires_in=3600)
        self._headers = CIMultiDict(
            {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bot is not None:
            await self.bot.stop()
        await self.authority.close()

    async def post(self, body: bytes) -> int:
        """Run one callback request through the receiver; its status."""
        assert self.bot is not None
        assert self._headers is not None
        request = cast("web.Request", _Request(body, self._headers))
        response = await self.bot.receiver.handle(request)
        return response.status
