"""Where a notification's time goes, stage by stage, in-process.

Whole calls (:func:`benchmarks._common.call_script`, 32 at a time with their
steps interleaved, as the load generator sends them) go through the bot's real
receiver without sockets (:mod:`benchmarks._inproc`), with the settings
``CallBot.serve`` applies. Prints:

* the cost per notification without any profiler (fastest of the rounds),
  and how much of it was garbage collection;
* two stages timed alone, without the profiler: authentication of the
  (cached) token and parsing a body into typed events;
* the same path under cProfile, split into stages: the cumulative time of
  each stage's entry point per notification, and its share of the profiled
  total. cProfile charges every Python call, so Python-heavy stages look
  larger than they are next to C ones (JSON decoding, pydantic-core); the
  shares guide, the unprofiled figure measures.

HTTP is not in these figures: ``throughput.py`` measures it as the CPU per
request of the ``bare`` server. With ``--server``, the ``full`` server of
the throughput benchmark runs under cProfile instead, loaded with whole calls
from 32 connections for 3 s, and the split is between aiohttp and the event
loop on one side and callbot's receiver and worker tasks on the other.

With ``--server --sampled``, the ``full`` server runs without a profiler and
py-spy (``pip install py-spy``; it reads the process from outside, which
needs ptrace rights) samples it under the same load: each stage's share of
the samples that were busy, and that share of the CPU per request the server
measured itself, in µs. Sampling charges nothing per call, so these shares
are the served path as it runs.

    python benchmarks/stages.py [--calls 2000] [--out full.prof]
    python benchmarks/stages.py --server [--out server.prof]
    python benchmarks/stages.py --server --sampled
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also run as a plain script

from benchmarks._common import APP_ID, LoadGenerator, Server, call_script, machine, server
from benchmarks._inproc import InProcessBot
from benchmarks.loadgen import bodies
from callbot._gc import tune_for_serving
from callbot._log import configure_logging
from callbot._parse import parse_body
from callbot.testing import TokenAuthority

# Calls played at once, as the load generator's 32 connections would.
AT_ONCE = 32
ROUNDS = 5

# stage -> the functions (file suffix, name) whose cumulative time is that stage's.
STAGES: dict[str, list[tuple[str, str]]] = {
    "authentication (cached token)": [("callbot/_auth.py", "verify")],
    "reading the body": [
        ("callbot/_receiver.py", "_buffered_body"),
        ("callbot/_receiver.py", "_read_limited"),
    ],
    "parsing, all of it": [("callbot/_parse.py", "parse_body_in_parts")],
    "  of which JSON decoding (orjson)": [("callbot/_parse.py", "_decode")],
    "  of which building the typed events": [("callbot/_parse.py", "_event_for")],
    "sequencing (store.ingest, up to the hand-off)": [("callbot/store/_memory.py", "ingest")],
    "  of which the duplicate digest": [("callbot/_sequencing.py", "_digest_of")],
    "  of which the merged call snapshot": [("callbot/_sequencing.py", "_merge")],
    "  of which event copies (model_copy)": [("pydantic/main.py", "model_copy")],
    "  of which queueing for dispatch (a task per call)": [("callbot/_dispatch.py", "submit")],
    "dispatch (the call's worker task, handler included)": [("callbot/_dispatch.py", "_work")],
    "  of which the call handle": [("callbot/graph/_services.py", "call")],
    "  of which the handler (a no-op)": [("benchmarks/_inproc.py", "count")],
    "  of which the handler metric": [("callbot/_metrics.py", "observe_handler")],
    "  of which the log context (bound per delivery)": [
        ("structlog/contextvars.py", "bind_contextvars"),
    ],
    "ack metric": [("callbot/_metrics.py", "observe")],
    "log level check": [("callbot/_log.py", "is_enabled")],
    "pydantic-core validation, wherever called": [
        (
            "~",
            "<method 'validate_python' of 'pydantic_core._pydantic_core.SchemaValidator' objects>",
        )
    ],
    "the receiver, all of it (auth to 202)": [("callbot/_receiver.py", "handle")],
}


RECEIVER = "the receiver, all of it (auth to 202)"
DISPATCH = "dispatch (the call's worker task, handler included)"


async def _play(bot: InProcessBot, payloads: list[bytes]) -> None:
    """Post ``payloads`` in groups of ``AT_ONCE``, letting the handlers catch up after each."""
    target = bot.handled
    for start in range(0, len(payloads), AT_ONCE):
        for body in payloads[start : start + AT_ONCE]:
            if await bot.post(body) != 202:
                raise RuntimeError("a notification was refused")
        target += len(payloads[start : start + AT_ONCE])
        while bot.handled < target:  # noqa: ASYNC110 - a counter, nothing to wait on
            await asyncio.sleep(0)


def _payloads(calls: int, prefix: str) -> list[bytes]:
    steps = len(call_script())
    generator = bodies(call_script(), prefix, AT_ONCE)
    return [next(generator) for _ in range(calls * steps)]


class _GcClock:
    """Seconds spent in garbage collection."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


