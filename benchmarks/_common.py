"""What the benchmarks share: bodies, the machine, server processes and the load generator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
NOTIFICATIONS = REPO / "tests" / "fixtures" / "notifications"
APP_ID = "6c4a7c4e-2b1a-4d7e-9a53-7a1bfb4c0d11"
CALLBACK_PATH = "/api/calls"
INCOMING = "09-call-answer-ex1-incoming-call-created.json"
ESTABLISHING = "10-call-answer-call-establishing.json"
ESTABLISHED = "11-call-answer-call-established.json"
ROSTER = "48-participant-invite-ex1-roster-participant-added.json"
TONE = "33-call-subscribetotone-dtmf-tone-received.json"
TERMINATING = "40-call-delete-call-terminating.json"
TERMINATED = "41-call-delete-call-terminated-5001.json"
PLACEHOLDER = "{CALL_ID}"
# The server gets one core, the load generator the other, so neither steals from the other.
SERVER_CPU = 0
LOAD_CPU = 1


def cpus() -> list[int]:
    """The CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0))


def machine() -> str:
    """One line naming the machine: CPU model, cores, Python."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{model}, nproc={os.cpu_count()}, Python {platform.python_version()} "
        f"({platform.python_implementation()}), {platform.system()} {platform.release()}"
    )


class Template:
    """A documented notification body whose call id can be replaced per request."""

    def __init__(self, name: str, replace: dict[str, str] | None = None) -> None:
        text = (NOTIFICATIONS / name).read_text(encoding="utf-8")
        for old, new in (replace or {}).items():
            if old not in text:
                raise ValueError(f"{name} has no {old!r}")
            text = text.replace(old, new)
        json.loads(text)  # only strict-JSON examples are useful here
        match = re.search(r"calls/([^/\"]+)", text)
        if match is None:
            raise ValueError(f"{name} names no call")
        self.name = name
        self.text = text.replace(match.group(1), PLACEHOLDER)

    @property
    def parts(self) -> list[str]:
        """The text around each occurrence of the call id."""
        return self.text.split(PLACEHOLDER)

    def render(self, call_id: str) -> bytes:
        """The body for ``call_id``."""
        return self.text.replace(PLACEHOLDER, call_id).encode()


def call_script() -> list[Template]:
    """One whole call as Graph reports it: offered, answered, a roster change, tones, hung up."""
    tones = [Template(TONE, {'"sequenceId": 1': f'"sequenceId": {n}'}) for n in (1, 2, 3)]
    return [
        Template(INCOMING),
        Template(ESTABLISHING),
        Template(ESTABLISHED),
        Template(ROSTER),
        *tones,
        Template(TERMINATING),
        Template(TERMINATED),
    ]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def pin(cpu: int) -> Callable[[], None]:
    """A ``preexec_fn`` that pins the child to ``cpu`` when this machine has it."""

    def apply() -> None:
        if cpu in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {cpu})

    return apply


@dataclass
class Server:
    """A benchmark server running in its own process."""

    kind: str
    port: int
    process: asyncio.subprocess.Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{CALLBACK_PATH}"

    async def stats(self) -> dict[str, Any]:
        """What the server counted (handled notifications, and latencies if it stamps them)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.port}/bench/stats") as response,
        ):
            result: dict[str, Any] = await response.json()
            return result

    async def reset(self) -> None:
        """Forget what was counted so far (after a warm-up)."""
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{self.port}/bench/reset") as response,
        ):
            response.raise_for_status()


@contextlib.asynccontextmanager
async def server(
    kind: str, openid_config_url: str, *options: str, wrapper: Sequence[str] = ()
) -> AsyncIterator[Server]:
    """Run ``python -m benchmarks.servers kind`` pinned to its own core until the block ends;
    ``wrapper`` is a command that runs it (valgrind, say)."""
    descriptor, log = tempfile.mkstemp(prefix=f"callbot-bench-{kind}-", suffix=".log")
    try:
        process = await asyncio.create_subprocess_exec(
            *wrapper,
            sys.executable,
            "-m",
            "benchmarks.servers",
            kind,
            "--openid-config-url",
            openid_config_url,
            *options,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=descriptor,
            preexec_fn=pin(SERVER_CPU),
        )
    finally:
        os.close(descriptor)
    try:
        assert process.stdout is not None
        # Under a wrapper such as valgrind, starting takes minutes rather than seconds.
        async with asyncio.timeout(600 if wrapper else 30):
            line = (await process.stdout.readline()).decode()
        if not line.startswith("LISTENING "):
            said = await asyncio.to_thread(Path(log).read_text)
            raise RuntimeError(f"{kind} server did not start: {said[-2000:]}")
        yield Server(kind, int(line.split()[1]), process)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        os.remove(log)


@dataclass
class LoadResult:
    """What the load generator saw during one command."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_seconds: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def busy(self) -> float:
        """The share of one core the generator used: near 1.0, it was the bottleneck."""
        return self.cpu_seconds / self.seconds if self.seconds else 0.0


class LoadGenerator:
    """:mod:`benchmarks.loadgen` in a process of its own, pinned to its own core, kept up.

    ``async with LoadGenerator(token) as load: await load.run(url, ...)``.
    """

    def __init__(self, token: str, calls_per_connection: int = 4) -> None:
        self._argv = [
            sys.executable,
            "-m",
            "benchmarks.loadgen",
            "--token",
            token,
            "--calls-per-connection",
            str(calls_per_connection),
        ]
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> LoadGenerator:
        self._process = await asyncio.create_subprocess_exec(
            *self._argv,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=pin(LOAD_CPU),
        )
        if await self._line() != "READY":
            raise RuntimeError("the load generator did not start")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._process is not None and self._process.returncode is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await self._process.wait()
            except TimeoutError:
                self._process.kill()
                await self._process.wait()

    async def _line(self) -> str:
        assert self._process is not None
        assert self._process.stdout is not None
        line = (await self._process.stdout.readline()).decode().strip()
        if not line:
            raise RuntimeError("the load generator stopped")
        return line

    async def run(self, url: str, *, prefix: str, connections: int, seconds: float) -> LoadResult:
        """Whole calls to ``url`` from ``connections`` connections for about ``seconds``."""
        assert self._process is not None
        assert self._process.stdin is not None
        command = {"url": url, "prefix": prefix, "connections": connections, "seconds": seconds}
        self._process.stdin.write(json.dumps(command).encode() + b"\n")
        await self._process.stdin.drain()
        return LoadResult(**json.loads(await self._line()))


def untune() -> None:
    """Undo two of callbot's optimisations in this process, to measure what they buy.

    The collector keeps the interpreter's thresholds (``CallBot.serve`` would
    raise them) and duplicate detection hashes ``json.dumps`` output instead of
    orjson's, as callbot did before both were measured.
    """
    import callbot._bot
    import callbot._sequencing

    def stdlib_canonical(value: Any) -> bytes:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode()

    callbot._bot.tune_for_serving = lambda: False  # type: ignore[attr-defined]
    callbot._sequencing._canonical_bytes = stdlib_canonical


def ratio_line(name: str, value: float, digits: int = 2) -> str:
    """``name: 0.NN`` exactly, for the table and for scripts that grep it."""
    return f"{name}: {value:.{digits}f}"
