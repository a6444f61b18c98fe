"""Faults of a several-instance deployment, with real processes on 127.0.0.1.

Each test starts its own redis-server processes (one server, a primary with a
replica and a Sentinel, or a three-master Cluster) and ``callbot run`` processes
of tests/test_redis_bot.py, sends calls' lifecycles to random instances as Graph
would (retrying whatever is not answered 202), injects one fault, and checks the
guarantees docs/scaling.md states for it:

* **kept**: no notification answered 202 is lost (every call's handlers all run);
* **order**: each call's handlers run in lifecycle order (the bot's appends are
  fenced by the run's epoch, as an author would fence their own writes);
* **flagged**: a handler run again after a takeover knows it
  (``current_attempt().redelivered``); a run that was not flagged never repeats.

Every wait is on a condition, bounded; no test sleeps for a fault to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from benchmarks._inproc import InProcessBot
from callbot import Call, events
from callbot.store._redis import connect, disconnect
from callbot.testing import TokenAuthority
from callbot.testing import builders as b

from .conftest import make_bot, until
from .test_redis import (  # the fixtures redis_server and redis_url too
    KEY_PREFIX,
    LIFECYCLE,
    Bots,
    RedisServer,
    _free_port,
    _redis_binary,
    call_key,
    first_runs,
    lines_of,
    read_logs,
    redis_server,
    redis_url,
    spray,
    wait_for,
    wait_for_logs,
)

pytestmark = pytest.mark.redis
__all__ = ["redis_server", "redis_url"]  # fixtures this module uses

CALLS = 60


def calls_named(prefix: str, count: int = CALLS) -> list[str]:
    return [f"{prefix}-{i:03d}" for i in range(count)]


def check(logs: dict[str, list[dict[str, Any]]]) -> int:
    """Kept, order, flagged (see the module's docstring); how many runs were re-runs."""
    for call_id, entries in logs.items():
        assert first_runs(entries) == LIFECYCLE, (call_id, entries)
    again = sum(1 for entries in logs.values() for e in entries if e["redelivered"])
    print(f"{len(logs)} calls, {again} flagged re-runs")  # shown with pytest -s
    return again


def lost_leases(bots: Bots) -> set[str]:
    """The calls whose lease an instance said it lost (``call_lease_lost``)."""
    lost: set[str] = set()
    for log in bots.logs.glob("bot-*.log"):
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == "call_lease_lost":
                    lost.add(str(entry["call_key"]))
    return lost


async def rerun_only_after_a_lost_lease(bots: Bots, logs: dict[str, list[dict[str, Any]]]) -> None:
    """Nothing ran twice but the calls whose owner lost its lease. With no fault injected,
    a loaded machine may still stall an instance past its short lease: the call is taken
    over and its unacknowledged entry run again, flagged, as a fault's would be. The owner
    says so once it runs again, which may be after the re-run: waited for, bounded."""
    again = {call_key(c) for c, entries in logs.items() if any(e["redelivered"] for e in entries)}

    async def explained() -> bool:
        return again <= lost_leases(bots)

    try:
        await wait_for(explained, within=30)
    except TimeoutError:
        unexplained = sorted(again - lost_leases(bots))
        raise AssertionError(f"run again with no lease lost: {unexplained}") from None


@contextlib.asynccontextmanager
async def running_bots(
    authority: TokenAuthority, url: str, logs: Path, count: int, **env: str
) -> AsyncIterator[Bots]:
    group = Bots(authority, url, logs)
    try:
        # A held `established` waits for its `establishing` however long a fault delays
        # it: a late `establishing` would otherwise be stale, as the ordering rules say.
        await group.start(count, **{"CALLBOT_REORDER_WINDOW": "30", **env})
        yield group
    finally:
        await group.close()


@contextlib.asynccontextmanager
async def client_for(url: str) -> AsyncIterator[Any]:
    client = connect(url)[0]
    try:
        yield client
    finally:
        await disconnect(client)


async def victim_ran(rdb: Any, calls: list[str], pid: int, count: int) -> bool:
    return len(await lines_of(rdb, calls, pid)) >= count


async def test_an_instance_paused_past_its_lease_loses_its_calls_cleanly(
    authority: TokenAuthority, redis_url: str, tmp_path: Path
) -> None:
    """Instance SIGSTOP past the lease. Kept, order, flagged: the others take its calls
    over; once it resumes, its stale runs are refused (checkpoints and fenced writes)."""
    env = {"CALLBOT_STORE_LEASE": "1", "CALLBOT_TEST_HANDLER_DELAY": "0.03"}
    async with (
        running_bots(authority, redis_url, tmp_path, 3, **env) as bots,
        client_for(redis_url) as rdb,
    ):
        victim_pid = bots.pid(0)
        calls = calls_named("stop")
        sprayed = asyncio.create_task(spray(bots, calls, random.Random(3)))
        await wait_for(lambda: victim_ran(rdb, calls, victim_pid, 10))
        bots.pause(0)

        async def victim_holds_nothing() -> bool:
            leases = [key async for key in rdb.scan_iter(match=KEY_PREFIX + "*:lease")]
            owners = [await rdb.get(lease) or "" for lease in leases]
            return not any(f":{victim_pid}:" in owner for owner in owners)

        await sprayed
        await wait_for(victim_holds_nothing)
        bots.resume(0)
        logs = await wait_for_logs(rdb, calls, within=60)
        check(logs)
        # it serves again: calls sent now are run, some of them by it
        more = calls_named("after-stop", 30)
        await spray(bots, more, random.Random(4))
        logs = await wait_for_logs(rdb, more, within=60)
        check(logs)
        await rerun_only_after_a_lost_lease(bots, logs)


@pytest.mark.parametrize("how", ["shutdown", "kill"])
async def test_redis_restarted_with_persistence_loses_nothing(
    authority: TokenAuthority, tmp_path: Path, how: str
) -> None:
    """Redis restart with persistence (appendfsync always): a graceful SHUTDOWN, or a
    SIGKILL. Kept, order, flagged: owners retry their checkpoints while Redis is away
    and, their epoch unchanged, go on where they were."""
    server = RedisServer(_redis_binary(), tmp_path, persistent=True)
    server.start()
    try:
        env = {"CALLBOT_STORE_LEASE": "2", "CALLBOT_TEST_HANDLER_DELAY": "0.01"}
        async with (
            running_bots(authority, server.url, tmp_path, 2, **env) as bots,
            client_for(server.url) as rdb,
        ):
            calls = calls_named("aof")
            sprayed = asyncio.create_task(spray(bots, calls, random.Random(7)))
            await wait_for(lambda: _handled(rdb, calls, 40))
            if how == "shutdown":
                await asyncio.to_thread(server.shutdown)
            else:
                await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            await sprayed
            check(await wait_for_logs(rdb, calls, within=60))
    finally:
        server.stop()


async def test_redis_restarted_without_persistence_recovers_by_itself(
    authority: TokenAuthority, tmp_path: Path
) -> None:
    """Redis restart without persistence: what it held is gone (documented), and the
    instances recover by themselves. Kept, order, flagged for the calls after it."""
    server = RedisServer(_redis_binary(), tmp_path)
    server.start()
    try:
        env = {"CALLBOT_STORE_LEASE": "1"}
        async with running_bots(authority, server.url, tmp_path, 2, **env) as bots:
            async with client_for(server.url) as rdb:
                before = calls_named("before", 20)
                await spray(bots, before, random.Random(8))
                logs = await wait_for_logs(rdb, before, within=60)
                check(logs)
                await rerun_only_after_a_lost_lease(bots, logs)
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            async with client_for(server.url) as rdb:
                after = calls_named("after", 40)
                await spray(bots, after, random.Random(9))
                logs = await wait_for_logs(rdb, after, within=60)
                check(logs)
                await rerun_only_after_a_lost_lease(bots, logs)
    finally:
        server.stop()


async def test_redis_paused_past_the_lease(
    authority: TokenAuthority, redis_url: str, tmp_path: Path
) -> None:
    """CLIENT PAUSE longer than the lease. Kept, order, flagged: leases run out while
    nobody can take them; owners whose epoch is unchanged go on, unrepeated."""
    env = {"CALLBOT_STORE_LEASE": "1", "CALLBOT_TEST_HANDLER_DELAY": "0.01"}
    async with (
        running_bots(authority, redis_url, tmp_path, 3, **env) as bots,
        client_for(redis_url) as rdb,
    ):
        calls = calls_named("pause")
        sprayed = asyncio.create_task(spray(bots, calls, random.Random(10)))
        await wait_for(lambda: _handled(rdb, calls, 40))
        async with client_for(redis_url) as pauser:
            await pauser.execute_command("CLIENT", "PAUSE", 2500, "ALL")
        await sprayed
        check(await wait_for_logs(rdb, calls, within=60))


@pytest.mark.parametrize("replicas", [0, 1])
async def test_a_sentinel_failover(
    authority: TokenAuthority, tmp_path: Path, replicas: int
) -> None:
    """Sentinel failover (``redis+sentinel://``): the instances follow the new primary,
    nothing stays 503. Kept, order, flagged for calls after the failover. For those
    around it: with ``store_replicas=1``, kept, order, flagged too (nothing is relied on
    before the replica holds it). Without, nothing is checked of them: replication is
    asynchronous, and what the old primary took after the promotion, until the instances
    left it, is lost (docs/scaling.md), the bot's own log lines with it. A call whose
    acknowledgements were lost runs those entries again, unflagged, after its later ones
    ran (``terminated`` logged, then ``tone1`` again): its log read back from the new
    primary is neither whole nor in order, and tells no first run from a re-run."""
    binary = _redis_binary()
    primary = RedisServer(binary, tmp_path / "primary", persistent=True)
    replica = RedisServer(binary, tmp_path / "replica", persistent=True)
    for server in (primary, replica):
        server.directory.mkdir()
    primary.args = ("--repl-diskless-sync-delay", "0")
    primary.start()
    replica.args = ("--replicaof", "127.0.0.1", str(primary.port))
    replica.start()
    sentinel, sentinel_port = await asyncio.to_thread(
        _start_sentinel, binary, tmp_path, primary.port
    )
    url = f"redis+sentinel://127.0.0.1:{sentinel_port}/callbot"
    try:
        with (
            redis.Redis(port=sentinel_port, socket_timeout=1) as watcher,
            redis.Redis(port=replica.port, socket_timeout=1) as follower,
        ):
            await _until_sync(lambda: follower.info("replication")["master_link_status"] == "up")
            await _until_sync(lambda: _replicas_known(watcher) >= 1)
            env = {
                "CALLBOT_STORE_LEASE": "2",
                "CALLBOT_TEST_HANDLER_DELAY": "0.01",
                "CALLBOT_STORE_REPLICAS": str(replicas),
            }
            if not replicas:
                # The usual window: a call that lost its `establishing` in the failover
                # should not hold its `established` (and its lease) for long.
                env["CALLBOT_REORDER_WINDOW"] = "2"
            async with (
                running_bots(authority, url, tmp_path, 2, **env) as bots,
                client_for(url) as rdb,
            ):
                around = calls_named("failover")
                sprayed = asyncio.create_task(spray(bots, around, random.Random(12)))
                await wait_for(lambda: _handled(rdb, around, 40))
                watcher.sentinel_failover("callbot")
                await _until_sync(lambda: _primary_port(watcher) == replica.port)
                await sprayed
                # The instances left the old primary (as they do within a lease tick).
                with redis.Redis(port=primary.port, socket_timeout=1) as old:
                    await _until_sync(
                        lambda: not any(c["name"] == "callbot" for c in old.client_list())
                    )
                after = calls_named("after-failover", 40)
                await spray(bots, after, random.Random(14))
                check(await wait_for_logs(rdb, after, within=60))
                if replicas:
                    check(await wait_for_logs(rdb, around, within=60))
    finally:
        sentinel.kill()
        sentinel.wait()
        primary.stop()
        replica.stop()


async def test_a_three_master_cluster(authority: TokenAuthority, tmp_path: Path) -> None:
    """A 3-master Redis Cluster (``redis+cluster://``). Kept, order, flagged, and run
    once: every script stays in one call's slot."""
    env = {"CALLBOT_STORE_LEASE": "2"}
    async with (
        _cluster(tmp_path) as url,
        client_for(url) as rdb,
        running_bots(authority, url, tmp_path, 3, **env) as bots,
    ):
        calls = calls_named("slot", 80)
        await spray(bots, calls, random.Random(13))
        logs = await wait_for_logs(rdb, calls, within=60)
        check(logs)
        await rerun_only_after_a_lost_lease(bots, logs)
        lost = lost_leases(bots)
        for call_id, entries in logs.items():
            if call_key(call_id) not in lost:
                assert [e["label"] for e in entries] == LIFECYCLE, (call_id, entries)


async def test_a_call_id_with_braces_stays_in_its_own_slot_of_a_cluster(tmp_path: Path) -> None:
    """A call id is the hash tag of the call's keys: ``}x`` (an empty tag, so each key in
    another slot) or ``-`` (an empty call key) made every notification of that call a
    503 and the store unreachable. Each is accepted and run, like any other call."""
    hostile = ["}x", "}", "-", "{a}", "a}b{c", "{}", "x{"]
    seen: list[str] = []

    async def record(call: Call, event: events.Event) -> None:
        seen.append(event.call_id)

    async with (
        _cluster(tmp_path) as url,
        InProcessBot(store=url, on_event=record) as bot,
    ):
        assert bot.bot is not None
        for call_id in ["plain", *hostile]:
            body = json.dumps(b.notifications(b.call_state(call_id, "establishing"))).encode()
            assert await bot.post(body) == 202, call_id
            assert bot.bot.ready

        async def all_ran() -> bool:
            return len(seen) == len(hostile) + 1

        await wait_for(all_ran)
        assert sorted(seen) == sorted(["plain", *hostile])


async def test_a_cluster_node_that_may_evict_the_stores_keys_is_named_at_start(
    tmp_path: Path,
) -> None:
    """INFO answers node by node on a Cluster: one node's evicting policy is named."""
    async with _cluster(tmp_path) as url:
        port = int(url.rpartition(":")[2])
        with redis.Redis(port=port, socket_timeout=1) as node:
            node.config_set("maxmemory-policy", "allkeys-lru")
            node.config_set("maxmemory", "1gb")
        with capture_logs() as logs:
            async with InProcessBot(store=url):
                pass
    [line] = [e for e in logs if e["event"] == "store_may_lose_calls"]
    assert line["maxmemory_policy"] == "allkeys-lru"


@contextlib.asynccontextmanager
async def _cluster(tmp_path: Path) -> AsyncIterator[str]:
    """A 3-master Redis Cluster on 127.0.0.1; its ``redis+cluster://`` URL."""
    binary = _redis_binary()
    cli = shutil.which("redis-cli")
    if cli is None:
        if os.environ.get("CALLBOT_TEST_REQUIRE_SERVERS") == "1":
            pytest.fail("redis-cli is required here (it comes with redis-server)")
        pytest.skip("redis-cli is not installed")
    nodes = []
    try:
        for n in range(3):
            directory = tmp_path / f"node{n}"
            directory.mkdir()
            node = RedisServer(
                binary,
                directory,
                args=lambda port: (
                    *("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"),
                ),
                spare=10000,  # the cluster bus port
            )
            node.start()
            nodes.append(node)
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes)]
        await asyncio.to_thread(
            subprocess.run,
            [*create, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for node in nodes:
            with redis.Redis(port=node.port, socket_timeout=1) as client:
                await _until_sync(lambda c=client: c.cluster("info")["cluster_state"] == "ok")
        yield f"redis+cluster://127.0.0.1:{nodes[0].port}"
    finally:
        for node in nodes:
            node.stop()


# -- helpers --------------------------------------------------------------------------


def _start_sentinel(
    binary: str, directory: Path, primary_port: int
) -> tuple[subprocess.Popen[bytes], int]:
    """A Sentinel on 127.0.0.1 watching the primary, and its port: another port is tried
    when the one picked was taken before the Sentinel bound it."""
    for _ in range(4):
        port = _free_port()
        config = directory / f"sentinel-{port}.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor callbot 127.0.0.1 {primary_port} 1\n"
            "sentinel down-after-milliseconds callbot 1000\n"
            "sentinel failover-timeout callbot 10000\n"
        )
        with (directory / "sentinel.log").open("ab") as out:
            process = subprocess.Popen(
                [binary, str(config), "--sentinel"], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        with redis.Redis(port=port, socket_timeout=1) as client:
            while process.poll() is None:
                try:
                    client.sentinel_masters()  # only a Sentinel answers this
                    return process, port
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        process.kill()
                        process.wait()
                        raise RuntimeError("redis-sentinel did not start") from None
                    time.sleep(0.05)
    raise RuntimeError("redis-sentinel did not start: each port tried was taken")


async def _handled(rdb: Any, calls: list[str], count: int) -> bool:
    logs = await read_logs(rdb, calls)
    return sum(len(entries) for entries in logs.values()) >= count


async def _until_sync(predicate: Any, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(redis.RedisError):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise AssertionError("the Redis deployment did not reach the expected state")
        await asyncio.sleep(0.05)


def _replicas_known(watcher: redis.Redis) -> int:
    return len(watcher.sentinel_slaves("callbot") or [])


def _primary_port(watcher: redis.Redis) -> int:
    address: Any = watcher.sentinel_get_master_addr_by_name("callbot")
    return int(address[1])


async def test_stopping_with_a_hung_redis_hands_over_no_further_after_a_failure(
    authority: TokenAuthority, serve: Any, tmp_path: Path
) -> None:
    """Each held call's hand-over waited out the socket timeout (3 s) when Redis hung: ten
    calls took 30 s past shutdown_timeout, beyond systemd's and Kubernetes' grace. The
    first failure ends the hand-over; the calls go to others when their leases run out."""
    server = RedisServer(_redis_binary(), tmp_path)
    server.start()
    assert server.process is not None
    try:
        bot = make_bot(authority, store=server.url, shutdown_timeout=0.5)
        started: set[str] = set()

        @bot.on_incoming_call
        async def hold(call: Call, event: events.IncomingCall) -> None:
            started.add(event.call_id)
            await asyncio.Event().wait()

        bot_server = await serve(bot)
        calls = [f"held-{i}" for i in range(10)]
        for call_id in calls:
            response = await bot_server.post(b.notifications(b.incoming_call(call_id)))
            assert response.status == 202
        await until(lambda: started == set(calls), within=30)
        os.kill(server.process.pid, signal.SIGSTOP)  # Redis hangs: no answers, no refusals
        try:
            with capture_logs() as logs:
                await bot.stop()
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        incomplete = [e for e in logs if e["event"] == "store_handover_incomplete"]
        assert len(incomplete) == 1
    finally:
        server.stop()
