"""Inbound connections: deadlines, a bound on how many are open, quiet refusals.

aiohttp waits for request headers forever and writes a traceback (with the
offending header, tokens included) for every malformed request. The bot's own
listener (``CallBot.serve``) uses :class:`ConnectionGuard` instead:

* request headers must arrive within ``header_timeout`` of their first byte (one
  sweep checks every connection four times per timeout, so a late one closes
  within 1.25 times it), and take at most :data:`MAX_HEADER_BYTES` (else a bare
  ``431`` and the connection closes);
* an idle connection (fresh, or between requests) closes after ``idle_timeout``
  (aiohttp's keep-alive timeout, set by ``CallBot.create_app``);
* at most ``max_connections`` are open: a new one closes the longest-idle
  connection, or is itself closed when every open one is busy with a request. One
  still sending a body, for a route of the author's or a callback, counts as idle from
  when its body began (:func:`displaceable`): a sender proves nothing by sending, and a
  callback's token may be any tenant's, so trickled bodies cannot keep Graph's callbacks out;
* malformed requests get a bare ``400 Bad Request`` and accept errors (no file
  descriptors left) one log line each, at most once per ``log_interval`` per
  kind, counted in ``callbot_connections_closed_total``;
* a request for a path the bot does not serve (aiohttp's ``404``), with a method
  its path does not take (``405``), or with an ``Expect`` other than ``100-continue``
  (``417``) is answered as aiohttp answers it and logged and counted the same way,
  since the access log is off.

The body deadline (``body_timeout``) is kept by what reads bodies: the receiver, and
for routes of the author's (``CallBot.add_routes``) ``callbot._routes``; so is the bound
on the bytes their bodies hold at once (:class:`BodyBudget`, one for each). Those routes'
connections are guarded as the callback's are: the guard wraps the whole server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from http import HTTPStatus
from typing import Any

from aiohttp import StreamReader, hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestHandler

from ._clock import loop_time
from ._log import RateLimitedLog, get_logger
from ._proxy import forwarded_client, peer_address

__all__ = ["MAX_HEADER_BYTES", "BodyBudget", "ConnectionGuard", "displaceable"]

log = get_logger("callbot.server")

_ACCEPT_FAILED = "socket.accept() out of system resource"
# As much of a refused request's path as a log line shows (a scanner's may be 8 KiB long).
_PATH_SHOWN = 256
MAX_HEADER_BYTES = 64 * 1024
"""The most a request's line and headers may take while they are still arriving, in bytes.
Graph's take 2 to 4 KB (its token about 1.5); aiohttp alone takes 128 headers of 8 KiB each,
which a sender without a token held in the bot's memory on each connection (2 MB of it, 2 GB
on 1,000). Headers that end within a read are aiohttp's to bound: they are not held."""
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 36\r\nConnection: close\r\n\r\n431 Request Header Fields Too Large\n"
)


