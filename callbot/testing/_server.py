"""A loopback aiohttp server: what the testing kit's fakes have in common."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self

from aiohttp import web

__all__ = ["LocalServer"]


class LocalServer(abc.ABC):
    """Serves :meth:`create_app` on a local port; also an async context manager."""

    def __init__(self, *, host: str = "127.0.0.1") -> None:
        self.host = host
        """The address served on (loopback unless told otherwise)."""
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None

    @abc.abstractmethod
    def create_app(self) -> web.Application:
        """The aiohttp application this server serves."""

    async def start(self, host: str | None = None, port: int = 0) -> None:
        """Serve on ``host`` (default: the constructor's) and ``port`` (0 picks a free one)."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        if host is not None:
            self.host = host
        # A short grace keeps close() quick when a test left a slow request hanging.
        runner = web.AppRunner(self.create_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, port)
            await site.start()
            bound_port = runner.addresses[0][1]
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self._base_url = f"http://{shown}:{bound_port}"

    async def _before_close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release what would keep requests open (subclasses override)."""

    async def close(self) -> None:
        """Stop serving."""
        await self._before_close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """``http://host:port`` (after :meth:`start`)."""
        if self._base_url is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._base_url
