"""The load generator: whole calls over keep-alive connections, in a process of its own.

``python -m benchmarks.loadgen --token T`` reads one JSON command per line on
stdin (``{"url": ..., "seconds": ..., "connections": ..., "prefix": ...}``),
runs it, and answers one JSON line on stdout: requests, seconds, p50_ms,
p99_ms, errors, and ``cpu_seconds``, its own CPU time during the run (the
benchmarks report it, so that a saturated generator shows). It stays up
between commands, so a measurement never pays for its start.

Each connection plays whole calls (:data:`benchmarks._common.CALL_SCRIPT`,
from incoming to terminated), ``--calls-per-connection`` at a time with
their steps interleaved, one request in flight and the next sent on the
202, so every call's notifications arrive in order. It speaks HTTP/1.1 over
a bare asyncio protocol with the requests' heads built once: a few
microseconds per request, a fraction of what the cheapest aiohttp server
spends.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also run as a plain script

from benchmarks._common import Template, call_script, percentile


def bodies(script: list[Template], prefix: str, calls_at_once: int) -> Iterator[bytes]:
    """Whole calls, ``calls_at_once`` of them interleaved step by step, without end."""
    parts = [template.parts for template in script]
    for group in itertools.count():
        ids = [f"{prefix}{group:07d}x{n}" for n in range(calls_at_once)]
        for step in parts:
            for call_id in ids:
                yield call_id.join(step).encode()


def _content_length(head: bytes) -> int:
    """The Content-Length of a response head (lower-cased), 0 when absent."""
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = head.find(b"\r\n", at + 2)
    return int(head[at + 17 : end if end >= 0 else len(head)])


class _Client(asyncio.Protocol):
    """One keep-alive connection sending the next request when the previous is answered."""

    def __init__(self, run: _Run, prefix: str) -> None:
        self.run = run
        self.bodies = bodies(run.script, prefix, run.calls_at_once)
        self.buffer = bytearray()
        self.sent_at = 0.0
        self.sent = 0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        # Past the deadline, calls under way are played to their end, so none is left open.
        if self.sent % self.run.group_size == 0 and time.perf_counter() >= self.run.deadline:
            self.transport.close()
            return
        body = next(self.bodies)
        self.sent += 1
        self.sent_at = time.perf_counter()
        self.transport.write(self.run.head % len(body) + body)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        length = _content_length(head)
        if len(self.buffer) < end + 4 + length:
            return  # the rest of the body is still on its way
        del self.buffer[: end + 4 + length]
        self.run.latencies.append(time.perf_counter() - self.sent_at)
        if head[9:12] != b"202":
            self.run.errors += 1
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.run.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


class _Run:
    """What the connections of one command share: the request head, the clock, the results."""

    def __init__(self, url: str, token: str, seconds: float, calls_at_once: int) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.head = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n"
        ).encode()
        self.script = call_script()
        self.calls_at_once = calls_at_once
        self.group_size = len(self.script) * calls_at_once
        self.deadline = time.perf_counter() + seconds
        self.latencies: list[float] = []
        self.errors = 0


async def generate(
    url: str, token: str, prefix: str, connections: int, seconds: float, calls_at_once: int
) -> dict[str, float]:
    """Run the load for ``seconds``; what it measured."""
    loop = asyncio.get_running_loop()
    cpu = time.process_time()
    started = time.perf_counter()
    run = _Run(url, token, seconds, calls_at_once)
    clients = []
    for n in range(connections):
        _, client = await loop.create_connection(
            lambda n=n: _Client(run, f"{prefix}{n:03d}c"),  # type: ignore[misc]
            run.host,
            run.port,
        )
        clients.append(client)
    async with asyncio.timeout(seconds + 30):
        await asyncio.gather(*(client.closed for client in clients))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(run.latencies),
        "seconds": elapsed,
        "p50_ms": percentile(run.latencies, 50) * 1000,
        "p99_ms": percentile(run.latencies, 99) * 1000,
        "errors": run.errors,
        "cpu_seconds": time.process_time() - cpu,
    }


async def serve_commands(token: str, calls_at_once: int) -> None:
    """Run each command read from stdin; answer each with a JSON line."""
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        result = await generate(
            command["url"],
            token,
            command["prefix"],
            command["connections"],
            command["seconds"],
            calls_at_once,
        )
        print(json.dumps(result), flush=True)


def main() -> None:
    """Parse the command line, then serve commands until stdin closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--token", required=True)
    parser.add_argument("--calls-per-connection", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(serve_commands(args.token, args.calls_per_connection))


if __name__ == "__main__":
    main()