class ConnectionGuard:
    """Keeps the bot's inbound connections bounded in number and in time."""

    def __init__(
        self,
        *,
        header_timeout: float,
        max_connections: int,
        log_interval: float = 1.0,
    ) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.closed: Counter[str] = Counter()
        """reason -> connections closed or requests refused by the guard (for metrics)."""
        # Insertion order is the order of last activity: the first idle one is the oldest.
        self._open: dict[_Connection, None] = {}
        self._log = RateLimitedLog(log, lines=1, interval=log_interval)
        # One sweep for every connection's header deadline, not a timer per request.
        self._sweep: asyncio.TimerHandle | None = None
        self._served: list[str] | None = None

    def check_descriptor_limit(self) -> None:
        """Warn when the connection bound cannot be reached before descriptors run out."""
        try:
            import resource
        except ImportError:  # not on POSIX: nothing to compare with
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Keys, Graph, the store and the log need descriptors of their own.
        if soft != resource.RLIM_INFINITY and self.max_connections > soft - 64:
            log.warning(
                "max_connections_above_descriptor_limit",
                max_connections=self.max_connections,
                descriptor_limit=soft,
                hint="raise `ulimit -n` or lower CALLBOT_MAX_CONNECTIONS",
            )

    @property
    def open_connections(self) -> int:
        """How many inbound connections are open now."""
        return len(self._open)

    def protocol_factory(
        self, server: web.Server, **handler_options: Any
    ) -> Callable[[], RequestHandler]:
        """What ``loop.create_server`` needs: one guarded aiohttp handler per connection.

        ``server``'s request handler is wrapped so that each connection knows when its
        request's headers are in and when it was answered.
        """
        loop = asyncio.get_running_loop()
        if not isinstance(server.request_handler, _Guarded):
            # Around the app, not a middleware: aiohttp's middleware chain costs more per request.
            server.request_handler = _Guarded(server.request_handler)

        def make() -> RequestHandler:
            return _Connection(server, guard=self, loop=loop, **handler_options)

        return make

    def exception_handler(
        self, fallback: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]
    ) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
        """A loop exception handler that turns accept failures into one counted line."""

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if context.get("message") == _ACCEPT_FAILED:
                exc = context.get("exception")
                self.closed["accept_failed"] += 1
                self._log.warning(
                    "connection_accept_failed",
                    error=type(exc).__name__ if exc is not None else None,
                    errno=getattr(exc, "errno", None),
                    open_connections=len(self._open),
                    reason="no file descriptors left; asyncio retries in one second",
                )
                return
            fallback(loop, context)

        return handle

    # -- driven by the connections -------------------------------------------------

    def _admit(self, conn: _Connection) -> bool:
        if len(self._open) >= self.max_connections:
            oldest_idle = next((c for c in self._open if not c.busy or c.sending is not None), None)
            if oldest_idle is None:
                self._count("refused", "every open connection is busy")
                return False
            why = "the connection bound was reached; "
            if oldest_idle.busy:
                why += f"the oldest still sending {oldest_idle.sending} closed"
            else:
                why += "the oldest idle one closed"
            self._count("evicted", why)
            self._drop(oldest_idle)
        self._open[conn] = None
        return True

    def _watch_headers(self) -> None:
        if self._sweep is None:
            # Each deadline is kept within a quarter of the timeout, checked in one pass.
            self._sweep = asyncio.get_running_loop().call_later(
                self.header_timeout / 4, self._sweep_headers
            )

    def _sweep_headers(self) -> None:
        self._sweep = None
        now = loop_time()
        waiting = False
        for conn in list(self._open):
            since = conn.headers_since
            if since is None:
                continue
            if now - since >= self.header_timeout:
                conn.headers_late()
            else:
                waiting = True
        if waiting:
            self._watch_headers()

    def _touch(self, conn: _Connection) -> None:
        if conn in self._open:
            del self._open[conn]
            self._open[conn] = None

    def _drop(self, conn: _Connection) -> None:
        self._open.pop(conn, None)
        conn.force_close()

    def _release(self, conn: _Connection) -> None:
        self._open.pop(conn, None)

    def _not_served(self, request: web.Request, refusal: web.HTTPException) -> None:
        """The router refused ``request`` (no handler ran): count it and say why."""
        fields: dict[str, Any]
        if isinstance(refusal, web.HTTPMethodNotAllowed):
            event, why = "method_not_allowed", "the path does not take this method"
            fields = {"allowed": sorted(refusal.allowed_methods)}
        elif isinstance(refusal, web.HTTPExpectationFailed):
            event, why = "expectation_failed", "the bot takes no Expect but 100-continue"
            fields = {"expect": request.headers.get("Expect", "")[:_PATH_SHOWN]}
        else:
            event, why, fields = "path_not_served", "the bot serves no such path", {}
        if self._served is None:
            # HEAD comes with every GET route; the app's routes never change once it serves.
            self._served = [
                f"{route.method} {route.resource.canonical}"
                for route in request.app.router.routes()
                if route.method != "HEAD" and route.resource is not None
            ]
        self.closed[event] += 1
        self._log.warning(
            event,
            status=refusal.status,
            method=request.method,
            # The path as sent, without its query string (which may carry anything).
            path=request.rel_url.raw_path[:_PATH_SHOWN],
            why=why,
            served=self._served,
            client=forwarded_client(request).address,
            **fields,
        )

    def _count(self, reason: str, why: str, **fields: Any) -> None:
        self.closed[reason] += 1
        self._log.warning(
            "connection_closed",
            reason=reason,
            why=why,
            open_connections=len(self._open),
            **fields,
        )


