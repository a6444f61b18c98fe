"""Routes of the author's own served beside the callback (``CallBot.add_routes``).

They are aiohttp route definitions, added to every app ``CallBot.create_app``
builds, after the bot's own routes. None may serve one of the bot's paths (the
callback path, ``/healthz``, ``/readyz``, ``/metrics``): it would never run, or
would split a path between the bot and the author. Each handler gets the request
with its body already read, within the callback's deadline (``body_timeout``) and
size limit (``max_body_bytes``): an unauthenticated sender that trickles a body
must not hold a connection (and a place under ``max_connections``) for ever.

Nothing of such a sender is proven while its body arrives, so neither may it hold
what Graph's callbacks need: its connection may be closed for a new one as an idle
one is (:func:`callbot._serving.displaceable`), and the bodies being read or
handled hold at most :data:`BODIES_AT_ONCE` times ``max_body_bytes`` in all (a
body of unknown length counted as ``max_body_bytes``); past that a request gets
``503`` at once, its body unread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from aiohttp import web
from aiohttp.abc import AbstractView
from aiohttp.typedefs import Handler

from ._config import BOT_PATHS
from ._log import get_logger
from ._proxy import forwarded_client
from ._serving import BodyBudget, displaceable

__all__ = ["BODIES_AT_ONCE", "BOT_PATHS", "checked_routes", "reading_bodies_first"]

log = get_logger("callbot.routes")

RouteHandler = Handler | type[AbstractView]
"""What a route definition runs: an ``async def`` function, or a class-based view."""
# As much of a request's path as a log line shows (anyone may send a long one).
_PATH_SHOWN = 256
BODIES_AT_ONCE = 4
"""How many bodies of ``max_body_bytes`` the author's routes hold at most, all requests
together, while they are read and handled."""


def checked_routes(
    routes: Iterable[web.AbstractRouteDef], callback_path: str
) -> list[web.AbstractRouteDef]:
    """``routes`` as a list, once aiohttp took them all and none serves one of the bot's paths.

    Raises ``TypeError`` for what is no route definition, ``ValueError`` for a route on one
    of the bot's paths, and what aiohttp raises for a route it refuses (a path without its
    leading ``/``, a handler that is no ``async def``, a method given twice for one path).
    """
    definitions = list(routes)
    for definition in definitions:
        if not isinstance(definition, web.AbstractRouteDef):
            raise TypeError(
                f"add_routes takes aiohttp route definitions (web.post(...), a "
                f"web.RouteTableDef), not {definition!r}"
            )
    scratch = web.UrlDispatcher()
    scratch.add_routes(definitions)
    bot_paths = (callback_path, *BOT_PATHS)
    for resource in scratch.resources():
        for path in bot_paths:
            if _serves(resource, path):
                methods = ", ".join(sorted({route.method for route in resource} - {"HEAD"}))
                what = "callback path" if path == callback_path else "path"
                raise ValueError(
                    f"the route {methods} {resource.canonical} would take requests for the "
                    f"bot's {what} {path}: the bot answers {', '.join(bot_paths)} itself; "
                    "give the route another path"
                )
    return definitions


def _serves(resource: web.AbstractResource, path: str) -> bool:
    """Whether ``resource`` matches requests for ``path``."""
    info = resource.get_info()
    if "path" in info:  # a plain path
        return info["path"] == path
    if "pattern" in info:  # a path with variables
        return info["pattern"].fullmatch(path) is not None
    if "prefix" in info:  # static files
        prefix = info["prefix"].rstrip("/")
        return path == prefix or path.startswith(prefix + "/")
    return resource.canonical == path


def reading_bodies_first(
    routes: Iterable[web.AbstractRouteDef],
    body_timeout: Callable[[], float],
    max_body_bytes: Callable[[], int],
) -> list[web.AbstractRouteDef]:
    """``routes``, each handler given its request once the body is read (static files as
    they are). Their bodies share one bound (:data:`BODIES_AT_ONCE`)."""
    held = BodyBudget(max_body_bytes, bodies=BODIES_AT_ONCE, what="the routes' bodies")
    return [
        web.RouteDef(
            route.method,
            route.path,
            _body_first(route.handler, body_timeout, max_body_bytes, held),
            route.kwargs,
        )
        if isinstance(route, web.RouteDef)
        else route
        for route in routes
    ]


def _body_first(
    handler: RouteHandler,
    body_timeout: Callable[[], float],
    max_body_bytes: Callable[[], int],
    held: BodyBudget,
) -> Handler:
    async def read_then_handle(request: web.Request) -> web.StreamResponse:
        if not request.body_exists:
            return await handler(request)
        largest = max_body_bytes()
        declared = request.content_length
        if declared is not None and declared > largest:
            return _refused(
                request, 413, "body_too_large", f"a body of {declared} bytes; at most {largest}"
            )
        claimed = held.size_of(request)
        refusal = held.claim(claimed)
        if refusal is not None:
            return _refused(request, 503, "bodies_busy", refusal)
        try:
            timeout = body_timeout()
            try:
                with displaceable(request, "a route's body"):
                    async with asyncio.timeout(timeout):
                        # aiohttp keeps it: the handler's read(), text(), json() and post()
                        # get it. Past client_max_size (max_body_bytes): aiohttp's 413.
                        await request.read()
            except TimeoutError:
                return _refused(
                    request, 408, "body_timeout", f"body not received within {timeout} s"
                )
            except ConnectionResetError:
                # Gone before its body was: closed by its sender, or for a new connection
                # (the guard said so). Nobody reads an answer.
                response = web.Response(status=400)
                response.force_close()
                return response
            return await handler(request)
        finally:
            held.release(claimed)

    return read_then_handle


def _refused(request: web.Request, status: int, error: str, detail: str) -> web.Response:
    """A request refused before its handler, its body not (wholly) read: one line says why,
    and the connection closes (what is left of the body is not read)."""
    log.warning(
        "route_" + error,
        status=status,
        method=request.method,
        path=request.rel_url.raw_path[:_PATH_SHOWN],
        detail=detail,
        client=forwarded_client(request).address,
    )
    response = web.json_response({"error": error, "detail": detail}, status=status)
    if status == 503:
        response.headers["Retry-After"] = "1"
    response.force_close()
    return response
