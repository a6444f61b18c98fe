"""Routes of the author's own served beside the callback (``CallBot.add_routes``).

They are aiohttp route definitions, added to every app ``CallBot.create_app``
builds, after the bot's own routes. None may serve one of the bot's paths (the
callback path, ``/healthz``, ``/readyz``, ``/metrics``): it would never run, or
would split a path between the bot and the author. Each handler gets the request
with its body already read, within the callback's deadline (``body_timeout``) and
size limit (``max_body_bytes``): an unauthenticated sender that trickles a body
must not hold a connection (and a place under ``max_connections``) for ever.
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

__all__ = ["BOT_PATHS", "checked_routes", "reading_bodies_first"]

log = get_logger("callbot.routes")

RouteHandler = Handler | type[AbstractView]
"""What a route definition runs: an ``async def`` function, or a class-based view."""
# As much of a request's path as a log line shows (anyone may send a long one).
_PATH_SHOWN = 256


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
    routes: Iterable[web.AbstractRouteDef], body_timeout: Callable[[], float]
) -> list[web.AbstractRouteDef]:
    """``routes``, each handler given its request once the body is read (static files as
    they are)."""
    return [
        web.RouteDef(
            route.method, route.path, _body_first(route.handler, body_timeout), route.kwargs
        )
        if isinstance(route, web.RouteDef)
        else route
        for route in routes
    ]


def _body_first(handler: RouteHandler, body_timeout: Callable[[], float]) -> Handler:
    async def read_then_handle(request: web.Request) -> web.StreamResponse:
        if request.body_exists:
            timeout = body_timeout()
            try:
                async with asyncio.timeout(timeout):
                    # aiohttp keeps it: the handler's read(), text(), json() and post() get it.
                    # Larger than client_max_size (max_body_bytes): aiohttp's 413.
                    await request.read()
            except TimeoutError:
                detail = f"body not received within {timeout} s"
                log.warning(
                    "route_body_timeout",
                    method=request.method,
                    path=request.rel_url.raw_path[:_PATH_SHOWN],
                    detail=detail,
                    client=forwarded_client(request).address,
                )
                response = web.json_response(
                    {"error": "body_timeout", "detail": detail}, status=408
                )
                response.force_close()
                return response
        return await handler(request)

    return read_then_handle
