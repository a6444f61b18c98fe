"""Dispatch latency: from a request's arrival to the start of its handler.

A callbot server in its own process stamps each request as the app receives
it (an outer middleware) and each handler as it starts; the request's stamp
travels to the handler in the context its worker task copies. Nothing is
held for reordering: the load is whole calls, each call's notifications
sent in order (see :mod:`benchmarks.loadgen`). Measured with 1 connection
(an idle bot) and with 32 (saturated: handlers wait behind other requests on
the loop).

    python benchmarks/latency.py [--seconds 4] [--quick] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also run as a plain script

from benchmarks._common import APP_ID, LoadGenerator, machine, percentile, server
from callbot.testing import TokenAuthority

CONNECTIONS = (1, 32)


async def measure(seconds: float, uvloop: bool) -> dict[str, Any]:
    """Percentiles of arrival-to-handler time at each connection count."""
    rows: list[dict[str, Any]] = []
    async with TokenAuthority() as authority:
        token = authority.mint(audience=APP_ID, expires_in=3600)
        options = ["--stamp", *(["--uvloop"] if uvloop else [])]
        async with (
            server("full", authority.openid_config_url, *options) as srv,
            LoadGenerator(token) as load,
        ):
            for connections in CONNECTIONS:
                common: dict[str, Any] = {"connections": connections}
                await load.run(srv.url, prefix=f"w{connections}-", seconds=1, **common)
                await asyncio.sleep(0.5)
                await srv.reset()
                result = await load.run(
                    srv.url, prefix=f"m{connections}-", seconds=seconds, **common
                )
                await asyncio.sleep(0.5)
                stats = await srv.stats()
                latencies = stats["latencies_us"]
                rows.append(
                    {
                        "connections": connections,
                        "rps": result.rps,
                        "handlers": len(latencies),
                        "p50_us": percentile(latencies, 50),
                        "p99_us": percentile(latencies, 99),
                        "ack_p50_ms": result.p50_ms,
                        "ack_p99_ms": result.p99_ms,
                    }
                )
    return {"rows": rows}


def report(results: dict[str, Any]) -> str:
    """The human-readable lines."""
    lines = [
        "dispatch latency: request arrival to handler start (no reorder hold)",
        f"{'connections':>11} {'req/s':>8} {'handlers':>9} {'p50 us':>8} {'p99 us':>8}"
        f" {'ack p50 ms':>10} {'ack p99 ms':>10}",
    ]
    for row in results["rows"]:
        lines.append(
            f"{row['connections']:>11} {row['rps']:>8.0f} {row['handlers']:>9} "
            f"{row['p50_us']:>8.0f} {row['p99_us']:>8.0f} "
            f"{row['ack_p50_ms']:>10.2f} {row['ack_p99_ms']:>10.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse the command line, measure, print."""
    parser = argparse.ArgumentParser(description="callbot dispatch latency")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="2 s per level")
    parser.add_argument("--uvloop", action="store_true", help="run the server on uvloop")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    print(machine())
    results = asyncio.run(measure(seconds, args.uvloop))
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
