"""The servers the benchmarks measure, one per process.

``python -m benchmarks.servers KIND --openid-config-url URL`` serves on
127.0.0.1 (a free port), prints ``LISTENING <port>`` once ready, and runs
until SIGTERM. Kinds:

* ``bare``: an aiohttp handler that reads the body and answers 202, the
  least any correct receiver does, so the practical limit on this machine;
* ``bare-noread``: the same without reading the body (for reference only: a
  receiver that ignores what it is sent is not one);
* ``handwritten``: :mod:`benchmarks.handwritten`, what an author writes without
  callbot, verifying the token of every request;
* ``handwritten-cached``: the same remembering tokens it has verified;
* ``full``: a :class:`callbot.CallBot` with one no-op handler for every event,
  served by ``CallBot.serve`` as ``callbot run`` serves it.

Each also serves ``GET /bench/stats`` (notifications handled, the process's
own CPU time, and with ``--stamp`` the time from request arrival to handler
start of each) and ``POST /bench/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import gc
import importlib
import json
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also run as a plain script

from benchmarks._common import APP_ID, CALLBACK_PATH, untune
from benchmarks.handwritten import HandwrittenReceiver
from callbot import Call, CallBot, events
from callbot._log import configure_logging

KINDS = ("bare-noread", "bare", "handwritten", "handwritten-cached", "full")
_ARRIVAL: contextvars.ContextVar[float] = contextvars.ContextVar("arrival")


class Stats:
    """What a server counts for the benchmark."""

    def __init__(self, stamp: bool) -> None:
        self.stamp = stamp
        self.handled = 0
        self.latencies: list[float] = []
        self.gc_seconds = [0.0, 0.0, 0.0]
        self.gc_max = 0.0
        self._gc_started = 0.0
        gc.callbacks.append(self._gc_clock)

    def _gc_clock(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        self.gc_seconds[info["generation"]] += took
        self.gc_max = max(self.gc_max, took)

    def handler_started(self) -> None:
        """Count a handler run and, when stamping, how long after its request's arrival."""
        self.handled += 1
        if self.stamp:
            arrival = _ARRIVAL.get(None)
            if arrival is not None:
                self.latencies.append(time.perf_counter() - arrival)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # Tasks created while the request runs copy this context, handler tasks included.
        _ARRIVAL.set(time.perf_counter())
        return await handler(request)

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "handled": self.handled,
                "latencies_us": [round(s * 1e6, 1) for s in self.latencies],
                "gc_ms": [round(s * 1e3, 1) for s in self.gc_seconds],
                "gc_max_ms": round(self.gc_max * 1e3, 1),
                "cpu_seconds": time.process_time(),
            }
        )

    async def reset(self, request: web.Request) -> web.Response:
        self.handled = 0
        self.latencies.clear()
        self.gc_seconds = [0.0, 0.0, 0.0]
        self.gc_max = 0.0
        return web.Response(status=204)


def _bare_app(read: bool) -> web.Application:
    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202)

    async def accept_unread(request: web.Request) -> web.Response:
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post(CALLBACK_PATH, accept if read else accept_unread)
    return app


def _handwritten_app(openid_config_url: str, stats: Stats, cache_tokens: bool) -> web.Application:
    with urllib.request.urlopen(openid_config_url, timeout=10) as response:
        jwks_uri = json.load(response)["jwks_uri"]
    receiver = HandwrittenReceiver(app_id=APP_ID, jwks_url=jwks_uri, cache_tokens=cache_tokens)

    async def on_notification(call_id: str, notification: Any) -> None:
        stats.handler_started()

    receiver.on_notification = on_notification  # type: ignore[method-assign]
    return receiver.create_app()


class _BenchBot(CallBot):
    """A CallBot whose app also serves the benchmark's routes."""

    def __init__(self, stats: Stats, **options: Any) -> None:
        super().__init__(**options)
        self.stats = stats

    def create_app(self) -> web.Application:
        app = super().create_app()
        _add_bench_routes(app, self.stats)
        return app


def _full_bot(openid_config_url: str, stats: Stats) -> CallBot:
    bot = _BenchBot(
        stats,
        app_id=APP_ID,
        openid_config_url=openid_config_url,
        public_url="https://bot.example.test",
        callback_path=CALLBACK_PATH,
        # The benchmark's calls are never answered; their warnings would only add noise.
        answer_warning_after=3600.0,
    )

    @bot.on(events.Event)
    async def noop(call: Call, event: events.Event) -> None:
        stats.handler_started()

    return bot


def _add_bench_routes(app: web.Application, stats: Stats) -> None:
    if stats.stamp:
        # First in the chain, so the stamp is taken before any other middleware runs.
        app.middlewares.insert(0, stats.middleware)
    app.router.add_get("/bench/stats", stats.get)
    app.router.add_post("/bench/reset", stats.reset)


def build(kind: str, openid_config_url: str, stats: Stats) -> web.Application:
    """The application of every kind but ``full``, with the benchmark's routes."""
    if kind in ("bare", "bare-noread"):
        app = _bare_app(read=kind == "bare")
    elif kind in ("handwritten", "handwritten-cached"):
        app = _handwritten_app(openid_config_url, stats, cache_tokens=kind == "handwritten-cached")
    else:
        raise SystemExit(f"unknown server kind {kind!r}")
    _add_bench_routes(app, stats)
    return app


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def _serve_bot(bot: CallBot) -> None:
    """Serve with ``CallBot.serve``, as ``callbot run`` does; say the port once ready."""
    port = _free_port()
    serving = asyncio.create_task(bot.serve("127.0.0.1", port))
    async with aiohttp.ClientSession() as session:
        while not serving.done():
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        break
            await asyncio.sleep(0.05)
    print(f"LISTENING {port}", flush=True)
    await serving


async def serve(kind: str, openid_config_url: str, stamp: bool) -> None:
    """Serve until SIGTERM or SIGINT."""
    configure_logging("json", "info")
    stats = Stats(stamp)
    if kind == "full":
        await _serve_bot(_full_bot(openid_config_url, stats))
        return
    runner = web.AppRunner(
        build(kind, openid_config_url, stats), access_log=None, handle_signals=False
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        print(f"LISTENING {runner.addresses[0][1]}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--openid-config-url", required=True)
    parser.add_argument("--stamp", action="store_true", help="record arrival-to-handler times")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument(
        "--untuned", action="store_true", help="without callbot's GC and digest optimisations"
    )
    parser.add_argument("--profile", type=Path, help="write cProfile statistics here on exit")
    args = parser.parse_args(argv)
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    if args.untuned:
        untune()
    if args.uvloop:
        # Optional, so imported by name: the benchmarks type-check without it installed.
        run = importlib.import_module("uvloop").run
    if args.profile is None:
        run(serve(args.kind, args.openid_config_url, args.stamp))
        return
    import cProfile

    with cProfile.Profile() as profile:
        run(serve(args.kind, args.openid_config_url, args.stamp))
    profile.dump_stats(args.profile)


if __name__ == "__main__":
    main()
