"""Scaling with active calls: cost per notification and memory per call.

For 10, 1,000 and 10,000 active calls (each got the documented incoming,
establishing and established notifications and has not ended), in a fresh
process each, with the bot's default settings (keep-alive on):

* memory per active call: Python allocations (tracemalloc) and resident set
  growth while the calls were opened, divided by their number;
* cost per notification: wall time to authenticate, parse, sequence, dispatch
  and run a no-op handler for DTMF-tone notifications spread over the active
  calls, garbage collection included (the fastest of 8 rounds).

Requests go through the bot's real receiver in-process (see
:mod:`benchmarks._inproc`), so the HTTP stack, the same at any scale, does not
dilute the ratio. Prints ``cost 10000/10: N.NN`` (target at most 1.2) and the
bytes per call (target at most 10 KB).

    python benchmarks/scaling.py [--notifications 8000] [--quick] [--untuned]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also run as a plain script

from benchmarks._common import (
    ESTABLISHED,
    ESTABLISHING,
    INCOMING,
    REPO,
    Template,
    machine,
    ratio_line,
    untune,
)
from benchmarks._inproc import InProcessBot
from callbot import Call, events
from callbot._gc import tune_for_serving
from callbot._log import configure_logging

SIZES = (10, 1_000, 10_000)
TONE = "33-call-subscribetotone-dtmf-tone-received.json"
# Requests in flight at once; fewer than the smallest number of calls, so that a batch
# never holds two notifications of one call and every size does the same work per item.
BATCH = 8
ROUNDS = 8


def _rss() -> int:
    """Resident set size of this process in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


async def _run(bot: InProcessBot, bodies: list[bytes]) -> None:
    """Post ``bodies`` in batches, letting the handlers catch up after each."""
    target = bot.handled
    for start in range(0, len(bodies), BATCH):
        for body in bodies[start : start + BATCH]:
            status = await bot.post(body)
            if status != 202:
                raise RuntimeError(f"notification refused with {status}")
        target += len(bodies[start : start + BATCH])
        while bot.handled < target:  # noqa: ASYNC110 - a counter, nothing to wait on
            await asyncio.sleep(0)


