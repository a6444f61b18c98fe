"""Routes of the author's own, served beside the callback: ``CallBot.add_routes``.

``callbot run``, ``bot.serve()`` and the testing kit each build a fresh app with
``create_app()``: a route added to an app the author got from ``create_app()``
was never served by them. Routes given to the bot are in every app it builds.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from callbot import CallBot
from callbot.testing import Simulator, TokenAuthority, run_with_simulator
from callbot.testing import builders as b

from .conftest import make_bot
from .test_hosting import (
    BotProcess,
    bot_env,
    client_session,
    serving_in_process,
    wait_for_line,
)
from .test_security_connections import processes

__all__ = ["processes"]  # the fixture this module uses

JOIN_URL = (
    "https://teams.microsoft.com/l/meetup-join/19%3ameeting_abc%40thread.v2/0"
    "?context=%7b%22Tid%22%3a%22t-1%22%2c%22Oid%22%3a%22o-1%22%7d"
)


def served_at(sim: Simulator, bot: CallBot) -> str:
    """The base URL of a bot the simulator serves (its callback URL without the path)."""
    assert sim.callback_url is not None
    return sim.callback_url.removesuffix(bot.settings.callback_path)


async def nothing(request: web.Request) -> web.Response:
    return web.Response()


def status_route(bot: CallBot, seen: list[Any]) -> web.RouteTableDef:
    """``POST /status``: notes the body it was given, answers whether the bot is ready."""
    routes = web.RouteTableDef()

    @routes.post("/status")
    async def status(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.json_response(
            {"ready": bot.ready, "authorization": "Authorization" in request.headers}
        )

    return routes


async def test_serve_serves_a_route_of_ones_own_and_its_router_refusals_name_it(
    authority: TokenAuthority, logging_restored: None
) -> None:
    bot = make_bot(authority)
    seen: list[Any] = []
    bot.add_routes(status_route(bot, seen))
    async with serving_in_process(bot) as port, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{port}"
        # No token: the route is no callback, nothing is checked for it.
        async with session.post(f"{base}/status", json={"asked": 1}) as response:
            assert response.status == 200
            assert await response.json() == {"ready": True, "authorization": False}
        with capture_logs() as logs:
            async with session.get(f"{base}/status") as response:
                assert response.status == 405
        async with session.get(f"{base}/healthz") as response:
            assert response.status == 200
    assert [json.loads(body) for body in seen] == [{"asked": 1}]
    [refusal] = [e for e in logs if e["event"] == "method_not_allowed"]
    assert refusal["allowed"] == ["POST"]
    assert "POST /status" in refusal["served"]


async def test_callbot_run_serves_a_route_of_ones_own_and_runs_on_started(
    authority: TokenAuthority, processes: list[BotProcess], tmp_path: Path
) -> None:
    output = tmp_path / "handled.txt"
    bot = await BotProcess.start(bot_env(authority, output, HOSTING_BOT_OWN_ROUTES="1"))
    processes.append(bot)
    async with client_session() as session:
        await bot.wait_ready(session)
        async with session.post(bot.base_url + "/echo", json={"hello": "bot"}) as response:
            assert response.status == 200
            assert await response.json() == {"echo": {"hello": "bot"}, "ready": True}
    await wait_for_line(output, "started", bot)


async def test_the_simulator_serves_a_route_that_joins_a_meeting(
    authority: TokenAuthority,
) -> None:
    """The control API of a meeting bot: ``POST /join`` with a join URL, tested against the
    simulator (it got 404 there)."""
    bot = make_bot(authority)
    routes = web.RouteTableDef()

    @routes.post("/join")
    async def join(request: web.Request) -> web.Response:
        call = await bot.join_meeting((await request.json())["joinUrl"])
        return web.json_response({"callId": call.id})

    bot.add_routes(routes)
    async with run_with_simulator(bot) as sim:
        base = served_at(sim, bot)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{base}/join", json={"joinUrl": JOIN_URL}) as response,
        ):
            assert response.status == 200
            call_id = (await response.json())["callId"]
        meeting = await sim.wait_for_outgoing_call()
        assert meeting.id == call_id
        await meeting.wait_for_state("established")
        await meeting.hangup()
        await meeting.wait_until_ended()


async def test_a_mounted_app_serves_a_route_of_ones_own(authority: TokenAuthority) -> None:
    bot = make_bot(authority)
    seen: list[Any] = []
    bot.add_routes(status_route(bot, seen))
    root = web.Application()
    root.add_subapp("/bot", bot.create_app())
    client: TestClient[Any, Any] = TestClient(TestServer(root, host="127.0.0.1"))
    await client.start_server()
    try:
        response = await client.post("/bot/status", data=b"{}")
        assert response.status == 200
        assert await response.json() == {"ready": True, "authorization": False}
    finally:
        await client.close()
    assert seen == [b"{}"]


async def test_a_route_s_body_has_the_callback_s_deadline_and_size_limit(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """The callback reads its body within ``body_timeout`` and ``max_body_bytes``; a route of
    the author's got no deadline at all, so a stranger trickling a body held a connection
    (and a place under ``max_connections``) for as long as it liked."""
    bot = make_bot(authority, body_timeout=0.3, max_body_bytes=1024)
    seen: list[Any] = []
    bot.add_routes(status_route(bot, seen))
    async with serving_in_process(bot) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /status HTTP/1.1\r\nHost: bot\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"asked": '
        )
        await writer.drain()
        with capture_logs() as logs:
            async with asyncio.timeout(20):
                status_line = await reader.readline()
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        [timeout] = [e for e in logs if e["event"] == "route_body_timeout"]
        assert (timeout["method"], timeout["path"]) == ("POST", "/status")

        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{port}/status", data=b"x" * 2000
            ) as response:
                assert response.status == 413
            # Read as sent, as the callback's body is: aiohttp inflates nothing.
            packed = gzip.compress(b'{"asked": 2}')
            async with session.post(
                f"http://127.0.0.1:{port}/status",
                data=packed,
                headers={"Content-Encoding": "gzip"},
            ) as response:
                assert response.status == 200
    assert seen == [packed]


@pytest.mark.parametrize(
    ("route", "path"),
    [
        (web.post("/api/calls", nothing), "/api/calls"),
        (web.get("/api/calls", nothing), "/api/calls"),
        (web.get("/healthz", nothing), "/healthz"),
        (web.post("/readyz", nothing), "/readyz"),
        (web.get("/metrics", nothing), "/metrics"),
        (web.put("/{name}", nothing), "/healthz"),
        (web.post("/api/{anything}", nothing), "/api/calls"),
    ],
    ids=[
        "the callback",
        "GET on the callback path",
        "healthz",
        "readyz",
        "metrics",
        "a variable matching healthz",
        "a variable matching the callback path",
    ],
)
def test_a_route_on_one_of_the_bots_paths_is_refused(
    authority: TokenAuthority, route: web.RouteDef, path: str
) -> None:
    bot = make_bot(authority)
    with pytest.raises(ValueError, match=f"would take requests for the bot's .*{path}"):
        bot.add_routes([route])
    assert bot.create_app()  # nothing of it was kept


def test_routes_are_checked_against_the_callback_path_the_bot_has(
    authority: TokenAuthority, tmp_path: Path
) -> None:
    bot = make_bot(authority, callback_path="/graph/notifications")
    with pytest.raises(ValueError, match="callback path /graph/notifications"):
        bot.add_routes([web.post("/graph/notifications", nothing)])
    with pytest.raises(ValueError, match="path /metrics"):
        bot.add_routes([web.static("/metrics", tmp_path)])
    bot.add_routes([web.post("/api/calls", nothing)])  # not the bot's path here
    # Moved onto a route of the author's, the callback would never be reached.
    bot.configure(callback_path="/api/calls")
    with pytest.raises(ValueError, match="callback path /api/calls"):
        bot.create_app()


def test_what_is_no_list_of_routes_or_a_route_twice_is_refused(
    authority: TokenAuthority,
) -> None:
    bot = make_bot(authority)
    with pytest.raises(TypeError, match=r"a list of route definitions"):
        bot.add_routes(web.post("/join", nothing))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="aiohttp route definitions"):
        bot.add_routes([nothing])  # type: ignore[list-item]
    bot.add_routes([web.post("/join", nothing)])
    with pytest.raises(RuntimeError, match="already registered"):
        bot.add_routes([web.post("/join", nothing)])
    bot.create_app()


async def test_routes_cannot_be_added_while_the_bot_runs(authority: TokenAuthority) -> None:
    bot = make_bot(authority)
    async with run_with_simulator(bot) as sim:
        with pytest.raises(RuntimeError, match="while the bot is not running"):
            bot.add_routes([web.post("/join", nothing)])
        base = served_at(sim, bot)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{base}/join") as response,
        ):
            assert response.status == 404
    bot.add_routes([web.post("/join", nothing)])


async def test_strangers_sending_route_bodies_keep_no_callback_out_nor_much_memory(
    authority: TokenAuthority, logging_restored: None
) -> None:
    """A route of the author's read each body before its handler, its connection busy: with
    ``max_connections`` of them trickling bodies, Graph's callbacks were refused, and at 4 MiB
    a body a stranger held ``max_connections`` times 4 MiB of the bot's memory."""
    bot = make_bot(authority, max_connections=5, max_body_bytes=1024, body_timeout=60)
    routes = web.RouteTableDef()
    waiting, release = asyncio.Event(), asyncio.Event()

    @routes.post("/upload")
    async def upload(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    @routes.get("/slow")
    async def slow(request: web.Request) -> web.Response:
        waiting.set()
        await release.wait()
        return web.Response()

    bot.add_routes(routes)
    body = json.dumps(b.notifications(b.incoming_call("call-1"))).encode()
    async with serving_in_process(bot) as port:
        strangers = []
        for _ in range(4):
            # Bodies of the most a route takes: the bodies of routes hold no more at once.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: bot\r\nContent-Length: 1024\r\n\r\n" + b"x"
            )
            await writer.drain()
            strangers.append((reader, writer))
        url = f"http://127.0.0.1:{port}"
        with capture_logs() as logs:
            async with asyncio.timeout(20):
                while True:  # until the four bodies are being read
                    async with (
                        aiohttp.ClientSession() as session,
                        session.post(f"{url}/upload", data=b"y" * 1024) as answer,
                    ):
                        if answer.status == 503:
                            assert answer.headers["Retry-After"] == "1"
                            break
                        assert answer.status == 200
        [busy] = [e for e in logs if e["event"] == "route_bodies_busy"]
        assert (busy["status"], busy["path"]) == (503, "/upload")
        # The fifth connection busy in a handler: every open connection is busy now.
        async with aiohttp.ClientSession() as session:
            slowly = asyncio.create_task(session.get(f"{url}/slow"))
            await waiting.wait()
            with capture_logs() as logs:
                async with aiohttp.ClientSession() as graph:
                    token = authority.mint(audience=bot.settings.app_id)
                    async with graph.post(
                        url + bot.settings.callback_path,
                        data=body,
                        headers={
                            "Authorization": f"Bearer {token}",
                            "Content-Type": "application/json",
                        },
                    ) as answer:
                        assert answer.status == 202
            [evicted] = [e for e in logs if e["event"] == "connection_closed"]
            assert evicted["reason"] == "evicted"
            assert "still sending a route's body" in evicted["why"]
            async with asyncio.timeout(20):
                assert await strangers[0][0].read() == b""  # the oldest stranger's, closed
            release.set()
            async with await slowly as answer:
                assert answer.status == 200
        for _, writer in strangers:
            writer.close()
        # What the strangers' bodies held is free again once their connections are gone.
        async with asyncio.timeout(20), aiohttp.ClientSession() as session:
            while True:
                async with session.post(f"{url}/upload", data=b"z" * 1024) as answer:
                    if answer.status == 200:
                        assert await answer.text() == "1024"
                        break
                    assert answer.status == 503
        # A body declared larger than max_body_bytes is refused before any of it is read.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: bot\r\nContent-Length: 5000\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(20):
            assert (await reader.readline()).startswith(b"HTTP/1.1 413")
        writer.close()
