"""Throughput against the limit, in interleaved rounds: bare aiohttp, hand-written, callbot.

Every server is up at once, each in its own process on core 0, while the
load generator (:mod:`benchmarks.loadgen`, kept up in its own process on
core 1) loads them in turns: in each round every server gets one turn of the
same length, the order rotating from round to round, so a burst of other
work on the machine lands on every server alike. The load is whole calls
(incoming, establishing, established, a roster change, three tones,
terminating, terminated; each connection plays four calls at a time, each
call's notifications in order) over 32 keep-alive connections, all with the
same bearer token, as Graph reuses one within its lifetime.

Servers (see :mod:`benchmarks.servers`): ``bare`` reads the body and answers
202, the least a correct receiver does; ``bare-noread`` does not even read
it (reference only); ``handwritten`` verifies every token; ``handwritten-cached``
remembers verified tokens; ``full`` is callbot with a no-op handler.

Per server it reports the median over rounds of requests/s, of the ack
latency percentiles and of CPU per request, the last from the server
process's own CPU time. Every ratio is the median of the ratios measured
within each round. The printed ``full/bare: 0.NN`` and friends compare CPU
per request (the other's over callbot's): the throughput each would reach on
a core of its own. Requests/s ratios are printed too, but on this shared
machine they flatter the slower server: when others take the core, a server
waiting on round trips loses more than one busy computing. The generator's
own CPU use is shown as well: near 100% it, not the server, would be the limit.

    python benchmarks/throughput.py [--rounds 5] [--seconds 2] [--quick] [--uvloop] [--untuned]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also run as a plain script

from benchmarks._common import (
    APP_ID,
    LoadGenerator,
    Server,
    call_script,
    machine,
    ratio_line,
    server,
)
from callbot.testing import TokenAuthority

KINDS = ("bare-noread", "bare", "handwritten", "handwritten-cached", "full")
# Servers whose handlers count notifications: a turn ends once they have caught up.
COUNTING = ("handwritten", "handwritten-cached", "full", "full-untuned")
CONNECTIONS = 32


async def _caught_up(srv: Server, expected: int, within: float = 10.0) -> dict[str, Any]:
    """The server's stats once its handlers have seen ``expected`` notifications in all."""
    async with asyncio.timeout(within):
        while True:
            stats = await srv.stats()
            if stats["handled"] >= expected:
                return stats
            await asyncio.sleep(0.02)


async def _turn(
    load: LoadGenerator, srv: Server, label: str, prefix: str, seconds: float, connections: int
) -> dict[str, float]:
    """One server loaded for ``seconds``: what the generator and the server measured."""
    before = await srv.stats()
    result = await load.run(srv.url, prefix=prefix, connections=connections, seconds=seconds)
    if label in COUNTING:
        after = await _caught_up(srv, before["handled"] + result.requests - result.errors)
    else:
        after = await srv.stats()
    requests = max(result.requests, 1)
    return {
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": result.errors,
        "cpu_us": (after["cpu_seconds"] - before["cpu_seconds"]) / requests * 1e6,
        "gc_share": (sum(after["gc_ms"]) - sum(before["gc_ms"])) / 1e3 / result.seconds,
        "load_busy": result.busy,
        "load_cpu_us": result.cpu_seconds / requests * 1e6,
    }


async def measure(
    seconds: float, rounds: int, connections: int, uvloop: bool, untuned: bool = False
) -> dict[str, Any]:
    """All servers up, loaded in turns for ``rounds`` rounds; medians and ratios.

    With ``untuned``, callbot also runs without its GC and digest optimisations.
    """
    runs: list[tuple[str, str, list[str]]] = [(kind, kind, []) for kind in KINDS]
    if untuned:
        runs.append(("full-untuned", "full", ["--untuned"]))
    labels = [label for label, _, _ in runs]
    samples: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    async with TokenAuthority() as authority, contextlib.AsyncExitStack() as stack:
        token = authority.mint(audience=APP_ID, expires_in=3600)
        servers: dict[str, Server] = {}
        for label, kind, extra in runs:
            options = [*extra, *(["--uvloop"] if uvloop else [])]
            servers[label] = await stack.enter_async_context(
                server(kind, authority.openid_config_url, *options)
            )
        load = await stack.enter_async_context(LoadGenerator(token))
        for label in labels:  # first use: imports, caches, the signing keys
            await _turn(load, servers[label], label, f"w-{label}-", 0.5, connections)
        for n in range(rounds):
            # Rotated each round, so that no server always follows the same one.
            order = labels[n % len(labels) :] + labels[: n % len(labels)]
            for label in order:
                turn = await _turn(
                    load, servers[label], label, f"r{n}-{label}-", seconds, connections
                )
                samples[label].append(turn)
    kinds = {
        label: {key: statistics.median(s[key] for s in rows) for key in rows[0]}
        for label, rows in samples.items()
    }
    ratios: dict[str, float] = {}
    rps_ratios: dict[str, float] = {}
    for other in labels:
        if other == "full":
            continue
        pairs = list(zip(samples["full"], samples[other], strict=True))
        ratios[f"full/{other}"] = statistics.median(o["cpu_us"] / f["cpu_us"] for f, o in pairs)
        rps_ratios[f"full/{other}"] = statistics.median(f["rps"] / o["rps"] for f, o in pairs)
    return {
        "kinds": kinds,
        "ratios": ratios,
        "rps_ratios": rps_ratios,
        "rounds": rounds,
        "seconds": seconds,
        "connections": connections,
        **ratios,
    }


def report(results: dict[str, Any]) -> str:
    """The human-readable lines."""
    steps = len(call_script())
    lines = [
        f"throughput: {results['connections']} connections, {results['rounds']} rounds of "
        f"{results['seconds']:g} s per server, whole calls of {steps} notifications; medians",
        f"{'server':<19} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'CPU us/req':>10} {'GC %':>5} {'loadgen CPU':>11}",
    ]
    for label, row in results["kinds"].items():
        load = f"{row['load_busy']:.0%} {row['load_cpu_us']:.0f}us"
        lines.append(
            f"{label:<19} {row['rps']:>8.0f} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} "
            f"{row['errors']:>6.0f} {row['cpu_us']:>10.1f} {row['gc_share']:>5.1%} {load:>11}"
        )
    full = results["kinds"]["full"]
    lines.append(
        f"full ack at {results['connections']} connections, p50 / p99: "
        f"{full['p50_ms']:.2f} / {full['p99_ms']:.2f} ms"
    )
    lines.append(
        "by requests/s: "
        + ", ".join(f"{name} {value:.2f}" for name, value in results["rps_ratios"].items())
    )
    lines.append("by CPU per request (the throughput on a core of one's own):")
    for name in ("full/bare", "full/bare-noread", "full/handwritten", "full/handwritten-cached"):
        lines.append(ratio_line(name, results["ratios"][name]))
    if "full/full-untuned" in results["ratios"]:
        lines.append(ratio_line("full/full-untuned", results["ratios"]["full/full-untuned"]))
    return "\n".join(lines)


def main() -> None:
    """Parse the command line, measure, print."""
    parser = argparse.ArgumentParser(description="callbot throughput against the limit")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per server per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 s")
    parser.add_argument("--uvloop", action="store_true", help="run the servers on uvloop")
    parser.add_argument(
        "--untuned", action="store_true", help="also run callbot without its GC/digest tuning"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    seconds, rounds = (1.0, 3) if args.quick else (args.seconds, args.rounds)
    print(machine())
    results = asyncio.run(measure(seconds, rounds, args.connections, args.uvloop, args.untuned))
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