class _GcClock:
    """Time spent in garbage collection, by generation."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.counts = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._started
            self.counts[info["generation"]] += 1


async def scenario(
    active: int, notifications: int, traced: bool, untuned: bool = False
) -> dict[str, float]:
    """Open ``active`` calls, then time ``notifications`` tones across them.

    With ``traced``, Python allocations are traced while the calls are opened
    (slower, and it inflates the resident set, so costs come from untraced runs).
    """
    configure_logging("json", "warning")
    if untuned:
        untune()
    else:
        tune_for_serving()  # as CallBot.serve does
    lifecycle = [Template(name) for name in (INCOMING, ESTABLISHING, ESTABLISHED)]
    tone = Template(TONE)
    tone_text = tone.text.replace('"sequenceId": 1', '"sequenceId": {SEQ}')

    async def answered(_: Call, event: events.Event) -> None:
        # Graph accepted the bot's answer: the call is proven real, as a bot's own calls
        # are (unproven, past max_pending_calls of them would be let go).
        if type(event) is events.IncomingCall and bot.bot is not None:
            bot.bot._running().lifecycle.prove(event.call_id)

    async with InProcessBot(on_event=answered) as bot:
        # A few calls first, so that first-use costs are not charged to the calls measured.
        await _run(bot, [t.render(f"warm{i:05d}") for i in range(20) for t in lifecycle])
        gc.collect()
        if traced:
            tracemalloc.start()
        traced_before = tracemalloc.get_traced_memory()[0]
        rss_before = _rss()
        ids = [f"call{i:09d}" for i in range(active)]
        await _run(bot, [t.render(call_id) for call_id in ids for t in lifecycle])
        gc.collect()
        if traced:
            allocated = tracemalloc.get_traced_memory()[0] - traced_before
            tracemalloc.stop()
            return {"active": active, "traced_bytes_per_call": allocated / active}
        rss = _rss() - rss_before
        assert bot.bot is not None
        if len(bot.bot.active_calls()) != active + 20:
            raise RuntimeError("calls did not all become active")
        # Each call's tones numbered 1, 2, 3, ... as Graph numbers a call's tones (a number
        # skipped would hold the next tone for the reorder window).
        bodies = [
            tone_text.replace("{CALL_ID}", ids[n % active])
            .replace("{SEQ}", str(n // active + 1))
            .encode()
            for n in range(notifications)
        ]
        clock = _GcClock()
        gc.callbacks.append(clock)
        # The fastest of several rounds: other processes on the machine only ever add time.
        rounds: list[float] = []
        size = -(-notifications // ROUNDS)
        for start in range(0, notifications, size):
            chunk = bodies[start : start + size]
            started = time.perf_counter()
            await _run(bot, chunk)
            rounds.append((time.perf_counter() - started) / len(chunk))
        gc.callbacks.remove(clock)
    return {
        "active": active,
        "cost_us": min(rounds) * 1e6,
        "gc_us": sum(clock.seconds) / notifications * 1e6,
        "full_collections": clock.counts[2],
        "rss_bytes_per_call": rss / active,
    }


def _one(active: int, notifications: int, *options: str) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.scaling",
            "--one",
            str(active),
            "--notifications",
            str(notifications),
            *options,
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def measure(notifications: int, untuned: bool = False, repeats: int = 2) -> dict[str, Any]:
    """Each size in fresh processes; the figures and the cost ratio.

    The sizes take turns ``repeats`` times and each keeps its fastest run, so a
    burst of other work on the machine cannot land on one size only.
    """
    extra = ["--untuned"] if untuned else []
    rows: dict[int, dict[str, Any]] = {active: {} for active in SIZES}
    for _ in range(repeats):
        for active in SIZES:
            run = _one(active, notifications, *extra)
            best = rows[active]
            if not best or run["cost_us"] < best["cost_us"]:
                best.update(run)
    for active in SIZES:
        rows[active].update(_one(active, notifications, "--traced", *extra))
    ordered = [rows[active] for active in SIZES]
    return {
        "rows": ordered,
        "cost 10000/10": ordered[-1]["cost_us"] / ordered[0]["cost_us"],
        "bytes_per_call": ordered[-1]["traced_bytes_per_call"],
    }


def report(results: dict[str, Any], notifications: int) -> str:
    """The human-readable lines."""
    lines = [
        f"scaling: {notifications} tone notifications over the active calls, in-process",
        f"{'active':>7} {'us/notif':>9} {'of it GC':>9} {'full GCs':>9} "
        f"{'traced B/call':>14} {'RSS B/call':>11}",
    ]
    for row in results["rows"]:
        lines.append(
            f"{row['active']:>7} {row['cost_us']:>9.1f} {row['gc_us']:>9.1f} "
            f"{row['full_collections']:>9} {row['traced_bytes_per_call']:>14.0f} "
            f"{row['rss_bytes_per_call']:>11.0f}"
        )
    lines.append(ratio_line("cost 10000/10", results["cost 10000/10"]))
    lines.append(f"memory per active call: {results['bytes_per_call'] / 1024:.1f} KB")
    return "\n".join(lines)


def main() -> None:
    """Parse the command line, measure, print."""
    parser = argparse.ArgumentParser(description="callbot scaling with active calls")
    parser.add_argument("--notifications", type=int, default=8_000)
    parser.add_argument("--quick", action="store_true", help="5,000 notifications, one turn")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--untuned", action="store_true", help="without callbot's GC and digest optimisations"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    notifications = 5_000 if args.quick else args.notifications
    if args.one is not None:
        print(json.dumps(asyncio.run(scenario(args.one, notifications, args.traced, args.untuned))))
        return
    print(machine())
    results = measure(notifications, args.untuned, repeats=1 if args.quick else 2)
    print(report(results, notifications))
    if args.json is not None:
        args.json.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
