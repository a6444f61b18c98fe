"""Throughput against the limit: bare aiohttp, a hand-written receiver, callbot.

Each server runs alone in its own process pinned to one core while the load
generator (wrk, else :mod:`benchmarks.loadgen`) runs on the other. Every
request carries the documented incoming-call notification with a fresh call
id, so callbot's sequencer opens a call record per request, and the same
bearer token, as Graph reuses one within its lifetime. Prints requests/s and
latency percentiles of each, then ``full/bare`` and ``full/handwritten``
measured in this run.

    python benchmarks/throughput.py [--seconds 4] [--connections 32] [--uvloop] [--untuned]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also run as a plain script

from benchmarks._common import (
    APP_ID,
    INCOMING,
    LoadResult,
    Template,
    load,
    machine,
    ratio_line,
    server,
)
from callbot.testing import TokenAuthority

KINDS = ("bare", "handwritten", "full")


async def _settle(read: Any, within: float = 10.0) -> int:
    """The server's handled count once it stops growing (handlers trail the 202s)."""
    last = -1
    async with asyncio.timeout(within):
        while True:
            now = int((await read())["handled"])
            if now == last:
                return now
            last = now
            await asyncio.sleep(0.2)


async def measure(
    seconds: float,
    connections: int,
    uvloop: bool,
    use_wrk: bool = True,
    untuned: bool = False,
) -> dict[str, Any]:
    """Run the servers one after another; their figures and the ratios.

    With ``untuned``, callbot also runs without its GC and digest optimisations.
    """
    template = Template(INCOMING)
    results: dict[str, Any] = {"kinds": {}}
    async with TokenAuthority() as authority:
        token = authority.mint(audience=APP_ID, expires_in=3600)
        runs: list[tuple[str, str, list[str]]] = [(kind, kind, []) for kind in KINDS]
        if untuned:
            runs.append(("full-untuned", "full", ["--untuned"]))
        for label, kind, extra in runs:
            options = [*extra, *(["--uvloop"] if uvloop else [])]
            async with server(kind, authority.openid_config_url, *options) as srv:
                common: dict[str, Any] = {
                    "token": token,
                    "template": template,
                    "connections": connections,
                }
                await load(srv.url, prefix=f"{kind}w", seconds=1, use_wrk=use_wrk, **common)
                await _settle(srv.stats)
                await srv.reset()
                result: LoadResult = await load(
                    srv.url, prefix=f"{kind}m", seconds=seconds, use_wrk=use_wrk, **common
                )
                handled = await _settle(srv.stats)
                stats = await srv.stats()
            results["kinds"][label] = {
                "rps": result.rps,
                "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms,
                "requests": result.requests,
                "errors": result.errors,
                "handled": handled if kind != "bare" else None,
                "gc_ms": sum(stats["gc_ms"]),
                "gc_max_ms": stats["gc_max_ms"],
                "tool": result.tool,
            }
    kinds = results["kinds"]
    results["full/bare"] = kinds["full"]["rps"] / kinds["bare"]["rps"]
    results["full/handwritten"] = kinds["full"]["rps"] / kinds["handwritten"]["rps"]
    if untuned:
        results["full/full-untuned"] = kinds["full"]["rps"] / kinds["full-untuned"]["rps"]
    return results


def report(results: dict[str, Any], seconds: float, connections: int) -> str:
    """The human-readable lines."""
    kinds = results["kinds"]
    tool = next(iter(kinds.values()))["tool"]
    lines = [
        f"throughput: {connections} connections, {seconds:g} s per server, load by {tool}, "
        f"body {INCOMING} with a fresh call id per request",
        f"{'server':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'handled':>9}"
        f" {'GC ms':>7} {'longest':>8}",
    ]
    for kind, row in kinds.items():
        handled = "-" if row["handled"] is None else str(row["handled"])
        lines.append(
            f"{kind:<12} {row['rps']:>9.0f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
            f"{row['errors']:>7} {handled:>9} {row['gc_ms']:>7.0f} {row['gc_max_ms']:>8.1f}"
        )
    lines.append(ratio_line("full/bare", results["full/bare"]))
    lines.append(ratio_line("full/handwritten", results["full/handwritten"]))
    if "full/full-untuned" in results:
        lines.append(ratio_line("full/full-untuned", results["full/full-untuned"]))
    return "\n".join(lines)


def main() -> None:
    """Parse the command line, measure, print."""
    parser = argparse.ArgumentParser(description="callbot throughput against the limit")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="3 s per server")
    parser.add_argument("--uvloop", action="store_true", help="run the servers on uvloop")
    parser.add_argument("--python-load", action="store_true", help="use loadgen even if wrk is")
    parser.add_argument(
        "--untuned", action="store_true", help="also run callbot without its GC/digest tuning"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    print(machine())
    results = asyncio.run(
        measure(
            seconds,
            args.connections,
            args.uvloop,
            use_wrk=not args.python_load,
            untuned=args.untuned,
        )
    )
    print(report(results, seconds, args.connections))
    if args.json is not None:
        args.json.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
