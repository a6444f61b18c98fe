"""A bounded aiohttp load generator, used when wrk is not installed.

``python -m benchmarks.loadgen URL --token T --template FILE ...`` keeps
``--connections`` requests in flight for ``--seconds``, each with a fresh call
id, and prints one JSON line: requests, seconds, p50_ms, p99_ms, errors.
It is slower than wrk, so against a fast server it measures itself as much as
the server; the table says which tool was used.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also run as a plain script

from benchmarks._common import Template, percentile


async def generate(
    url: str, token: str, template: Template, prefix: str, connections: int, seconds: float
) -> dict[str, float]:
    """Run the load; what it measured."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    counter = itertools.count()
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            body = template.render(f"{prefix}{next(counter):09d}")
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 202:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=connections)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "errors": errors,
    }


def main() -> None:
    """Parse the command line, run, print the JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--token", required=True)
    parser.add_argument("--template", required=True)
    parser.add_argument("--prefix", default="call")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    result = asyncio.run(
        generate(
            args.url,
            args.token,
            Template(args.template),
            args.prefix,
            args.connections,
            args.seconds,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