async def _alone(bot: InProcessBot) -> dict[str, float]:
    """Seconds per notification of authentication and of parsing, each timed by itself."""
    assert bot.bot is not None
    assert bot._headers is not None
    receiver = bot.bot.receiver
    header = bot._headers["Authorization"]
    payloads = _payloads(AT_ONCE, "alone-")
    best = {"auth": float("inf"), "parse": float("inf")}
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in payloads:
            await receiver._auth.verify(header)
        best["auth"] = min(best["auth"], (time.perf_counter() - started) / len(payloads))
        started = time.perf_counter()
        for body in payloads:
            parse_body(body)
        best["parse"] = min(best["parse"], (time.perf_counter() - started) / len(payloads))
    return best


async def measure(
    calls: int, out: Path | None
) -> tuple[float, float, dict[str, float], pstats.Stats, int]:
    """Unprofiled cost and GC per notification (fastest round), stages alone, the profile."""
    configure_logging("json", "info")
    tune_for_serving()  # as CallBot.serve does
    async with InProcessBot() as bot:
        await _play(bot, _payloads(AT_ONCE * 4, "warm"))
        rounds: list[tuple[float, float]] = []
        for n in range(ROUNDS):
            payloads = _payloads(calls, f"round{n}-")
            clock = _GcClock()
            gc.callbacks.append(clock)
            started = time.perf_counter()
            await _play(bot, payloads)
            elapsed = time.perf_counter() - started
            gc.callbacks.remove(clock)
            rounds.append((elapsed / len(payloads), clock.seconds / len(payloads)))
        alone = await _alone(bot)
        payloads = _payloads(calls, "profiled-")
        profile = cProfile.Profile()
        profile.enable()
        await _play(bot, payloads)
        profile.disable()
    if out is not None:
        profile.dump_stats(out)
    cost, collecting = min(rounds)
    return cost, collecting, alone, pstats.Stats(profile), len(payloads)


def stage_table(stats: pstats.Stats, notifications: int) -> list[tuple[str, float, float]]:
    """(stage, µs per notification, share of the profiled total) for each stage."""
    table: dict[tuple[str, str], float] = {}
    total = 0.0
    for (filename, _, name), row in stats.stats.items():  # type: ignore[attr-defined]
        total += row[2]  # own time; their sum is the whole profiled time
        for path, function in (p for paths in STAGES.values() for p in paths):
            if name == function and (path == "~" or filename.endswith(path)):
                table[path, function] = table.get((path, function), 0.0) + row[3]
    rows = []
    for stage, paths in STAGES.items():
        seconds = sum(table.get(p, 0.0) for p in paths)
        rows.append((stage, seconds / notifications * 1e6, seconds / total))
    outside = total - sum(table.get(p, 0.0) for p in (*STAGES[RECEIVER], *STAGES[DISPATCH]))
    rows.append(
        ("the rest: the event loop, the harness", outside / notifications * 1e6, outside / total)
    )
    rows.append(("profiled total", total / notifications * 1e6, 1.0))
    return rows


# stage -> (file suffix, function) whose cumulative time it is, in the served profile.
SERVER_STAGES: dict[str, tuple[str, str]] = {
    "aiohttp: the request, from parsed head to written response": (
        "aiohttp/web_protocol.py",
        "_handle_request",
    ),
    "  callbot's receiver (auth to 202)": ("callbot/_receiver.py", "handle"),
    "  socket writes (the kernel's loopback included)": (
        "~",
        "<method 'send' of '_socket.socket' objects>",
    ),
    "aiohttp: reading and parsing requests": ("aiohttp/web_protocol.py", "data_received"),
    "callbot's worker tasks (dispatch, handler included)": ("callbot/_dispatch.py", "_work"),
}


# stage -> (file suffix, function) of its entry point, as py-spy names frames.
SAMPLED_STAGES: dict[str, tuple[str, str]] = {
    "aiohttp: a request, from parsed head to written response": (
        "aiohttp/web_protocol.py",
        "_handle_request",
    ),
    "  callbot's receiver (auth to 202)": ("callbot/_receiver.py", "handle"),
    "    of which authentication (cached token)": ("callbot/_auth.py", "verify"),
    "    of which parsing into typed events": ("callbot/_parse.py", "parse_body_in_parts"),
    "    of which sequencing and queueing (the store's ingest)": (
        "callbot/store/_memory.py",
        "ingest",
    ),
    "  writing the response": ("aiohttp/web_protocol.py", "finish_response"),
    "aiohttp: reading and parsing requests": ("aiohttp/web_protocol.py", "data_received"),
    "callbot's worker tasks (dispatch, handler included)": ("callbot/_dispatch.py", "_work"),
}
# A py-spy frame: "Qualified.name (path/to/file.py:line)".
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


