"""The Redis store against a real redis-server: several instances, one truth.

Needs ``redis-server`` (``apt-get install -y redis-server``); without it these
tests skip, unless ``CALLBOT_TEST_REQUIRE_SERVERS=1`` makes them fail. One
server is started on 127.0.0.1 for the session (no persistence, a temporary
directory) and emptied before each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from callbot import (
    Call,
    CallBot,
    CallEnded,
    ConfigurationError,
    OperationFailed,
    RunSuperseded,
    StoreUnavailable,
    Target,
    current_attempt,
    events,
    models,
)
from callbot._ids import id_key
from callbot._journal import Attempt
from callbot._lifecycle import ENDED_MEMORY, Lifecycle
from callbot._sequencing import Placed
from callbot.store import _codec, _redis, _scripts
from callbot.store._redis import follow_primary
from callbot.testing import DeliveryOptions, FakeGraph, TokenAuthority
from callbot.testing import builders as b

from .conftest import APP_ID, BotServer, make_bot, until
from .test_digits import MENU, pin_then_choice
from .test_hosting import BotProcess, bot_env, post_signed, signal_twice, wait_for_line
from .test_redis_bot import label, log_key
from .test_security_tokens import OTHER_TENANT as OTHER
from .test_security_tokens import without_tenant

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parent.parent
LIFECYCLE = [
    "IncomingCall",
    "establishing",
    "established",
    "tone:tone1",
    "tone:tone2",
    "terminated",
]
KEY_PREFIX = f"callbot:{APP_ID}:"
THANKS = "https://cdn.example.test/thanks.wav"


# -- a redis-server of our own -------------------------------------------------------


def _free_port(also: int = 0) -> int:
    """A port free now on 127.0.0.1 (another process may take it before it is bound); with
    ``also``, one whose port ``also`` above is free too."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if not also:
            return port
        if port + also > 65535:
            continue
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", port + also))
        except OSError:
            continue
        return port


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None and os.access("/usr/bin/redis-server", os.X_OK):
        found = "/usr/bin/redis-server"
    if found is None:
        if os.environ.get("CALLBOT_TEST_REQUIRE_SERVERS") == "1":
            pytest.fail("redis-server is required here: apt-get install -y redis-server")
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    return found


class RedisServer:
    """A redis-server process on 127.0.0.1, its files in ``directory``.

    Without persistence unless ``persistent`` (then every write is in the
    append-only file before Redis answers it); ``args`` adds options, or makes them
    for the port Redis is started on (a cluster's file, a second port); ``spare``
    is how far above that port a second one it binds lies (0: none).
    """

    def __init__(
        self,
        binary: str,
        directory: Path,
        port: int | None = None,
        *,
        persistent: bool = False,
        args: tuple[str, ...] | Callable[[int], tuple[str, ...]] = (),
        spare: int = 0,
    ) -> None:
        self.binary = binary
        self.directory = directory
        self._spare = spare
        self.port = port or _free_port(spare)
        # A port picked here may be taken by another process before Redis binds it: the first
        # start may then try another. A restart keeps its port, which clients already know.
        self._may_move = port is None
        self.persistent = persistent
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        for _ in range(4 if self._may_move else 1):
            if self._start_once():
                self._may_move = False
                return
            self.port = _free_port(self._spare)
        raise RuntimeError("redis-server did not start")

    def _start_once(self) -> bool:
        """Start on ``self.port``; False when Redis exited at once (its port was taken) and
        another may be tried."""
        log = (self.directory / f"redis-{self.port}.log").open("ab")
        persistence = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")
        self.process = subprocess.Popen(
            [
                *(self.binary, "--bind", "127.0.0.1", "--port", str(self.port)),
                *(persistence if self.persistent else ("--save", "", "--appendonly", "no")),
                *("--dir", str(self.directory)),
                *(self.args(self.port) if callable(self.args) else self.args),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        with redis.Redis(port=self.port, socket_timeout=1) as client:
            while True:
                try:
                    client.ping()
                    return True
                except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                    if self.process.poll() is not None and self._may_move:
                        self.process = None
                        return False
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        self.stop()
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)

    def shutdown(self) -> None:
        """A graceful stop: Redis writes what it must and exits."""
        if self.process is not None:
            client = redis.Redis(port=self.port, socket_timeout=5)
            with client, contextlib.suppress(redis.ConnectionError):
                client.shutdown()
            self.process.wait(timeout=30)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(_redis_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis() -> Iterator[Callable[..., RedisServer]]:
    """``own_redis(directory, ...)``: a RedisServer of the test's own (not started yet),
    stopped when the test ends. Asked for before ``serve``, it stops after the test's bots:
    a bot stopping with its Redis gone spends its drain trying to hand its calls over."""
    servers: list[RedisServer] = []

    def make(directory: Path, **options: Any) -> RedisServer:
        servers.append(RedisServer(_redis_binary(), directory, **options))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    with redis.Redis(port=redis_server.port) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
async def rdb(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def lifecycle_steps(call_id: str) -> list[list[dict[str, Any]]]:
    """One call's notifications; ``established`` is sent before ``establishing``."""
    return [
        [b.incoming_call(call_id)],
        [b.call_state(call_id, "established"), b.call_state(call_id, "establishing")],
        [b.tone(call_id, "tone1", 1), b.tone(call_id, "tone2", 2)],
        [b.call_terminated(call_id)],
    ]


def call_key(call_id: str) -> str:
    return call_id.replace("-", "").lower()


async def read_logs(rdb: Any, calls: list[str]) -> dict[str, list[dict[str, Any]]]:
    await follow_primary(rdb)
    pipe = rdb.pipeline(transaction=False)
    for call_id in calls:
        pipe.lrange(log_key(call_key(call_id)), 0, -1)
    lines = await pipe.execute()
    return {c: [json.loads(x) for x in found] for c, found in zip(calls, lines, strict=True)}


async def settled(rdb: Any, calls: list[str] | None = None) -> bool:
    """Nothing runs and nothing waits: no call is leased, none is runnable, and no inbox
    (of ``calls``, or of any call) holds an entry: entries are acknowledged once their
    handlers finished.

    Without the inboxes, a call looked settled while work of it waited unleased: popped
    off ``runnable`` and not claimed yet, or left by an owner whose lease ran out, until
    the reaper's next round put it back. (Inboxes of other calls may keep an entry for
    good where a failover lost writes, as without ``store_replicas``.)
    """
    # Read to the end: an async iterator left midway keeps its connection.
    keys = [key async for key in rdb.scan_iter(match=KEY_PREFIX + "*", count=1000)]
    if any(key.endswith(":lease") for key in keys):
        return False
    if int(await rdb.zcard(KEY_PREFIX + "runnable")):
        return False
    if calls is None:
        inboxes = [key for key in keys if key.endswith(":inbox")]
    else:
        inboxes = [inbox_key(call_key(call)) for call in calls]
    pipe = rdb.pipeline(transaction=False)
    for inbox in inboxes:
        pipe.xlen(inbox)
    return not any(int(length) for length in await pipe.execute()) if inboxes else True


def inbox_key(call: str) -> str:
    (inbox,) = _redis._Keys(KEY_PREFIX).of(call, "inbox")
    return inbox


def whole(entries: list[dict[str, Any]]) -> bool:
    """Whether a call's log holds a line of each step of its lifecycle."""
    return set(LIFECYCLE) <= {entry["label"] for entry in entries}


async def wait_for_logs(
    rdb: Any, calls: list[str], *, within: float
) -> dict[str, list[dict[str, Any]]]:
    """Every call's log once each has its whole lifecycle and the store settled."""
    deadline = time.monotonic() + within
    while True:
        logs = await read_logs(rdb, calls)
        # Every label, not as many lines: a flagged re-run is a line too, and stands in for
        # no other label (the reaper may start a call's last entry after a look that saw
        # the store settled).
        short = {c: [e["label"] for e in v] for c, v in logs.items() if not whole(v)}
        if not short and await settled(rdb, calls):
            return await read_logs(rdb, calls)
        if time.monotonic() > deadline:
            example = next(iter(short), None)
            late = (
                []
                if example is None
                else await rdb.lrange(log_key(call_key(example), "late"), 0, -1)
            )
            raise AssertionError(
                f"{len(short)} calls not finished, e.g. {list(short.items())[:3]}; "
                f"late lines of {example}: {late}; settled: {await settled(rdb, calls)}"
            )
        await asyncio.sleep(0.1)


# -- bots as separate processes ------------------------------------------------------


class Bots:
    """``callbot run`` processes of tests/test_redis_bot.py sharing one Redis."""

    def __init__(self, authority: TokenAuthority, redis_url: str, logs: Path) -> None:
        self.authority = authority
        self.redis_url = redis_url
        self.logs = logs
        self.ports: list[int] = []
        self.processes: list[asyncio.subprocess.Process] = []
        self.alive: list[int] = []
        self.session: aiohttp.ClientSession | None = None
        self.token = authority.mint(audience=APP_ID, expires_in=3600)

    async def start(self, count: int, source: Path = REPO, /, **env: str) -> None:
        """Start ``count`` more instances of the callbot package in ``source``."""
        base = {
            **os.environ,
            "CALLBOT_STORE": self.redis_url,
            "CALLBOT_APP_ID": APP_ID,
            "CALLBOT_OPENID_CONFIG_URL": self.authority.openid_config_url,
            "CALLBOT_PUBLIC_URL": "https://bot.example.test",
            # A held `established` waits for its `establishing`, which a loaded machine may
            # deliver more than a few seconds later: closed sooner, `establishing` is stale.
            "CALLBOT_REORDER_WINDOW": "30",
            "CALLBOT_KEEP_ALIVE": "0",
            "CALLBOT_ANSWER_WARNING_AFTER": "3600",
            "CALLBOT_SHUTDOWN_TIMEOUT": "2",
            "CALLBOT_LOG_FORMAT": "json",
            # Info, for the line that says which port the system picked (--port 0).
            "CALLBOT_LOG_LEVEL": "info",
            **env,
        }
        first = len(self.processes)
        for index in range(first, first + count):
            with (self.logs / f"bot-{index}.log").open("ab") as out:
                process = await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "callbot", "run", "tests.test_redis_bot:bot"),
                    *("--port", "0"),
                    cwd=source,
                    env=base,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            self.ports.append(0)
            self.processes.append(process)
            self.alive.append(index)
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=10)
            )
        await asyncio.gather(*(self._ready(i) for i in range(first, first + count)))

    def _listening_port(self, index: int) -> int:
        """The port bot ``index`` said it listens on, 0 before it said so."""
        with contextlib.suppress(FileNotFoundError):
            for line in (self.logs / f"bot-{index}.log").read_text().splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and entry.get("event") == "listening":
                        return int(entry["port"])
        return 0

    async def _ready(self, index: int) -> None:
        assert self.session is not None
        # Several Python processes importing at once on a loaded machine: 30 s was seen short.
        deadline = time.monotonic() + 60
        while True:
            if self.ports[index] == 0:
                self.ports[index] = self._listening_port(index)
            with contextlib.suppress(aiohttp.ClientError):
                if self.ports[index]:
                    url = f"http://127.0.0.1:{self.ports[index]}/readyz"
                    async with self.session.get(url) as response:
                        if response.status == 200:
                            return
            if self.processes[index].returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"bot {index} did not become ready; see {self.logs}")
            await asyncio.sleep(0.1)

    def pid(self, index: int) -> int:
        return self.processes[index].pid

    async def kill(self, index: int) -> None:
        self.alive.remove(index)
        self.processes[index].kill()
        await self.processes[index].wait()

    async def stop(self, index: int) -> None:
        """SIGTERM: the instance drains and hands its calls over, as in a rolling upgrade."""
        self.alive.remove(index)
        self.processes[index].terminate()
        await self.processes[index].wait()

    def pause(self, index: int) -> None:
        """SIGSTOP; the balancer stops sending it requests (its health checks fail)."""
        self.alive.remove(index)
        os.kill(self.pid(index), signal.SIGSTOP)

    def resume(self, index: int) -> None:
        os.kill(self.pid(index), signal.SIGCONT)
        self.alive.append(index)

    async def post(self, index: int, item: dict[str, Any]) -> int:
        assert self.session is not None
        async with self.session.post(
            f"http://127.0.0.1:{self.ports[index]}/api/calls",
            data=json.dumps(b.notifications(item)),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        ) as response:
            return response.status

    async def deliver(self, item: dict[str, Any], rng: random.Random) -> int:
        """Post to a random live instance until one accepts it, as Graph retries; who did."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            index = rng.choice(self.alive)
            try:
                if await self.post(index, item) == 202:
                    return index
            except (aiohttp.ClientError, TimeoutError):
                pass  # killed under us: Graph would retry, the balancer would pick another
            await asyncio.sleep(0.02)
        raise AssertionError("no instance accepted the notification")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        for process in self.processes:
            if process.returncode is None:
                process.terminate()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 8)
            except TimeoutError:
                process.kill()
                await process.wait()


@pytest.fixture
async def bots(authority: TokenAuthority, redis_url: str, tmp_path: Path) -> AsyncIterator[Bots]:
    group = Bots(authority, redis_url, tmp_path)
    try:
        yield group
    finally:
        await group.close()


async def spray(bots: Bots, calls: list[str], rng: random.Random) -> dict[tuple[str, str], int]:
    """Each call's lifecycle to random instances, duplicated and partly out of order.

    Returns which instance accepted each (call, label) first.
    """
    accepted: dict[tuple[str, str], int] = {}
    # Bounded: 32 calls under way at a time, not hundreds posting at once.
    running = asyncio.Semaphore(32)

    async def lifecycle(call_id: str) -> None:
        async with running:
            await steps(call_id)

    async def steps(call_id: str) -> None:
        sent: list[dict[str, Any]] = []
        for step in lifecycle_steps(call_id):
            for item in step:
                copies = rng.choice((1, 2, 2, 3))
                # copies go to different instances at the same moment
                who = await asyncio.gather(*(bots.deliver(item, rng) for _ in range(copies)))
                event_label = label(_parse_one(item))
                accepted.setdefault((call_id, event_label), who[0])
                sent.append(item)
            if rng.random() < 0.3:
                await bots.deliver(rng.choice(sent), rng)  # a late repeat

    await asyncio.gather(*(lifecycle(call_id) for call_id in calls))
    return accepted


def _parse_one(item: dict[str, Any]) -> events.Event:
    from callbot._parse import parse_payload

    (event,) = parse_payload(b.notifications(item))
    return event


def first_runs(entries: list[dict[str, Any]]) -> list[str]:
    """A call's labels less its re-runs, checking that every re-run was flagged as one.

    An instance that loses a call (killed, paused past its lease) may have run a
    notification's handlers without acknowledging it; the next owner runs them
    again, and ``current_attempt().redelivered`` says so.
    """
    labels: list[str] = []
    for entry in entries:
        if entry["label"] in labels:
            assert entry["redelivered"], f"{entry['label']} ran twice, unflagged: {entries}"
            continue
        labels.append(entry["label"])
    return labels


async def wait_for(predicate: Any, *, within: float = 30.0) -> None:
    """Wait until the awaitable ``predicate()`` holds; fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110 - state in Redis or other processes
            await asyncio.sleep(0.05)


async def lines_of(rdb: Any, calls: list[str], pid: int) -> list[dict[str, Any]]:
    logs = await read_logs(rdb, calls)
    return [entry for entries in logs.values() for entry in entries if entry["pid"] == pid]


# -- the tests ---------------------------------------------------------------------


async def test_a_call_with_an_entry_waiting_unleased_is_not_settled(rdb: aioredis.Redis) -> None:
    """The waits of these tests hold out for work nobody holds a lease on: an entry left in a
    call's inbox by an owner whose lease ran out (or popped off ``runnable`` and not claimed
    yet) runs later, once the reaper's next round puts the call back."""
    inbox = inbox_key("left")
    assert await settled(rdb)
    entry = await rdb.xadd(inbox, {"e": "{}"})
    assert not await settled(rdb)
    assert not await settled(rdb, ["left"])
    assert await settled(rdb, ["other"])  # only the calls waited for count
    await rdb.xdel(inbox, entry)  # acknowledged: run and done
    assert await settled(rdb)


async def test_three_processes_run_each_call_in_order_exactly_once(
    bots: Bots, rdb: aioredis.Redis
) -> None:
    await bots.start(3, CALLBOT_STORE_LEASE="5")
    calls = [f"call-{i:03d}" for i in range(240)]
    await spray(bots, calls, random.Random(11))
    logs = await wait_for_logs(rdb, calls, within=30)
    pids: set[int] = set()
    for call_id, entries in logs.items():
        assert [e["label"] for e in entries] == LIFECYCLE, call_id
        assert entries[2]["previous"] == "establishing", call_id
        assert not any(e["redelivered"] for e in entries), call_id
        pids.update(e["pid"] for e in entries)
    assert pids == {bots.pid(i) for i in range(3)}  # every instance did its share
    leftovers = await rdb.zcard(KEY_PREFIX + "runnable")
    assert leftovers == 0


async def test_a_killed_process_s_calls_are_taken_over_by_the_others(
    bots: Bots, rdb: aioredis.Redis
) -> None:
    """Instance SIGKILL. Checks: no accepted notification lost; order per call kept;
    what the killed instance had in hand runs again elsewhere, flagged as a re-run.

    The victim is frozen first (its handlers stop returning once ``test:freeze:{pid}``
    exists), so that what it holds is stable whatever the machine's load: the test
    waits on conditions only.
    """
    await bots.start(
        3, CALLBOT_STORE_LEASE="1", CALLBOT_TEST_HANDLER_DELAY="0.03", CALLBOT_TEST_FREEZE="1"
    )
    victim = 0
    victim_pid = bots.pid(victim)
    calls = [f"kill-{i:03d}" for i in range(90)]
    rng = random.Random(5)
    sprayed = asyncio.create_task(spray(bots, calls, rng))

    async def victim_ran(count: int, frozen: bool) -> bool:
        lines = await lines_of(rdb, calls, victim_pid)
        return sum(1 for line in lines if line["frozen"] == frozen) >= count

    await wait_for(lambda: victim_ran(10, False))
    await rdb.set(f"test:freeze:{victim_pid}", "1")
    await wait_for(lambda: victim_ran(3, True))
    await bots.kill(victim)
    in_hand = {call_key(c) for c in calls for e in (await read_logs(rdb, [c]))[c] if e["frozen"]}

    accepted = await sprayed
    logs = await wait_for_logs(rdb, calls, within=60)
    for call_id, entries in logs.items():
        assert first_runs(entries) == LIFECYCLE, (call_id, entries)
    by_key = {call_key(c): logs[c] for c in calls}
    assert in_hand
    for call in in_hand:
        # frozen in the victim's hands: run again by the others, flagged
        frozen = [e for e in by_key[call] if e["frozen"]]
        assert len(frozen) == 1
        # Runs after the frozen one: it may itself be a re-run, where a loaded machine stalled
        # the call's first owner past its 1-s lease.
        since = by_key[call][by_key[call].index(frozen[0]) + 1 :]
        again = [e for e in since if e["label"] == frozen[0]["label"]]
        assert again, call
        assert again[0]["redelivered"], again
        assert again[0]["pid"] != victim_pid
    from_victim = [(c, lab) for (c, lab), who in accepted.items() if who == victim]
    handled_by_others = [
        (c, lab)
        for c, lab in from_victim
        if any(e["label"] == lab and e["pid"] != victim_pid for e in logs[c])
    ]
    assert handled_by_others, "nothing the victim accepted was handled by another instance"


OLDER_TREE = Path(__file__).parent / "fixtures" / "releases" / "callbot-43b44af.tar.gz"
"""The callbot package of commit 43b44af (``git archive 43b44af callbot``): the tree before
how far each operation got was kept in a call's record."""


@pytest.fixture
def older_tree(tmp_path: Path) -> Path:
    """A directory running the older callbot package with the bot these tests run."""
    root = tmp_path / "older"
    (root / "tests").mkdir(parents=True)
    with tarfile.open(OLDER_TREE) as archive:
        archive.extractall(root, filter="data")
    for name in ("__init__.py", "test_redis_bot.py"):
        shutil.copy(REPO / "tests" / name, root / "tests" / name)
    return root


async def deliver_steps(bots: Bots, calls: list[str], steps: slice, rng: random.Random) -> None:
    """The given steps of each call's lifecycle, to random live instances, some twice."""
    running = asyncio.Semaphore(32)

    async def one_call(call_id: str) -> None:
        async with running:
            for step in lifecycle_steps(call_id)[steps]:
                for item in step:
                    copies = rng.choice((1, 2))
                    await asyncio.gather(*(bots.deliver(item, rng) for _ in range(copies)))

    await asyncio.gather(*(one_call(call_id) for call_id in calls))