class _Connection(RequestHandler):
    """aiohttp's handler for one connection, with the guard's deadlines and quiet errors."""

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **options: Any) -> None:
        super().__init__(manager, **options)
        self._guard = guard
        self.busy = False
        self.sending: str | None = None
        """What body it is busy receiving, while that makes it displaceable (:func:`displaceable`):
        closed for a new connection as an idle one would be."""
        self.headers_since: float | None = None
        """When the first byte of a request whose headers are not complete arrived."""
        self.header_bytes: int | None = None
        """How many bytes of a request's headers have arrived while they are not complete
        (``None`` once they are, or while a request is answered)."""
        self.payload: StreamReader | None = None
        """The body of the request last answered while aiohttp may still be reading it (it
        reads the rest of a body its handler left, for ``lingering_time``)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._guard._admit(self):
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard._release(self)
        self.headers_since = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.busy:
            super().data_received(data)
            return
        if self.payload is not None:
            if not self.payload.is_eof():
                # The rest of an answered request's body, which aiohttp reads: no headers.
                super().data_received(data)
                return
            self.payload = None
        if self.headers_since is None:
            # The first byte of a request starts its header deadline and its byte count.
            self.headers_since = loop_time()
            self._guard._watch_headers()
            self.header_bytes = 0
        parsed = self._request_count
        super().data_received(data)
        if self.header_bytes is None:
            return  # its headers ended in an earlier read: the rest is the handler's to bound
        if self._request_count != parsed:
            self.header_bytes = None  # they ended in this one: no scan of ours needed
        elif (seen := self.header_bytes + len(data)) > MAX_HEADER_BYTES:
            self.headers_too_large()
        else:
            self.header_bytes = seen

    def request_started(self, payload: StreamReader) -> None:
        self.busy = True
        self.headers_since = None
        self.header_bytes = None
        self.payload = payload

    def request_finished(self) -> None:
        self.busy = False
        if self.payload is not None and self.payload.is_eof():
            self.payload = None  # all of it arrived: nothing left to read, nor to keep
        self._guard._touch(self)

    def headers_too_large(self) -> None:
        """The headers outgrew :data:`MAX_HEADER_BYTES`: say so, count it, close."""
        self.headers_since = self.header_bytes = None
        self._guard._count(
            "headers_too_large", f"request headers longer than {MAX_HEADER_BYTES} bytes"
        )
        if self.transport is not None:
            self.transport.write(_TOO_LARGE)  # closing sends what is written first
        self._guard._drop(self)

    def headers_late(self) -> None:
        """The header deadline passed: count it and close the connection."""
        self.headers_since = None
        self._guard._count(
            "header_timeout", f"request headers not complete within {self._guard.header_timeout} s"
        )
        self._guard._drop(self)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # A bug in the bot, not the sender's fault: keep aiohttp's traceback.
            return super().handle_error(request, status, exc, message)
        # The parser's message quotes the offending line (a token, say): never repeat it.
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        self._guard._count(
            "bad_request",
            "the request could not be parsed as HTTP",
            status=status,
            error=type(exc).__name__ if exc is not None else None,
            # Headers of a request that could not be parsed are not believed, a proxy's neither.
            client=peer_address(request),
        )
        response = web.Response(status=status, text=f"{status} {phrase}".strip() + "\n")
        response.force_close()
        return response


@contextlib.contextmanager
def displaceable(request: web.BaseRequest, sending: str) -> Iterator[None]:
    """While inside, ``request``'s connection (receiving ``sending``, "a route's body") may
    be closed to admit a new one, as an idle one is, and was last active when its body
    began: the one sending longest goes first. Its sender proved nothing that entitles it to a place
    (a route's body comes from anyone, a callback's with a token of any tenant), so trickling
    bodies must not keep Graph's callbacks out. Closed, its body's reads raise
    ``ConnectionResetError``."""
    protocol = request.protocol
    if not isinstance(protocol, _Connection):
        yield  # another server's (an app served by the author's own runner)
        return
    protocol.sending = sending
    protocol._guard._touch(protocol)
    try:
        yield
    finally:
        protocol.sending = None


class BodyBudget:
    """The bytes bodies of one kind (the callback's, the author's routes') hold while they are
    read and handled: at most ``bodies`` times ``max_body_bytes`` in all, and with
    ``per_sender``, at most that many times it for one sender (a tenant). A body counts as
    its ``Content-Length``, or as ``max_body_bytes`` without one (chunked: as much as may
    come), from before it is read until its request is answered."""

    __slots__ = ("_by_sender", "_largest", "bodies", "held", "per_sender", "what")

    def __init__(
        self,
        max_body_bytes: Callable[[], int],
        *,
        bodies: int,
        what: str,
        per_sender: tuple[int, str] | None = None,
    ) -> None:
        self._largest = max_body_bytes
        self.bodies = bodies
        self.what = what
        """What the bodies are, for a refusal's detail ("the routes' bodies")."""
        self.per_sender = per_sender
        """How many bodies of ``max_body_bytes`` one sender holds at most, and what a sender
        is ("tenant"), or ``None`` when senders are not told apart."""
        self.held = 0
        """The bytes held now, by every sender."""
        self._by_sender: dict[str, int] = {}

    def size_of(self, request: web.BaseRequest) -> int:
        """What ``request``'s body counts as."""
        declared = request.content_length
        return self._largest() if declared is None else declared

    def held_by(self, sender: str) -> int:
        """The bytes ``sender``'s bodies hold now."""
        return self._by_sender.get(sender, 0)

    def claim(self, size: int, sender: str = "") -> str | None:
        """Hold ``size`` bytes for ``sender``: ``None`` once they are held (give them back
        with :meth:`release`), else why not (nothing held)."""
        largest = self._largest()
        if self.per_sender is not None:
            bodies, kind = self.per_sender
            mine, share = self._by_sender.get(sender, 0), bodies * largest
            if mine + size > share:
                return f"{self.what} of this {kind} hold {mine} bytes; at most {share} at once"
        limit = self.bodies * largest
        if self.held + size > limit:
            every = "" if self.per_sender is None else f" of every {self.per_sender[1]}"
            return f"{self.what}{every} hold {self.held} bytes; at most {limit} at once"
        self.held += size
        if self.per_sender is not None:
            self._by_sender[sender] = self._by_sender.get(sender, 0) + size
        return None

    def release(self, size: int, sender: str = "") -> None:
        """Give back what :meth:`claim` held."""
        self.held -= size
        if self.per_sender is not None:
            left = self._by_sender.pop(sender) - size
            if left:
                self._by_sender[sender] = left  # no sender is kept once it holds nothing


RequestHandlerFunction = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class _Guarded:
    """A server's request handler, telling the connection when a request starts and ends."""

    __slots__ = ("_inner",)

    def __init__(self, inner: RequestHandlerFunction) -> None:
        self._inner = inner

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        if not isinstance(protocol, _Connection):
            return await self._inner(request)
        protocol.request_started(request.content)
        try:
            return await self._inner(request)
        except web.HTTPException as refusal:
            # The router's own 404 or 405, or its 417 to an Expect it does not take (before
            # any handler): aiohttp answers it, and no access log says so.
            if isinstance(request, web.Request) and (
                request.match_info.http_exception is refusal or _expect_refused(request, refusal)
            ):
                protocol._guard._not_served(request, refusal)
            raise
        finally:
            protocol.request_finished()


def _expect_refused(request: web.Request, refusal: web.HTTPException) -> bool:
    """Whether ``refusal`` is aiohttp's answer to an ``Expect`` it does not take.

    aiohttp checks an HTTP/1.1 request's ``Expect`` before any handler runs and answers
    anything but ``100-continue`` with 417; a 417 a handler raised itself is its own answer.
    """
    expect = request.headers.get(hdrs.EXPECT, "")
    return (
        isinstance(refusal, web.HTTPExpectationFailed)
        and bool(expect)
        and request.version == HttpVersion11
        and expect.lower() != "100-continue"
    )