async def _sampled(samples: Path, seconds: float) -> tuple[int, float]:
    """Sample the ``full`` server with py-spy for ``seconds`` of whole calls; the requests
    answered meanwhile and the server's CPU seconds over them."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--sampled needs py-spy on PATH: pip install py-spy")
    async with _warm_full_server() as (load, srv):
        before = (await srv.stats())["cpu_seconds"]
        command = [spy, "record", "--pid", str(srv.process.pid), "--rate", "2000"]
        command += ["--duration", str(int(seconds)), "--format", "raw"]
        # Blocking mode: the process is paused for each sample, so every stack is whole.
        command += ["--output", str(samples)]
        sampler = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        result = await load.run(srv.url, prefix="sampled-", connections=32, seconds=seconds)
        cpu = (await srv.stats())["cpu_seconds"] - before
        _, said = await sampler.communicate()
        if sampler.returncode != 0:
            raise SystemExit(f"py-spy failed: {said.decode(errors='replace')[-500:]}")
        return result.requests, cpu


def sampled_table(samples: Path, us_per_request: float) -> list[tuple[str, float, float]]:
    """(stage, µs per request, share of busy samples), from py-spy's raw output."""
    busy = 0
    counts = dict.fromkeys(SAMPLED_STAGES, 0)
    for line in samples.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        busy += int(count)
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            if match is not None:
                frames.append((match["file"], match["name"].rpartition(".")[2]))
        for stage, (path, function) in SAMPLED_STAGES.items():
            if any(name == function and file.endswith(path) for file, name in frames):
                counts[stage] += int(count)
    if busy == 0:
        raise SystemExit(f"no samples in {samples}")
    return [(stage, us_per_request * count / busy, count / busy) for stage, count in counts.items()]


@contextlib.asynccontextmanager
async def _warm_full_server(*options: str) -> AsyncIterator[tuple[LoadGenerator, Server]]:
    """The ``full`` server and a load generator, after half a second of whole calls."""
    async with TokenAuthority() as authority:
        token = authority.mint(audience=APP_ID, expires_in=3600)
        async with (
            LoadGenerator(token) as load,
            server("full", authority.openid_config_url, *options) as srv,
        ):
            await load.run(srv.url, prefix="warm-", connections=32, seconds=0.5)
            yield load, srv


async def _served(out: Path) -> int:
    """Run the ``full`` server under cProfile with 3 s of whole calls; the requests sent."""
    async with _warm_full_server("--profile", str(out)) as (load, srv):
        result = await load.run(srv.url, prefix="profiled-", connections=32, seconds=3.0)
        return result.requests


def served_table(out: Path) -> None:
    """Print the served profile's split by stage."""
    stats = pstats.Stats(str(out))
    rows = stats.stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in rows.values())
    print(f"{'stage':<58} {'share':>6}")
    rest = total
    for stage, (path, function) in SERVER_STAGES.items():
        seconds = sum(
            row[3]
            for (filename, _, name), row in rows.items()
            if name == function and (path == "~" or filename.endswith(path))
        )
        if not stage.startswith(" "):
            rest -= seconds
        print(f"{stage:<58} {seconds / total:>6.1%}")
    print(f"{'the rest: the event loop, tasks, timers, the idle wait':<58} {rest / total:>6.1%}")


def main() -> None:
    """Parse the command line, measure, print."""
    parser = argparse.ArgumentParser(description="callbot's cost per notification, by stage")
    parser.add_argument("--calls", type=int, default=2000, help="whole calls per round")
    parser.add_argument("--out", type=Path, help="also write the cProfile statistics here")
    parser.add_argument("--server", action="store_true", help="profile the served full path")
    parser.add_argument(
        "--sampled", action="store_true", help="with --server: sample it with py-spy instead"
    )
    args = parser.parse_args()
    print(machine())
    if args.server and args.sampled:
        samples = Path(tempfile.mkdtemp()) / "server.samples"
        requests, cpu = asyncio.run(_sampled(samples, seconds=5.0))
        us_per_request = cpu / requests * 1e6
        print(
            f"the full server sampled by py-spy, {requests} requests of whole calls, "
            f"32 connections, {us_per_request:.1f} us of CPU per request:"
        )
        print(f"{'stage':<58} {'us/req':>7} {'share':>6}")
        for stage, micros, share in sampled_table(samples, us_per_request):
            print(f"{stage:<58} {micros:>7.1f} {share:>6.1%}")
        return
    if args.server:
        out = args.out or Path(tempfile.mkdtemp()) / "server.prof"
        requests = asyncio.run(_served(out))
        print(
            f"the full server under cProfile, {requests} requests of whole calls, 32 connections:"
        )
        served_table(out)
        return
    cost, collecting, alone, stats, notifications = asyncio.run(measure(args.calls, args.out))
    print(
        f"in-process, whole calls of {len(call_script())} notifications, {AT_ONCE} at once: "
        f"{cost * 1e6:.1f} us per notification without the profiler (fastest of {ROUNDS}), "
        f"of which garbage collection {collecting * 1e6:.1f} us"
    )
    print(
        f"timed alone: authentication {alone['auth'] * 1e6:.1f} us, "
        f"parsing into typed events {alone['parse'] * 1e6:.1f} us per notification"
    )
    print(f"under cProfile ({notifications} notifications):")
    print(f"{'stage':<54} {'us/notif':>9} {'share':>6}")
    for stage, micros, share in stage_table(stats, notifications):
        print(f"{stage:<54} {micros:>9.1f} {share:>6.1%}")


if __name__ == "__main__":
    main()