@pytest.mark.parametrize("stopped", ["older", "newer"])
async def test_two_trees_share_one_redis_and_hand_their_calls_over(
    bots: Bots, rdb: aioredis.Redis, older_tree: Path, stopped: str
) -> None:
    """A rolling upgrade (the older instance stopped) and its rollback (the newer one
    stopped): while both run, each call's notifications go to either, and then the calls
    in progress are finished by the one left. Every call's handlers see its lifecycle in
    order, once, whichever tree ran each step."""
    await bots.start(1, older_tree, CALLBOT_STORE_LEASE="2")
    await bots.start(1, CALLBOT_STORE_LEASE="2")
    older, newer = 0, 1
    victim, survivor = (older, newer) if stopped == "older" else (newer, older)
    calls = [f"upgrade-{i:03d}" for i in range(60)]
    rng = random.Random(7)
    # Calls begun on both: the incoming call, then its established and establishing.
    await deliver_steps(bots, calls, slice(0, 2), rng)
    begun = {c: ["IncomingCall", "establishing", "established"] for c in calls}
    await wait_for(
        lambda: _have(rdb, begun),
        within=60,
    )
    await bots.stop(victim)
    # Their tones and their end, to the one left.
    await deliver_steps(bots, calls, slice(2, None), rng)
    logs = await wait_for_logs(rdb, calls, within=60)
    for call_id, entries in logs.items():
        assert first_runs(entries) == LIFECYCLE, (call_id, entries)
        # What each tree knew of the call was read by the other: its state went on.
        previous = {e["label"]: e["previous"] for e in entries}
        assert previous["established"] == "establishing", call_id
        assert previous["terminated"] == "established", call_id
    packages = {e["pid"]: e["package"] for entries in logs.values() for e in entries}
    assert packages == {
        bots.pid(older): str((older_tree / "callbot").resolve()),
        bots.pid(newer): str((REPO / "callbot").resolve()),
    }
    handed = [
        c for c in calls if {e["pid"] for e in logs[c]} == {bots.pid(victim), bots.pid(survivor)}
    ]
    assert handed, "no call was begun by the stopped instance and finished by the other"
    for index in (older, newer):
        lines = (bots.logs / f"bot-{index}.log").read_text().splitlines()
        errors = [line for line in lines if '"level": "error"' in line or "Traceback" in line]
        assert not errors, (index, errors[:3])


async def _have(rdb: aioredis.Redis, expected: dict[str, list[str]]) -> bool:
    """Whether each call's handlers have seen (at least) the given labels."""
    logs = await read_logs(rdb, list(expected))
    return all(
        set(labels) <= {e["label"] for e in logs[call_id]} for call_id, labels in expected.items()
    )


