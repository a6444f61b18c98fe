"""Notifications per second with the Redis store, as a share of the in-memory store.

The same load goes through a bot with ``store="memory"`` and through one with
``store="redis://..."`` (a redis-server started here on 127.0.0.1, without
persistence): many calls at once, each sending its lifecycle (incoming,
establishing, established, terminated) one notification after another, each
through the bot's real receiver (authentication, parsing, the store) in
process, as :mod:`benchmarks._inproc` does. A round ends when every handler
ran. Rounds alternate between the two stores; the best of each is kept.

    python benchmarks/bench_store.py [--calls 1500] [--concurrency 64] [--rounds 3]
                                     [--replicas N]

With ``--replicas N``, the server has N replicas and the bot ``store_replicas=N``:
the cost of waiting for them (they share the machine's cores too).

Prints both rates, ``redis/memory: 0.NN`` and how many handler runs repeated. Needs
``redis-server``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also run as a plain script

from benchmarks._common import machine, ratio_line
from benchmarks._inproc import InProcessBot
from callbot import Call, events
from callbot._log import configure_logging
from callbot.testing import builders as b


@contextmanager
def redis_server(*options: str) -> Iterator[str]:
    """A throw-away redis-server on 127.0.0.1 (with extra ``options``); its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench_store needs redis-server (apt-get install -y redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(
            [
                *(binary, "--bind", "127.0.0.1", "--port", str(port)),
                *("--save", "", "--appendonly", "no", "--dir", directory),
                *options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.kill()
            process.wait()


def bodies(round_id: str, calls: int) -> list[list[bytes]]:
    """Each call's lifecycle, as request bodies."""
    out = []
    for n in range(calls):
        call_id = f"{round_id}-{n:05d}"
        items = [
            b.incoming_call(call_id),
            b.call_state(call_id, "establishing"),
            b.call_state(call_id, "established"),
            b.call_terminated(call_id),
        ]
        out.append([json.dumps(b.notifications(item)).encode() for item in items])
    return out


async def measure(
    store: str, round_id: str, calls: int, concurrency: int, replicas: int = 0
) -> tuple[float, int]:
    """Notifications per second through a fresh bot using ``store``; repeated handler runs."""
    options: dict[str, Any] = {"store": store, "keep_alive": False, "reorder_window": 1.0}
    if store != "memory":
        options["store_lease"] = 5.0
        options["store_replicas"] = replicas
    work = bodies(round_id, calls)
    total = sum(len(call) for call in work)
    counted = 0
    all_handled = asyncio.Event()
    ran: set[tuple[str, str]] = set()
    repeated = 0

    async def count(call: Call, event: events.Event) -> None:
        nonlocal counted, repeated
        what = (event.call_key, getattr(event, "state", type(event).__name__))
        if what in ran:
            repeated += 1  # a handler run twice for one notification
            return
        ran.add(what)
        counted += 1
        if counted == total:
            all_handled.set()

    async with InProcessBot(on_event=count, **options) as bot:
        queue = iter(work)

        async def caller() -> None:
            for lifecycle in queue:
                for body in lifecycle:
                    status = await bot.post(body)
                    if status != 202:
                        raise RuntimeError(f"the bot answered {status}")

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        await all_handled.wait()
        elapsed = time.perf_counter() - started
    return total / elapsed, repeated


async def run(calls: int, concurrency: int, rounds: int, url: str, replicas: int) -> None:
    best = {"memory": 0.0, "redis": 0.0}
    repeated = {"memory": 0, "redis": 0}
    await measure("memory", "warm-m", min(calls, 200), concurrency)
    await measure(url, "warm-r", min(calls, 200), concurrency, replicas)
    for n in range(rounds):
        for name, store in (("memory", "memory"), ("redis", url)):
            rate, again = await measure(store, f"{name}-{n}", calls, concurrency, replicas)
            best[name] = max(best[name], rate)
            repeated[name] += again
    print(machine())
    print(f"calls per round: {calls}, 4 notifications each, {concurrency} at a time")
    if replicas:
        print(f"redis: a primary and {replicas} replica(s), store_replicas={replicas}")
    print(f"memory: {best['memory']:.0f} notifications/s")
    print(f"redis:  {best['redis']:.0f} notifications/s")
    print(f"repeated handler runs: memory {repeated['memory']}, redis {repeated['redis']}")
    print("answers other than 202: 0 (any would have stopped the run)")
    print(ratio_line("redis/memory", best["redis"] / best["memory"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--replicas", type=int, default=0, help="replicas of the server, and store_replicas"
    )
    args = parser.parse_args()
    configure_logging("json", "error")
    with contextlib.ExitStack() as servers:
        url = servers.enter_context(redis_server())
        port = url.rsplit(":", 1)[1].split("/")[0]
        for _ in range(args.replicas):
            replica = servers.enter_context(redis_server("--replicaof", "127.0.0.1", port))
            _until_in_sync(replica)
        asyncio.run(run(args.calls, args.concurrency, args.rounds, url, args.replicas))


def _until_in_sync(url: str) -> None:
    import redis

    deadline = time.monotonic() + 10
    with redis.Redis.from_url(url, socket_timeout=1) as client:
        while client.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                sys.exit("the replica did not sync with its primary")
            time.sleep(0.05)


if __name__ == "__main__":
    main()
