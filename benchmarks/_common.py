"""What the benchmarks share: bodies, the machine, server processes and the load generator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
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

    def __init__(self, name: str) -> None:
        text = (NOTIFICATIONS / name).read_text(encoding="utf-8")
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
async def server(kind: str, openid_config_url: str, *options: str) -> AsyncIterator[Server]:
    """Run ``python -m benchmarks.servers kind`` pinned to its own core until the block ends."""
    descriptor, log = tempfile.mkstemp(prefix=f"callbot-bench-{kind}-", suffix=".log")
    try:
        process = await asyncio.create_subprocess_exec(
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
        async with asyncio.timeout(30):
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
    """What the load generator saw."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_WRK_SCRIPT = """
local parts = {PARTS}
local prefix = "{PREFIX}"
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {TOKEN}"
request = function()
  n = n + 1
  local id = string.format("%s%09d", prefix, n)
  return wrk.format(nil, nil, nil, table.concat(parts, id))
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\": %d, \\"us\\": %d, \\"p50\\": %d, "
    .. "\\"p99\\": %d, \\"errors\\": %d}}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def _lua_string(text: str) -> str:
    # A JSON string literal without unicode escapes is a valid Lua string literal.
    return json.dumps(text, ensure_ascii=False)


def wrk_available() -> bool:
    """Whether the wrk load generator is installed."""
    return shutil.which("wrk") is not None


async def load(
    url: str,
    *,
    token: str,
    template: Template,
    prefix: str,
    connections: int,
    seconds: float,
    use_wrk: bool = True,
) -> LoadResult:
    """POST ``template`` with a fresh call id per request to ``url`` for ``seconds``.

    Uses wrk (one thread, pinned to its own core) when installed, else a
    bounded aiohttp client in a process of its own.
    """
    if use_wrk and wrk_available():
        return await _wrk(url, token, template, prefix, connections, seconds)
    return await _python_load(url, token, template, prefix, connections, seconds)


async def _wrk(
    url: str, token: str, template: Template, prefix: str, connections: int, seconds: float
) -> LoadResult:
    parts = "{" + ", ".join(_lua_string(p) for p in template.parts) + "}"
    script = _WRK_SCRIPT.replace("{{", "{").replace("}}", "}")
    script = script.replace("{PARTS}", parts).replace("{PREFIX}", prefix).replace("{TOKEN}", token)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        process = await asyncio.create_subprocess_exec(
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            handle.name,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=pin(LOAD_CPU),
        )
        out, err = await process.communicate()
    finally:
        os.unlink(handle.name)
    for line in out.decode().splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON ") :])
            return LoadResult(
                requests=data["requests"],
                seconds=data["us"] / 1e6,
                p50_ms=data["p50"] / 1000,
                p99_ms=data["p99"] / 1000,
                errors=data["errors"],
                tool="wrk",
            )
    raise RuntimeError(f"wrk said: {out.decode()} {err.decode()}")


async def _python_load(
    url: str, token: str, template: Template, prefix: str, connections: int, seconds: float
) -> LoadResult:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.loadgen",
        url,
        "--token",
        token,
        "--template",
        template.name,
        "--prefix",
        prefix,
        "--connections",
        str(connections),
        "--seconds",
        str(seconds),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=pin(LOAD_CPU),
    )
    out, _ = await process.communicate()
    data = json.loads(out.decode().strip().splitlines()[-1])
    return LoadResult(tool="aiohttp", **data)


def untune() -> None:
    """Undo two of callbot's optimisations in this process, to measure what they buy.

    The collector keeps the interpreter's thresholds (``CallBot.serve`` would
    raise them) and duplicate detection hashes ``json.dumps`` output instead of
    orjson's, as callbot did before both were measured.
    """
    import hashlib

    import callbot._bot
    import callbot._sequencing

    def stdlib_digest(raw: dict[str, Any]) -> bytes:
        text = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    callbot._bot.tune_for_serving = lambda: False  # type: ignore[attr-defined]
    callbot._sequencing._digest = stdlib_digest


def ratio_line(name: str, value: float, digits: int = 2) -> str:
    """``name: 0.NN`` exactly, for the table and for scripts that grep it."""
    return f"{name}: {value:.{digits}f}"