async def test_a_restarted_instance_knows_its_calls_again(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    async with FakeGraph() as graph:
        options: dict[str, Any] = {
            "store": redis_url,
            "store_lease": 1.0,
            "reorder_window": 5.0,
            "graph_url": graph.graph_url,
            "authority_url": graph.authority_url,
            "app_secret": "fake-graph-secret",
            "keep_alive": False,
        }
        seen: list[tuple[str, str, str | None]] = []

        def recording(**changes: Any) -> CallBot:
            bot = make_bot(authority, **{**options, **changes})

            @bot.on(events.Event)
            async def record(call: Call, event: events.Event) -> None:
                seen.append((call.key, label(event), getattr(event, "previous_state", None)))

            return bot

        first = recording()
        server: BotServer = await serve(first)
        meeting: dict[str, Any] = {
            "chat_info": models.ChatInfo(thread_id="19:meeting_x@thread.v2", message_id="0"),
            "meeting_info": models.OrganizerMeetingInfo(
                organizer=models.IdentitySet.model_validate({"user": {"id": "org-1"}})
            ),
        }
        for call_id in ("alpha", "beta"):  # the calls Graph posts about, still going
            graph.add_call(call_id, state="establishing")
        for item in (
            b.call_state("alpha", "establishing", **meeting),
            b.call_state("alpha", "established"),
            b.incoming_call("beta"),
            b.call_state("beta", "establishing"),
            b.call_state("gamma", "establishing"),
            b.call_terminated("gamma"),
        ):
            assert (await server.post(b.notifications(item))).status == 202
        await until(lambda: len(seen) == 6)
        await until(lambda: {c.key for c in first.active_calls()} == {"alpha", "beta"})
        await first.stop()

        # The only instance comes back: a new process, the same Redis.
        second = recording(keep_alive=True, keep_alive_interval=1.0)
        server = await serve(second)
        calls = {c.key: c for c in second.active_calls()}
        assert set(calls) == {"alpha", "beta"}
        alpha = calls["alpha"]
        assert alpha.state == "established"
        assert alpha.snapshot is not None
        assert alpha.snapshot.chat_info is not None
        assert alpha.snapshot.chat_info.thread_id == "19:meeting_x@thread.v2"
        assert isinstance(alpha.snapshot.meeting_info, models.OrganizerMeetingInfo)
        assert calls["beta"].state == "establishing"
        # Keep-alives resume for the established call only.
        request = await graph.wait_for_request("keepAlive")
        assert request.call_id == "alpha"
        # A few rounds of the 1-s interval: had beta's started, it would be among them.
        await until(lambda: len(graph.requests_for("keepAlive")) >= 3, within=30)
        assert {r.call_id for r in graph.requests_for("keepAlive")} == {"alpha"}

        # The next notifications are ordered against what was stored.
        before = len(seen)
        held = second._running().store.counts["held"]
        for item in (
            b.call_state("alpha", "established"),  # an exact repeat
            b.call_state("alpha", "establishing", subject="late"),  # stale
            b.call_state("beta", "established"),  # its predecessor is known: not held
            b.call_terminated("alpha"),
        ):
            assert (await server.post(b.notifications(item))).status == 202
        await until(lambda: len(seen) == before + 2)
        assert second._running().store.counts["held"] == held
        assert sorted(seen[before:]) == [
            ("alpha", "terminated", "established"),
            ("beta", "established", "establishing"),
        ]
        await until(lambda: {c.key for c in second.active_calls()} == {"beta"})
        counts = second.metrics.render().decode()
        assert 'outcome="dropped",reason="duplicate"} 1.0' in counts
        assert 'outcome="dropped",reason="stale"} 1.0' in counts


def graph_instance(
    authority: TokenAuthority, redis_url: str, graph: FakeGraph, **options: Any
) -> CallBot:
    """An instance sharing Redis whose Graph is ``graph``."""
    return make_bot(
        authority,
        store=redis_url,
        graph_url=graph.graph_url,
        authority_url=graph.authority_url,
        app_secret="fake-graph-secret",
        **options,
    )


async def test_an_operation_resolves_when_its_outcome_lands_on_another_instance(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    async with FakeGraph() as graph:
        waiting: dict[str, int] = {}
        outcomes: list[tuple[int, str]] = []
        servers: list[BotServer] = []
        for index in range(2):
            bot = graph_instance(
                authority,
                redis_url,
                graph,
            )

            @bot.on_state("established")
            async def play(call: Call, event: events.CallStateChanged, index: int = index) -> None:
                op = await call.play_prompt("https://cdn.example.test/hello.wav")
                waiting[call.key] = index
                done = await op.wait(timeout=10)
                outcomes.append((index, done.status or ""))

            servers.append(await serve(bot))
        graph.add_call("op-call", state="establishing")  # the call Graph posts about
        for state in ("establishing", "established"):
            item = b.call_state("op-call", state)
            assert (await servers[0].post(b.notifications(item))).status == 202
        await graph.wait_for_request("playPrompt")
        await until(lambda: "opcall" in waiting)
        owner = waiting["opcall"]
        (operation_id,) = graph.operations
        other = servers[1 - owner]
        response = await other.post(graph.operation_notification(operation_id))
        assert response.status == 202
        await until(lambda: bool(outcomes), within=20)
        assert outcomes == [(owner, "completed")]


@pytest.mark.parametrize("told", ["to-the-owner", "elsewhere", "the-call-ended"])
async def test_a_handler_run_again_gets_the_outcome_its_first_run_saw(
    authority: TokenAuthority, serve: Any, redis_url: str, told: str
) -> None:
    """A handler played a prompt and saw it complete (its outcome accepted by the instance
    running the call, or by another one), or fail as the caller hung up, then its instance
    went while it still ran (collecting digits, writing a summary). Run again on an
    instance started since, its journal replays the prompt (nothing sent to Graph), and its
    wait ends as the first run's did: what it waits for sits in the call's inbox behind the
    handler itself."""
    runs: list[tuple[int, bool, str]] = []
    ended: list[int] = []
    async with FakeGraph() as graph:

        async def instance(index: int) -> BotServer:
            bot = graph_instance(authority, redis_url, graph, store_lease=1.0)

            @bot.on_state("established")
            async def greet(call: Call, event: events.CallStateChanged) -> None:
                attempt = current_attempt()
                op = await call.play_prompt("https://cdn.example.test/greeting.wav")
                try:
                    status = (await op.wait(timeout=60)).status or ""
                except OperationFailed as exc:
                    status = "call ended" if exc.call_ended else "failed"
                runs.append((index, attempt is not None and attempt.redelivered, status))
                if index == 0:
                    await asyncio.Event().wait()  # still running when its instance goes

            @bot.on_terminated
            async def gone(call: Call, event: events.CallTerminated) -> None:
                ended.append(index)

            server: BotServer = await serve(bot)
            return server

        first = await instance(0)
        other = await instance(1) if told == "elsewhere" else first
        graph.add_call("rerun-call", state="establishing")
        for state in ("establishing", "established"):
            item = b.call_state("rerun-call", state)
            assert (await first.post(b.notifications(item))).status == 202
        await graph.wait_for_request("playPrompt")
        (operation_id,) = graph.operations
        if told == "the-call-ended":
            news = b.notifications(b.call_terminated("rerun-call"))
        else:
            news = graph.operation_notification(operation_id)
        assert (await other.post(news)).status == 202  # to the other: its relay tells the wait
        await until(lambda: len(runs) == 1, within=20)
        if other is not first:
            await other.bot.stop()
        await first.bot.stop()  # the handler abandoned: the call handed over
        await instance(2)  # a replacement takes the call over
        await until(lambda: len(runs) == 2, within=30)
        status = "call ended" if told == "the-call-ended" else "completed"
        assert runs == [(0, False, status), (2, True, status)]
        assert len(graph.requests_for("playPrompt")) == 1
        if told == "the-call-ended":
            await until(lambda: ended == [2])  # its end goes to handlers after the re-run


async def test_rosters_are_diffed_against_the_stored_roster_on_any_instance(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    seen: list[tuple[list[str], list[str]]] = []
    servers: list[BotServer] = []
    for _ in range(2):
        bot = make_bot(authority, store=redis_url)

        @bot.on_participants
        async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
            seen.append(([p.id or "" for p in event.joined], [p.id or "" for p in event.left]))

        servers.append(await serve(bot))
    alice, bob = b.participant("alice"), b.participant("bob")
    # The same roster again after another one is a change; right after itself, a repeat.
    # The last is a change again: once it is seen, the repeat before it was decided.
    rosters = ([alice], [alice, bob], [alice], [alice], [alice, bob])
    for index, people in enumerate(rosters):
        item = b.roster("meeting", people)
        assert (await servers[index % 2].post(b.notifications(item))).status == 202
    await until(lambda: len(seen) >= 4)
    assert seen == [(["alice"], []), (["bob"], []), ([], ["bob"]), (["bob"], [])]


async def test_a_held_state_survives_its_owner_stopping(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """A hold outlasting the drain: the call is handed over with the held entry."""
    seen: list[tuple[str, str | None, int]] = []
    servers: list[BotServer] = []
    for index in range(2):
        bot = make_bot(authority, store=redis_url, reorder_window=30.0, shutdown_timeout=0.3)

        @bot.on(events.CallStateChanged)
        async def record(call: Call, event: events.CallStateChanged, index: int = index) -> None:
            seen.append((event.state, event.previous_state, index))

        servers.append(await serve(bot))
    first, second = servers
    item = b.call_state("held", "established")
    assert (await first.post(b.notifications(item))).status == 202
    store = first.bot._running().store
    await until(lambda: store._holding(id_key("held")))  # type: ignore[attr-defined]
    assert seen == []  # held by the first instance, waiting for establishing
    await first.bot.stop()  # hands the call over: the held entry is not acknowledged
    item = b.call_state("held", "establishing")
    assert (await second.post(b.notifications(item))).status == 202
    await until(lambda: len(seen) == 2, within=20)
    assert seen == [("establishing", None, 1), ("established", "establishing", 1)]


@pytest.mark.parametrize("held", ["state", "tone"])
async def test_a_hold_is_waited_out_at_a_graceful_shutdown(
    authority: TokenAuthority, serve: Any, redis_url: str, held: str
) -> None:
    """An instance draining while an event of a call waits for its predecessor goes on
    feeding the call until the hold ends (here the predecessor, accepted by the other
    instance), then hands it over acknowledged: the next instance runs only what is new.
    Handing it over at once, entries past the held one that had run were run again."""
    runs: list[tuple[int, str, bool]] = []
    servers: list[BotServer] = []
    for index in range(2):
        bot = make_bot(
            authority,
            store=redis_url,
            store_lease=60.0,
            reorder_window=30.0,
            shutdown_timeout=30.0,
        )

        def ran(what: str, index: int = index) -> None:
            attempt = current_attempt()
            runs.append((index, what, attempt is not None and attempt.redelivered))

        @bot.on(events.CallStateChanged)
        async def state(call: Call, event: events.CallStateChanged, ran: Any = ran) -> None:
            ran(event.state)

        @bot.on_tone
        async def tone(call: Call, event: events.ToneReceived, ran: Any = ran) -> None:
            ran(f"tone{event.sequence_id}")

        servers.append(await serve(bot))
    first, second = servers
    if held == "state":
        before = [b.call_state("k", "established")]
        missing, after, news = b.call_state("k", "establishing"), b.tone("k", "tone1", 1), "tone1"
        expected = [(0, "establishing", False), (0, "established", False)]
    else:
        before = [b.call_state("k", s) for s in ("establishing", "established")]
        before += [b.tone("k", "tone1", 1), b.tone("k", "tone3", 3)]
        missing, after, news = b.tone("k", "tone2", 2), b.tone("k", "tone4", 4), "tone4"
        expected = [(0, what, False) for what in ("establishing", "established", "tone1")]
        expected += [(0, "tone2", False), (0, "tone3", False)]
    for item in before:
        assert (await first.post(b.notifications(item))).status == 202
    store = first.bot._running().store
    await until(lambda: store._holding(id_key("k")))  # type: ignore[attr-defined]
    receiver = first.bot._running().receiver
    stopping = asyncio.create_task(first.bot.stop())
    await until(lambda: receiver.draining)
    assert (await second.post(b.notifications(missing))).status == 202
    await stopping
    assert runs == expected
    assert (await second.post(b.notifications(after))).status == 202
    await until(lambda: len(runs) > len(expected), within=20)
    assert runs == [*expected, (1, news, False)]


async def test_a_hold_ending_after_the_drain_is_run_by_the_next_instance(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """A hold outlasting the drain may still end before the instance closes (serve() closes
    its connections first; here the predecessor, accepted by the other instance, is read
    meanwhile): what it releases is left to the call's next owner, not run on the stopping
    instance after its dispatcher was joined, where nothing waits for it or cancels it."""
    runs: list[tuple[int, int | None, bool]] = []
    servers: list[BotServer] = []
    for index in range(2):
        bot = make_bot(
            authority,
            store=redis_url,
            store_lease=60.0,
            reorder_window=30.0,
            shutdown_timeout=0.3,
        )

        @bot.on_tone
        async def tone(call: Call, event: events.ToneReceived, index: int = index) -> None:
            attempt = current_attempt()
            runs.append((index, event.sequence_id, attempt is not None and attempt.redelivered))

        servers.append(await serve(bot))
    first, second = servers
    for item in (
        b.call_state("k", "establishing"),
        b.call_state("k", "established"),
        b.tone("k", "tone1", 1),
        b.tone("k", "tone3", 3),
    ):
        assert (await first.post(b.notifications(item))).status == 202
    runtime = first.bot._running()
    store = runtime.store
    await until(lambda: store._holding(id_key("k")))  # type: ignore[attr-defined]
    await first.bot.drain()  # its window outlasts the drain: tone 3 is still held
    assert (await second.post(b.notifications(b.tone("k", "tone2", 2)))).status == 202
    await until(lambda: not store._holding(id_key("k")))  # type: ignore[attr-defined]
    await first.bot.stop()
    await until(lambda: runtime.dispatcher.busy_calls == 0)
    assert [sequence for index, sequence, _ in runs if index == 0] == [1]
    await until(lambda: {s for i, s, _ in runs if i == 1} >= {2, 3}, within=20)
    # tone 1 runs there again, flagged, unless it was acknowledged before the hold began
    assert [s for i, s, _ in runs if i == 1 and s != 1] == [2, 3]
    assert all(again for i, s, again in runs if i == 1 and s == 1)


@pytest.mark.parametrize("told", ["after-transferring", "alone"])
async def test_a_transfer_s_failure_is_told_once_by_the_instance_that_takes_the_call_over(
    authority: TokenAuthority, serve: Any, redis_url: str, told: str
) -> None:
    """The instance running a call asked a transfer (and, for one, was told its
    ``transferring``), then stopped: the next instance is told the failure, back from
    ``transferring`` or by the update alone. It knows from the call's record that a transfer
    waits for its news, so ``on_transfer_failed`` runs there once, naming the transfer's
    target; Graph sending the failure again runs nothing."""
    heard: list[tuple[int, str, str | None]] = []
    named: list[models.InvitationParticipantInfo | None] = []
    ran: list[int] = []
    async with FakeGraph() as graph:
        graph.add_call("xfer")
        servers: list[BotServer] = []
        for index in range(2):
            bot = graph_instance(authority, redis_url, graph, shutdown_timeout=2.0)

            @bot.on_state("established", "transferring")
            async def state(call: Call, event: events.CallStateChanged, index: int = index) -> None:
                if event.previous_state == "establishing":
                    await call.transfer(Target.user("agent-id", "Agent"))
                ran.append(index)

            @bot.on_transfer_failed
            async def failed(
                call: Call,
                event: events.CallStateChanged | events.CallUpdated,
                index: int = index,
            ) -> None:
                heard.append((index, type(event).__name__, getattr(event, "previous_state", None)))
                named.append(event.transfer_target)

            @bot.on_terminated
            async def ended(call: Call, event: events.CallTerminated, index: int = index) -> None:
                heard.append((index, "ended", None))

            servers.append(await serve(bot))
        steps = [b.call_state("xfer", "establishing"), b.call_state("xfer", "established")]
        if told == "after-transferring":
            steps.append(b.call_state("xfer", "transferring"))
        for item in steps:
            assert (await servers[0].post(b.notifications(item))).status == 202
        await until(lambda: len(ran) == len(steps) - 1, within=10)
        assert len(graph.requests_for("transfer")) == 1
        runner = ran[0]
        assert set(ran) == {runner}
        await servers[runner].bot.stop()  # hands the call over, with the transfer counted
        other = servers[1 - runner]
        why = models.ResultInfo(code=500, subcode=7000, message="Transfer failed.")
        failure = b.notifications(b.call_state("xfer", "established", result_info=why))
        assert (await other.post(failure)).status == 202
        await until(lambda: len(heard) == 1, within=10)
        assert (await other.post(failure)).status == 202  # Graph sent it twice
        assert (await other.post(b.notifications(b.call_terminated("xfer")))).status == 202
        await until(lambda: heard[-1:] == [(1 - runner, "ended", None)], within=10)
    news = (
        ("CallStateChanged", "transferring")
        if told == "after-transferring"
        else ("CallUpdated", None)
    )
    assert heard == [(1 - runner, *news), (1 - runner, "ended", None)]
    agent = Target.user("agent-id", "Agent").invitation_json()
    assert named == [models.InvitationParticipantInfo.model_validate(agent)]


async def test_an_update_sent_before_a_transfer_is_stale_on_the_instance_that_takes_over(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """Teams repeats ``established`` as a call starts (recorded sb08, sb09), each a request of
    its own: one sent before the transfer began may come after its ``transferring``, within
    ``reorder_window`` of it, and is no failure (it waits for the transfer's failure, and the
    call's end drops it). When another instance took the call
    over meanwhile, it did not know when ``transferring`` came (the record kept no time), and
    took that update for the transfer's failure: ``on_transfer_failed`` ran, and the call
    moved back to ``established`` while the transfer went on."""
    heard: list[tuple[int, str]] = []
    ran: list[int] = []
    async with FakeGraph() as graph:
        graph.add_call("xfer")
        servers: list[BotServer] = []
        for index in range(2):
            # A window no step outlasts, however loaded the machine.
            bot = graph_instance(
                authority, redis_url, graph, shutdown_timeout=2.0, reorder_window=300.0
            )

            @bot.on_state("established", "transferring")
            async def state(call: Call, event: events.CallStateChanged, index: int = index) -> None:
                if event.previous_state == "establishing":
                    await call.transfer(Target.user("agent-id", "Agent"))
                ran.append(index)
                heard.append((index, event.state))

            @bot.on_transfer_failed
            async def failed(call: Call, event: events.Event, index: int = index) -> None:
                heard.append((index, "transfer failed"))

            @bot.on_terminated
            async def ended(call: Call, event: events.CallTerminated, index: int = index) -> None:
                heard.append((index, "ended"))

            servers.append(await serve(bot))
        steps = [
            b.call_state("xfer", "establishing"),
            b.call_state("xfer", "established"),
            b.call_state("xfer", "transferring"),
        ]
        for item in steps:
            assert (await servers[0].post(b.notifications(item))).status == 202
        await until(lambda: len(ran) == 2, within=10)
        runner = ran[0]
        await servers[runner].bot.stop()  # hands the call over, transferring
        other = servers[1 - runner]
        earlier = b.call_state("xfer", "established")
        earlier["resourceData"]["mediaState"] = {"audio": "active"}
        assert (await other.post(b.notifications(earlier))).status == 202
        done = b.call_terminated("xfer", code=0, subcode=7015, message="transferred")
        assert (await other.post(b.notifications(done))).status == 202
        await until(lambda: heard[-1:] == [(1 - runner, "ended")], within=10)
    assert heard == [(runner, "established"), (runner, "transferring"), (1 - runner, "ended")]


async def test_a_held_tone_gets_its_predecessor_while_a_handler_of_the_call_runs(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """A state overtakes held tones (``ringing``: the tones wait for ``established``) and its
    handler runs past the window: what the held tones wait for, arriving meanwhile (the
    call's ``established``, then the tone before the last), still reaches the sequencer
    within the window (as in the memory store), so handlers get the tones in order, not the
    held ones alone first."""
    bot = make_bot(authority, store=redis_url, reorder_window=30.0)
    tones: list[int | None] = []
    running, go_on = asyncio.Event(), asyncio.Event()

    @bot.on_tone
    async def tone(call: Call, event: events.ToneReceived) -> None:
        tones.append(event.sequence_id)

    @bot.on_state("ringing")
    async def ringing(call: Call, event: events.CallStateChanged) -> None:
        running.set()
        await go_on.wait()

    server = await serve(bot)
    assert (await server.post(b.notifications(b.call_state("k", "establishing")))).status == 202
    for sequence in (1, 3):
        item = b.tone("k", f"tone{sequence}", sequence)
        assert (await server.post(b.notifications(item))).status == 202
    store = bot._running().store
    await until(lambda: store._holding(id_key("k")))  # type: ignore[attr-defined]
    assert (await server.post(b.notifications(b.call_state("k", "ringing")))).status == 202
    await asyncio.wait_for(running.wait(), 5)
    for item in (b.call_state("k", "established"), b.tone("k", "tone2", 2)):
        assert (await server.post(b.notifications(item))).status == 202
    # Released by established and tone 2, not by the window (which a failure waits out).
    await until(lambda: not store._holding(id_key("k")), within=60)  # type: ignore[attr-defined]
    go_on.set()
    await until(lambda: len(tones) == 3)
    assert tones == [1, 2, 3]
    assert store.counts["released_alone"] == 0


def _labelling_bot(
    authority: TokenAuthority, store: str, **options: Any
) -> tuple[CallBot, list[str]]:
    """A bot on ``store`` and the list its handler adds each event's label to."""
    handled: list[str] = []
    bot = make_bot(authority, store=store, **options)

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        handled.append(label(event))

    return bot, handled


async def test_redis_down_means_503_then_recovery_by_itself(
    own_redis: Callable[..., RedisServer], authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    server_process = own_redis(tmp_path)
    server_process.start()
    bot, handled = _labelling_bot(authority, server_process.url, store_lease=1.0)

    server: BotServer = await serve(bot)
    assert (await server.post(b.notifications(b.incoming_call("r1")))).status == 202
    await until(lambda: handled == ["IncomingCall"])
    assert (await server.client.get("/readyz")).status == 200

    server_process.stop()
    response = await server.post(b.notifications(b.call_state("r1", "establishing")))
    assert response.status == 503
    assert (await response.json())["error"] == "store_unavailable"
    ready = await server.client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["store_reachable"] is False

    server_process.start()  # same port, empty: what was stored is gone with the server
    await until(lambda: bot.ready, within=10)
    response = await server.post(b.notifications(b.call_state("r2", "establishing")))
    assert response.status == 202
    await until(lambda: handled == ["IncomingCall", "establishing"], within=10)
    assert (await server.client.get("/readyz")).status == 200


async def test_calls_going_on_are_indexed_again_once_redis_lost_its_data(
    own_redis: Callable[..., RedisServer], authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    """Redis restarted without persistence mid-call: the instance that had indexed the call
    remembered it had, so the call never went back into the ``active`` index, and no other
    instance (one started later, one taking up keep-alives) knew of it."""
    server_process = own_redis(tmp_path)
    server_process.start()
    bot, _ = _labelling_bot(authority, server_process.url, store_lease=1.0)
    server: BotServer = await serve(bot)
    active = KEY_PREFIX + "active"
    for item in (
        b.call_state("going-call", "establishing"),
        b.call_state("going-call", "established"),
    ):
        assert (await server.post(b.notifications(item))).status == 202

    async def indexed() -> bool:
        async with aioredis.Redis(port=server_process.port, decode_responses=True) as admin:
            return bool(await admin.sismember(active, "goingcall"))

    await wait_for(indexed, within=10)
    server_process.stop()
    server_process.start()  # same port, empty
    await until(lambda: bot.ready, within=10)
    assert not await indexed()
    update = b.call_state("going-call", "established", mediaState={"audio": "active"})
    assert (await server.post(b.notifications(update))).status == 202  # the call goes on
    await wait_for(indexed, within=10)


async def test_a_server_that_may_evict_the_stores_keys_is_named_at_start(
    own_redis: Callable[..., RedisServer], authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    """Managed Redis often defaults to ``volatile-lru``, which takes any key with an expiry,
    every key of a call's included: the start says so, with the setting to change."""
    args = ("--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru")
    server_process = own_redis(tmp_path, args=args)
    await asyncio.to_thread(server_process.start)
    with capture_logs() as logs:
        await serve(make_bot(authority, store=server_process.url))
    [line] = [e for e in logs if e["event"] == "store_may_lose_calls"]
    assert line["log_level"] == "warning"
    assert line["maxmemory_policy"] == "volatile-lru"
    assert "noeviction" in line["hint"]


async def test_a_server_that_keeps_every_key_is_not_warned_about(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    with capture_logs() as logs:
        await serve(make_bot(authority, store=redis_url))
    assert "store_started" in [e["event"] for e in logs]
    assert [e for e in logs if e["event"] == "store_may_lose_calls"] == []


async def test_a_user_not_allowed_info_still_runs_calls(
    own_redis: Callable[..., RedisServer], authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    """The server check is a courtesy: an ACL user without ``INFO`` runs calls all the same."""
    args = ("--user", "bot", "on", ">s3cret", "~*", "&*", "+@all", "-info")
    server_process = own_redis(tmp_path, args=args)
    await asyncio.to_thread(server_process.start)
    bot, handled = _labelling_bot(
        authority, f"redis://bot:s3cret@127.0.0.1:{server_process.port}/0"
    )

    with capture_logs() as logs:
        server: BotServer = await serve(bot)
    assert "store_server_unchecked" in [e["event"] for e in logs]
    assert (await server.post(b.notifications(b.incoming_call("acl-call")))).status == 202
    await until(lambda: handled == ["IncomingCall"], within=10)


@pytest.mark.parametrize(
    "info",
    [
        {"redis_version": "6.0.16", "maxmemory_policy": "noeviction"},
        {"redis_version": "6.2.14", "maxmemory_policy": "noeviction"},
        # a Cluster: INFO answers by node
        {
            "127.0.0.1:7000": {"redis_version": "7.2.4", "maxmemory_policy": "noeviction"},
            "127.0.0.1:7001": {"redis_version": "6.0.9", "maxmemory_policy": "noeviction"},
        },
    ],
)
def test_a_server_older_than_the_scripts_need_is_refused(info: dict[str, Any]) -> None:
    """Redis 6.0 (still offered by managed services) runs no ``XTRIM MINID``, and 6.2 no
    script flags (``#!lua flags=allow-oom``): the scripts would fail, or not load at all;
    the start says so instead."""
    with pytest.raises(ConfigurationError, match=r"needs Redis 7\.0 or later, the server is 6\."):
        _redis.server_fitness(info)


async def test_a_server_too_old_stops_the_start_and_leaves_nothing_open(
    authority: TokenAuthority, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real server, taken for too old (the oldest version allowed raised past it)."""
    monkeypatch.setattr(_redis, "MIN_VERSION", (99, 0))
    bot = make_bot(authority, store=redis_url)
    with pytest.raises(ConfigurationError, match=r"needs Redis 99\.0 or later"):
        await bot.start()
    assert bot._runtime is None
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("callbot-store")] == []


async def test_a_server_too_old_reached_after_the_start_keeps_the_bot_unready(
    own_redis: Callable[..., RedisServer],
    authority: TokenAuthority,
    serve: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis down at start, then up but unfit: one ``store_unusable`` line, and unready."""
    monkeypatch.setattr(_redis, "MIN_VERSION", (99, 0))
    server_process = own_redis(tmp_path)
    await asyncio.to_thread(server_process.start)
    server_process.stop()
    with capture_logs() as logs:
        server: BotServer = await serve(make_bot(authority, store=server_process.url))
        await asyncio.to_thread(server_process.start)  # same port
        await until(lambda: any(e["event"] == "store_unusable" for e in logs), within=10)
        # What else Redis runs meanwhile (here this test's server runs the scripts) does
        # not make the bot ready.
        await server.post(b.notifications(b.incoming_call("unfit-call")))
        assert not server.bot.ready
        assert (await server.client.get("/readyz")).status == 503
    unusable = [e for e in logs if e["event"] == "store_unusable"]
    assert len(unusable) == 1
    assert "needs Redis 99.0 or later" in unusable[0]["error"]


def test_an_evicting_policy_with_no_memory_limit_is_not_warned_about() -> None:
    """``maxmemory 0`` (self-hosted Redis's default): nothing is ever evicted."""
    info = {"redis_version": "7.0.15", "maxmemory": 0, "maxmemory_policy": "allkeys-lru"}
    assert _redis.server_fitness(info) is None


def test_every_evicting_node_of_a_cluster_is_named() -> None:
    nodes = {
        f"127.0.0.1:{port}": {
            "redis_version": "7.0.15",
            "maxmemory": 1 << 30,
            "maxmemory_policy": policy,
        }
        for port, policy in ((7000, "allkeys-lru"), (7001, "noeviction"), (7002, "volatile-ttl"))
    }
    warning = _redis.server_fitness(nodes)
    assert warning is not None
    assert warning["maxmemory_policy"] == "allkeys-lru, volatile-ttl"
    assert (
        _redis.server_fitness({"redis_version": "7.0.0", "maxmemory_policy": "noeviction"}) is None
    )


async def test_a_full_server_that_keeps_every_key_refuses_then_takes_the_retry(
    own_redis: Callable[..., RedisServer], authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    """What ``noeviction`` gives when Redis is full: 503 (Graph sends again), unready, and
    nothing accepted is lost; once there is room, the retry is taken and run once.

    Unready until Redis takes a write again: what it still answered meanwhile (a run
    letting its call go) made the bot ready while every write was refused."""
    server_process = own_redis(tmp_path)
    await asyncio.to_thread(server_process.start)
    bot, handled = _labelling_bot(authority, server_process.url, store_lease=1.0)

    server: BotServer = await serve(bot)
    assert (await server.post(b.notifications(b.incoming_call("full-call")))).status == 202
    await until(lambda: handled == ["IncomingCall"], within=10)
    async with aioredis.Redis(port=server_process.port, decode_responses=True) as admin:
        await admin.config_set("maxmemory", "1")  # every write now refused: OOM
        retried = b.notifications(b.call_state("full-call", "establishing"))
        response = await server.post(retried)
        assert response.status == 503
        assert (await response.json())["error"] == "store_unavailable"
        assert (await server.client.get("/readyz")).status == 503
        # The call's run let it go meanwhile (Redis runs that when full: it frees memory).
        await wait_for(lambda: settled(admin, ["full-call"]))
        assert (await server.client.get("/readyz")).status == 503
        await admin.config_set("maxmemory", "0")
    await until(lambda: bot.ready, within=10)
    assert (await server.post(retried)).status == 202
    await until(lambda: handled == ["IncomingCall", "establishing"], within=10)


async def test_a_full_server_still_runs_what_it_accepted(
    own_redis: Callable[..., RedisServer], authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    """Notifications accepted before Redis filled up reach their handlers while it is full,
    and are acknowledged (their inbox trimmed): running them is what frees memory. Only new
    notifications get 503.

    The owner notes an entry as fed before its handlers run, a write Redis refused while
    full and the owner retried for ever: the caller's keys, accepted by another instance
    while a handler waited, never ran, and held their memory until Redis had room."""
    server_process = own_redis(tmp_path)
    await asyncio.to_thread(server_process.start)
    first, handled = _labelling_bot(authority, server_process.url, store_lease=2.0)
    other, handled_there = _labelling_bot(authority, server_process.url, store_lease=2.0)
    answered = asyncio.Event()

    @first.on_state("established")
    async def menu(call: Call, event: events.CallStateChanged) -> None:
        await answered.wait()  # the menu is read out, say

    owner: BotServer = await serve(first)
    second: BotServer = await serve(other)
    for state in ("establishing", "established"):
        assert (await owner.post(b.notifications(b.call_state("full-call", state)))).status == 202
    await until(lambda: handled == ["establishing", "established"], within=10)
    keys = [b.tone("full-call", tone, n) for n, tone in enumerate(("tone1", "tone2"), start=1)]
    for key in keys:
        assert (await second.post(b.notifications(key))).status == 202
    async with aioredis.Redis(port=server_process.port, decode_responses=True) as admin:
        await admin.config_set("maxmemory", "1")  # every write now refused: OOM
        answered.set()
        await until(lambda: handled[2:] == ["tone:tone1", "tone:tone2"], within=10)
        await wait_for(lambda: settled(admin, ["full-call"]), within=10)
        late = b.notifications(b.tone("full-call", "tone3", 3))
        assert (await second.post(late)).status == 503  # new work is still refused
        await admin.config_set("maxmemory", "0")
    await until(lambda: second.bot.ready, within=10)
    assert (await second.post(late)).status == 202  # Graph's retry
    await until(lambda: [*handled[4:], *handled_there] == ["tone:tone3"], within=10)


@pytest.mark.parametrize("stop", ["drained", "abandoned", "crashed"])
async def test_a_call_whose_instance_stops_while_redis_is_full_goes_on_elsewhere(
    own_redis: Callable[..., RedisServer],
    authority: TokenAuthority,
    serve: Any,
    tmp_path: Path,
    stop: str,
) -> None:
    """An instance stops while Redis is full (it drains, its handler is abandoned at the
    deadline, or it crashes): its call, with a notification waiting, runs on another
    instance all the same, and is acknowledged. The call was put back in ``runnable`` by a
    plain ZADD, and the reaper's round began with a plain SET (and, before it, the index
    writes of the round): writes Redis refuses when full. The call waited for room."""
    server_process = own_redis(tmp_path)
    await asyncio.to_thread(server_process.start)
    go_on = asyncio.Event()
    first = make_bot(
        authority,
        store=server_process.url,
        store_lease=1.0 if stop == "crashed" else 60.0,
        shutdown_timeout=0.5 if stop == "abandoned" else 30.0,
    )
    ringing: list[str] = []

    @first.on_incoming_call
    async def ring(call: Call, event: events.IncomingCall) -> None:
        ringing.append(call.key)
        await go_on.wait()  # the greeting is played, say

    other, handled = _labelling_bot(authority, server_process.url)
    owner: BotServer = await serve(first)
    await serve(other)
    assert (await owner.post(b.notifications(b.incoming_call("full-call")))).status == 202
    await until(lambda: ringing == ["fullcall"], within=10)
    # Accepted by the call's owner while its handler runs: it waits in the inbox.
    waiting = b.notifications(b.call_state("full-call", "establishing"))
    assert (await owner.post(waiting)).status == 202
    other_store: Any = other._running().store
    async with aioredis.Redis(port=server_process.port, decode_responses=True) as admin:
        if stop != "crashed":
            # The reaper's round is another instance's, which never comes: the hand-over
            # alone must wake the call.
            await admin.set(KEY_PREFIX + "reaper", "elsewhere", px=600_000)
        await admin.config_set("maxmemory", "1")  # every write now refused: OOM
        try:
            if stop == "drained":
                receiver = first._running().receiver
                stopping = asyncio.create_task(first.stop())
                await until(lambda: receiver.draining)
                go_on.set()  # the running handler finishes within the drain
                await stopping
            elif stop == "abandoned":
                await first.stop()
            else:
                # A call of its own awaits its place in the active index meanwhile: a
                # write refused too, which comes before the reaper's in an upkeep round.
                other_store._index_changes["listedcall"] = True
                await crash(first)
            expected = ["establishing"] if stop == "drained" else ["IncomingCall", "establishing"]
            await until(lambda: handled == expected, within=20)
            await wait_for(lambda: settled(admin, ["full-call"]), within=10)
        finally:
            go_on.set()
            await admin.config_set("maxmemory", "0")


async def test_a_new_incoming_call_is_taken_whatever_the_room(
    redis_url: str, authority: TokenAuthority, serve: Any
) -> None:
    """With ``max_concurrent_handlers`` calls' handlers waiting (a menu waiting for keys), a
    new incoming call waited in ``runnable`` for room: unanswered, Graph drops it at 15 s.
    Its handlers wait for no slot (design.md), and it waits for no room either."""
    release = asyncio.Event()
    bot, handled = _labelling_bot(authority, redis_url, max_concurrent_handlers=2)

    @bot.on_state("established")
    async def menu(call: Call, event: events.CallStateChanged) -> None:
        await release.wait()  # the caller's keys, say

    server: BotServer = await serve(bot)
    try:
        for call in ("busy-0", "busy-1"):
            for state in ("establishing", "established"):
                assert (await server.post(b.notifications(b.call_state(call, state)))).status == 202
        store = bot._running().store
        assert isinstance(store, _redis.RedisStore)
        # Both runs stop lingering for their next notification: no room is left.
        await until(lambda: store._free_slots() <= 0, within=10)
        assert (await server.post(b.notifications(b.incoming_call("new-call")))).status == 202
        await until(lambda: "IncomingCall" in handled, within=10)
    finally:
        release.set()


@pytest.mark.parametrize("left", ["draining", "crashed"])
async def test_an_incoming_call_its_instance_left_is_taken_by_a_full_instance(
    authority: TokenAuthority, serve: Any, redis_url: str, left: str
) -> None:
    """A new incoming call taken on by an instance that began to drain before its ingest's
    answer came (so it hands the call over at once), or that crashed with the call's
    handler running, waited in ``runnable`` while every other instance was full: none looks
    there without a free slot, and Graph drops a call not answered within 15 s. It is taken
    whatever the room, as the ingest takes it."""
    release, stuck = asyncio.Event(), asyncio.Event()
    full, handled = _labelling_bot(authority, redis_url, max_concurrent_handlers=1)
    leaving, handled_there = _labelling_bot(authority, redis_url, store_lease=1.0)

    @full.on_state("establishing")
    async def work(call: Call, event: events.CallStateChanged) -> None:
        await release.wait()  # holds the instance's one slot

    @leaving.on_incoming_call
    async def ring(call: Call, event: events.IncomingCall) -> None:
        await stuck.wait()  # never set: the call's entry is never acknowledged there

    busy_server: BotServer = await serve(full)
    leaving_server: BotServer = await serve(leaving)
    try:
        busy = b.notifications(b.call_state("busy", "establishing"))
        assert (await busy_server.post(busy)).status == 202
        store: Any = full._running().store
        await until(lambda: "establishing" in handled and store._free_slots() <= 0, within=10)
        incoming = b.notifications(b.incoming_call("ringing"))
        if left == "draining":
            leaving_store: Any = leaving._running().store
            go, held = asyncio.Event(), asyncio.Event()
            paused_before(leaving_store, _scripts.INGEST, go, held)
            post = asyncio.ensure_future(leaving_server.post(incoming))
            await until(held.is_set, within=10)  # taken on: the ingest asked for the lease
            draining = asyncio.ensure_future(leaving._running().drain())
            await until(lambda: leaving_store._draining, within=10)
            go.set()
            assert (await post).status == 202
            await draining
        else:
            assert (await leaving_server.post(incoming)).status == 202
            await until(lambda: handled_there == ["IncomingCall"], within=10)
            await crash(leaving)
        # taken past the room (the busy call still holds the one slot)
        await until(lambda: "IncomingCall" in handled, within=20)
    finally:
        release.set()


async def test_a_full_instance_leaves_ringing_calls_to_an_instance_with_room(
    authority: TokenAuthority, serve: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every instance waited on ``ringing`` whatever its room, and Redis serves its blocked
    clients in turn: 40 calls left ringing were split 20/20 between an idle instance and
    one at ``max_concurrent_handlers`` (1), which then ran 21 calls. A full instance takes
    only a call no instance with room took within the grace (made a minute here, so that
    the idle one has all it needs)."""
    monkeypatch.setattr(_redis, "_RING_GRACE_MS", 60_000, raising=False)
    release = asyncio.Event()
    took: dict[str, list[str]] = {"idle": [], "full": []}
    bots: dict[str, CallBot] = {}
    for name, cap in (("idle", 256), ("full", 1)):
        bot = make_bot(authority, store=redis_url, max_concurrent_handlers=cap)

        @bot.on_incoming_call
        async def ring(call: Call, event: events.IncomingCall, name: str = name) -> None:
            took[name].append(event.call_id)

        bots[name] = bot

    @bots["full"].on_state("establishing")
    async def work(call: Call, event: events.CallStateChanged) -> None:
        await release.wait()  # holds the full instance's one slot

    full_server: BotServer = await serve(bots["full"])
    await serve(bots["idle"])
    leaving = make_bot(authority, store=redis_url)
    leaving_server: BotServer = await serve(leaving)
    full_store: Any = bots["full"]._running().store
    try:
        busy = b.notifications(b.call_state("busy", "establishing"))
        assert (await full_server.post(busy)).status == 202
        await until(lambda: full_store._free_slots() <= 0, within=10)
        await leaving._running().store.drain(0.1)  # what it receives rings for the others
        for n in range(40):
            ringing = b.notifications(b.incoming_call(f"share-{n}"))
            assert (await leaving_server.post(ringing)).status == 202
        await until(lambda: len(took["idle"]) + len(took["full"]) == 40, within=30)
        assert took["full"] == []
        assert sorted(took["idle"]) == sorted(f"share-{n}" for n in range(40))
    finally:
        release.set()


async def test_a_call_no_longer_rings_once_a_later_state_comes(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """A call rang while its incoming call's entry was unacknowledged: one whose
    ``on_incoming_call`` handler answered and ran on rang still once ``established``
    came, and after a crash was taken by any instance, whatever its room. A later state
    (answered, redirected, ended) ends its ringing."""
    stuck = asyncio.Event()
    bot = make_bot(authority, store=redis_url)
    ringing: list[str] = []

    @bot.on_incoming_call
    async def ring(call: Call, event: events.IncomingCall) -> None:
        ringing.append(event.call_id)
        await stuck.wait()  # answered, and running on

    server: BotServer = await serve(bot)
    store: Any = bot._running().store
    (fence,) = store._keys.of(id_key("answered"), "fence")
    try:
        assert (await server.post(b.notifications(b.incoming_call("answered")))).status == 202
        await until(lambda: ringing == ["answered"], within=10)
        assert await rdb.hget(fence, "i") is not None
        established = b.notifications(b.call_state("answered", "established"))
        assert (await server.post(established)).status == 202
        assert await rdb.hget(fence, "i") is None
    finally:
        stuck.set()


def _epoch_taken(script: _scripts.Script, answer: Any) -> int | None:
    """The epoch of the lease an answer of ``script`` (CLAIM or INGEST) took, if it took one."""
    if not isinstance(answer, list) or not answer:
        return None
    if script is _scripts.INGEST:
        return int(answer[3]) if len(answer) > 3 and int(answer[1]) == 2 else None
    return int(answer[0])


def answer_held(
    store: Any,
    reached: asyncio.Event,
    go: asyncio.Event,
    *,
    lose: bool = False,
    script: _scripts.Script = _scripts.CLAIM,
) -> list[int]:
    """Hold the answer of ``store``'s next round trip running ``script`` (CLAIM, or INGEST)
    that took a call, which Redis ran, until ``go`` is set (``reached`` is set once it is
    held), then hand it over or, ``lose``, fail as a connection closing before its reply
    does. The epochs it took are filled in."""
    real = store._answers
    epochs: list[int] = []

    async def held(commands: Any, **options: Any) -> Any:
        if commands and commands[0][:2] == ("EVALSHA", script.sha):
            answers = await real(commands, **options)
            took = [e for e in (_epoch_taken(script, a) for a in answers) if e is not None]
            if not took:
                # The instance's other loop took the call first (a ringing call waits in both).
                return answers
            store._answers = real
            epochs.extend(took)
            reached.set()
            await go.wait()
            if lose:
                raise redis.ConnectionError("Connection closed by server.")
            return answers
        return await real(commands, **options)

    store._answers = held
    return epochs


def _attempt_bot(
    authority: TokenAuthority, store: str
) -> tuple[CallBot, list[tuple[str, int, bool]]]:
    """A bot on ``store`` and the list its handler adds each event's label, epoch and
    whether it is a re-run to."""
    handled: list[tuple[str, int, bool]] = []
    bot = make_bot(authority, store=store)

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        attempt = current_attempt()
        assert attempt is not None
        handled.append((label(event), attempt.epoch, attempt.redelivered))

    return bot, handled


def _left_waiting(kind: str, call_id: str) -> dict[str, Any]:
    """A notification an instance that drains leaves to the others: a new incoming call
    (ringing) or a later state (runnable only)."""
    if kind == "ringing":
        return b.notifications(b.incoming_call(call_id))
    return b.notifications(b.call_state(call_id, "establishing"))


@pytest.mark.parametrize("kind", ["ringing", "runnable"])
async def test_a_call_claimed_as_its_instance_drains_is_handed_over_at_once(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis, kind: str
) -> None:
    """A drain that began while a CLAIM was on its way (Redis ran it, its answer not read
    yet) cancelled the claim loop: the lease it took was held by nobody until it ran out
    (``store_lease``, 10 s), past what Graph waits for a call to be answered. The claim ends
    and the call is handed straight over at that epoch, ringing still; its first run is
    no re-run."""
    leaving, _ = _attempt_bot(authority, redis_url)
    taker, taker_handled = _attempt_bot(authority, redis_url)
    other, handled = _attempt_bot(authority, redis_url)
    leaving_server: BotServer = await serve(leaving)
    await serve(taker)
    taker_store: Any = taker._running().store
    reached, go = asyncio.Event(), asyncio.Event()
    epochs = answer_held(taker_store, reached, go)
    await leaving._running().store.drain(0.1)  # it leaves the call to the others
    assert (await leaving_server.post(_left_waiting(kind, "left-1"))).status == 202
    await until(reached.is_set, within=10)  # the taker's CLAIM took the lease
    (epoch,) = epochs
    lease, fence = taker_store._keys.of(id_key("left-1"), "lease", "fence")
    assert await rdb.get(lease) == f"{taker_store.token}/{epoch}"
    await serve(other)
    stopping = asyncio.ensure_future(taker.stop())
    await until(lambda: taker_store._draining, within=10)
    go.set()
    await stopping
    # handed over at the claim's epoch, not left to run out
    assert await rdb.hget(fence, "r") == str(epoch)
    first = "IncomingCall" if kind == "ringing" else "establishing"
    await until(lambda: [h[0] for h in handled] == [first], within=10)
    assert taker_handled == []
    assert handled[0][1] > epoch
    assert handled[0][2] is False  # nothing of it ran before


@pytest.mark.parametrize("kind", ["ringing", "runnable"])
async def test_a_call_popped_as_its_instance_drains_is_handed_over_at_once(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis, kind: str
) -> None:
    """A drain that began while a claim loop's pop was on its way (Redis popped the call,
    its answer not read yet) cancelled the loop: the call was in no index until a reaper's
    round found it. The loop is woken instead, reads what Redis popped and hands it over:
    another instance runs it with no reaper's round (none may reap here)."""
    leaving, _ = _attempt_bot(authority, redis_url)
    taker, taker_handled = _attempt_bot(authority, redis_url)
    other, handled = _attempt_bot(authority, redis_url)
    leaving_server: BotServer = await serve(leaving)
    await serve(taker)
    taker_store: Any = taker._running().store
    await rdb.set(taker_store._keys.reaper, "nobody", px=120_000)
    call = id_key("popped-1")
    reached, go = asyncio.Event(), asyncio.Event()
    real = taker_store._blocking.bzpopmin

    popping: set[str] = set()

    async def held(keys: Any, timeout: float = 0) -> Any:
        popping.add(str(keys))  # each loop's pops, from the claim and the answer loop
        popped = await real(keys, timeout=timeout)
        if popped and popped[1] in (call, call.encode()):
            reached.set()
            await go.wait()
        return popped

    taker_store._blocking.bzpopmin = held
    await leaving._running().store.drain(0.1)  # it leaves the call to the others
    await until(lambda: len(popping) == 2, within=10)  # no pop begun before is on its way
    assert (await leaving_server.post(_left_waiting(kind, "popped-1"))).status == 202
    await until(reached.is_set, within=10)  # popped by the taker, its answer held
    await serve(other)
    stopping = asyncio.ensure_future(taker.stop())
    await until(lambda: taker_store._draining, within=10)
    go.set()
    await stopping
    first = "IncomingCall" if kind == "ringing" else "establishing"
    await until(lambda: [h[0] for h in handled] == [first], within=10)
    assert taker_handled == []
    assert handled[0][2] is False  # nothing of it ran before


@pytest.mark.parametrize("kind", ["ringing", "runnable"])
async def test_a_claim_whose_answer_was_lost_runs_the_call_at_the_lease_it_took(
    authority: TokenAuthority, serve: Any, redis_url: str, kind: str
) -> None:
    """A CLAIM Redis ran whose answer was lost with the connection left the call leased by
    its instance, which did not run it, until the lease ran out (10 s): the claim loop took
    the call for waiting in ``runnable`` still. It is asked again, and answered as it was
    while its lease holds: the call runs at the epoch that CLAIM took, as a first run."""
    leaving, _ = _attempt_bot(authority, redis_url)
    taker, handled = _attempt_bot(authority, redis_url)
    leaving_server: BotServer = await serve(leaving)
    await serve(taker)
    reached, go = asyncio.Event(), asyncio.Event()
    epochs = answer_held(taker._running().store, reached, go, lose=True)
    await leaving._running().store.drain(0.1)
    assert (await leaving_server.post(_left_waiting(kind, "left-2"))).status == 202
    await until(reached.is_set, within=10)
    (epoch,) = epochs
    go.set()
    first = "IncomingCall" if kind == "ringing" else "establishing"
    await until(lambda: len(handled) == 1, within=20)
    assert handled == [(first, epoch, False)]


async def test_an_ingest_whose_answer_was_lost_runs_the_call_it_took_at_that_lease(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """An ingest whose INGEST took a new incoming call, its answer lost with the connection,
    got 503 and left the call leased by its instance, which did not run it, until the lease
    ran out (``store_lease``, 10 s): Graph's retry was told the instance ran it already. The
    call is asked for again as a claim whose answer was lost is: its handlers run here at
    the epoch INGEST took, once, as a first run, Graph's retry coming first or not."""
    bot, handled = _attempt_bot(authority, redis_url)
    server: BotServer = await serve(bot)
    store: Any = bot._running().store
    reached, go = asyncio.Event(), asyncio.Event()
    epochs = answer_held(store, reached, go, lose=True, script=_scripts.INGEST)
    incoming = b.notifications(b.incoming_call("lost-1"))
    posting = asyncio.ensure_future(server.post(incoming))
    await until(reached.is_set, within=10)  # Redis ran it: the lease is this instance's
    (epoch,) = epochs
    (lease,) = store._keys.of(id_key("lost-1"), "lease")
    assert await rdb.get(lease) == f"{store.token}/{epoch}"
    asked, answer = asyncio.Event(), asyncio.Event()
    asked_epochs = answer_held(store, asked, answer)  # the CLAIM asked again, held
    go.set()
    assert (await posting).status == 503
    await until(asked.is_set, within=10)
    assert asked_epochs == [epoch]  # answered the lease INGEST took
    # Graph's retry meanwhile: the instance holds the lease, and the ask again runs the call
    assert (await server.post(incoming)).status == 202
    answer.set()
    await until(lambda: len(handled) == 1, within=10)
    assert handled == [("IncomingCall", epoch, False)]
    established = b.notifications(b.call_state("lost-1", "established"))
    assert (await server.post(established)).status == 202
    await until(lambda: len(handled) == 2, within=10)
    assert [h[0] for h in handled] == ["IncomingCall", "established"]  # none ran twice


async def test_an_ingest_whose_answer_was_lost_as_its_instance_drains_hands_the_call_over(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """The same while the instance drains: the lease INGEST took was held by nobody until it
    ran out (10 s), past what Graph waits for a call to be answered. The drain waits for the
    ask again, which hands the call straight over at that epoch, ringing still: another
    instance runs it as a first run."""
    taker, taker_handled = _attempt_bot(authority, redis_url)
    other, handled = _attempt_bot(authority, redis_url)
    taker_server: BotServer = await serve(taker)
    await serve(other)
    taker_store: Any = taker._running().store
    reached, go = asyncio.Event(), asyncio.Event()
    epochs = answer_held(taker_store, reached, go, lose=True, script=_scripts.INGEST)
    posting = asyncio.ensure_future(taker_server.post(b.notifications(b.incoming_call("lost-2"))))
    await until(reached.is_set, within=10)
    (epoch,) = epochs
    lease, fence = taker_store._keys.of(id_key("lost-2"), "lease", "fence")
    assert await rdb.get(lease) == f"{taker_store.token}/{epoch}"
    stopping = asyncio.ensure_future(taker.stop())
    await until(lambda: taker_store._draining, within=10)
    go.set()
    assert (await posting).status == 503
    await stopping
    # handed over at the epoch INGEST took, not left to run out
    assert await rdb.hget(fence, "r") == str(epoch)
    await until(lambda: len(handled) == 1, within=10)
    assert taker_handled == []
    assert handled[0][0] == "IncomingCall"
    assert handled[0][1] > epoch
    assert handled[0][2] is False  # nothing of it ran before


async def test_a_fact_whose_answer_was_lost_runs_the_call_it_took_at_that_lease(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """A fact of the bot's own (Graph placed the call the bot asked for) appended by an INGEST
    that took the call, its answer lost: the store raised, and the call stayed leased by its
    instance, which did not run it, until the lease ran out (10 s). It is asked for again as
    an ingest's is: the call runs here at the epoch INGEST took, and its first notification
    is handled at once, as a first run."""
    bot, handled = _attempt_bot(authority, redis_url)
    server: BotServer = await serve(bot)
    store: Any = bot._running().store
    reached, go = asyncio.Event(), asyncio.Event()
    epochs = answer_held(store, reached, go, lose=True, script=_scripts.INGEST)
    noting = asyncio.ensure_future(store.note(Placed("placed-1")))
    await until(reached.is_set, within=10)
    (epoch,) = epochs
    go.set()
    with pytest.raises(StoreUnavailable):
        await noting
    key = id_key("placed-1")
    await until(lambda: key in store._owned and store._owned[key].epoch == epoch, within=10)
    established = b.notifications(b.call_state("placed-1", "established"))
    assert (await server.post(established)).status == 202
    await until(lambda: len(handled) == 1, within=10)
    assert handled == [("established", epoch, False)]


@dataclass
class Trip:
    """What to do with a store's next round trip running the script ``sha`` on the keys of
    the call whose key ``key`` is (:func:`intercepted`): wait for ``gate`` before sending
    it; once Redis ran it, wait for ``hold`` before reading its answer, and ``lose`` the
    answer (a connection closing before its reply)."""

    sha: str
    key: str
    gate: asyncio.Event | None = None
    hold: asyncio.Event | None = None
    lose: bool = False
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    answers: list[Any] = field(default_factory=list)
    used: bool = False


def intercepted(store: Any, trips: list[Trip]) -> None:
    """Act on ``store``'s round trips as ``trips`` say, each on the first that matches it."""
    real = store._answers

    async def answers(commands: Any, **options: Any) -> Any:
        for trip in trips:
            if not trip.used and any(
                c[:2] == ("EVALSHA", trip.sha) and trip.key in c for c in commands
            ):
                trip.used = True
                trip.reached.set()
                if trip.gate is not None:
                    await trip.gate.wait()
                got = await real(commands, **options)
                trip.answers.extend(got)
                if trip.hold is not None:
                    await trip.hold.wait()
                if trip.lose:
                    raise redis.ConnectionError("Connection closed by server.")
                return got
        return await real(commands, **options)

    store._answers = answers


async def test_a_late_answer_asked_again_runs_no_handler_again(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """Two asks again for one call (an incoming call's INGEST took the lease, epoch E, and
    Graph's retry was told this instance runs it, both answers lost): the first runs the
    call at E, which ends and gives the call up; the second's answer, read while E held,
    comes after that. It began a second run at E, as a first run: the handler ran twice,
    not flagged. Its run now notes its first entry against the lease first, refused."""
    bot, handled = _attempt_bot(authority, redis_url)
    server: BotServer = await serve(bot)
    store: Any = bot._running().store
    key = id_key("dup-1")
    (lease,) = store._keys.of(key, "lease")
    first, retry = (Trip(_scripts.INGEST.sha, lease, lose=True) for _ in range(2))
    gate, late = asyncio.Event(), asyncio.Event()
    first_ask = Trip(_scripts.CLAIM.sha, lease, gate=gate)
    second_ask = Trip(_scripts.CLAIM.sha, lease, hold=late)
    intercepted(store, [first, retry, first_ask, second_ask])
    incoming = b.notifications(b.incoming_call("dup-1"))
    assert (await server.post(incoming)).status == 503  # INGEST took E, its answer lost
    epoch = int(first.answers[0][3])
    await until(first_ask.reached.is_set, within=10)  # held before it is sent
    assert (await server.post(incoming)).status == 503  # the retry's answer lost too
    await until(lambda: len(second_ask.answers) == 1, within=10)
    assert int(second_ask.answers[0][0]) == epoch  # answered E, while E held
    gate.set()
    await until(lambda: len(handled) == 1, within=10)
    await until(lambda: key not in store._owned, within=10)  # the run gave the call up
    assert await rdb.get(lease) is None
    late.set()
    await until(lambda: not store._asked_again and key not in store._owned, within=10)
    assert handled == [("IncomingCall", epoch, False)]


async def test_a_store_closed_as_an_ingest_s_answer_is_lost_leaves_nothing_behind(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """An ingest that took a call, its answer lost as the store closes: closing before its
    ask again began left a coroutine never awaited and the call counted against the room;
    failing once closing had begun, the ask ran after close returned, a connection left
    open. Closing, none is asked: the call goes on elsewhere when its lease runs out."""
    bot, _ = _attempt_bot(authority, redis_url)
    server: BotServer = await serve(bot)
    store: Any = bot._running().store
    (lease,) = store._keys.of(id_key("after-1"), "lease")
    go = asyncio.Event()
    lost = Trip(_scripts.INGEST.sha, lease, lose=True, hold=go)
    intercepted(store, [lost])
    posting = asyncio.ensure_future(server.post(b.notifications(b.incoming_call("after-1"))))
    await until(lambda: bool(lost.answers), within=10)  # INGEST took the call; reply out
    await store.drain(0.05)  # cut short
    await store.close()
    clients = len(await rdb.client_list())  # this test's own: the store's are closed
    go.set()
    assert (await posting).status == 503
    assert (store._asked_again, store._taking) == (set(), 0)
    assert (len(await rdb.client_list()), store._batch._spare) == (clients, [])


async def test_an_ask_again_closed_before_it_began_leaves_nothing_behind(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """The store told to close as an ingest's answer is lost (a stop as the connection
    drops): the ask again made is cancelled before its first step, and leaves no coroutine
    never awaited (an error in this suite) nor the call counted against the room."""
    bot, _ = _attempt_bot(authority, redis_url)
    server: BotServer = await serve(bot)
    store: Any = bot._running().store
    (lease,) = store._keys.of(id_key("closing-1"), "lease")
    lost = Trip(_scripts.INGEST.sha, lease, lose=True)
    intercepted(store, [lost])
    losing = store._answers
    closing: list[asyncio.Future[None]] = []

    async def answers(commands: Any, **options: Any) -> Any:
        try:
            return await losing(commands, **options)
        except redis.ConnectionError:
            if lost.used and not closing:
                closing.append(asyncio.ensure_future(store.close()))
            raise

    store._answers = answers
    assert (await server.post(b.notifications(b.incoming_call("closing-1")))).status == 503
    await closing[0]
    gc.collect()  # a coroutine never awaited is told as it is collected
    assert (store._asked_again, store._taking) == (set(), 0)


async def test_an_upkeep_round_redis_filled_up_during_proves_nothing(
    own_redis: Callable[..., RedisServer], authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    """An upkeep round whose writes were taken before Redis filled up, ending after a callback
    got 503 for it, made the bot ready while every write was refused."""
    server_process = own_redis(tmp_path)
    await asyncio.to_thread(server_process.start)
    bot, _ = _labelling_bot(authority, server_process.url)
    server: BotServer = await serve(bot)
    await until(lambda: bot.ready, within=10)
    store = bot._running().store
    assert isinstance(store, _redis.RedisStore)
    reaped, go_on, ended = asyncio.Event(), asyncio.Event(), asyncio.Event()
    reap, mark = store._reap, store._mark

    async def reap_then_wait() -> None:
        await reap()  # its SET taken
        reaped.set()
        await go_on.wait()

    def marked(reachable: bool, error: BaseException | None = None, *, wrote: bool = False) -> None:
        mark(reachable, error, wrote=wrote)
        if go_on.is_set() and reachable:
            ended.set()  # the held round's end

    store._reap = reap_then_wait  # type: ignore[method-assign]
    store._mark = marked  # type: ignore[method-assign]
    try:
        async with aioredis.Redis(port=server_process.port, decode_responses=True) as admin:
            await reaped.wait()
            await admin.config_set("maxmemory", "1")  # every write now refused: OOM
            response = await server.post(b.notifications(b.incoming_call("filled-call")))
            assert response.status == 503
            store._reap = reap  # type: ignore[method-assign]
            go_on.set()
            await ended.wait()
            assert not bot.ready
            assert (await server.client.get("/readyz")).status == 503
            await admin.config_set("maxmemory", "0")
    finally:
        go_on.set()
        store._reap, store._mark = reap, mark  # type: ignore[method-assign]
    await until(lambda: bot.ready, within=10)
    assert (await server.post(b.notifications(b.incoming_call("filled-call")))).status == 202


@pytest.mark.parametrize(
    ("error", "refuses"),
    [
        (
            redis.exceptions.OutOfMemoryError(
                "command not allowed when used memory > 'maxmemory'."
            ),
            True,
        ),
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), True),
        # Redis 6 names a script's failing command's error after a dash
        (
            redis.ResponseError(
                "Error running script (call to f_0be3): @user_script:71: "
                "-OOM command not allowed when used memory > 'maxmemory'."
            ),
            True,
        ),
        (redis.ResponseError("MISCONF Redis is configured to save RDB snapshots, but ..."), True),
        (redis.ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False),
        (redis.ConnectionError("Connection closed by server."), False),
    ],
)
def test_what_refuses_writes_while_reads_go_on(error: Exception, refuses: bool) -> None:
    """After these, only a write Redis takes makes the store reachable again."""
    assert _redis._refuses_writes(error) is refuses


async def test_with_store_replicas_nothing_is_relied_on_before_a_replica_holds_it(
    own_redis: Callable[..., RedisServer], authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    """``store_replicas=1``: while the primary has no replica, callbacks get 503 (Graph
    retries them) and /readyz fails; once a replica holds the writes again, 202."""
    primary = own_redis(tmp_path / "primary")
    replica = own_redis(tmp_path / "replica")
    for node in (primary, replica):
        node.directory.mkdir()
    primary.start()
    replica.args = ("--replicaof", "127.0.0.1", str(primary.port))
    replica.start()
    handled: list[str] = []
    bot = make_bot(authority, store=primary.url, store_lease=1.0, store_replicas=1)

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        handled.append(label(event))

    server: BotServer = await serve(bot)
    await until(lambda: bot.ready, within=10)  # once the replica is in sync
    assert (await server.post(b.notifications(b.incoming_call("w1")))).status == 202
    await until(lambda: handled == ["IncomingCall"])

    replica.stop()
    response = await server.post(b.notifications(b.call_state("w1", "establishing")))
    assert response.status == 503
    assert (await response.json())["error"] == "store_unavailable"
    assert (await server.client.get("/readyz")).status == 503
    assert handled == ["IncomingCall"]

    replica.start()
    await until(lambda: bot.ready, within=10)
    response = await server.post(b.notifications(b.call_state("w1", "establishing")))
    assert response.status == 202
    await until(lambda: handled == ["IncomingCall", "establishing"], within=10)


async def _two_players(
    authority: TokenAuthority,
    serve: Any,
    redis_url: str,
    graph: FakeGraph,
    runs: list[tuple[int, bool, str | None]],
) -> BotServer:
    """Two instances sharing Redis whose ``established`` handler plays a prompt and notes
    (instance, re-run, operation id) in ``runs``; the first one's then never finishes.
    Returns the first."""
    servers: list[BotServer] = []
    for index in range(2):
        bot = graph_instance(
            authority,
            redis_url,
            graph,
            store_lease=1.0,
            shutdown_timeout=0.2,
        )

        @bot.on_state("established")
        async def play(call: Call, event: events.CallStateChanged, index: int = index) -> None:
            attempt = current_attempt()
            assert attempt is not None
            op = await call.play_prompt("https://cdn.example.test/hello.wav")
            runs.append((index, attempt.redelivered, op.id))
            if index == 0:
                await asyncio.Event().wait()  # never finishes: the instance stops

        servers.append(await serve(bot))
    return servers[0]


async def _replayed_after_stopping(
    first: BotServer, graph: FakeGraph, runs: list[tuple[int, bool, str | None]]
) -> None:
    """Stop the first of :func:`_two_players` mid-handler: the other runs the handler again,
    flagged, and gets the recorded prompt instead of sending it to Graph again."""
    await first.bot.stop()  # the handler is abandoned: its entry is not acknowledged
    await until(lambda: len(runs) == 2, within=10)
    (_, first_flag, first_op), (index, again, second_op) = runs
    assert (first_flag, index, again) == (False, 1, True)
    assert second_op == first_op  # the recorded answer, not a new operation
    assert len(graph.requests_for("playPrompt")) == 1


async def test_a_re_run_handler_does_not_repeat_graph_actions_its_first_run_completed(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """Instance stopped mid-handler: the next owner runs the handler again, flagged as a
    re-run, and its first action is served from the journal instead of sent again."""
    async with FakeGraph() as graph:
        runs: list[tuple[int, bool, str | None]] = []
        first = await _two_players(authority, serve, redis_url, graph, runs)
        graph.add_call("journal-call", state="establishing")  # the call Graph posts about
        for state in ("establishing", "established"):
            item = b.call_state("journal-call", state)
            assert (await first.post(b.notifications(item))).status == 202
        await until(lambda: bool(runs), within=10)
        await _replayed_after_stopping(first, graph, runs)


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (with openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CALLBOT_TEST_REQUIRE_SERVERS") == "1":
            pytest.fail("openssl is required here")
        pytest.skip("openssl is not installed")
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key = directory / "server.pem", directory / "server.key"
    csr, ext = directory / "server.csr", directory / "ext.cnf"
    # Python 3.13 verifies with VERIFY_X509_STRICT: the CA needs a key usage and the
    # server certificate an authority key identifier.
    ext.write_text("subjectAltName=IP:127.0.0.1\nauthorityKeyIdentifier=keyid,issuer\n")
    steps = [
        (
            *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key)),
            *("-out", str(ca), "-days", "2", "-subj", "/CN=callbot-test-ca"),
            *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        ),
        (
            *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key)),
            *("-out", str(csr), "-subj", "/CN=127.0.0.1"),
        ),
        (
            *("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key)),
            *("-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)),
        ),
    ]
    for step in steps:
        subprocess.run([openssl, *step], check=True, capture_output=True, timeout=60)
    return ca, cert, key


@pytest.mark.parametrize("kind", ["tls", "acl", "acl-not-dangerous"])
async def test_tls_and_acl_users(
    own_redis: Callable[..., RedisServer],
    authority: TokenAuthority,
    serve: Any,
    tmp_path: Path,
    kind: str,
) -> None:
    """The store over TLS (``rediss://``, the server's certificate checked against a CA)
    and as an ACL user (``redis://user:password@``)."""
    if kind == "tls":
        ca, cert, key = await asyncio.to_thread(_certificates, tmp_path)
        server = own_redis(
            tmp_path,
            # the TLS port right above the plain one, both picked again if either is taken
            args=lambda port: (
                *("--tls-port", str(port + 1), "--tls-cert-file", str(cert)),
                *("--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)),
                *("--tls-auth-clients", "no"),
            ),
            spare=1,
        )
        await asyncio.to_thread(server.start)
        url = f"rediss://127.0.0.1:{server.port + 1}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    else:
        # "acl-not-dangerous": as managed Redis's usual data role (INFO, CONFIG, KEYS... denied)
        grants = ("+@all", "-@dangerous") if kind == "acl-not-dangerous" else ("+@all",)
        args = ("--user", "bot", "on", ">s3cret", "~*", "&*", *grants)
        server = own_redis(tmp_path, args=args)
        await asyncio.to_thread(server.start)
        url = f"redis://bot:s3cret@127.0.0.1:{server.port}/0"
    handled: list[tuple[str, bool]] = []
    bot = make_bot(authority, store=url, store_lease=1.0)

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        attempt = current_attempt()
        handled.append((label(event), attempt is not None and attempt.redelivered))

    served: BotServer = await serve(bot)
    for item in lifecycle_steps("secure-call"):
        for notification in item:
            assert (await served.post(b.notifications(notification))).status == 202
    await until(lambda: len(handled) == len(LIFECYCLE), within=10)
    assert handled == [(step, False) for step in LIFECYCLE]


@pytest.mark.parametrize("kind", [events.CallStateChanged, events.CallUpdated])
async def test_a_run_that_lost_its_call_sends_no_further_graph_action(
    authority: TokenAuthority,
    serve: Any,
    redis_url: str,
    rdb: aioredis.Redis,
    kind: type[events.Event],
) -> None:
    """Instance paused past its lease, then resumed mid-handler (simulated: another
    instance's acquisition is written into Redis and the run's lease deadline passes):
    the handler's next Graph action is refused, not sent. Also for an update (Teams sends
    ``established`` again with media state: sb09), which the sequencer rewrites."""
    async with FakeGraph() as graph:
        started, go = asyncio.Event(), asyncio.Event()
        outcome: list[str] = []
        bot = graph_instance(
            authority,
            redis_url,
            graph,
            store_lease=5.0,
        )

        @bot.on(kind)
        async def play(call: Call, event: events.Event) -> None:
            if isinstance(event, events.CallStateChanged) and event.state != "established":
                return
            started.set()
            await go.wait()
            try:
                await call.play_prompt("https://cdn.example.test/hello.wav")
                outcome.append("sent")
            except RunSuperseded:
                outcome.append("refused")

        server: BotServer = await serve(bot)
        audio = {"mediaState": {"audio": "active"}}
        for state, extra in (("establishing", {}), ("established", {}), ("established", audio)):
            item = b.call_state("fenced-call", state)
            item["resourceData"].update(extra)
            assert (await server.post(b.notifications(item))).status == 202
        await asyncio.wait_for(started.wait(), 10)
        await _taken_over(bot, rdb, "fenced-call")
        go.set()
        await until(lambda: bool(outcome), within=10)
        assert outcome == ["refused"]
        assert graph.requests_for("playPrompt") == []


async def test_a_handler_stopped_because_its_run_lost_the_call_is_no_error(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """A handler that lets ``RunSuperseded`` escape (its run lost the call to another
    instance, which runs the delivery again) stops quietly, as one stopped by the call's end
    does: no ``on_error``, no ``handler_failed`` traceback, the outcome ``superseded``; the
    delivery's next handler does not start there, and the delivery counts once."""
    async with FakeGraph() as graph:
        started, go = asyncio.Event(), asyncio.Event()
        errors: list[BaseException] = []
        outcomes: list[str] = []
        bot = graph_instance(authority, redis_url, graph, store_lease=5.0)

        @bot.on_state("established")
        async def play(call: Call, event: events.CallStateChanged) -> None:
            started.set()
            await go.wait()
            await call.play_prompt("https://cdn.example.test/hello.wav")

        @bot.on_state("established")
        async def after(call: Call, event: events.CallStateChanged) -> None:
            outcomes.append("the next handler started")  # the new owner runs it, not this run

        @bot.on_error
        async def report(call: Call, event: events.Event, exc: BaseException) -> None:
            errors.append(exc)

        bot.watch_handlers(lambda name, event, outcome: outcomes.append(outcome))
        server: BotServer = await serve(bot)
        for state in ("establishing", "established"):
            item = b.call_state("fenced-call", state)
            assert (await server.post(b.notifications(item))).status == 202
        await asyncio.wait_for(started.wait(), 10)
        await _taken_over(bot, rdb, "fenced-call")
        with capture_logs() as logs:
            go.set()
            await until(lambda: bool(outcomes), within=10)
        await until(lambda: bot._running().dispatcher.counts["handled"] >= 2, within=10)
        assert outcomes == ["superseded"]
        assert errors == []
        assert [line["event"] for line in logs if line["event"].startswith("handler_")] == [
            "handler_stopped_superseded"
        ]
        assert bot._running().dispatcher.counts["superseded"] == 1
        assert graph.requests_for("playPrompt") == []


async def _taken_over(bot: CallBot, rdb: aioredis.Redis, call_id: str) -> Any:
    """Another instance takes the call over while this one's run is paused past its lease
    (its lease and epoch moved on in Redis, its own deadline gone); the run is returned."""
    key = call_key(call_id)
    await rdb.set(f"{KEY_PREFIX}{{{key}}}:lease", "another-instance/99")
    await rdb.hincrby(f"{KEY_PREFIX}{{{key}}}:fence", "n", 1)
    run = bot._running().store._running[key]  # type: ignore[attr-defined]
    run.deadline = 0.0  # as after a pause longer than the lease
    return run


async def test_a_run_that_lost_its_call_starts_no_further_handler(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """Instance paused (SIGSTOP) or its loop blocked past its lease with deliveries of the
    call still queued: here `established`, held, released behind its late `establishing`,
    whose handler is running (after a pause, a hold whose window closed meanwhile is
    released the same way). Once another instance took the call over (simulated as above),
    the queued delivery does not start on the old instance, unflagged: the new owner runs
    it, flagged as a re-run."""
    started, go = asyncio.Event(), asyncio.Event()
    seen: list[str] = []
    bot = make_bot(authority, store=redis_url, store_lease=5.0, reorder_window=30.0)

    @bot.on(events.CallStateChanged)
    async def record(call: Call, event: events.CallStateChanged) -> None:
        seen.append(event.state)
        if event.state == "establishing":
            started.set()
            await go.wait()

    server: BotServer = await serve(bot)
    for state in ("established", "establishing"):
        item = b.call_state("queued-call", state)
        assert (await server.post(b.notifications(item))).status == 202
    await asyncio.wait_for(started.wait(), 10)
    run = await _taken_over(bot, rdb, "queued-call")
    runtime = bot._running()
    with capture_logs() as logs:
        go.set()
        await until(lambda: runtime.dispatcher.queued == 0, within=10)
    assert seen == ["establishing"]
    superseded = [e for e in logs if e.get("event") == "delivery_superseded"]
    assert [(e["kind"], e["epoch"]) for e in superseded] == [("CallStateChanged", run.epoch)]


async def test_a_graph_action_is_recorded_once_redis_takes_the_write(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """Redis fails the journal write just as Graph answers a handler's action (here the
    call's journal key is made unwritable; a dropped connection or a restart does the
    same): the write is retried until Redis takes it, so a re-run after a takeover replays
    the action instead of sending it again."""
    key = call_key("record-call")
    journal = f"{KEY_PREFIX}{{{key}}}:journal"
    async with FakeGraph() as graph:
        runs: list[tuple[int, bool, str | None]] = []
        acted = asyncio.Event()

        async def answer_then_fail(request: Any) -> Any:
            await rdb.set(journal, "not a hash")  # HSET into it fails (WRONGTYPE)
            acted.set()
            return graph._default(request)

        graph.route("playPrompt", answer_then_fail)
        first = await _two_players(authority, serve, redis_url, graph, runs)
        graph.add_call("record-call", state="establishing")  # the call Graph posts about
        for state in ("establishing", "established"):
            item = b.call_state("record-call", state)
            assert (await first.post(b.notifications(item))).status == 202
        await asyncio.wait_for(acted.wait(), 10)
        store = first.bot._running().store
        # The journal write failed once: the handler went on, or the store retries it.
        await until(lambda: bool(runs) or not store.reachable, within=10)
        await rdb.delete(journal)
        await until(lambda: bool(runs), within=10)
        await _replayed_after_stopping(first, graph, runs)


class Collecting:
    """Two instances sharing Redis, each collecting digits once its call is established."""

    def __init__(self, reorder_window: float = 1.0) -> None:
        self.reorder_window = reorder_window
        self.servers: list[BotServer] = []
        self.collecting: dict[str, int] = {}
        self.collected: list[tuple[int, str]] = []

    async def start(
        self, authority: TokenAuthority, serve: Any, redis_url: str, graph: FakeGraph, **ask: Any
    ) -> None:
        for index in range(2):
            bot = graph_instance(
                authority,
                redis_url,
                graph,
                reorder_window=self.reorder_window,
            )

            @bot.on_state("established")
            async def pin(call: Call, event: events.CallStateChanged, index: int = index) -> None:
                self.collecting[call.key] = index
                try:
                    self.collected.append((index, await call.collect_digits(**ask)))
                except CallEnded:
                    self.collected.append((index, "ended"))

            self.servers.append(await serve(bot))

    async def establish(self, graph: FakeGraph, call_id: str) -> tuple[int, BotServer]:
        """Establish ``call_id`` at the first instance: the owner's index, and the other."""
        graph.add_call(call_id, state="establishing")  # the call Graph posts about
        for state in ("establishing", "established"):
            item = b.call_state(call_id, state)
            assert (await self.servers[0].post(b.notifications(item))).status == 202
        await graph.wait_for_request("subscribeToTone")
        await until(lambda: id_key(call_id) in self.collecting)
        owner = self.collecting[id_key(call_id)]
        return owner, self.servers[1 - owner]


async def test_keys_posted_to_another_instance_reach_a_handler_collecting_digits(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    async with FakeGraph() as graph:
        bots = Collecting()
        ask = {"max_digits": 4, "finish_on": "#", "timeout": 10}
        await bots.start(authority, serve, redis_url, graph, **ask)
        owner, other = await bots.establish(graph, "pin-call")
        for sequence, tone in enumerate(("tone4", "tone2", "pound"), start=1):
            response = await other.post(b.notifications(b.tone("pin-call", tone, sequence)))
            assert response.status == 202
        await until(lambda: bool(bots.collected), within=20)
        assert bots.collected == [(owner, "42")]


async def test_keys_arriving_swapped_at_two_instances_are_collected_in_graph_s_order(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    async with FakeGraph() as graph:
        bots = Collecting(reorder_window=300)  # never closes here: 8 is released by 7 alone
        await bots.start(authority, serve, redis_url, graph, max_digits=3, timeout=30)
        owner, other = await bots.establish(graph, "swap-call")
        tones = bots.servers[owner].bot._running().services.tones
        key = id_key("swap-call")
        (listener,) = tones._listeners[key]

        async def told_and_taken(count: int) -> None:
            await until(lambda: len(tones._told.get(key, ())) == count, within=10)
            await until(lambda: not listener.pending(), within=10)

        # Numbered from 6 as in the recorded Teams call; 8 overtakes 7 at the other instance.
        for count, (sequence, tone) in enumerate(((6, "tone1"), (8, "tone3")), start=1):
            response = await other.post(b.notifications(b.tone("swap-call", tone, sequence)))
            assert response.status == 202
            await told_and_taken(count)
        response = await bots.servers[owner].post(b.notifications(b.tone("swap-call", "tone2", 7)))
        assert response.status == 202
        await until(lambda: bool(bots.collected), within=10)
        assert bots.collected == [(owner, "123")]


async def _abandoning(
    authority: TokenAuthority,
    serve: Any,
    redis_url: str,
    graph: FakeGraph,
    install: Callable[[CallBot, int], None],
) -> list[BotServer]:
    """Two instances sharing Redis with the handlers ``install(bot, index)`` adds; the
    first one's stop abandons a handler still running (the other runs it again at once)."""
    servers: list[BotServer] = []
    for index in range(2):
        bot = graph_instance(
            authority,
            redis_url,
            graph,
            store_lease=60.0,
            shutdown_timeout=0.3,
        )
        install(bot, index)
        servers.append(await serve(bot))
    return servers


def _again() -> bool:
    attempt = current_attempt()
    return attempt is not None and attempt.redelivered


async def _press(server: BotServer, call_id: str, sequence: int, tone: str) -> None:
    assert (await server.post(b.notifications(b.tone(call_id, tone, sequence)))).status == 202


async def test_a_handler_collecting_digits_run_again_hears_the_keys_its_first_run_heard(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """The instance collecting a PIN, then a choice, stops mid-choice (abandoned): the
    handler run again elsewhere gets the PIN its first run collected, and its choice hears
    the key the first run's choice heard, read back from the call's inbox, before the one
    pressed since; not the "9" pressed between the two, which no collection heard. It used
    to give the choice that "9": a re-run heard every key pressed after its notification."""
    between = asyncio.Event()
    results: list[tuple[int, bool, str]] = []

    def install(bot: CallBot, index: int) -> None:
        @bot.on_state("established")
        async def collect(call: Call, event: events.CallStateChanged) -> None:
            results.append((index, _again(), await call.collect_digits(max_digits=4, timeout=30)))
            await between.wait()
            results.append((index, _again(), await call.collect_digits(max_digits=2, timeout=30)))

    async with FakeGraph() as graph:
        first, second = await _abandoning(authority, serve, redis_url, graph, install)
        graph.add_call("pin-call", state="establishing")  # the call Graph posts about
        for state in ("establishing", "established"):
            item = b.call_state("pin-call", state)
            assert (await first.post(b.notifications(item))).status == 202
        await graph.wait_for_request("subscribeToTone")
        key, tones = id_key("pin-call"), first.bot._running().services.tones
        for sequence, digit in enumerate("1234", start=1):
            await _press(first, "pin-call", sequence, f"tone{digit}")
        await until(lambda: results == [(0, False, "1234")])
        await _press(first, "pin-call", 5, "tone9")
        await until(lambda: len(tones._told.get(key, ())) == 5)  # told while none listens
        between.set()
        await until(lambda: bool(tones._listeners.get(key)))
        await _press(first, "pin-call", 6, "tone5")
        await until(lambda: not tones._listeners[key][0].pending())  # the choice took it
        await first.bot.stop()  # the handler is abandoned: the other instance runs it again
        await _press(second, "pin-call", 7, "tone6")  # before or after the choice reopens
        await until(lambda: len(results) == 3, within=20)
        assert results == [(0, False, "1234"), (1, True, "1234"), (1, True, "56")]
        assert len(graph.requests_for("subscribeToTone")) == 1  # replayed from the journal


async def test_a_re_run_builds_only_the_entries_that_may_be_tones_one_per_turn(
    authority: TokenAuthority,
    serve: Any,
    redis_url: str,
    rdb: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reading back the keys an earlier run heard built every entry after the run's, 64
    in one turn of the event loop: 64 rosters of a meeting of 1,900 held an instance's loop
    5.5 s, every call on it waiting. Entries without a tone are not built now, and each
    one built lets the loop run before the next."""
    release = asyncio.Event()
    holding: list[str] = []
    bots = [make_bot(authority, store=redis_url, store_lease=60.0) for _ in range(2)]

    @bots[0].on_state("established")
    async def hold(call: Call, event: events.CallStateChanged) -> None:
        holding.append(call.id)
        await release.wait()  # the entries after this one wait in the inbox

    servers = [await serve(bot) for bot in bots]
    try:
        for state in ("establishing", "established"):
            item = b.call_state("meeting-call", state)
            assert (await servers[0].post(b.notifications(item))).status == 202
        await until(lambda: bool(holding))
        for sequence in range(1, 21):
            # Posted to the instance not running the call: it never parsed them.
            joined = [b.participant(f"p-{sequence}")]
            roster = b.delta_roster("meeting-call", joined, sequence_number=sequence)
            tone = b.tone("meeting-call", "tone1", sequence)
            assert (await servers[1].post(b.notifications(roster, tone))).status == 202
        (inbox,) = _redis._Keys(KEY_PREFIX).of("meetingcall", "inbox")
        entries: Any = await rdb.xrange(inbox)
        entry = next(i for i, fields in entries if '"established"' in fields["e"])

        turns = 0

        async def count_turns() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        built: list[int] = []  # the loop turns counted as each entry was built
        decode = _codec.decode_entry

        def counting(text: str) -> events.Event:
            built.append(turns)
            return decode(text)

        monkeypatch.setattr(_redis, "decode_entry", counting)
        ticker = asyncio.create_task(count_turns())
        journal = bots[1]._running().store._journal  # type: ignore[attr-defined]
        attempt = Attempt("meetingcall", entry, 1, True, journal=journal)
        tones = await journal.tones_after(attempt)
        ticker.cancel()
        assert [tone.sequence_id for tone in tones] == list(range(1, 21))
        assert len(built) == 20  # the rosters were never built
        assert all(later > earlier for earlier, later in itertools.pairwise(built))
    finally:
        release.set()


async def test_a_re_run_sends_no_action_again_after_a_collection_its_first_run_finished(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """The caller pressed a key during the PIN's prompt (cancelled: a barge-in), and the
    prompt's outcome reached the other instance too; the handler then thanked the caller
    and its instance stopped. Run again, the handler gets the same PIN, and neither the
    prompts nor the barge-in go to Graph again. It used to send the thanks again: the
    replayed prompt had ended, so the re-run sent no cancel, and the thanks took its step."""
    results: list[tuple[int, bool, str]] = []

    def install(bot: CallBot, index: int) -> None:
        @bot.on_state("established")
        async def collect(call: Call, event: events.CallStateChanged) -> None:
            pin = await call.collect_digits(MENU, max_digits=4, timeout=30)
            await call.play_prompt(THANKS)
            results.append((index, _again(), pin))
            if index == 0:
                await asyncio.Event().wait()  # never set: the instance stops meanwhile

    async with FakeGraph() as graph:
        first, second = await _abandoning(authority, serve, redis_url, graph, install)
        graph.add_call("barge-call", state="establishing")  # the call Graph posts about
        for state in ("establishing", "established"):
            item = b.call_state("barge-call", state)
            assert (await first.post(b.notifications(item))).status == 202
        await graph.wait_for_request("playPrompt")
        await _press(first, "barge-call", 1, "tone1")
        await graph.wait_for_request("cancelMediaProcessing")
        (prompt,) = [op for op, body in graph.operations.items() if "PromptOperation" in str(body)]
        assert (await first.post(graph.operation_notification(prompt))).status == 202
        await until(lambda: bool(second.bot._running().services.operations._recent))
        for sequence, digit in enumerate("234", start=2):
            await _press(first, "barge-call", sequence, f"tone{digit}")
        await until(lambda: results == [(0, False, "1234")])
        await first.bot.stop()  # the handler is abandoned: the other instance runs it again
        await until(lambda: len(results) == 2, within=20)
        assert results == [(0, False, "1234"), (1, True, "1234")]
        prompts = [r.json["prompts"][0] for r in graph.requests_for("playPrompt")]
        assert [p["mediaInfo"]["uri"] for p in prompts] == [MENU, THANKS]
        assert len(graph.requests_for("cancelMediaProcessing")) == 1


async def test_a_re_run_handler_its_first_run_never_started_hears_no_key_taken_before(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """A tone handler collecting after "*" waited behind the PIN's handler, which took the
    "*" and the keys after it, when the instance stopped: both run again elsewhere, flagged
    (the tones were fed), the PIN as before, and the tone handler, as its first run would
    have, collects from when it starts. It used to be given the keys the PIN had taken."""
    results: list[tuple[int, str, bool, str]] = []

    def install(bot: CallBot, index: int) -> None:
        @bot.on_state("established")
        async def pin(call: Call, event: events.CallStateChanged) -> None:
            keys = await call.collect_digits(max_digits=4, timeout=30)
            results.append((index, "pin", _again(), keys))
            if index == 0:
                await asyncio.Event().wait()  # never set: the instance stops meanwhile

        @bot.on_tone
        async def star(call: Call, event: events.ToneReceived) -> None:
            if event.digit == "*":
                keys = await call.collect_digits(max_digits=2, timeout=0.2)
                results.append((index, "star", _again(), keys))

    async with FakeGraph() as graph:
        first, _ = await _abandoning(authority, serve, redis_url, graph, install)
        graph.add_call("star-call", state="establishing")  # the call Graph posts about
        for state in ("establishing", "established"):
            item = b.call_state("star-call", state)
            assert (await first.post(b.notifications(item))).status == 202
        await graph.wait_for_request("subscribeToTone")
        for sequence, tone in enumerate(["tone1", "star", "tone3", "tone4"], start=1):
            await _press(first, "star-call", sequence, tone)
        await until(lambda: results == [(0, "pin", False, "1*34")])
        await first.bot.stop()  # the handler is abandoned: the other instance runs it again
        await until(lambda: len(results) == 3, within=20)
        assert results[1:] == [(1, "pin", True, "1*34"), (1, "star", True, "")]


@pytest.mark.parametrize("live", ["established", "hold", "aStateGraphAddsLater"])
async def test_a_call_placed_on_one_instance_is_awaited_established_there(
    authority: TokenAuthority, serve: Any, redis_url: str, live: str
) -> None:
    """The instance that placed a call waits for it to be established while Graph tells
    another one (the load balancer's pick): told through Redis, the wait returns; a call
    ending there first fails the wait with its reason. Any state a live call moves between
    counts, as it does on the instance running the call (only ``established`` was told)."""
    bots = [make_bot(authority, store=redis_url) for _ in range(2)]
    servers = [await serve(bot) for bot in bots]
    waiting = asyncio.create_task(bots[0].services.call("placed").wait_until_established(30))
    declined = asyncio.create_task(bots[0].services.call("declined").wait_until_established(30))
    await until(lambda: len(bots[0]._running().lifecycle._established_waiters) == 2)
    for state in ("establishing", live):
        item = b.call_state("placed", state)
        assert (await servers[1].post(b.notifications(item))).status == 202
    await asyncio.wait_for(waiting, 10)
    item = b.call_state("declined", "establishing")
    assert (await servers[1].post(b.notifications(item))).status == 202
    ended = b.call_terminated("declined", code=603, subcode=0, message="Declined")
    assert (await servers[1].post(b.notifications(ended))).status == 202
    with pytest.raises(CallEnded) as info:
        await asyncio.wait_for(declined, 10)
    assert info.value.result_info is not None
    assert info.value.result_info.code == 603


async def test_a_wait_started_after_another_instance_was_told_established_returns_at_once(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """A bot places a call, and only later waits for it to be established: Graph told the
    other instance meanwhile. The wait went on until its timeout (the instance that placed
    the call was told only while someone waited); with the memory store it returns at once."""
    async with FakeGraph() as graph:
        options: dict[str, Any] = {
            "store": redis_url,
            "graph_url": graph.graph_url,
            "authority_url": graph.authority_url,
            "app_secret": "fake-graph-secret",
        }
        bots = [make_bot(authority, **options) for _ in range(2)]
        servers = [await serve(bot) for bot in bots]
        placed = await bots[0].create_call(Target.user("user-1", "Lee Gu"))
        # Told after the placed call's, in the same stream: once this wait returns, that was.
        later = asyncio.create_task(bots[0].services.call("later").wait_until_established(30))
        await until(lambda: bool(bots[0]._running().lifecycle._established_waiters))
        for call_id in (placed.id, "later"):
            for state in ("establishing", "established"):
                item = b.call_state(call_id, state)
                assert (await servers[1].post(b.notifications(item))).status == 202
        await asyncio.wait_for(later, 10)
        await asyncio.wait_for(placed.wait_until_established(30), 10)
        ended = b.call_terminated(placed.id, code=200, subcode=5002, message="Hung up")
        assert (await servers[1].post(b.notifications(ended))).status == 202
        await until(lambda: placed.ended)
        with pytest.raises(CallEnded):
            await placed.wait_until_established(30)


async def test_every_instance_lists_the_calls_of_every_instance(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    bots = [make_bot(authority, store=redis_url) for _ in range(2)]
    servers: list[BotServer] = [await serve(bot) for bot in bots]
    for state in ("establishing", "established"):
        item = b.call_state("listed-call", state)
        assert (await servers[0].post(b.notifications(item))).status == 202

    # The other instance ran nothing of the call: it learns of it from the shared store.
    def listed_everywhere(keys: list[str]) -> bool:
        return all([c.key for c in bot.active_calls()] == keys for bot in bots)

    await until(lambda: listed_everywhere(["listedcall"]), 10)
    listed = bots[1].active_calls()[0]
    assert listed.state == "established"
    assert (await servers[1].post(b.notifications(b.call_terminated("listed-call")))).status == 202
    await until(lambda: listed_everywhere([]), 10)


async def test_a_placed_call_is_listed_once_graph_tells_a_state_of_it(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """What Graph answered placing a call is kept in the call's record before any
    notification of it: the call is not listed meanwhile (as with the memory store, where
    only a call that reached a state is), then is, with the bot's own participant id."""
    async with FakeGraph() as graph:
        bot = graph_instance(authority, redis_url, graph)
        server = await serve(bot)
        placed = await bot.create_call(Target.user("user-1", "Lee Gu"))
        store = bot._running().store
        assert isinstance(store, _redis.RedisStore)
        await until(lambda: placed.key in store._known, within=10)
        assert bot.active_calls() == []
        item = b.call_state(placed.id, "establishing")
        assert (await server.post(b.notifications(item))).status == 202
        await until(lambda: [c.key for c in bot.active_calls()] == [placed.key], within=10)
        (listed,) = bot.active_calls()
        assert listed.snapshot is not None
        assert placed.snapshot is not None
        assert listed.snapshot.my_participant_id == placed.snapshot.my_participant_id


async def test_a_call_placed_by_a_draining_instance_has_the_bot_s_id_where_it_runs(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """An instance shutting down places a call (a handler finishing meanwhile): it takes on
    no call, and leaves this one to the others, which run its notifications with the bot's
    own participant id that the answer to the request named."""
    async with FakeGraph() as graph:
        draining = graph_instance(authority, redis_url, graph)
        other = graph_instance(authority, redis_url, graph)
        seen: list[tuple[str, str | None]] = []

        @other.on(events.CallStateChanged)
        async def record(call: Call, event: events.CallStateChanged) -> None:
            seen.append((event.state, call.snapshot.my_participant_id if call.snapshot else None))

        await serve(draining)
        server = await serve(other)
        await draining._running().drain()
        placed = await draining.create_call(Target.user("user-1", "Lee Gu"))
        assert placed.snapshot is not None
        mine = placed.snapshot.my_participant_id
        assert mine is not None
        for state in ("establishing", "established"):
            item = b.call_state(placed.id, state)
            assert (await server.post(b.notifications(item))).status == 202
        await until(lambda: len(seen) == 2, within=10)
    assert seen == [("establishing", mine), ("established", mine)]


async def test_a_call_placed_while_redis_cannot_take_its_fact_is_placed_all_the_same(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """Graph made the call: when Redis cannot take the fact of its placing, the handle is
    returned and a warning says what the call misses (its tenant is then the one its first
    notification's token proves, and its handlers lack the bot's participant id). Its
    notifications still run."""
    async with FakeGraph() as graph:
        bot = graph_instance(authority, redis_url, graph)
        seen: list[tuple[str, str | None]] = []

        @bot.on(events.CallStateChanged)
        async def record(call: Call, event: events.CallStateChanged) -> None:
            seen.append((event.state, call.snapshot.my_participant_id if call.snapshot else None))

        server = await serve(bot)
        store = bot._running().store
        assert isinstance(store, _redis.RedisStore)
        real = store._run_all

        async def refusing_facts(commands: Any, *, then: Any = None) -> Any:
            if any('{"fact":' in str(part) for command in commands for part in command):
                raise redis.exceptions.ConnectionError("connection reset")
            return await real(commands, then=then)

        store._run_all = refusing_facts  # type: ignore[method-assign]
        with capture_logs() as logs:
            placed = await bot.create_call(Target.user("user-1", "Lee Gu"))
        store._run_all = real  # type: ignore[method-assign]
        (warning,) = [e for e in logs if e.get("event") == "placed_call_not_kept"]
        assert warning["call_id"] == placed.id
        assert "first notification" in warning["detail"]
        assert "my_participant_id" in warning["detail"]
        for state in ("establishing", "established"):
            item = b.call_state(placed.id, state)
            assert (await server.post(b.notifications(item))).status == 202
        await until(lambda: len(seen) == 2, within=10)
    assert seen == [("establishing", None), ("established", None)]


async def established(server: BotServer, graph: FakeGraph, call_id: str) -> _redis.RedisStore:
    """``call_id`` established on ``server`` (and known to ``graph``); the bot's store."""
    graph.add_call(call_id)
    for state in ("establishing", "established"):
        item = b.notifications(b.call_state(call_id, state))
        assert (await server.post(item)).status == 202
    store = server.bot._running().store
    assert isinstance(store, _redis.RedisStore)
    return store


async def test_a_transfer_redis_cannot_count_is_not_asked(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """The transfer is counted in the call's inbox before it is sent. When Redis cannot take
    that, ``transfer`` raises StoreUnavailable and sends nothing: no transfer was asked, and
    none is counted. The next one, Redis back, is asked and counted."""
    async with FakeGraph() as graph:
        bot = graph_instance(authority, redis_url, graph)
        heard: list[int] = []

        @bot.on_call_updated
        async def failed(call: Call, event: events.CallUpdated) -> None:
            if event.result_info is not None:
                heard.append(event.result_info.subcode or 0)

        server = await serve(bot)
        store = await established(server, graph, "xfer-call")
        real = store._run_all

        async def refusing_facts(commands: Any, *, then: Any = None) -> Any:
            if any('{"fact":' in str(part) for command in commands for part in command):
                raise redis.exceptions.ConnectionError("connection reset")
            return await real(commands, then=then)

        store._run_all = refusing_facts  # type: ignore[method-assign]
        call = bot.services.call("xfer-call")
        with pytest.raises(StoreUnavailable):
            await call.transfer(Target.user("agent-id", "Agent"))
        assert graph.requests_for("transfer") == []
        store._run_all = real  # type: ignore[method-assign]
        why = models.ResultInfo(code=500, subcode=7000, message="Transfer failed.")
        failure = b.notifications(b.call_state("xfer-call", "established", result_info=why))
        assert (await server.post(failure)).status == 202  # a failure of no transfer asked
        await until(lambda: heard == [7000])
        await call.transfer(Target.user("agent-id", "Agent"))
        assert (await server.post(failure)).status == 202  # the one asked, worded alike
        await until(lambda: heard == [7000, 7000])


@pytest.mark.parametrize("fault", ["answer-lost", "refusal-first", "never-kept"])
async def test_a_transfer_whose_count_redis_did_not_answer_is_withdrawn(
    authority: TokenAuthority, serve: Any, redis_url: str, fault: str
) -> None:
    """Redis may keep a transfer's ask and its answer be lost (a timeout, a dropped
    connection): ``transfer`` raises StoreUnavailable and sends nothing, and withdraws the
    ask by name. A failure of the call then is no transfer's; whichever of the ask and its
    withdrawal Redis takes first; and withdrawing an ask Redis never kept leaves the
    transfer asked before it counted, its failure naming that one's target."""
    async with FakeGraph() as graph:
        bot = graph_instance(authority, redis_url, graph)
        heard: list[tuple[bool, str | None]] = []

        @bot.on_call_updated
        async def updated(call: Call, event: events.CallUpdated) -> None:
            if event.result_info is not None:
                target = event.transfer_target
                identity = None if target is None else target.identity
                user = None if identity is None else identity.user
                heard.append((event.transfer_failed, None if user is None else user.id))

        server = await serve(bot)
        store = await established(server, graph, "xfer-call")
        call = bot.services.call("xfer-call")
        if fault == "never-kept":
            await call.transfer(Target.user("agent-1", "Agent"))  # Graph took it on
        real = store._run_all
        held: list[Any] = []

        async def losing_the_answer(commands: Any, *, then: Any = None) -> Any:
            if not any('"transferAsked"' in str(part) for command in commands for part in command):
                answers = await real(commands, then=then)
                for late in held:  # the ask Redis got late, after its withdrawal
                    await real(late, then=then)
                held.clear()
                return answers
            if fault == "answer-lost":
                await real(commands, then=then)
            elif fault == "refusal-first":
                held.append(commands)
            raise redis.exceptions.ConnectionError("connection reset")

        store._run_all = losing_the_answer  # type: ignore[method-assign]
        with pytest.raises(StoreUnavailable):
            await call.transfer(Target.user("agent-2", "Agent"))
        store._run_all = real  # type: ignore[method-assign]
        assert held == []
        assert len(graph.requests_for("transfer")) == (fault == "never-kept")
        why = models.ResultInfo(code=500, subcode=7000, message="Transfer failed.")
        failure = b.notifications(b.call_state("xfer-call", "established", result_info=why))
        assert (await server.post(failure)).status == 202
        await until(lambda: len(heard) == 1)
        named_first = fault == "never-kept"
        assert heard == ([(True, "agent-1")] if named_first else [(False, None)])


async def test_an_inbox_fact_of_a_later_kind_is_logged_and_skipped(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """An instance of a later release may keep a fact of a call of a kind this one does not
    know in the call's inbox (during a rolling upgrade): the run of the call logs it and goes
    on with the notifications after it."""
    seen: list[str] = []
    bot = make_bot(authority, store=redis_url)

    @bot.on(events.CallStateChanged)
    async def record(call: Call, event: events.CallStateChanged) -> None:
        seen.append(event.state)

    server = await serve(bot)
    later = '{"fact":"somethingLater","callId":"later-call"}'
    await rdb.xadd(f"{KEY_PREFIX}{{{call_key('later-call')}}}:inbox", {"e": later})
    with capture_logs() as logs:
        for state in ("establishing", "established"):
            item = b.notifications(b.call_state("later-call", state))
            assert (await server.post(item)).status == 202
        await until(lambda: seen == ["establishing", "established"])
    (unreadable,) = [e for e in logs if e.get("event") == "inbox_entry_unreadable"]
    assert "somethingLater" in unreadable["error"]


async def test_a_call_is_its_tenants_on_every_instance(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    async with FakeGraph() as graph:
        bots = Collecting()
        await bots.start(authority, serve, redis_url, graph, max_digits=1, timeout=10)
        owner, other = await bots.establish(graph, "tenant-call")
        # Another tenant's token, at the instance that does not run the call: refused there,
        # and the copy every instance is told of does not end the call where it runs.
        forged = without_tenant(b.call_terminated("tenant-call"))
        response = await other.post(b.notifications(forged), token=other.token(tenant_id=OTHER))
        assert (response.status, (await response.json())["error"]) == (403, "tenant_mismatch")
        # Told after the forged end: the handler would have seen that first.
        response = await other.post(b.notifications(b.tone("tenant-call", "tone2", 1)))
        assert response.status == 202
        await until(lambda: bool(bots.collected), within=20)
        assert bots.collected == [(owner, "2")]


async def test_what_an_instance_refuses_reaches_no_other_instance(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """Another tenant's end and outcome, posted to the instance that runs the call and
    refused there (403), are told to no other instance: an action awaited on another one,
    which does not know the call's tenant, gets the genuine outcome posted after them."""
    async with FakeGraph() as graph:
        bots = Collecting()
        await bots.start(authority, serve, redis_url, graph, max_digits=1, timeout=10)
        owner, other = await bots.establish(graph, "refused-call")
        assert other.bot._running().lifecycle.get("refused-call") is None
        op = await other.bot.services.call("refused-call").play_prompt("https://cdn.example/a.wav")
        waiting = asyncio.create_task(op.wait(timeout=10))
        assert op.id is not None
        forged = [
            without_tenant(b.call_terminated("refused-call", code=666, message="forged")),
            without_tenant(b.operation_update("refused-call", op.id, status="failed", code=666)),
        ]
        runner = bots.servers[owner]
        for item in forged:
            response = await runner.post(b.notifications(item), token=runner.token(tenant_id=OTHER))
            assert (response.status, (await response.json())["error"]) == (403, "tenant_mismatch")
        # The others hear of outcomes in the order they were accepted: the forged ones first.
        genuine = b.operation_update("refused-call", op.id)
        assert (await runner.post(b.notifications(genuine))).status == 202
        done = await waiting
        assert (done.status, done.result_info and done.result_info.code) == ("completed", 200)


async def test_a_draining_instance_acts_on_no_end_of_another_tenant_for_a_call_it_does_not_run(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """While an instance drains, a refused request (503) still settles waits, but only for
    calls of its token's tenant. This instance does not know the tenant of a call another
    instance runs: another tenant's forged end, posted to it, must not fail its wait."""
    async with FakeGraph() as graph:
        bots = Collecting()
        await bots.start(authority, serve, redis_url, graph, max_digits=1, timeout=10)
        owner, other = await bots.establish(graph, "drained-call")
        op = await other.bot.services.call("drained-call").play_prompt("https://cdn.example/a.wav")
        waiting = asyncio.create_task(op.wait(timeout=10))
        assert op.id is not None
        draining = asyncio.create_task(other.bot.drain())
        await until(lambda: not other.bot.ready)
        forged = without_tenant(b.call_terminated("drained-call", code=666, message="forged"))
        response = await other.post(b.notifications(forged), token=other.token(tenant_id=OTHER))
        assert response.status == 503
        runner = bots.servers[owner]
        genuine = b.operation_update("drained-call", op.id)
        assert (await runner.post(b.notifications(genuine))).status == 202
        done = await waiting
        await draining
        assert (done.status, done.result_info and done.result_info.code) == ("completed", 200)


async def test_a_collection_after_a_full_one_gets_the_callers_keys_when_every_copy_is_told(
    redis_url: str,
) -> None:
    """The Redis store tells the tone router every copy of a tone, and Graph retries (the
    simulator posting each notification twice): the next collection gets "56", not "" nor
    a repeated "4"."""
    bot = CallBot(app_id=APP_ID, store=redis_url)
    delivery = DeliveryOptions(duplicate=True)
    assert await pin_then_choice(bot, delivery=delivery) == ["1234", "56"]


def timers_due_ran(lifecycle: Lifecycle, by: float) -> bool:
    """Whether the loop's clock passed ``by`` and every timer the lifecycle had due since ran."""
    now = asyncio.get_running_loop().time()
    return now > by and all(due > now for due, *_ in lifecycle._heap)


async def test_a_call_whose_end_is_accepted_stays_known_while_its_run_delivers_what_came_first(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """The termination is accepted (and told to the lifecycle at once) while a handler of an
    earlier state still runs past ``termination_grace``: the call's record stays until its
    end is delivered, so the tone and the end come with the call's snapshot and history."""
    seen: list[tuple[str, str | None, bool]] = []
    release = asyncio.Event()
    bot = make_bot(authority, store=redis_url, termination_grace=0.2)

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        if isinstance(event, events.CallStateChanged) and event.state == "established":
            await release.wait()
        previous = event.previous_state if isinstance(event, events.CallStateChanged) else None
        seen.append((label(event), previous, call.snapshot is not None))

    server: BotServer = await serve(bot)
    for item in (
        b.incoming_call("slow-end"),
        b.call_state("slow-end", "establishing"),
        b.call_state("slow-end", "established"),
        b.tone("slow-end", "tone1", 1),
        b.call_terminated("slow-end"),
    ):
        assert (await server.post(b.notifications(item))).status == 202
    lifecycle = bot._running().lifecycle
    life = lifecycle.get("slow-end")
    assert life is not None
    assert life.ended  # told on arrival: waits end now
    grace_over = asyncio.get_running_loop().time() + 0.2
    await until(functools.partial(timers_due_ran, lifecycle, grace_over))
    assert lifecycle.get("slow-end") is life  # still known: its end is not delivered yet
    release.set()
    await until(lambda: len(seen) == 5)
    assert seen[3:] == [("tone:tone1", None, True), ("terminated", "established", True)]
    await until(lambda: lifecycle.get("slow-end") is None)  # then forgotten after its grace


async def test_every_key_expires_when_the_last_instance_stops_mid_handler(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """The only instance stops while a handler runs: its call is handed over (made runnable
    for an instance that may never come), and every key it leaves expires in a day, even
    when its reaper never set the shared indexes' expiry after they were written."""
    started = asyncio.Event()
    bot = make_bot(authority, store=redis_url, shutdown_timeout=0.1)

    @bot.on(events.Event)
    async def stuck(call: Call, event: events.Event) -> None:
        started.set()
        await asyncio.Event().wait()

    server: BotServer = await serve(bot)
    assert (await server.post(b.notifications(b.incoming_call("last-one")))).status == 202
    await asyncio.wait_for(started.wait(), 10)
    # As if the reaper last set the shared indexes' expiry before they were written (a call
    # indexed as pending since, say).
    await rdb.sadd(f"{KEY_PREFIX}pending", "indexed-since")
    for index in ("pending", "unpending", "active", "events", "runnable"):
        await rdb.persist(f"{KEY_PREFIX}{index}")
    await server.client.close()
    assert await rdb.zcard(f"{KEY_PREFIX}runnable") == 1  # handed over, as a stopped run is
    left = {key: await rdb.pttl(key) async for key in rdb.scan_iter(f"{KEY_PREFIX}*")}
    assert left
    assert all(ttl > 0 for ttl in left.values()), left


def fail_once_after_the_scripts(store: _redis.RedisStore) -> None:
    """Make the round trip after an ingest's scripts (the one telling the other instances of
    a tone) fail, once."""
    real = store._run_all
    failed: list[tuple[Any, ...]] = []

    async def failing_once(commands: Any, *, then: Any = None) -> Any:
        if not failed and any(command[0] == "XADD" for command in commands):
            failed.extend(commands)
            raise redis.exceptions.ConnectionError("connection reset between the round trips")
        return await real(commands, then=then)

    store._run_all = failing_once  # type: ignore[method-assign]


async def test_a_failure_after_the_scripts_leaves_no_call_unrun(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """Redis fails on the round trip after the ingest scripts (the one telling the other
    instances of a tone): the request gets 503, yet the call the scripts gave this instance
    runs now, and Graph's retry (a repeat) is dropped, not run again or left waiting."""
    seen: list[str] = []
    bot = make_bot(authority, store=redis_url, store_lease=300.0)

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        seen.append(label(event))

    server: BotServer = await serve(bot)
    store = bot._running().store
    assert isinstance(store, _redis.RedisStore)
    fail_once_after_the_scripts(store)
    body = b.notifications(b.incoming_call("trip-call"), b.tone("trip-call", "tone1", 1))
    assert (await server.post(body)).status == 503
    await until(lambda: seen == ["IncomingCall", "tone:tone1"])  # not after the 300-s lease
    assert (await server.post(body)).status == 202  # the retry: both items are repeats
    assert (await server.post(b.notifications(b.call_terminated("trip-call")))).status == 202
    await until(lambda: seen == ["IncomingCall", "tone:tone1", "terminated"])


async def test_rosters_kept_before_a_failure_are_repeats_in_graph_s_retry(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """Redis fails on the round trip after the ingest scripts: the request gets 503 though
    its notifications were kept, and Graph sends it again whole. Its rosters are repeats
    then, though a roster coming back after another is news otherwise: handlers see each
    once, not the first one again as a change back."""
    seen: list[str] = []
    bot = make_bot(authority, store=redis_url, store_lease=300.0)

    @bot.on(events.ParticipantsUpdated)
    async def record(call: Call, event: events.ParticipantsUpdated) -> None:
        seen.append(",".join(p.id or "" for p in event.participants))

    server: BotServer = await serve(bot)
    for state in ("establishing", "established"):
        assert (await server.post(b.notifications(b.call_state("retried", state)))).status == 202
    store = bot._running().store
    assert isinstance(store, _redis.RedisStore)
    fail_once_after_the_scripts(store)
    alice, bob = b.participant("alice"), b.participant("bob")
    rosters = [b.roster("retried", people) for people in ([alice], [alice, bob])]
    body = b.notifications(*rosters, b.tone("retried", "tone1", 1))
    assert (await server.post(body)).status == 503
    assert (await server.post(body)).status == 202  # the retry: every item a repeat
    closing = b.roster("retried", [bob])
    assert (await server.post(b.notifications(closing, b.call_terminated("retried")))).status == 202
    await until(lambda: seen[-1:] == ["bob"])
    assert seen == ["alice", "alice,bob", "bob"]


async def test_a_script_failing_in_an_ingest_round_trip_refuses_only_its_notification(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """One ingest script of a request fails (here its call's inbox is a key of another
    kind) after the others kept their notifications: the request gets 503, and what was
    kept is acted on. The call whose lease the round trip took runs now, not after its
    lease; Graph's retry delivers no roster twice."""
    seen: list[str] = []
    bot = make_bot(authority, store=redis_url, store_lease=300.0)

    @bot.on(events.ParticipantsUpdated)
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        seen.append(",".join(p.id or "" for p in event.participants))

    @bot.on(events.IncomingCall)
    async def incoming(call: Call, event: events.IncomingCall) -> None:
        seen.append(f"incoming:{event.call_id}")

    server: BotServer = await serve(bot)
    for state in ("establishing", "established"):
        assert (await server.post(b.notifications(b.call_state("retried", state)))).status == 202
    store = bot._running().store
    assert isinstance(store, _redis.RedisStore)
    (inbox,) = store._keys.of(id_key("broken"), "inbox")
    await rdb.set(inbox, "not a stream")
    alice, bob = b.participant("alice"), b.participant("bob")
    rosters = [b.roster("retried", people) for people in ([alice], [alice, bob])]
    body = b.notifications(
        *rosters, b.incoming_call("newcomer"), b.call_state("broken", "establishing")
    )
    with capture_logs() as logs:
        response = await server.post(body)
    assert response.status == 503
    assert (await response.json())["error"] == "store_unavailable"
    (line,) = [line for line in logs if line["event"] == "notifications_not_kept"]
    assert (line["refused"], line["kept"]) == (1, 3)
    assert "WRONGTYPE" in line["error"]
    await until(lambda: "incoming:newcomer" in seen)  # not after its 300-s lease
    await rdb.delete(inbox)
    assert (await server.post(body)).status == 202  # the retry: the rosters are repeats
    closing = b.roster("retried", [bob])
    assert (await server.post(b.notifications(closing, b.call_terminated("retried")))).status == 202
    await until(lambda: seen[-1:] == ["bob"])
    assert [label for label in seen if not label.startswith("incoming")] == [
        "alice",
        "alice,bob",
        "bob",
    ]
    assert seen.count("incoming:newcomer") == 1


async def test_an_ended_call_stays_ended_after_its_grace_on_any_instance(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """Past ``termination_grace`` the call's record stays for the 10 minutes a process
    remembers an end: a late state posted to an instance that never saw the call is
    dropped, not taken for a new call whose handlers run again."""
    seen: list[tuple[int, str]] = []
    servers: list[BotServer] = []
    for index in range(2):
        bot = make_bot(authority, store=redis_url, termination_grace=1.0)

        @bot.on(events.Event)
        async def record(call: Call, event: events.Event, index: int = index) -> None:
            seen.append((index, label(event)))

        servers.append(await serve(bot))
    first, second = servers
    for item in (
        b.incoming_call("late-call"),
        b.call_state("late-call", "established"),
        b.call_terminated("late-call"),
    ):
        assert (await first.post(b.notifications(item))).status == 202
    await until(lambda: len(seen) == 3)
    record_key = _redis._Keys(KEY_PREFIX).record(id_key("late-call"))

    async def grace_over() -> bool:
        # The record's time to live shows the grace period spent (or the record gone).
        return await rdb.pttl(record_key) < ENDED_MEMORY * 1000

    await wait_for(grace_over)
    await until(lambda: first.bot._running().lifecycle.get("late-call") is None)
    with capture_logs() as logs:
        late = b.tone("late-call", "tone1", 1)
        assert (await second.post(b.notifications(late))).status == 202

        def decided() -> bool:
            dropped = [e for e in logs if e.get("event") == "notification_dropped"]
            return bool(dropped) or len(seen) > 3

        await until(decided, within=10)
    assert [e["reason"] for e in logs if e.get("event") == "notification_dropped"] == ["after_end"]
    assert [label for _, label in seen] == ["IncomingCall", "established", "terminated"]


async def test_a_handler_abandoned_at_shutdown_is_handed_over_at_once(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """A handler still running at the shutdown deadline is abandoned, and its call handed
    over as the instance closes: the other instance runs it again, told, without waiting
    for the lease (a minute here) to run out."""
    runs: list[tuple[int, bool]] = []
    stuck = asyncio.Event()
    servers: list[BotServer] = []
    for index in range(2):
        bot = make_bot(authority, store=redis_url, store_lease=60.0, shutdown_timeout=0.5)

        @bot.on_incoming_call
        async def ring(call: Call, event: events.IncomingCall, index: int = index) -> None:
            attempt = current_attempt()
            runs.append((index, attempt is not None and attempt.redelivered))
            if index == 0:
                await stuck.wait()  # never set: outlives the shutdown deadline

        servers.append(await serve(bot))
    first = servers[0]
    assert (await first.post(b.notifications(b.incoming_call("abandoned")))).status == 202
    await until(lambda: runs == [(0, False)])
    await first.bot.stop()
    await until(lambda: len(runs) == 2, within=20)
    assert runs == [(0, False), (1, True)]


async def test_a_second_signal_stops_the_drain_of_a_call_this_instance_runs(
    authority: TokenAuthority, redis_url: str, tmp_path: Path
) -> None:
    """The drain waits for each call this instance runs to finish its entry: a second
    signal stops that wait too (else all of a 600 s shutdown_timeout), and the call is
    handed over as the instance closes."""
    output = tmp_path / "handled.txt"
    env = bot_env(
        authority,
        output,
        CALLBOT_STORE=redis_url,
        HOSTING_BOT_RELEASE="1",
        CALLBOT_SHUTDOWN_TIMEOUT="600",
    )
    bot = await BotProcess.start(env)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            await bot.wait_ready(session)
            assert await post_signed(session, bot, authority, "hurry-redis") == 202
            await wait_for_line(output, "start hurry-redis", bot)
        await signal_twice(bot, signal.SIGTERM)

        assert await bot.wait_exit() == 0, bot.output()
    finally:
        await bot.close()
    assert output.read_text().splitlines() == ["start hurry-redis"]
    entries = bot.events()
    assert [e["signal"] for e in entries if e.get("event") == "shutdown_hurried"] == ["SIGTERM"]
    abandoned = [e["call_id"] for e in entries if e.get("event") == "notification_abandoned"]
    assert abandoned == ["hurry-redis"], bot.output()
    [closed] = [e for e in entries if e.get("event") == "store_closed"]
    assert closed["handed_over"] == 1


async def test_entries_left_at_a_graceful_shutdown_are_not_flagged_as_re_runs(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """An instance that drains lets the running handler finish, then hands the call over:
    the entries it accepted for the call meanwhile never ran, so the instance taking the
    call runs them as first runs (``redelivered`` false), not as re-runs."""
    runs: list[tuple[int, str, bool]] = []
    go_on = asyncio.Event()
    servers: list[BotServer] = []
    for index in range(2):
        bot = make_bot(authority, store=redis_url, store_lease=60.0, shutdown_timeout=30.0)

        @bot.on_incoming_call
        async def ring(call: Call, event: events.IncomingCall, index: int = index) -> None:
            attempt = current_attempt()
            runs.append((index, "incoming", attempt is not None and attempt.redelivered))
            await go_on.wait()

        @bot.on_state("establishing")
        async def establishing(
            call: Call, event: events.CallStateChanged, index: int = index
        ) -> None:
            attempt = current_attempt()
            runs.append((index, "establishing", attempt is not None and attempt.redelivered))

        servers.append(await serve(bot))
    first = servers[0]
    assert (await first.post(b.notifications(b.incoming_call("drained")))).status == 202
    await until(lambda: runs == [(0, "incoming", False)])
    # Accepted by the call's owner while its handler runs: it waits in the inbox.
    body = b.notifications(b.call_state("drained", "establishing"))
    assert (await first.post(body)).status == 202
    receiver = first.bot._running().receiver
    stopping = asyncio.create_task(first.bot.stop())
    await until(lambda: receiver.draining)
    go_on.set()  # the running handler finishes within the drain
    await stopping
    await until(lambda: len(runs) == 2, within=20)
    assert runs == [(0, "incoming", False), (1, "establishing", False)]


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_termination_told_early_is_delivered_after_a_handler_outlasting_the_grace(
    authority: TokenAuthority, serve: Any, redis_url: str, store: str
) -> None:
    """The Redis store tells the lifecycle of a termination on arrival (to wake waiters);
    when the call's handler outlasted ``termination_grace``, the call was forgotten as if
    its end had been delivered, and the termination itself was then dropped as after_end."""
    options: dict[str, Any] = {"termination_grace": 0.2}
    if store == "redis":
        options["store"] = redis_url
    bot = make_bot(authority, **options)
    release = asyncio.Event()
    seen: list[str] = []

    @bot.on_incoming_call
    async def slow(call: Call, event: events.IncomingCall) -> None:
        seen.append("incoming")
        await release.wait()

    @bot.on_terminated
    async def ended(call: Call, event: events.CallTerminated) -> None:
        seen.append("terminated")

    server: BotServer = await serve(bot)
    assert (await server.post(b.notifications(b.incoming_call("slow-call")))).status == 202
    await until(lambda: seen == ["incoming"])
    assert (await server.post(b.notifications(b.call_terminated("slow-call")))).status == 202
    if store == "redis":
        # Told at once; kept past the grace while its run still has the end to deliver.
        lifecycle = bot._running().lifecycle
        grace_over = asyncio.get_running_loop().time() + 0.2
        await until(functools.partial(timers_due_ran, lifecycle, grace_over))
        assert lifecycle.get("slow-call") is not None
    release.set()
    await until(lambda: seen == ["incoming", "terminated"])


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_every_line_about_a_call_names_it_as_first_seen(
    authority: TokenAuthority, serve: Any, redis_url: str, store: str
) -> None:
    """Graph writes one call's id in more than one form (upper case without dashes in some
    paths): the lines about the call (a handler's failure, a repeat dropped, a straggler
    dropped) all carry the id as first seen, so one search finds them all."""
    call_id = "3f2a1b7c-9d4e-4f6a-8b1c-2d3e4f5a6b7c"
    compact = call_id.replace("-", "").upper()
    options: dict[str, Any] = {"store": redis_url} if store == "redis" else {}
    bot = make_bot(authority, **options)
    ran: list[str] = []

    @bot.on_state("establishing")
    async def fail(call: Call, event: events.CallStateChanged) -> None:
        ran.append(event.state)
        raise RuntimeError("a bug of the handler's")

    @bot.on_terminated
    async def ended(call: Call, event: events.CallTerminated) -> None:
        ran.append("terminated")

    server = await serve(bot)
    with capture_logs() as logs:
        steps = [
            b.call_state(call_id, "establishing"),
            b.call_state(compact, "establishing"),  # a repeat, written in the other form
            b.call_terminated(compact),
            b.call_state(compact, "established"),  # a straggler
        ]
        for item in steps:
            assert (await server.post(b.notifications(item))).status == 202
        await until(lambda: ran == ["establishing", "terminated"])
        await until(lambda: sum(e["event"] == "notification_dropped" for e in logs) == 2)
    about = [e for e in logs if e["event"] in ("handler_failed", "notification_dropped")]
    assert sorted(e.get("reason", e["event"]) for e in about) == [
        "after_end",
        "duplicate",
        "handler_failed",
    ]
    assert {e["call_id"] for e in about} == {call_id}


class PatientClaims:
    """An instance's wait for a runnable call, made to last until one comes (as ``BZPOPMIN``
    without a timeout would): the room the instance had when the wait began is then as old
    as the wait, however the machine's timing goes. Counts the waits and the calls popped."""

    def __init__(self, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.waits = 0
        self.popped: list[str] = []
        self._pop = store._blocking.bzpopmin
        monkeypatch.setattr(store._blocking, "bzpopmin", self._wait)

    async def _wait(self, *keys: str, timeout: float) -> Any:
        self.waits += 1
        while True:
            popped = await self._pop(*keys, timeout=timeout)
            if popped:
                self.popped.append(popped[1])
                return popped


async def is_runnable(rdb: Any, call: str) -> bool:
    return await rdb.zscore(KEY_PREFIX + "runnable", call) is not None


def one_slot_each(
    authority: TokenAuthority, redis_url: str
) -> tuple[list[CallBot], list[tuple[str, int]], asyncio.Event]:
    """Two instances with one handler slot each, whose ``establishing`` handler notes
    (call, instance) and holds its slot until the event returned is set."""
    release = asyncio.Event()
    ran: list[tuple[str, int]] = []
    bots = [make_bot(authority, store=redis_url, max_concurrent_handlers=1) for _ in range(2)]
    for index, bot in enumerate(bots):

        @bot.on_state("establishing")
        async def work(call: Call, event: events.CallStateChanged, index: int = index) -> None:
            ran.append((call.key, index))
            await release.wait()  # holds the instance's one slot

    return bots, ran, release


async def test_an_instance_that_filled_up_while_waiting_for_a_call_leaves_it_to_one_with_room(
    authority: TokenAuthority,
    serve: Any,
    redis_url: str,
    rdb: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An instance began waiting for a runnable call with a slot free; a call it accepted
    meanwhile took that slot. The call it popped next was claimed all the same, and its
    handlers waited there for the busy handler while another instance had room. It is left
    for that instance now; and with every instance full, a runnable call runs once a slot
    frees."""
    bots, ran, release = one_slot_each(authority, redis_url)

    first = await serve(bots[0])
    store: Any = bots[0]._running().store
    claims = PatientClaims(store, monkeypatch)
    await until(lambda: claims.waits > 0)  # waiting for a runnable call, a slot free
    try:
        busy = b.notifications(b.call_state("busy", "establishing"))
        assert (await first.post(busy)).status == 202
        await until(lambda: ran == [("busy", 0)])  # taken on at acceptance: now full
        late = b.notifications(b.call_state("late", "establishing"))
        assert (await first.post(late)).status == 202  # runnable: nobody may take it here
        await until(lambda: claims.popped == ["late"])  # the wait begun with room returns it
        second = await serve(bots[1])
        await until(lambda: len(ran) == 2 or "late" in store._owned, within=10)
        assert "late" not in store._owned, "the full instance claimed the call"
        assert ran == [("busy", 0), ("late", 1)]

        # Both instances full: the call waits in runnable until a handler returns.
        third = b.notifications(b.call_state("third", "establishing"))
        assert (await second.post(third)).status == 202
        assert await is_runnable(rdb, "third")
        assert len(ran) == 2
        release.set()
        await until(lambda: len(ran) == 3, within=10)
        await wait_for(lambda: settled(rdb))
        assert sorted(call for call, _ in ran) == ["busy", "late", "third"]
    finally:
        release.set()


@pytest.mark.parametrize("requests", ["one", "two at once"])
async def test_an_instance_takes_on_no_more_calls_at_once_than_it_has_room_for(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis, requests: str
) -> None:
    """Calls accepted together (one request naming two new calls, or two requests at once)
    are taken on only as far as the instance has room: with one slot, the second call is
    left runnable for an instance with room, and runs there at once."""
    bots, ran, release = one_slot_each(authority, redis_url)

    first = await serve(bots[0])
    await serve(bots[1])
    try:
        calls = [b.call_state("one", "establishing"), b.call_state("two", "establishing")]
        if requests == "one":
            assert (await first.post(b.notifications(*calls))).status == 202
        else:
            answers = await asyncio.gather(*(first.post(b.notifications(c)) for c in calls))
            assert [answer.status for answer in answers] == [202, 202]
        await until(lambda: len(ran) == 2, within=10)  # each on an instance with room
        assert sorted(index for _, index in ran) == [0, 1]
        release.set()
        await wait_for(lambda: settled(rdb))
    finally:
        release.set()


async def second_full(
    serve: Any, bots: list[CallBot], ran: list[tuple[str, int]]
) -> tuple[BotServer, BotServer]:
    """Serve both instances of :func:`one_slot_each`; the second's slot taken by a call."""
    first = await serve(bots[0])
    second = await serve(bots[1])
    assert (await second.post(b.notifications(b.call_state("busy", "establishing")))).status == 202
    await until(lambda: ran == [("busy", 1)])
    return first, second


def paused_before(store: Any, script: Any, go: asyncio.Event, reached: asyncio.Event) -> None:
    """Hold ``store``'s next round trip running ``script`` until ``go`` is set (``reached``
    is set when it is held), as a slow Redis would."""
    real = store._answers

    async def paused(commands: Any, **options: Any) -> Any:
        if commands and commands[0][:2] == ("EVALSHA", script.sha):
            store._answers = real
            reached.set()
            await go.wait()
        return await real(commands, **options)

    store._answers = paused


async def test_an_instance_waiting_for_room_looks_again_once_a_round_trip_took_nothing(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """A notification of a call another instance runs asks for its lease in the round trip,
    which counts against the room meanwhile; an instance with no room left waits for a slot.
    Taking nothing frees that room again: the instance, running nothing, claims a call a
    full instance left runnable."""
    bots, ran, release = one_slot_each(authority, redis_url)
    try:
        first, second = await second_full(serve, bots, ran)
        store: Any = bots[0]._running().store
        go, held = asyncio.Event(), asyncio.Event()
        paused_before(store, _scripts.INGEST, go, held)
        post = asyncio.ensure_future(
            first.post(b.notifications(b.call_state("busy", "established")))
        )
        await until(held.is_set)
        await until(lambda: len(store._slot_freed._waiters) > 0, within=10)  # waits for room
        go.set()
        assert (await post).status == 202
        assert not store._owned
        # The second instance is full: a new call it accepts is runnable, for the first.
        assert (
            await second.post(b.notifications(b.call_state("late", "establishing")))
        ).status == 202
        await until(lambda: len(ran) == 2, within=10)
        assert ran[1] == ("late", 0)
    finally:
        release.set()


async def test_a_claim_under_way_counts_against_the_room(
    authority: TokenAuthority, serve: Any, redis_url: str
) -> None:
    """Calls an instance is claiming count against its room until they are its own: a call
    it accepts meanwhile is left runnable, not taken on past max_concurrent_handlers."""
    bots, ran, release = one_slot_each(authority, redis_url)
    try:
        first, second = await second_full(serve, bots, ran)
        store: Any = bots[0]._running().store
        go, claiming = asyncio.Event(), asyncio.Event()
        paused_before(store, _scripts.CLAIM, go, claiming)
        # The second instance is full: the call is runnable, and the first claims it.
        assert (
            await second.post(b.notifications(b.call_state("late", "establishing")))
        ).status == 202
        await until(claiming.is_set, within=10)
        assert (
            await first.post(b.notifications(b.call_state("new", "establishing")))
        ).status == 202
        go.set()
        await until(lambda: "late" in store._owned, within=10)
        assert sorted(store._owned) == ["late"]
    finally:
        release.set()


async def test_a_lone_instance_at_capacity_runs_the_call_it_left_once_a_slot_frees(
    authority: TokenAuthority,
    serve: Any,
    redis_url: str,
    rdb: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call an instance popped while full goes back to runnable; with no other instance,
    the same one runs it as soon as its busy handler returns: nothing is lost or starved."""
    release = asyncio.Event()
    ran: list[str] = []
    bot = make_bot(authority, store=redis_url, max_concurrent_handlers=1)

    @bot.on_state("establishing")
    async def work(call: Call, event: events.CallStateChanged) -> None:
        ran.append(call.key)
        await release.wait()  # holds the instance's one slot

    server = await serve(bot)
    claims = PatientClaims(bot._running().store, monkeypatch)
    await until(lambda: claims.waits > 0)
    try:
        busy = b.notifications(b.call_state("busy", "establishing"))
        assert (await server.post(busy)).status == 202
        await until(lambda: ran == ["busy"])
        late = b.notifications(b.call_state("late", "establishing"))
        assert (await server.post(late)).status == 202
        await until(lambda: claims.popped == ["late"])
        await wait_for(lambda: is_runnable(rdb, "late"), within=10)  # put back, not claimed
        release.set()
        await until(lambda: ran == ["busy", "late"], within=10)
        await wait_for(lambda: settled(rdb))
        assert ran == ["busy", "late"]
    finally:
        release.set()


async def test_a_call_kept_alive_keeps_its_keys_however_long_it_goes_without_news(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """Graph keeps a call the bot keeps alive for as long as it goes on, notifications or not
    (a meeting nobody joins or leaves for a day): each keep-alive Graph accepts renews the
    call's keys. They expired a day after its last notification, while its keep-alives went
    on: the next notification (or a restart) found nothing kept, started the call over from
    no state, and its keep-alives stopped (Graph then ended it: 408/8537)."""
    async with FakeGraph() as graph:
        graph.add_call("all-day")
        bot = make_bot(
            authority,
            store=redis_url,
            graph_url=graph.graph_url,
            authority_url=graph.authority_url,
            app_secret="fake-graph-secret",
            keep_alive=True,
            keep_alive_interval=1.0,
        )
        server = await serve(bot)
        for state in ("establishing", "established"):
            item = b.call_state("all-day", state)
            assert (await server.post(b.notifications(item))).status == 202
        await wait_for(lambda: settled(rdb))
        keys = [f"{KEY_PREFIX}{{{call_key('all-day')}}}:{name}" for name in _KEPT]
        assert await rdb.exists(*keys) == len(keys)
        # Nearly a day since the last notification.
        for key in keys:
            await rdb.pexpire(key, 60_000)
        kept_alive = len(graph.requests_for("keepAlive"))

        async def renewed() -> bool:
            lifetimes = [await rdb.pttl(key) for key in keys]
            return min(lifetimes) > 60_000

        await wait_for(renewed, within=10)
        assert len(graph.requests_for("keepAlive")) > kept_alive


_KEPT = ("inbox", "fence", "call", "tenant")
"""The keys a call that goes on keeps (its ``seen`` and ``lease`` are kept for a while only)."""


def keeping_bot(
    authority: TokenAuthority, graph: FakeGraph, redis_url: str, **options: Any
) -> CallBot:
    """An instance keeping calls alive, sending to ``graph``: keeper looks every second, a
    keeper lease of 3 (a busy test machine pausing its loop for a moment moves no keeper)."""
    return make_bot(
        authority,
        store=redis_url,
        store_lease=3.0,
        graph_url=graph.graph_url,
        authority_url=graph.authority_url,
        app_secret="fake-graph-secret",
        keep_alive=True,
        keep_alive_interval=1.0,
        **options,
    )


@contextlib.asynccontextmanager
async def keeping_instances(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> AsyncIterator[tuple[list[CallBot], list[FakeGraph], list[BotServer]]]:
    """Two instances keeping calls alive, each sending to a Graph of its own (so that a
    keep-alive tells which instance sent it), with an established call ``quiet`` that no
    notification comes for after the first instance ran it."""
    async with FakeGraph() as first_graph, FakeGraph() as second_graph:
        graphs = [first_graph, second_graph]
        bots: list[CallBot] = []
        for graph in graphs:
            graph.add_call("quiet")
            bots.append(keeping_bot(authority, graph, redis_url))
        servers = [await serve(bot) for bot in bots]
        for state in ("establishing", "established"):
            item = b.call_state("quiet", state)
            assert (await servers[0].post(b.notifications(item))).status == 202
        await wait_for(lambda: settled(rdb))
        yield bots, graphs, servers


def kept_alive(graph: FakeGraph) -> int:
    return len(graph.requests_for("keepAlive"))


async def the_keeper(graphs: list[FakeGraph]) -> int:
    """Which instance keeps the call alive (the one whose Graph hears from it)."""
    await until(lambda: any(kept_alive(graph) for graph in graphs), within=10)
    return next(n for n, graph in enumerate(graphs) if kept_alive(graph))


async def crash(bot: CallBot) -> None:
    """Stop an instance as a killed process stops: no upkeep, no keep-alive, nothing handed
    over (its leases run out in Redis)."""
    runtime = bot._running()
    store: Any = runtime.store
    runs = [state.task for state in store._owned.values() if state.task is not None]
    await _redis._cancelled([*store._tasks, *runs])
    await runtime.lifecycle.close()


async def test_an_instance_stopping_hands_its_quiet_calls_keep_alives_over(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """A call no notification came for since an instance ran it (a meeting the bot sits in)
    is kept alive by one instance: stopping (scaled down), it hands the keep-alive over to
    another instance, which keeps it alive from then on. The keep-alives stopped with it,
    and Graph ended the call 45 minutes later."""
    async with keeping_instances(authority, serve, redis_url, rdb) as (bots, graphs, _):
        keeper = await the_keeper(graphs)
        other = graphs[1 - keeper]
        await bots[keeper].stop()
        before = kept_alive(other)
        await until(lambda: kept_alive(other) > before + 1, within=10)


async def test_a_quiet_call_whose_keeper_crashed_is_kept_alive_by_another_instance(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """The instance keeping a quiet call alive is killed (no hand-over): another instance
    takes the call's keep-alives up once the keeper's lease runs out, though it never ran
    the call. Nobody kept it alive until its next notification, and Graph ended a quiet
    meeting 45 minutes after the crash."""
    async with keeping_instances(authority, serve, redis_url, rdb) as (bots, graphs, _):
        keeper = await the_keeper(graphs)
        other = graphs[1 - keeper]
        await crash(bots[keeper])
        before = kept_alive(other)
        await until(lambda: kept_alive(other) > before + 1, within=20)


async def test_an_instance_stopping_during_a_keeper_look_gives_up_the_leases_it_took(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """An instance stops while the answer to a keeper look is on its way: the leases that
    look took are given up with the others. Held by nobody's keep-alives, they kept the call
    from every other instance until they ran out, as a crashed instance's do."""
    async with FakeGraph() as graph:
        graph.add_call("quiet")
        bot = keeping_bot(authority, graph, redis_url)
        server = await serve(bot)
        store: Any = bot._running().store
        (keeper,) = store._keys.of("quiet", "keeper")
        run_all = store._run_all
        taken = asyncio.Event()

        async def answered_late(commands: Any, **options: Any) -> Any:
            answers = await run_all(commands, **options)
            if (
                any(c[1] == _scripts.KEEP.sha and keeper in c for c in commands)
                and not taken.is_set()
            ):
                taken.set()
                await asyncio.Event().wait()  # the answer is still on its way at the stop
            return answers

        store._run_all = answered_late
        for state in ("establishing", "established"):
            item = b.call_state("quiet", state)
            assert (await server.post(b.notifications(item))).status == 202
        async with asyncio.timeout(30):
            await taken.wait()
        assert await rdb.get(keeper) == store.token
        await bot.stop()
        assert not await rdb.exists(keeper)


async def test_a_call_not_established_elsewhere_is_read_again_once_a_keeper_look(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """An instance that never ran a call reads its record again, to learn that it became
    established, when it looks at the keeper leases (a minute apart by default), not every
    two seconds: every instance read the record of every call not yet established that
    often, those a sender invented included (up to the pending bound, for five minutes)."""
    async with FakeGraph() as graph:
        graph.add_call("ringing")
        options: dict[str, Any] = {
            "store": redis_url,
            "graph_url": graph.graph_url,
            "authority_url": graph.authority_url,
            "app_secret": "fake-graph-secret",
            "keep_alive": True,
        }
        first, second = make_bot(authority, **options), make_bot(authority, **options)
        server = await serve(first)
        await serve(second)
        store: Any = second._running().store
        load_records, sync_known = store._load_records, store._sync_known
        reads: list[str] = []
        syncs = 0

        async def counted_loads(calls: Any) -> Any:
            reads.extend(calls)
            return await load_records(calls)

        async def counted_syncs() -> None:
            nonlocal syncs
            await sync_known()
            syncs += 1

        store._load_records, store._sync_known = counted_loads, counted_syncs
        item = b.call_state("ringing", "establishing")
        assert (await server.post(b.notifications(item))).status == 202
        await until(lambda: store.known("ringing") is not None, within=30)
        known_at = syncs
        await until(lambda: syncs >= known_at + 3, within=30)
        assert reads.count("ringing") == 1, reads


async def test_a_call_taken_up_unproven_and_let_go_past_the_pending_bound_stays_let_go(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """An instance takes up two established calls it knows from the shared index only, neither
    proven yet, past its bound of pending calls: the oldest is let go. It is left to the
    others: its stale record had it taken up again with the next look but one, which let the
    other go, and so on, each time with a keeper lease given up and taken and a keep-alive."""
    async with FakeGraph() as graph:
        graph.hang_next("keepAlive", times=1_000)  # nothing proves the calls here
        keeper = keeping_bot(authority, graph, redis_url, max_pending_calls=1)
        await serve(keeper)  # up before the calls: it knows them from the index only
        server = await serve(make_bot(authority, store=redis_url))
        lifecycle: Any = keeper._running().lifecycle
        store: Any = keeper._running().store
        adopt, keep = lifecycle.adopt, store._keep
        adopted: list[str] = []
        let_go: list[str] = []
        looks = 0

        def counted_adopt(call_id: str, **options: Any) -> Any:
            adopted.append(id_key(call_id))
            return adopt(call_id, **options)

        async def counted_keep() -> None:
            nonlocal looks
            before = store._next_keep
            await keep()
            looks += store._next_keep != before

        lifecycle.adopt, store._keep = counted_adopt, counted_keep
        lifecycle.when_forgotten(
            lambda key, why: let_go.append(key) if why == "too_many_pending_calls" else None
        )
        for call in ("first", "second"):
            for state in ("establishing", "established"):
                item = b.call_state(call, state)
                assert (await server.post(b.notifications(item))).status == 202
        await until(lambda: bool(let_go), within=30)
        after = looks
        await until(lambda: looks >= after + 4, within=30)
        assert adopted.count(let_go[0]) == 1, adopted


async def test_a_call_that_ran_on_two_instances_is_kept_alive_by_one(
    authority: TokenAuthority, serve: Any, redis_url: str, rdb: aioredis.Redis
) -> None:
    """A call each instance ran while established gets its keep-alives from one of them:
    every instance that had run a call kept it alive, one request per interval each."""
    async with keeping_instances(authority, serve, redis_url, rdb) as (bots, graphs, servers):
        roster = b.roster("quiet", [b.participant("someone", display_name="Someone")])
        assert (await servers[1].post(b.notifications(roster))).status == 202
        await wait_for(lambda: settled(rdb))
        for bot in bots:
            life = bot._running().lifecycle.get("quiet")
            assert life is not None
            assert life.established
        before = [kept_alive(graph) for graph in graphs]
        await until(lambda: sum(map(kept_alive, graphs)) >= sum(before) + 6, within=30)
        sent = [kept_alive(graph) - already for graph, already in zip(graphs, before, strict=True)]
        assert min(sent) == 0, sent
