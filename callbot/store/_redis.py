"""The Redis store: several instances behind a load balancer, one truth.

Graph posts a call's notifications to whichever instance the balancer picks.
Every instance appends what it accepts to the call's inbox in Redis (a Lua
script that also drops repeats), and answers 202 only once Redis has it.
Whoever holds the call's lease runs the call: it feeds the inbox, in order,
through the same :class:`~callbot._sequencing.Sequencer` the in-memory store
uses, with the call's record loaded from Redis; runs the handlers; and
acknowledges each entry, saving the record, once its handlers finished. A
crashed instance's leases expire and its calls move to the others, which run
the unacknowledged entries again, flagged as re-runs (each acquisition of a
lease is a new fencing epoch). docs/scaling.md has the whole design.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import socket
import time
import weakref
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from .. import events
from .._clock import wait_all
from .._config import Settings
from .._dispatch import Dispatcher
from .._errors import ConfigurationError, StoreUnavailable
from .._ids import id_key, tenant_key
from .._journal import Attempt
from .._lifecycle import ENDED_MEMORY, KEEP_ALIVE_LIMIT, LIVE_PHASE, PENDING_LET_GO, Lifecycle
from .._log import RateLimitedLog, get_logger
from .._sequencing import (
    MAX_BACKLOG_BYTES,
    MAX_BACKLOG_ENTRIES,
    SEEN_DIGESTS,
    CallRecord,
    Delivery,
    KeeperLeft,
    OwnFact,
    Placed,
    Sequencer,
    digest_decides,
    kept_of_refused,
    refused_items,
)
from . import _scripts
from ._base import Outcomes, tell_waiting, waited_for
from ._codec import (
    decode_entry,
    decode_fact,
    decode_record,
    digest_of,
    encode_entry,
    encode_fact,
    encode_record,
    stored_proven,
)

__all__ = ["MIN_VERSION", "RedisStore", "connect", "disconnect", "follow_primary", "server_fitness"]

log = get_logger("callbot.store")

_READ_BATCH = 64
"""Inbox entries read at once."""
_EARLIER_BATCHES = 16
"""Batches a handler run again reads at most for the tones its earlier run heard."""
_TONE_KEYS = ('"toneInfo"', '"tone_info"')
"""How an inbox entry holding a tone names it (``encode_entry`` writes keys as received;
the models read either spelling)."""
_ACK_EVERY = 32
"""Entries an owner feeds at most before it acknowledges them (a checkpoint serves a
burst; a takeover repeats at most this many)."""
_CLAIM_BATCH = 32
"""Calls taken in one step at most."""
_PARSED_LIMIT = 10_000
_KEYS_LIMIT = 20_000
_RESTING_LIMIT = 10_000
"""Bounds of the caches that spare parsing an entry or decoding a record again."""
_BLOCK_SECONDS = 1.0
"""How long a blocking read waits; below the socket timeout, so a wait is never an error."""
_RING_GRACE_MS = 1000
"""How long a call rings (from its oldest waiting entry, by the server's clock) before an
instance with no room takes it: one with room takes it at once."""
_RING_POLL = 0.25
"""How often an instance with no room looks for calls rung past that grace."""
_SOCKET_TIMEOUT = 3.0
_EVENTS_MAXLEN = 10_000
"""Roughly how many operation outcomes, tones and call ends the shared events stream keeps."""
_LIFETIME_MS = 24 * 3600 * 1000
"""Keys of a call that never ended, and the shared indexes, expire after a day unused (a
call's by its notifications, or by Graph accepting its keep-alive)."""
_MIN_DEDUPE_MS = 10 * 60 * 1000
"""Exact repeats are dropped at least this long after the first copy (Graph's retries)."""
_SYNC_SECONDS = 2.0
"""How often the list of the cluster's active calls is refreshed."""
_RETRY_PAUSE = 0.2
"""How long a loop waits after Redis failed it (doubled up to a second while it fails)."""
_STEADY_PAUSE = 0.05
"""How long an owner waits before it tries a step Redis failed again (up to 5 times as
long while it keeps failing)."""
_MAX_CONNECTIONS = 16
"""Connections to Redis per instance for commands (blocking reads have their own)."""
_MAX_PIPELINE = 512
"""Commands sent in one round trip at most."""
_SENDERS = 4
"""Round trips in flight at once."""


_KEEPER_CHECK_MAX = 60.0
"""How long, at most, between two looks of an instance at the keeper leases (see _keep)."""


def keeper_timing(keep_alive_interval: float, tick: float) -> tuple[float, int]:
    """How often an instance renews the keeper leases it holds and looks for established
    calls nobody keeps alive, and how long (ms) a keeper lease outlives its last renewal.

    A keeper lost right before a keep-alive was due leaves its call without one for that
    interval, then until its lease runs out (3 looks), another instance's next look (one
    more) takes it up, and its first keep-alive comes within one more (spread over a look:
    an instance may take up thousands at once): 5 looks, kept within half of what Graph
    leaves after an interval (45 minutes). A look comes at most every store tick, at least
    every minute, and at least three times an interval, so that a call's keeper is found
    before its first keep-alive is due."""
    spare = KEEP_ALIVE_LIMIT - keep_alive_interval
    every = max(tick, min(keep_alive_interval / 3, spare / 10, _KEEPER_CHECK_MAX))
    return every, int(every * 3 * 1000)


_REPLICA_WAIT_MS = 1000
"""With ``store_replicas``: how long a round trip waits for replicas to hold its writes
(a primary cut off from its replicas, as one is after a failover, answers 503 then)."""


class NotReplicated(RedisError):
    """The primary took the writes, but not enough replicas hold them yet."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(raw: Any) -> list[tuple[str, str]]:
    """``(id, entry)`` pairs from XRANGE, whether redis-py or a script answered it."""
    out = []
    for entry_id, fields in raw or ():
        if not isinstance(fields, dict):
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        out.append((_text(entry_id), _text(fields.get("e", ""))))
    return out


def _stream_id(entry_id: str) -> tuple[int, int]:
    millis, _, sequence = entry_id.partition("-")
    return int(millis), int(sequence or 0)


def _after(entry_id: str) -> str:
    """The smallest stream id greater than ``entry_id`` (XTRIM MINID keeps it and later)."""
    millis, sequence = _stream_id(entry_id)
    return f"{millis}-{sequence + 1}"


def _decode_record(call: str, stored: str) -> CallRecord | None:
    try:
        return decode_record(stored)
    except Exception as exc:
        # The call goes on from a fresh record rather than not at all.
        log.error("call_record_unreadable", call_key=call, error=repr(exc))
        return None


# -- connecting ------------------------------------------------------------------------

_SCHEMES = "redis://, rediss://, unix://, redis+cluster://, rediss+cluster://, redis+sentinel://"


def connect(url: str) -> tuple[Any, Any]:
    """Two clients for a store URL (see :func:`_connect`); a malformed one is a
    :class:`ConfigurationError` (its message never repeats the URL: it may hold a password)."""
    try:
        return _connect(url)
    except ValueError as exc:
        raise ConfigurationError(f"CALLBOT_STORE is not a usable Redis URL: {exc}") from None


def _connect(url: str) -> tuple[Any, Any]:
    """Two clients for a store URL: one for commands, one for blocking reads.

    * ``redis://``, ``rediss://`` (TLS), ``unix://``: one server (users and
      passwords as in redis-py's URLs: ``redis://user:secret@host:6379/0``);
    * ``redis+cluster://host:port`` (or ``rediss+cluster://``): a Redis Cluster,
      any of its nodes;
    * ``redis+sentinel://host:port,host:port/service[/db]`` (or
      ``rediss+sentinel://``): the primary Sentinel names for ``service``,
      followed across failovers.
    """
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ConfigurationError(f"the store URL must be one of {_SCHEMES}, got {url!r}")
    common: dict[str, Any] = {
        "client_name": "callbot",  # in CLIENT LIST, to tell the bot's connections apart
        "decode_responses": True,
        "protocol": 2,
        "socket_timeout": _SOCKET_TIMEOUT,
        "socket_connect_timeout": _SOCKET_TIMEOUT,
    }
    # A script is never sent twice by the client: a claim answered into a dropped
    # connection would be lost to its sender. The store's own loops retry instead.
    retry = Retry(ExponentialBackoff(cap=0.1, base=0.01), 0)
    if scheme in ("redis", "rediss", "unix"):
        commands = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=_MAX_CONNECTIONS, timeout=_SOCKET_TIMEOUT, retry=retry, **common
        )
        blocking = aioredis.ConnectionPool.from_url(url, max_connections=4, **common)
        return aioredis.Redis(connection_pool=commands), aioredis.Redis(connection_pool=blocking)
    if scheme in ("redis+cluster", "rediss+cluster"):
        parts = urlsplit(url)
        # A path (a database number) means nothing to a cluster: it has only database 0.
        plain = f"{scheme.removesuffix('+cluster')}://{parts.netloc}"
        if parts.query:
            plain += "?" + parts.query
        return (
            RedisCluster.from_url(plain, **common),
            RedisCluster.from_url(plain, **common),
        )
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        parts = urlsplit(url)
        hosts = []
        for host in parts.netloc.rpartition("@")[2].split(","):
            name, _, port = host.rpartition(":")
            hosts.append((name or host, int(port) if name else 26379))
        path = [unquote(p) for p in parts.path.split("/") if p]
        if not path:
            raise ConfigurationError(f"a Sentinel URL names its service: {_SCHEMES}")
        options: dict[str, Any] = {**common, "db": int(path[1]) if len(path) > 1 else 0}
        if parts.username:
            options["username"] = unquote(parts.username)
        if parts.password:
            options["password"] = unquote(parts.password)
        if scheme == "rediss+sentinel":
            options["ssl"] = True
        query = parse_qs(parts.query)
        sentinel_options: dict[str, Any] = {"socket_timeout": _SOCKET_TIMEOUT}
        if "sentinel_password" in query:
            sentinel_options["password"] = query["sentinel_password"][0]
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs=sentinel_options, **options
        )
        return (
            sentinel.master_for(path[0], retry=retry),
            sentinel.master_for(path[0]),
        )
    raise ConfigurationError(f"the store URL must be one of {_SCHEMES}, got {scheme}://...")


async def disconnect(client: Any) -> None:
    """Close a client of :func:`connect`, its pool, and its Sentinel connections."""
    with contextlib.suppress(RedisError, OSError):
        await client.aclose()
        pool = getattr(client, "connection_pool", None)
        if pool is not None:  # a pool the client was given is not closed with it
            await pool.disconnect()
        if isinstance(pool, SentinelConnectionPool):
            for sentinel in pool.sentinel_manager.sentinels:
                await sentinel.aclose()


_PRIMARIES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
"""The primary each Sentinel-managed pool was last seen to talk to."""


async def follow_primary(client: Any) -> None:
    """With Sentinel: once it names a new primary, every connection to the old one goes.

    An old primary keeps taking writes until Sentinel turns it into a replica; what it
    takes meanwhile is lost. Called every lease tick, this bounds that window (redis-py
    itself only drops the idle connections, and only if it notices the change first).
    """
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, SentinelConnectionPool):
        return
    primary = await pool.get_master_address()  # type: ignore[no-untyped-call]
    known = _PRIMARIES.get(pool)
    _PRIMARIES[pool] = primary
    if known is not None and known != primary:
        log.warning("store_primary_changed", primary=str(primary), previous=str(known))
        await pool.disconnect()


def _pack_python(commands: Sequence[tuple[Any, ...]]) -> bytes:
    """Commands in the Redis protocol, as one write."""
    out: list[bytes] = []
    add = out.append
    for command in commands:
        add(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):
                data = arg.encode()
            elif isinstance(arg, bytes):
                data = arg
            elif isinstance(arg, int):
                data = b"%d" % arg
            else:
                data = repr(arg).encode()  # a float, as redis-py writes it
            add(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _pack_hiredis(commands: Sequence[tuple[Any, ...]]) -> bytes:
    """The same, packed in C."""
    return b"".join([_pack_command(command) for command in commands])


try:
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - depends on the installation
    _pack = _pack_python
else:
    _pack = _pack_hiredis


class _Batcher:
    """Sends commands in pipelines: what is issued while a round trip is in flight goes
    together in the next one (a few round trips may be in flight at once)."""

    def __init__(self, client: Any, *, replicas: int = 0, witness: str = "") -> None:
        self._client = client
        self._replicas = replicas
        # A write before each WAIT: WAIT answers for the connection's last write, and the
        # primary's offset after this one covers every write before it, on any connection.
        self._witness = ("SET", witness, "1", "PX", 60_000)
        # One server (or Sentinel's primary): packed and read here, one timeout per round
        # trip, as redis-py's own packing costs more than the rest of a command. A Cluster
        # routes each command to its node: its pipeline does that.
        self._pool: Any = None if isinstance(client, RedisCluster) else client.connection_pool
        self.ordered = self._pool is not None
        """Whether the commands of one round trip take effect in their order (one server
        runs them so; a Cluster's pipeline sends each node its own)."""
        self._waiting: deque[tuple[Sequence[tuple[Any, ...]], asyncio.Future[list[Any]]]] = deque()
        self._senders: set[asyncio.Task[None]] = set()
        # Connections kept between round trips: taking one from the pool and giving it back
        # (its lock, condition and timeout) cost more than the packing of a round trip.
        self._spare: list[Any] = []

    async def run(self, *command: Any) -> Any:
        """One command's answer (its error raised), sent with whatever else is waiting."""
        (answer,) = await self.submit((command,))
        if isinstance(answer, Exception):
            raise answer
        return answer

    def submit(self, commands: Sequence[tuple[Any, ...]]) -> asyncio.Future[list[Any]]:
        """Queue commands for one round trip; the future of their answers (an error Redis
        answers is one of them; a round trip that failed fails the future)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._waiting.append((commands, future))
        if len(self._senders) < _SENDERS:
            task = loop.create_task(self._send())
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)
        return future

    async def _send(self) -> None:
        try:
            await self._send_waiting()
        finally:
            # Off the count in the very step that found nothing waiting: the done callback
            # runs an iteration later, and a submit in between would start no sender.
            task = asyncio.current_task()
            if task is not None:
                self._senders.discard(task)

    async def _send_waiting(self) -> None:
        waiting = self._waiting
        while waiting:
            batch = [waiting.popleft()]
            size = len(batch[0][0])
            while waiting and size + len(waiting[0][0]) <= _MAX_PIPELINE:
                batch.append(waiting.popleft())
                size += len(batch[-1][0])
            try:
                if self._pool is not None:
                    await self._round_trip(batch)
                    continue
                pipe = self._client.pipeline(transaction=False)
                for group, _ in batch:
                    for command in group:
                        pipe.execute_command(*command)
                answers = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                failure = exc
                if not isinstance(exc, RedisError):
                    # the client's internals broke with the connection: the same for callers
                    failure = RedisConnectionError(f"{type(exc).__name__}: {exc}")
                    failure.__cause__ = exc
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                continue
            except BaseException:
                for _, future in batch:
                    future.cancel()
                raise
            start = 0
            for group, future in batch:
                end = start + len(group)
                if not future.done():
                    future.set_result(answers[start:end])
                start = end

    async def _round_trip(
        self, batch: list[tuple[Sequence[tuple[Any, ...]], asyncio.Future[list[Any]]]]
    ) -> None:
        """Write the commands of a batch at once on one connection; each group's future
        gets its answers (errors answered by Redis as values) as soon as they are read, so
        its caller goes on while Redis still runs the rest."""
        pool = self._pool
        connection = self._spare.pop() if self._spare else None
        reused = connection is not None
        if connection is None:
            connection = await pool.get_connection()
        commands = [command for group, _ in batch for command in group]
        if self._replicas:
            # answered once replicas hold every write the primary took so far
            commands += [self._witness, ("WAIT", self._replicas, _REPLICA_WAIT_MS)]
        try:
            async with asyncio.timeout(_SOCKET_TIMEOUT):
                if reused:
                    # checked as the pool checks what it hands out: reconnected if the
                    # server closed it meanwhile (or Sentinel named another primary)
                    await pool.ensure_connection(connection)
                await connection.send_packed_command(_pack(commands))
                read = connection.read_response
                answered: list[tuple[asyncio.Future[list[Any]], list[Any]]] = []
                for group, future in batch:
                    answers: list[Any] = []
                    for _ in group:
                        try:
                            # no timeout of its own: the round trip has one
                            answers.append(await read(timeout=math.inf))
                        except ResponseError as exc:
                            answers.append(exc)
                    if self._replicas:
                        answered.append((future, answers))
                    elif not future.done():
                        future.set_result(answers)
                if self._replicas:
                    await read(timeout=math.inf)  # the witness's OK
                    held = await read(timeout=math.inf)
                    failure = None
                    if int(held) < self._replicas:
                        failure = NotReplicated(
                            f"{held} of {self._replicas} replicas hold the writes after "
                            f"{_REPLICA_WAIT_MS} ms"
                        )
                    for future, answers in answered:
                        if future.done():
                            continue
                        if failure is None:
                            future.set_result(answers)
                        else:
                            future.set_exception(failure)
        except BaseException:
            # Replies may still be on their way: the connection cannot serve again.
            await connection.disconnect(nowait=True)
            await pool.release(connection)
            raise
        if len(self._spare) < _SENDERS:
            self._spare.append(connection)
        else:
            await pool.release(connection)

    def close(self) -> None:
        for task in self._senders:
            task.cancel()
        while self._waiting:
            self._waiting.popleft()[1].cancel()
        # the pool's disconnect closes them (it counts them in use)
        self._spare.clear()


async def _one_command(pool: Any, command: tuple[Any, ...]) -> Any:
    """One command's raw answer on a pooled connection (a blocking one: its reply may take
    up to its BLOCK time, below the socket timeout)."""
    connection = await pool.get_connection()
    try:
        await connection.send_packed_command(_pack((command,)))
        # the socket timeout: raised, and the connection dropped (an explicit timeout
        # would answer None and leave the late reply to the next command)
        return await connection.read_response()
    except BaseException:
        # a reply may still be on its way: the connection cannot serve again
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)


@dataclass(eq=False)
class _Owned:
    """One run of a call under a lease this instance acquired (one fencing epoch)."""

    key: str
    epoch: int
    lease: str
    """The lease's value while this run holds it: ``{token}/{epoch}``."""
    deadline: float
    """Monotonic time after which the lease may have expired in Redis."""
    fed_before: tuple[int, int] | None
    """Entries up to this id were handed to handlers by an earlier run: re-runs."""
    marked: tuple[int, int] = (0, 0)
    """Entries up to this id are noted in Redis as handed to handlers (by this run)."""
    outstanding: int = 0
    """Deliveries handed to the dispatcher whose handlers have not finished."""
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    signals: int = 0
    """Entries this instance appended while the run held the call."""
    looked: int = 0
    """``signals`` when the run last read the inbox."""
    buffer: deque[tuple[str, str | events.Event]] = field(default_factory=deque)
    """Entries read (or appended by this instance) and not fed yet, in order: each as the
    event this instance parsed, else as read (never both, so a blocked call's read ahead
    holds one copy)."""
    tail: tuple[int, int] = (0, 0)
    """The last entry id the run knows of (fed or in ``buffer``)."""
    saved: tuple[str, CallRecord] | None = None
    """The record as the last checkpoint stored it."""
    fed: str | None = None
    """The last entry handed to the sequencer."""
    acked: str | None = None
    """The last entry acknowledged."""
    owed: int = 0
    """Entries fed since the last checkpoint."""
    waiting: bool = False
    """The run waits for its next entry, with nothing fed outstanding or held: an entry
    accepted here meanwhile is fed at once by the ingest (see ``_hand``)."""
    journaled: list[str] = field(default_factory=list)
    """Journal fields this run recorded, deleted once their entries are acknowledged."""
    lost: bool = False
    releasing: bool = False
    """A release is on its way: a renewal refused meanwhile only means it went through."""
    task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.idle.set()


def _last_handed(state: _Owned) -> str:
    """The last entry of the call that may have run: acknowledged by this run, or handed to
    handlers by an earlier one (``0-0``: none)."""
    ran = max(_stream_id(state.acked) if state.acked else (0, 0), state.fed_before or (0, 0))
    return f"{ran[0]}-{ran[1]}"


def _hash_tag(call: str) -> str:
    """``call`` as it stands between a key's braces: never empty and free of braces, so a
    Cluster hashes every key of the call by all of it; escaped one to one, so two calls
    never share a key (Graph's ids need no escaping)."""
    if not call:
        return "%"  # an escaped call always has two hex digits after its '%'
    if "%" in call or "{" in call or "}" in call:
        return call.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return call


class _Keys:
    """Key names. A call's keys share the call key as hash tag: one slot in a Cluster."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.runnable = prefix + "runnable"
        # Calls of ``runnable`` whose incoming call waits to be answered: in its slot, so
        # that one script writes both.
        self.ringing = f"{{{self.runnable}}}:ringing"
        self.pending = prefix + "pending"
        # Where a call taken off ``pending`` waits for its second look: in the same slot,
        # so that one script moves it (a key without braces hashes as a whole, as its
        # hash tag would).
        self.unpending = f"{{{self.pending}}}:unpending"
        self.active = prefix + "active"
        self.events = prefix + "events"
        self.reaper = prefix + "reaper"
        self._made: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}

    def of(self, call: str, *names: str) -> tuple[str, ...]:
        # kept: a call's keys are asked for at each of its notifications and checkpoints
        made = self._made.get((call, names))
        if made is None:
            if len(self._made) >= _KEYS_LIMIT:
                self._made.clear()
            tag = _hash_tag(call)
            made = tuple([f"{self.prefix}{{{tag}}}:{name}" for name in names])
            self._made[call, names] = made
        return made

    def record(self, call: str) -> str:
        return self.of(call, "call")[0]


def _cmd(script: _scripts.Script, keys: Sequence[str], *args: Any) -> tuple[Any, ...]:
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


MIN_VERSION = (7, 0)
"""The oldest Redis the scripts run on (script flags: those that run accepted work run
while Redis is full; ``XTRIM MINID``, exclusive ``XRANGE`` bounds)."""


def server_fitness(info: Mapping[str, Any]) -> dict[str, str] | None:
    """What ``INFO`` says of the servers holding the store: :class:`ConfigurationError` if
    one is older than :data:`MIN_VERSION`; the fields of a warning if one may evict keys
    under memory pressure (a ``maxmemory`` limit with any ``maxmemory-policy`` but
    ``noeviction``: every key of a call expires, so even a ``volatile-*`` policy takes
    them), else None.

    ``info`` is one server's, or a Cluster's: each node's, by node.
    """
    servers = (
        [info] if "redis_version" in info else [v for v in info.values() if isinstance(v, Mapping)]
    )
    for server in servers:
        version = str(server.get("redis_version", ""))
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if len(parts) == 2 and parts < MIN_VERSION:
            raise ConfigurationError(
                f"the store needs Redis {MIN_VERSION[0]}.{MIN_VERSION[1]} or later, the server "
                f"is {version}: upgrade it (managed Redis: choose version 7)"
            )
    evicting = sorted(
        {
            str(s["maxmemory_policy"])
            for s in servers
            # With no memory limit (0, self-hosted Redis's default) nothing is evicted.
            if s.get("maxmemory_policy", "noeviction") != "noeviction"
            and int(s.get("maxmemory", 1) or 0) > 0
        }
    )
    if not evicting:
        return None
    return {
        "maxmemory_policy": ", ".join(evicting),
        "why": "under memory pressure Redis may drop a call's keys (its lease, fence, record "
        "or waiting notifications): handlers could run twice, notifications be lost",
        "hint": "set maxmemory-policy noeviction (a full Redis then refuses new notifications: "
        "the bot answers 503 and Graph sends them again)",
    }


class RedisStore:
    """Keeps calls and their accepted notifications in Redis, shared by every instance.

    ``url`` is a Redis URL (see :func:`connect`: one server, a Cluster or Sentinel).
    Keys start with ``prefix`` (by default ``callbot:{app_id}:``, so bots can share a
    server). ``settings.store_lease`` is how long a crashed instance's calls wait
    before the others take them over.
    """

    def __init__(
        self,
        url: str,
        *,
        settings: Settings,
        dispatcher: Dispatcher,
        lifecycle: Lifecycle,
        outcomes: Outcomes,
        prefix: str | None = None,
    ) -> None:
        self._settings = settings
        self._dispatcher = dispatcher
        self._lifecycle = lifecycle
        self._outcomes = outcomes
        prefix = prefix if prefix is not None else f"callbot:{settings.app_id}:"
        if "{" in prefix or "}" in prefix:
            # a call's keys take the call key as hash tag: braces of the prefix would win
            raise ConfigurationError(f"a Redis key prefix cannot hold braces, got {prefix!r}")
        self._keys = _Keys(prefix)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        """This instance's name in the leases it holds (followed by ``/{epoch}``)."""
        self._woken = f"{{{self._keys.runnable}}}:wake:{self.token}"
        """Where a drain wakes this instance's loops from their pops (in the slot of the
        sets they pop: one command pops both)."""
        self._lease_ms = max(int(settings.store_lease * 1000), 100)
        grace_ms = max(int(settings.termination_grace * 1000), 1000)
        self._dedupe_ms = max(_MIN_DEDUPE_MS, grace_ms)
        # An ended call's record stays as long as a process remembers the end: a straggler
        # after the grace period is dropped, not taken for a new call.
        self._ended_ms = grace_ms + int(ENDED_MEMORY * 1000)
        self._tick = min(settings.store_lease / 3, 1.0)
        self._keep_every, self._keeper_ms = keeper_timing(settings.keep_alive_interval, self._tick)
        self._next_keep = 0.0
        self._hold_poll = min(0.02, max(settings.reorder_window / 10, 0.002))
        self._linger = min(self._tick, 0.2)
        self._capacity = settings.max_concurrent_handlers
        self._redis, self._blocking = connect(url)
        self._batch = _Batcher(
            self._redis, replicas=settings.store_replicas, witness=self._keys.prefix + "written"
        )
        self._sequencer = Sequencer(
            self._deliver,
            lifecycle,
            reorder_window=settings.reorder_window,
            max_roster=settings.max_roster_size,
            on_drop=self._dropped,
        )
        lifecycle.when_forgotten(self._forgotten)
        lifecycle.when_kept_alive(lambda call_key: self._kept_alive.add(call_key))
        # A call whose end was told stays while this instance runs it (its end is yet to come).
        lifecycle.keep_while(lambda call_key: call_key in self._owned)
        # One instance keeps each call alive: the one holding its keeper lease (see _keep).
        lifecycle.keep_alive_where(
            lambda call_key: call_key in self._keeping, spread=self._keep_every
        )
        self._owned: dict[str, _Owned] = {}
        self._known: dict[str, CallRecord] = {}
        self._indexed: dict[str, bool] = {}
        """Calls this instance put in the ``active`` index, or took up from it unproven
        after a start, each with whether it was proven then."""
        self._letting_go: set[str] = set()
        """Calls this instance ran, or took up, and let go while pending, to take off the
        ``active`` index."""
        self._own_counts: Counter[str] = Counter()
        # A repeat's line: a sender posting 200 copies a request decides how many.
        self._lines = RateLimitedLog(log)
        self._parsed: dict[tuple[str, str], events.Event] = {}
        """Events this instance accepted for calls it runs, by call and inbox entry id, until
        the call's run buffers them in place of their text."""
        self._resting: dict[str, tuple[str, CallRecord]] = {}
        """Records of calls this instance gave up, as stored, in case it takes them again."""
        self._running: dict[str, _Owned] = {}
        """The run feeding each call now (a new lease may wait for an old run to end)."""
        self._in_flight: dict[int, _Owned] = {}
        """The run that fed each delivery still in the dispatcher (by the delivery's id)."""
        self._attempts: dict[int, tuple[events.Event, Attempt]] = {}
        """The attempt of each event fed and not yet delivered or dropped, by the id of its
        raw item (which the sequencer's copies of an event share)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._claimers: list[asyncio.Task[None]] = []
        """The loops taking calls that wait with nobody on them (stopped by a drain)."""
        self._claiming: set[asyncio.Task[Any]] = set()
        """Those of them between a popped call and its run or hand-over (left to end by a
        drain)."""
        self._popping: set[asyncio.Task[Any]] = set()
        """Those of them waiting on a pop (woken by a drain, not cancelled)."""
        self._asked_again: set[asyncio.Task[None]] = set()
        """The tasks asking again for calls an ingest asked to take, its answer lost, until
        they run or are handed over (left to end by a drain, as a claim under way)."""
        self._slot_freed = asyncio.Event()
        self._reachable = False
        self._rehydrated = False
        self._server_checked = False
        self._unfit: ConfigurationError | None = None
        """Why the server answering cannot hold the store: unready, whatever else succeeds."""
        self._writes_refused = False
        """Redis last refused a write while it may answer the rest (full, read-only, unable
        to persist): unreachable until an upkeep round's writes are taken, whatever else
        succeeds meanwhile (reads, a script that needs no memory)."""
        self._refusals = 0
        """How many write refusals were seen: an upkeep round during which one came proves
        nothing (its writes may all have gone before it)."""
        self._draining = False
        self._drained = False
        """The drain's wait is over: nothing more of any call is handed to handlers here."""
        self._closing = False
        self._journal = _Journal(self)
        self._index_changes: dict[str, bool] = {}
        """Calls to add to (True) or take off (False) the ``active`` index."""
        self._ended_pending: set[str] = set()
        """Ended calls given up, to take off the ``pending`` index."""
        self._kept_alive: set[str] = set()
        """Calls Graph accepted a keep-alive of, whose keys are to last another day."""
        self._keeping: set[str] = set()
        """Calls whose keeper lease this instance holds: it sends their keep-alives."""
        self._asking: set[str] = set()
        """Calls a keeper look asked the lease of, until its answer is read: it may hold them."""
        self._lingering = 0
        """Held calls with nothing to do, waiting a moment for their next notification."""
        self._taking = 0
        """Calls asked for by a round trip still under way: counted against the room."""
        self._moves = 0
        """Moves of calls off the pending index this instance made (see _generation)."""

    # -- the Store interface ------------------------------------------------------

    @property
    def sequencer(self) -> Sequencer:
        """The ordering rules, applied to the calls this instance holds."""
        return self._sequencer

    @property
    def reachable(self) -> bool:
        """Whether Redis answered the last request."""
        return self._reachable

    @property
    def counts(self) -> Counter[str]:
        """Sequencing outcomes of this instance (repeats dropped on arrival included)."""
        return self._sequencer.counts + self._own_counts

    async def start(self) -> None:
        """Check the server, load the scripts and the calls still going on; start claiming
        calls. A server that cannot hold the store raises :class:`ConfigurationError`."""
        try:
            await self._prepare()
            self._mark(True)
        except RedisError as exc:
            # Serve anyway: /readyz fails and callbacks get 503 until Redis is back.
            # Unreachable is the initial state, so _mark alone would say nothing.
            log.warning("store_unreachable", store="redis", error=str(exc))
            self._mark(False, exc)
        loop = asyncio.get_running_loop()
        self._claimers = [
            loop.create_task(self._claim_loop(), name="callbot-store-claim"),
            loop.create_task(self._answer_loop(), name="callbot-store-answer"),
        ]
        self._tasks = [
            *self._claimers,
            loop.create_task(self._maintain_loop(), name="callbot-store-maintain"),
            loop.create_task(self._events_loop(), name="callbot-store-events"),
        ]
        log.info("store_started", store="redis", token=self.token, lease=self._lease_ms / 1000)

    async def ingest(self, batch: Sequence[events.Event]) -> None:
        """Append each event to its call's inbox (repeats dropped), or raise StoreUnavailable.

        A call that nobody runs is taken on by this instance at once, when it has room.
        """
        started = time.monotonic()
        try:
            kept, answers, follow_up, asked, failure = await self._append(batch, started)
        except RedisError as exc:
            self._mark(False, exc)
            raise StoreUnavailable(f"the Redis store cannot take notifications now: {exc}") from exc
        try:
            await self._accepted(kept, answers, follow_up, started, failure)
        finally:
            self._taken(asked)  # each call taken is owned by now

    async def _accepted(
        self,
        batch: Sequence[events.Event],
        answers: list[tuple[Any, str]],
        follow_up: list[tuple[Any, ...]],
        started: float,
        failure: Exception | None,
    ) -> None:
        """Send what follows the scripts, then act on their answers: runs begun or told.
        ``batch`` is what the scripts took up (``failure``: why the others failed)."""
        try:
            await self._run_all(follow_up)
        except RedisError as exc:
            # The scripts' answers are acted on all the same (a call they gave this instance
            # runs now, not after its lease); the request gets 503, and Graph's retry (a
            # repeat here) sends these again.
            if failure is None:  # the scripts' own failure says more
                failure = exc
        self._mark(failure is None, failure)
        elsewhere = backlog = 0
        for event, (answer, call) in zip(batch, answers, strict=True):
            fresh = int(answer[0])
            if fresh == -1:
                elsewhere += 1  # the call is another tenant's
                continue
            if waited_for(event):
                # in the events stream for the others; here without reading it back (refused
                # with its call's backlog full too, for a handler waiting for it: see _append)
                self._tell(event)
            if fresh == -2:
                backlog += 1
                continue
            who, entry = int(answer[1]), _text(answer[2])
            if not fresh:
                self._own_counts["duplicate"] += 1
                self._lines.info(
                    "notification_dropped",
                    call_id=self._lifecycle.named(event.call_id),
                    reason="duplicate",
                    kind=type(event).__name__,
                )
            if who not in (1, 2):
                continue
            if who == 2:
                if fresh:
                    # This instance runs the call: it need not parse the entry again.
                    self._parsed[call, entry] = event
                self._begin_taken(call, started, answer)
            else:
                lease = _text(answer[4])
                state = self._running.get(call)
                if state is None or state.lease != lease:
                    # A run about to start (perhaps after an older one, still winding down):
                    # it reads the inbox rather than linger first. None here yet: the take
                    # that leased it begins it, once answered or asked again (_ask_again).
                    state = self._owned.get(call)
                    if state is not None and state.lease == lease:
                        state.signals += 1
                        state.changed.set()
                    continue
                before = _text(answer[3]) if fresh else None
                if fresh:
                    state.marked = max(state.marked, _stream_id(entry))  # the script noted it
                    if _stream_id(entry) <= state.tail:
                        continue  # the run read it from the inbox while this awaited Redis
                if (
                    before is not None
                    and (not before or _stream_id(before) <= state.tail)
                    and len(state.buffer) < _READ_BATCH
                ):
                    # Nothing came between what the run knows and this entry: it need not
                    # read the inbox to see it. (Past a read's worth buffered, the entry
                    # waits in the inbox: a blocked handler's call holds no more here.)
                    # fed as parsed here: the entry's text need not be kept nor parsed again
                    if self._may_hand(state):
                        self._hand(state, entry, event)
                        continue
                    self._take(state, [(entry, event)])
                else:
                    state.signals += 1
                state.changed.set()  # a held or idle call need not wait for its next look
        if failure is not None or backlog:
            # Graph sends the whole request again: what was kept of it is a repeat then.
            await self._note_kept(batch, answers)
        if failure is not None:
            raise StoreUnavailable(
                f"the Redis store cannot take notifications now: {failure}"
            ) from failure
        if elsewhere or backlog:
            raise refused_items(len(batch), elsewhere=elsewhere, backlog=backlog)

    async def _note_kept(
        self, batch: Sequence[events.Event], answers: list[tuple[Any, str]]
    ) -> None:
        """Note, for each call, the notifications of a request refused in part that were
        kept (:class:`~callbot._sequencing.KeptOfRefused`), in line after them."""
        kept = [
            event for event, (answer, _) in zip(batch, answers, strict=True) if int(answer[0]) >= 0
        ]
        for fact in kept_of_refused(kept):
            with contextlib.suppress(StoreUnavailable):
                # Else the request's copies are news, as if nothing had been noted.
                await self.note(fact)

    def elsewhere(self) -> list[CallRecord]:
        """The calls of every instance that reached a state and have not ended (refreshed
        every few seconds)."""
        # A call placed, of which only the answer to the request is known yet, is not
        # listed (nor is it in memory).
        return [r for r in self._known.values() if r.phase >= 0 and not r.closed]

    async def note(self, fact: OwnFact) -> None:
        """Append the fact to the call's inbox, as a notification is (one round trip): the
        run of the call (on any instance, now or after a takeover) feeds it to the sequencer
        before what comes after it, and the call's record keeps what it changed from then
        on."""
        keys = self._keys
        call = id_key(fact.call_id)
        started = time.monotonic()
        take = self._free_slots() > 0 and call not in self._owned
        command = self._fact_command(fact, take=take)
        self._taking += take
        try:
            # Indexed as pending after the entry, as an ingest does: the reaper finds it.
            (answer,) = await self._run_all([command], then=("SADD", keys.pending, call))
        except RedisError as exc:
            self._mark(False, exc)
            if take:
                self._ask_again([call], started)  # as an ingest's: Redis may have given it here
            raise StoreUnavailable(f"the Redis store cannot keep a call's fact: {exc}") from exc
        finally:
            self._taken(take)  # owned, if taken, once the answer below is acted on
        self._mark(True)
        who = int(answer[1])
        if who == 3:
            score = _stream_id(_text(answer[3]))[0]
            with contextlib.suppress(RedisError):  # else the reaper wakes it
                await self._script_run(self._wake([(call, score, bool(int(answer[4])))]))
        elif who == 2:
            self._begin_taken(call, started, answer)
        elif who == 1:
            state = self._owned.get(call)
            if state is not None:
                # Its run reads the inbox on its next look rather than linger first.
                state.signals += 1
                state.changed.set()

    def _fact_command(self, fact: OwnFact, *, take: bool) -> tuple[Any, ...]:
        """The script appending ``fact`` to its call's inbox (taking the call on if ``take``)."""
        return _cmd(
            _scripts.INGEST,
            self._keys.of(
                id_key(fact.call_id), "inbox", "seen", "lease", "fence", "call", "tenant"
            ),
            "",  # never a repeat
            encode_fact(fact),
            self._dedupe_ms,
            self.token,
            self._lease_ms if take else "",
            _READ_BATCH,
            _LIFETIME_MS,
            "",  # a fact is no notification: no token proves a tenant
            SEEN_DIGESTS,
            # The call is the tenant's it was placed in, unless a notification bound it first.
            tenant_key(fact.tenant_id) if isinstance(fact, Placed) and fact.tenant_id else "",
            *("", ""),  # what the bot itself knows of a call is never refused
            "",  # nor a new incoming call
        )

    async def _hand_keep_alives_over(self) -> None:
        """Give up the keeper leases of the calls this instance keeps alive: another instance
        takes each up with its next look (see ``_keep``). Each call also gets a
        ``keeperLeft`` fact and is made runnable, for an instance of an earlier release, which
        knows no keeper lease: it runs the call at once and keeps it alive from then on (a
        quiet call brings no notification that would)."""
        calls, self._keeping = sorted(self._keeping), set()
        # A look stopped before its answer came may have taken these: given up as well.
        asked, self._asking = sorted(self._asking.difference(calls)), set()
        if not calls and not asked:
            return
        keys = self._keys
        lives = [self._lifecycle.get(call) for call in calls]
        going = [life for life in lives if life is not None and life.established]
        given_up = [*calls, *asked]
        answers = await self._run_all(
            [
                *(
                    _cmd(_scripts.KEEP, keys.of(call, "keeper"), self.token, "")
                    for call in given_up
                ),
                *(self._fact_command(KeeperLeft(life.call_id), take=False) for life in going),
            ],
            # as a note: the reaper finds them
            then=("SADD", keys.pending, *(life.key for life in going)) if going else None,
        )
        waiting = [
            (life.key, _stream_id(_text(answer[3]))[0], bool(int(answer[4])))
            for life, answer in zip(going, answers[len(given_up) :], strict=True)
            if int(answer[1]) == 3
        ]
        if waiting:
            await self._script_run(self._wake(waiting))

    async def drain(self, timeout: float, stop_waiting: asyncio.Event | None = None) -> None:
        """Stop claiming (a take under way ends, what it takes handed straight over); let each
        held call finish its running entry, then hand it over (what is still running when
        ``stop_waiting`` is set is handed over as it closes)."""
        self._draining = True
        began = time.monotonic()
        # A loop cancelled in a pop would lose a call Redis popped as the answer went out
        # (in no index until a reaper's round): woken, it reads the call and hands it over.
        popping = [claimer for claimer in self._claimers if claimer in self._popping]
        woken = await self._wake_popping(len(popping))
        for claimer in self._claimers:
            # Waiting for a call; one whose claim is under way hands over what it takes.
            if claimer not in self._claiming and not (woken and claimer in popping):
                claimer.cancel()
        # So do ingests taking calls and asks again: the runs they begin now hand calls over.
        takes = asyncio.ensure_future(self._takes_end())
        await wait_all([*self._claimers, takes], max(timeout, 0.001), stop_waiting)
        takes.cancel()
        owners = [state.task for state in self._owned.values() if state.task is not None]
        for state in self._owned.values():
            state.changed.set()
        if owners:
            left = timeout - (time.monotonic() - began)
            await wait_all(owners, max(left, 0.001), stop_waiting)
        self._drained = True

    async def _wake_popping(self, count: int) -> bool:
        """End ``count`` pops under way, each with a member of this instance's wake key;
        ``False`` if Redis did not take them."""
        if not count:
            return True
        members = [part for n in range(count) for part in (0, f"drain-{n}")]
        try:
            await self._batch.run("ZADD", self._woken, *members)
            await self._batch.run("PEXPIRE", self._woken, self._lease_ms)
        except RedisError:
            return False
        return True

    async def _pop(self, key: str) -> Any:
        """``key``'s first call, waited for up to ``_BLOCK_SECONDS``, or ``None`` (none came,
        or a drain woke the pop)."""
        task = asyncio.current_task()
        assert task is not None
        self._popping.add(task)
        try:
            popped = await self._blocking.bzpopmin([self._woken, key], timeout=_BLOCK_SECONDS)
        finally:
            self._popping.discard(task)
        return None if popped and _text(popped[0]) == self._woken else popped

    async def close(self) -> None:
        """Stop every task, hand the calls still held over to the others, disconnect."""
        self._draining = True
        self._closing = True
        # Taken before the runs are cancelled: each removes its call from _owned as it ends.
        left = list(self._owned.values())
        owners = [state.task for state in left if state.task is not None]
        tasks = [*self._tasks, *self._asked_again, *owners]
        await _cancelled(tasks)
        self._owned.clear()
        # One failure (a socket timeout when Redis hangs) ends the hand-over: trying each
        # call would take a timeout per call, past any grace period. The calls not handed
        # over go to the others when their leases run out, as a crashed instance's do.
        try:
            await self._index_step(self._flush_indexes)
            await self._index_step(self._let_go_pending)
            for state in left:
                # Their entries were not acknowledged; another instance runs them again.
                await self._release(state, handover=True)
            await self._hand_keep_alives_over()
            # This may be the last instance, stopping before its reaper ever ran.
            await self._expire_indexes()
            await self._batch.run("DEL", self._woken)  # what a loop ended elsewhere left
        except (RedisError, OSError) as exc:
            log.warning("store_handover_incomplete", store="redis", error=str(exc))
        self._sequencer.close()
        self._batch.close()
        for client in (self._redis, self._blocking):
            await disconnect(client)
        log.info("store_closed", store="redis", handed_over=len(left))

    # -- accepting ----------------------------------------------------------------

    async def _append(
        self, batch: Sequence[events.Event], started: float
    ) -> tuple[
        Sequence[events.Event],
        list[tuple[Any, str]],
        list[tuple[Any, ...]],
        int,
        Exception | None,
    ]:
        """The batch's scripts in one round trip: the events whose scripts answered and
        their answers (with each one's call), what to send next, before they are acted on
        (calls to make runnable or index again, accepted outcomes, tones and ends for the
        other instances), how many calls it asked to take on (counted in ``_taking`` until
        the caller lets them go), and the first error a script or the index answered.
        Should the round trip fail, the calls it asked to take are asked for again in the
        background (sent at ``started``)."""
        keys = self._keys
        room = self._free_slots()
        taking: set[str] = set()
        texts: list[str] = []
        calls = [event.call_key for event in batch]
        commands: list[tuple[Any, ...]] = []
        for event, call in zip(batch, calls, strict=True):
            incoming = type(event) is events.IncomingCall
            # Only the first item of a call in this batch may take it on, and only as many
            # calls as there is room for; a new incoming call whatever the room (unless
            # draining): it must be answered within 15 s, and its handlers wait for no slot.
            take = (
                (len(taking) < room or (incoming and not self._draining))
                and call not in self._owned
                and call not in taking
            )
            if take:
                taking.add(call)
            entry = encode_entry(event)
            texts.append(entry)
            commands.append(
                _cmd(
                    _scripts.INGEST,
                    keys.of(call, "inbox", "seen", "lease", "fence", "call", "tenant"),
                    # A roster, or a live state, repeated after another one may be news: the
                    # call's sequencer decides.
                    digest_of(event) if digest_decides(event) else "",
                    entry,
                    self._dedupe_ms,
                    self.token,
                    self._lease_ms if take else "",
                    _READ_BATCH,
                    _LIFETIME_MS,
                    tenant_key(event.tenant_id or ""),
                    SEEN_DIGESTS,
                    "",  # only the fact of a placed call names the tenant it was placed in
                    MAX_BACKLOG_ENTRIES,
                    MAX_BACKLOG_BYTES,
                    _ringing_arg(event),
                )
            )
        # The pending index, where the reaper finds a call whose owner is lost: written
        # after the entries. A removal either comes after it, and its second look sees
        # the entries (see _unpend), or before it. A call this instance runs is in it
        # already, unless its run ended meanwhile or its lease was taken back after it
        # expired (the reaper may have taken it off): the answers say, and it is then
        # indexed after them.
        held = {call for call in calls if self._holds(call)}
        unsure = [call for call in dict.fromkeys(calls) if call not in held]
        index = ("SADD", keys.pending, *unsure) if unsure else None
        self._taking += len(taking)
        try:
            scripts = await self._answers(commands, then=index)
        except BaseException as exc:
            if taking and isinstance(exc, RedisError):
                # Redis may have given them to this instance: else none runs until its lease ends
                self._ask_again(list(taking), started)
            self._taken(len(taking))
            raise
        late: dict[str, None] = {}
        failure: Exception | None = None
        if index is not None:
            indexed = scripts.pop()
            if isinstance(indexed, Exception):
                failure = indexed
                late = dict.fromkeys(unsure)  # indexed again after the answers
        failed = [n for n, answer in enumerate(scripts) if isinstance(answer, Exception)]
        if failed:
            # What the other scripts kept stands (and a call one took runs here): the
            # failed ones are refused, sent again with the request after its 503.
            failure = scripts[failed[0]]
            log.warning(
                "notifications_not_kept",
                store="redis",
                refused=len(failed),
                kept=len(batch) - len(failed),
                error=str(failure),
            )
            refused = set(failed)
            answered = [n for n in range(len(batch)) if n not in refused]
            batch = [batch[n] for n in answered]
            calls = [calls[n] for n in answered]
            texts = [texts[n] for n in answered]
            scripts = [scripts[n] for n in answered]
        runnable: dict[str, tuple[int, bool]] = {}
        broadcasts: list[tuple[Any, ...]] = []
        for event, call, entry, answer in zip(batch, calls, texts, scripts, strict=True):
            if int(answer[0]) == -1:
                continue  # refused: the call is another tenant's, and nobody is told of it
            # Whoever waits for these (op.wait, collect_digits, ...) may run on any instance.
            if waited_for(event):
                # Every copy goes out (waiters ignore a repeat): a copy retried after a
                # failed first attempt is a repeat here, yet may never have gone out.
                broadcasts.append(
                    (
                        *("XADD", keys.events, "MAXLEN", "~", _EVENTS_MAXLEN, "*"),
                        *("e", entry, "o", self.token),
                    )
                )
            if int(answer[0]) < 0:
                # Refused, its call's backlog full: what a running handler of the call waits
                # for in it (its prompt's outcome) is told all the same, as while draining.
                continue
            who = int(answer[1])
            if who == 3:
                # Nobody runs the call and this instance has no room: the oldest entry waits.
                score, ringing = runnable.get(call, (_stream_id(_text(answer[3]))[0], False))
                runnable[call] = (score, ringing or bool(int(answer[4])))
            if call in held and (who != 1 or int(answer[5])):
                late[call] = None
        follow_up: list[tuple[Any, ...]] = [("SADD", keys.pending, *late)] if late else []
        if runnable:
            follow_up.append(self._wake([(c, *waiting) for c, waiting in runnable.items()]))
        # Sent once the scripts decided: a refused notification must not reach the others.
        follow_up += broadcasts
        return batch, list(zip(scripts, calls, strict=True)), follow_up, len(taking), failure

    def _taken(self, count: int) -> None:
        """``count`` calls asked for are owned now, or were not taken: they no longer count
        against the room as asked for."""
        if count:
            self._taking -= count
            self._slot_freed.set()  # a claim loop waiting for room looks again

    def _free_slots(self) -> int:
        """How many more calls this instance may take on now (none while draining): calls
        asked for by an ingest still awaiting Redis count as taken."""
        if self._draining:
            return 0
        return self._capacity - len(self._owned) + self._lingering - self._taking

    def _holds(self, call: str) -> bool:
        state = self._owned.get(call)
        return state is not None and not state.lost and not state.releasing

    # -- claiming and running calls -------------------------------------------------

    async def _claim_loop(self) -> None:
        keys = self._keys
        pause = _RETRY_PAUSE
        while not self._draining:
            if self._free_slots() <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                # Returns at once while calls wait; then take more of them in the same step.
                popped = await self._pop(keys.runnable)
            except RedisError as exc:
                self._mark(False, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            pause = _RETRY_PAUSE
            if popped:
                with self._claiming_now():
                    await self._claim_step(self._claim_popped(_text(popped[1]), popped[2]))

    async def _claim_popped(self, first: str, score: float) -> None:
        """Claim a call popped off ``runnable``, and as many more as there is room for."""
        started = time.monotonic()
        # Counted again: calls this instance accepted during the wait may have filled it,
        # and a call taken now would wait for a slot while another instance has one.
        free = self._free_slots()
        if free <= 0:
            # (in ``ringing`` still, if its incoming call waits to be answered)
            with contextlib.suppress(RedisError):  # else the reaper wakes it
                await self._script_run(self._wake([(first, score, False)]))
            return
        # Counted against the room until owned, as an ingest's are: none taken twice.
        reserved = min(free, _CLAIM_BATCH)
        self._taking += reserved
        calls = [first]
        try:
            if reserved > 1:
                with contextlib.suppress(RedisError):  # those popped the reaper wakes again
                    calls += _members(
                        await self._batch.run("ZPOPMIN", self._keys.runnable, reserved - 1)
                    )
            answers = await self._claimed(calls, ringing=False)
        finally:
            # Nothing awaits between this and the runs begun below.
            self._taken(reserved)
        await self._run_claimed(calls, answers, started)

    async def _answer_loop(self) -> None:
        """Take each call whose new incoming call waits to be answered with nobody on it,
        whatever this instance's room, as its ingest would have: Graph drops a call not
        answered within 15 s, and its handlers wait for no slot (``_claim_loop`` looks at
        ``runnable`` only with room). One call at a time: the instances waiting take turns.
        An instance with room takes one at once; a full one only a call that rang past
        ``_RING_GRACE_MS`` (an instance with room goes first, and the call is answered)."""
        keys = self._keys
        pause = _RETRY_PAUSE
        while not self._draining:
            if self._free_slots() <= 0:
                await asyncio.sleep(_RING_POLL)
                if self._free_slots() <= 0 and not self._draining:
                    with self._claiming_now():
                        await self._claim_step(self._take_overdue())
                continue
            try:
                popped = await self._pop(keys.ringing)
            except RedisError as exc:
                # Popped perhaps: in ``runnable`` still, and the reaper rings it again.
                self._mark(False, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            pause = _RETRY_PAUSE
            if not popped:
                continue
            with self._claiming_now():
                if self._free_slots() > 0 or self._draining:
                    await self._claim_step(self._answer_popped(_text(popped[1])))
                else:
                    # Filled meanwhile: rung again for an instance with room (or for this
                    # one, past the grace).
                    wake = self._wake([(_text(popped[1]), popped[2], True)])
                    await self._claim_step(self._script_run(wake))

    async def _take_overdue(self) -> None:
        """Take, with no room, a call that rang past the grace: no instance with room took
        it."""
        overdue = _cmd(_scripts.OVERDUE, (self._keys.ringing,), _RING_GRACE_MS)
        call = await self._script_run(overdue)
        if call is not None:
            await self._answer_popped(_text(call))

    async def _answer_popped(self, call: str) -> None:
        """Claim a call popped off ``ringing`` while its incoming call waits to be answered."""
        started = time.monotonic()
        self._taking += 1  # counted against the room until owned, as any claim
        try:
            answers = await self._claimed([call], ringing=True)
        finally:
            self._taken(1)  # nothing awaits between this and the run begun below
        await self._run_claimed([call], answers, started)

    def _ask_again(self, calls: list[str], started: float) -> None:
        """Ask CLAIM again, in the background, for the calls an INGEST sent at ``started``
        (a notification's, or a fact's) asked to take, its answer lost: the lease it may have
        taken is answered as CLAIM answers its own (see ``_claimed``). Closing, none is asked:
        such a call goes to another instance when its lease runs out, as a crashed one's."""
        if self._closing:
            return
        task = asyncio.get_running_loop().create_task(
            self._claim_again(calls, started), name="callbot-store-ask-again"
        )
        self._asked_again.add(task)
        task.add_done_callback(self._asked_again.discard)

    async def _claim_again(self, calls: list[str], started: float) -> None:
        # Its step made here, not by _ask_again: cancelled before it began, nothing is left.
        await self._claim_step(self._run_asked_again(calls, started))

    async def _run_asked_again(self, calls: list[str], started: float) -> None:
        """Run, or while draining hand over, what CLAIM asked again gives this instance."""
        self._taking += len(calls)  # counted against the room until answered
        try:
            answers = await self._claimed(calls, ringing=False, again=True)
        finally:
            self._taken(len(calls))  # nothing awaits between this and the runs begun below
        await self._run_claimed(calls, answers, started)

    async def _takes_end(self) -> None:
        """Wait until no round trip asking for calls is under way (a drain starts none), nor
        an ask again for them."""
        while self._taking > 0:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        # Each was made while its ingest's count stood: none is made from here on.
        if self._asked_again:
            await asyncio.wait(self._asked_again)

    async def _claim_step(self, step: Awaitable[Any]) -> None:
        """A claim loop's step; a failure is logged, and the loop goes on."""
        try:
            await step
        except RedisError as exc:
            # A claim is asked again until closing; a call popped and not claimed, the reaper
            # wakes again from the pending index.
            self._mark(False, exc)
        except Exception:
            log.exception("store_claim_failed")
            await asyncio.sleep(_RETRY_PAUSE)

    @contextlib.contextmanager
    def _claiming_now(self) -> Iterator[None]:
        """A claim loop's step from a popped call to its run or hand-over: a drain lets it
        end (cancelled, a CLAIM run by Redis would leave a lease nobody uses)."""
        task = asyncio.current_task()
        assert task is not None
        self._claiming.add(task)
        try:
            yield
        finally:
            self._claiming.discard(task)

    async def _claimed(
        self, calls: Sequence[str], *, ringing: bool, again: bool = False
    ) -> list[Any]:
        """The CLAIM answers for ``calls``, asked again until they come: a CLAIM whose answer
        was lost may have taken a lease, which the ask again answers (only closing stops it).
        ``again``: the first ask is one again already (an ingest's answer was lost)."""
        pause = _STEADY_PAUSE
        while True:
            try:
                answers = await self._run_all(
                    [self._claim(call, ringing=ringing, again=again) for call in calls]
                )
            except RedisError as exc:
                again = True
                pause = await self._wait_after(exc, pause)
                continue
            self._mark(True)
            return answers

    async def _run_claimed(
        self, calls: Sequence[str], answers: Sequence[Any], started: float
    ) -> None:
        """Run the calls CLAIM gave this instance; draining, hand them straight over (ringing
        still, if their incoming call waits to be answered)."""
        back: list[_Owned] = []
        for call, answer in zip(calls, answers, strict=True):
            if not answer:
                continue
            epoch = int(answer[0])
            owned = self._owned.get(call)
            if owned is not None and owned.epoch == epoch:
                continue  # another take of this instance got the same lease, and runs it
            if self._draining:
                fed = _text(answer[3])
                back.append(
                    _Owned(
                        call,
                        epoch=epoch,
                        lease=f"{self.token}/{epoch}",
                        deadline=started + self._lease_ms / 1000,
                        fed_before=_stream_id(fed) if fed else None,
                    )
                )
            else:
                self._begin_claimed(call, started, answer)
        for state in back:
            # Nothing of it ran here: the fed mark goes back to where the claim found it.
            with contextlib.suppress(RedisError):  # only closing: its lease runs out
                await self._release(state, handover=True, ran=_last_handed(state))

    def _claim(self, call: str, *, ringing: bool = False, again: bool = False) -> tuple[Any, ...]:
        """The script taking a call that waits with nobody on it (``ringing``: only while its
        incoming call waits to be answered; ``again``: the last ask's answer was lost)."""
        return _cmd(
            _scripts.CLAIM,
            self._keys.of(call, "inbox", "lease", "fence", "call"),
            self.token,
            self._lease_ms,
            _READ_BATCH,
            _LIFETIME_MS,
            "1" if ringing else "",
            "1" if again else "",
        )

    def _begin_claimed(self, call: str, started: float, answer: Any) -> None:
        """Run a call a CLAIM script gave this instance (its answer: what the acquisition
        read; a fifth value when it was answered again, taking nothing)."""
        self._begin(
            call,
            started,
            epoch=int(answer[0]),
            stored=_text(answer[1]),
            entries=_entries(answer[2]),
            fed=_text(answer[3]),
            taken_now=len(answer) < 5,
        )

    def _begin_taken(self, call: str, started: float, answer: Any) -> None:
        """Run a call the INGEST script gave this instance (its answer: fresh, who, entry,
        then what the acquisition read)."""
        self._begin(
            call,
            started,
            epoch=int(answer[3]),
            stored=_text(answer[4]),
            entries=_entries(answer[5]),
            fed=_text(answer[6]),
        )

    def _begin(
        self,
        call: str,
        started: float,
        *,
        epoch: int,
        stored: str,
        entries: list[tuple[str, str]],
        fed: str,
        taken_now: bool = True,
    ) -> None:
        previous = self._owned.get(call)
        if previous is not None and previous.epoch == epoch:
            return  # begun already: a CLAIM asked again was answered the lease an ingest took
        state = _Owned(
            call,
            epoch=epoch,
            lease=f"{self.token}/{epoch}",
            deadline=started + self._lease_ms / 1000,
            fed_before=_stream_id(fed) if fed else None,
        )
        if entries and taken_now:
            state.marked = _stream_id(entries[0][0])  # the acquisition noted the first one
        # Else the first is noted before it is fed, held to the lease: a run of this instance
        # may have given that lease up after Redis answered, and its handlers must not run again.
        if previous is not None:
            # The old run lost its lease and is still winding down: let it, then go on.
            runner = self._own_after(previous, state)
        else:
            runner = self._own(state, stored, entries)
        state.task = asyncio.get_running_loop().create_task(
            runner, name=f"callbot-store-call-{call}"
        )
        self._owned[call] = state

    async def _own_after(self, previous: _Owned, state: _Owned) -> None:
        if previous.task is not None:
            await asyncio.gather(previous.task, return_exceptions=True)
        self._owned[state.key] = state
        await self._own(state, None, [])

    async def _own(self, state: _Owned, stored: str | None, entries: list[tuple[str, str]]) -> None:
        try:
            await self._run_call(state, stored, entries)
            if state.outstanding:
                # A run may end (its lease lost) while it fed handlers past a held event: the
                # call's next run here waits for them, so a call's handlers never overlap.
                await state.idle.wait()
        except RedisError as exc:
            # Only while closing: until then every step is retried while the lease may hold.
            log.warning("call_run_interrupted", call_key=state.key, error=str(exc))
        except Exception:
            log.exception("call_run_failed", call_key=state.key)
        finally:
            record = self._sequencer.evict(state.key)
            for held in record.held if record is not None else ():
                self._dropped(held)  # the inbox keeps it for the call's next run
            if self._owned.get(state.key) is state:
                del self._owned[state.key]
            if self._running.get(state.key) is state:
                del self._running[state.key]
            if len(self._parsed) > _PARSED_LIMIT:
                # entries another instance took over; parsing them again costs little
                self._parsed.clear()
            self._slot_freed.set()

    async def _run_call(
        self, state: _Owned, stored: str | None, first: list[tuple[str, str]]
    ) -> None:
        """Feed the call's inbox through the sequencer, acknowledging as handlers finish."""
        key = state.key
        self._running[key] = state
        if stored is None:
            stored, first = await self._steady(self._load_call, key)
        record = self._resting_record(key, stored)
        if record is not None:
            # The lifecycle resumes its keep-alive: the instance that kept it may be gone.
            self._sequencer.adopt(record)
        else:
            # Nothing stored (a failover lost it): the run starts from no state.
            self._sequencer.start_over(key)
            self._index_again([key])
        # A call with no record stored gets one at its first entry: an instance taking it
        # over then starts from its snapshot, not from nothing.
        unsaved = not stored
        buffer = state.buffer
        self._take(state, first)
        while not state.lost:
            holding = self._holding(key)
            if state.outstanding and not holding:
                # While events are held, entries go on being fed as handlers run (draining
                # too): the one a held event waits for must reach the sequencer in its window.
                await state.idle.wait()
                continue
            fed = state.fed
            owing = not holding and fed is not None and fed != state.acked
            if (
                fed is not None
                and owing
                and (unsaved or self._draining or state.owed >= _ACK_EVERY)
            ):
                coming = buffer[-1][0] if buffer else ""
                read_on = not buffer and not self._draining
                if read_on:
                    state.looked = state.signals
                outcome, more = await self._checkpoint(state, fed, read_on=read_on, next_id=coming)
                if not outcome:
                    return
                unsaved = False
                self._take(state, more)
                continue
            if self._draining and not holding:
                # A hold is waited out first (its predecessor or its window): entries past a
                # held one may have run, so only a call holding nothing is handed over
                # acknowledged, and what this run did not feed goes on as news.
                await self._release(state, handover=True, ran=_last_handed(state))
                return
            if buffer:
                entry_id, item = buffer[0]
                unnoted = _stream_id(entry_id) > state.marked
                # Noted before its handlers run, so a takeover knows it is a re-run; and
                # nothing new is fed on a lease that may have run out without a renewal.
                if (unnoted or time.monotonic() > state.deadline) and not await self._note_fed(
                    state, buffer[-1][0]
                ):
                    return
                buffer.popleft()
                self._feed(state, entry_id, item)
                continue
            if holding:
                # Wait for the window to close or for the missing predecessor to arrive.
                state.changed.clear()
                await _until(state.changed, self._hold_poll)
                state.looked = state.signals
                self._take(state, await self._steady(self._read, key, fed))
                continue
            if owing:
                record = self._sequencer.record(key)
                ended = record is not None and record.closed
            else:
                ended = state.saved is not None and state.saved[1].closed
            if state.signals == state.looked and not ended:
                # Nothing to do: keep the call a moment, as its next notification often
                # follows at once (sparing a checkpoint, a release, a pending-index update
                # and a take). Meanwhile it does not count against this instance's room,
                # and what this instance accepts for it is fed by the ingest (_hand).
                state.changed.clear()
                self._lingering += 1
                state.waiting = True
                try:
                    await _until(state.changed, self._linger)
                finally:
                    state.waiting = False
                    self._lingering -= 1
                if state.fed != fed:
                    continue  # fed meanwhile: acknowledged once it rests (or the bound hits)
            if buffer or self._draining or state.outstanding:
                continue
            if fed is not None and owing:
                # Acknowledged, and the call given up in the same step unless entries wait.
                state.looked = state.signals
                outcome, more = await self._checkpoint(
                    state, fed, read_on=True, next_id="", release=True
                )
                if not outcome:
                    return
                if outcome == 2:
                    await self._unpend(key, ended=ended)
                    return
                self._take(state, more)
                continue
            if state.signals == state.looked:
                gave_up = await self._release(state, handover=False)
                if gave_up == 1:
                    await self._unpend(key, ended=ended)
                if gave_up != 0:
                    return
            state.looked = state.signals
            self._take(state, await self._steady(self._read, key, fed))

    def _take(self, state: _Owned, entries: Sequence[tuple[str, str | events.Event]]) -> None:
        """Buffer entries the run does not know yet (a read may repeat what it has), each as
        the event this instance parsed when it has one, else parsed as it is taken."""
        for entry_id, item in entries:
            number = _stream_id(entry_id)
            if number > state.tail:
                parsed = self._parsed.pop((state.key, entry_id), None)
                if parsed is None:
                    parsed = self._read_elsewhere(item)
                state.buffer.append((entry_id, item if parsed is None else parsed))
                state.tail = number

    def _read_elsewhere(self, item: str | events.Event) -> events.Event | None:
        """An entry this instance did not accept (or no longer keeps parsed), parsed as it is
        taken: what a handler may wait for in it (an operation's outcome, the call's end) is
        told at once. Its relay may not have reached this instance (it started later, or let
        an outcome go unmatched), and a handler waiting here (one run again after a takeover,
        its journal replaying the action) holds the entries behind it."""
        if not isinstance(item, str):
            return item
        try:
            if decode_fact(item) is not None:
                return None
            event = decode_entry(item)
        except Exception:
            return None  # fed as read: _feed says why it cannot be
        if waited_for(event):
            self._tell(event)  # told twice when relayed too: what waits is resolved once
        return event

    async def _load_call(self, key: str) -> tuple[str, list[tuple[str, str]]]:
        inbox = self._keys.of(key, "inbox")[0]
        stored, entries = await self._run_all(
            [("GET", self._keys.record(key)), ("XRANGE", inbox, "-", "+", "COUNT", _READ_BATCH)]
        )
        return (_text(stored) if stored else ""), _entries(entries)

    async def _read(self, key: str, after: str | None) -> list[tuple[str, str]]:
        start = "-" if after is None else "(" + after
        inbox = self._keys.of(key, "inbox")[0]
        entries = await self._batch.run("XRANGE", inbox, start, "+", "COUNT", _READ_BATCH)
        return _entries(entries)

    def _holding(self, key: str) -> bool:
        record = self._sequencer.record(key)
        return record is not None and record.holding

    def _may_hand(self, state: _Owned) -> bool:
        """Whether an entry that follows all the run knows may be fed by the ingest: the
        run waits for it with nothing outstanding, and its lease surely holds."""
        return (
            state.waiting
            and not state.buffer
            and not state.outstanding
            and not state.lost
            and not state.releasing
            and not self._draining
            and state.owed < _ACK_EVERY
            and time.monotonic() < state.deadline
            and not self._holding(state.key)
        )

    def _hand(self, state: _Owned, entry_id: str, event: events.Event) -> None:
        """Feed an entry as the run would, without waking it: the ingest noted it as fed."""
        state.tail = max(state.tail, _stream_id(entry_id))
        self._feed(state, entry_id, event)
        record = self._sequencer.record(state.key)
        if state.owed >= _ACK_EVERY or record is None or record.closed or record.holding:
            state.changed.set()  # the run acknowledges, gives the call up or waits out a hold

    def _feed(self, state: _Owned, entry_id: str, item: str | events.Event) -> None:
        key = state.key
        state.fed = entry_id
        state.owed += 1
        if isinstance(item, str):
            try:
                fact = decode_fact(item)
                if fact is not None:
                    # No handler runs for it: acknowledged with the next checkpoint.
                    self._sequencer.note(fact)
                    return
                event = decode_entry(item)
            except Exception as exc:
                # Acknowledged with the next checkpoint: it can never be read.
                log.error("inbox_entry_unreadable", call_key=key, entry=entry_id, error=repr(exc))
                return
        else:
            event = item
        redelivered = state.fed_before is not None and _stream_id(entry_id) <= state.fed_before
        if redelivered:
            log.info("notification_redelivered", call_key=key, entry=entry_id, epoch=state.epoch)
        attempt = Attempt(key, entry_id, state.epoch, redelivered, journal=self._journal)
        self._attempts[id(event.raw)] = (event, attempt)
        self._sequencer.accept(event)
        record = self._sequencer.record(key)
        if record is None or not any(held is event for held in record.held):
            self._attempts.pop(id(event.raw), None)  # delivered or dropped: nothing waits

    def _dropped(self, event: events.Event) -> None:
        self._attempts.pop(id(event.raw), None)

    def _deliver(self, delivery: Delivery) -> None:
        kept = self._attempts.pop(id(delivery.event.raw), None)
        if kept is not None:
            # built directly: dataclasses.replace looks the fields up at every call
            delivery = Delivery(
                delivery.event,
                delivery.snapshot,
                delivery.roster,
                delivery.life,
                kept[1],
                delivery.size,
            )
        state = self._running.get(delivery.event.call_key)
        if state is not None:
            state.outstanding += 1
            state.idle.clear()
            if not state.waiting:  # else fed by the ingest (_hand), which wakes it if need be
                state.changed.set()
            # The run that fed it is told, even if a newer run of the call has begun.
            self._in_flight[id(delivery)] = state
        if self._drained:
            # The dispatcher was joined: left unfinished (unacknowledged), the next owner runs it.
            log.warning(
                "notification_handed_over",
                call_id=delivery.life.call_id,
                kind=type(delivery.event).__name__,
                reason="released after the shutdown deadline",
            )
            return
        self._dispatcher.submit(delivery, done=self._delivered)

    def _delivered(self, delivery: Delivery) -> None:
        state = self._in_flight.pop(id(delivery), None)
        if state is not None:
            state.outstanding -= 1
            if state.outstanding == 0:
                state.idle.set()

    async def _checkpoint(
        self, state: _Owned, entry_id: str, *, read_on: bool, next_id: str, release: bool = False
    ) -> tuple[int, list[tuple[str, str]]]:
        """Acknowledge entries up to ``entry_id`` with the record as it stands now.

        With ``read_on``, also read the entries that wait; with ``release`` too, give the
        call up if none does. The outcome: 0, the lease was lost; 1, acknowledged (with
        what was read); 2, acknowledged and given up. Retried across failures and
        reconnects: the script's fencing decides.
        """
        key = state.key
        record = self._sequencer.record(key)
        payload = "" if record is None else encode_record(record)
        ended = record is not None and record.closed
        done = [
            f for f in state.journaled if _stream_id(f.partition("/")[0]) <= _stream_id(entry_id)
        ]
        if done:
            state.journaled = [f for f in state.journaled if f not in done]
        command = _cmd(
            _scripts.CHECKPOINT,
            self._keys.of(key, "inbox", "lease", "fence", "call", "journal"),
            state.lease,
            state.epoch,
            _after(entry_id),
            payload,
            "1" if ended else "0",
            self._ended_ms,
            self._lease_ms,
            _LIFETIME_MS,
            "1" if read_on else "0",
            _READ_BATCH,
            next_id,
            "1" if release else "0",
            *done,
        )
        # Given up, ingests here index the call as pending again (see _append).
        state.releasing = release
        try:
            started, answer = await self._steady_script(command)
        finally:
            state.releasing = False
        outcome = int(answer[0])
        if not outcome:
            self._lose(state, "checkpoint_refused")
            return 0, []
        state.acked = entry_id
        if state.fed == entry_id:
            state.owed = 0
        entries = _entries(answer[1]) if len(answer) > 1 else []
        noted = next_id or (entries[0][0] if entries else "")
        if noted:
            state.marked = max(state.marked, _stream_id(noted))
        if record is not None:
            state.saved = (payload, record)
            self._index(key, record)
        if outcome == 2:
            state.releasing = True  # a renewal refused from now on only means it is released
            self._rest(state)
        else:
            self._extend(state, started)
        return outcome, entries

    async def _steady_script(self, command: tuple[Any, ...]) -> tuple[float, Any]:
        """When a script was sent, and its answer: as ``_steady`` retries it, without two
        coroutines more per command."""
        pause = _STEADY_PAUSE
        while True:
            started = time.monotonic()
            try:
                (answer,) = await self._run_all((command,))
            except RedisError as exc:
                pause = await self._wait_after(exc, pause)
                continue
            self._mark(True)
            return started, answer

    async def _note_fed(self, state: _Owned, entry_id: str) -> bool:
        command = _cmd(
            _scripts.MARK,
            self._keys.of(state.key, "lease", "fence"),
            state.lease,
            state.epoch,
            self._lease_ms,
            entry_id,
        )
        started, answer = await self._steady_script(command)
        if not int(answer):
            self._lose(state, "mark_refused")
            return False
        self._extend(state, started)
        state.marked = max(state.marked, _stream_id(entry_id))
        return True

    def _index(self, key: str, record: CallRecord) -> None:
        """Keep the ``active`` index (outside the scripts: it lives in a slot of its own).

        Written with the next upkeep round, many calls in one command: the index only
        serves listing calls and taking them up again after a restart.
        """
        self._letting_go.discard(key)
        if record.closed:
            self._known.pop(key, None)
            self._indexed.pop(key, None)
            self._index_changes[key] = False
        else:
            self._known[key] = record
            indexed, proven = self._indexed.get(key), record.life.proven
            # Again once proven: an instance that let it go unproven may have taken it off.
            if indexed is None or (proven and not indexed):
                self._indexed[key] = proven
                self._index_changes[key] = True

    def _index_again(self, calls: Sequence[str]) -> None:
        """Redis may have lost what the ``active`` index held of ``calls``: each still
        going goes into it again with the next upkeep round (the first checkpoint does
        not: it writes only what changed since the call was last indexed)."""
        for key in calls:
            proven = self._indexed.pop(key, None)
            if proven is not None and key not in self._index_changes:
                self._indexed[key] = proven
                self._index_changes[key] = True

    async def _let_go_pending(self) -> None:
        """Take the calls let go while pending off the ``active`` index, then look at each
        again: one stored proven, or held by another instance's run, goes back (a proof
        stored later indexes it again too: see ``_index``)."""
        if not self._letting_go:
            return
        calls, self._letting_go = list(self._letting_go), set()
        keys = self._keys
        try:
            await self._batch.run("SREM", keys.active, *calls)
            looks = await self._run_all(
                [("GET", name) for call in calls for name in keys.of(call, "lease", "call")]
            )
            mine = self.token + "/"
            kept = [
                call
                for call, lease, stored in zip(calls, looks[::2], looks[1::2], strict=True)
                if (lease and not _text(lease).startswith(mine))
                or (stored and stored_proven(_text(stored)))
            ]
            if kept:
                await self._batch.run("SADD", keys.active, *kept)
        except RedisError:
            # Taken off and looked at again with the next round.
            self._letting_go.update(call for call in calls if call not in self._indexed)
            raise

    async def _expire_indexes(self) -> None:
        """The shared indexes expire a day after the last instance that touched them."""
        keys = self._keys
        shared = [keys.pending, keys.unpending, keys.active, keys.events]
        await self._run_all(
            [("PEXPIRE", key, _LIFETIME_MS) for key in (*shared, keys.runnable, keys.ringing)]
        )

    async def _flush_indexes(self) -> None:
        changes, self._index_changes = self._index_changes, {}
        ended, self._ended_pending = self._ended_pending, set()
        added = [call for call, active in changes.items() if active]
        removed = [call for call, active in changes.items() if not active]
        commands: list[tuple[Any, ...]] = []
        if added:
            commands.append(("SADD", self._keys.active, *added))
        if removed:
            commands.append(("SREM", self._keys.active, *removed))
        if ended:
            commands.append(("SREM", self._keys.pending, *ended))
        try:
            await self._run_all(commands)
        except RedisError:
            # Written with the next round; a newer change of a call wins.
            self._index_changes = {**changes, **self._index_changes}
            self._ended_pending |= ended
            raise

    async def _prolong(self) -> None:
        """Renew the keys of the calls kept alive since the last round: a call goes on while
        Graph accepts its keep-alives, though no notification of it came for a day."""
        calls, self._kept_alive = self._kept_alive, set()
        lives = [self._lifecycle.get(call) for call in calls]
        going = [life.key for life in lives if life is not None and not life.ended]
        try:
            await self._run_all(
                [
                    ("PEXPIRE", key, _LIFETIME_MS)
                    for call in going
                    for key in self._keys.of(call, "inbox", "fence", "call", "tenant")
                ]
            )
        except RedisError:
            self._kept_alive.update(going)  # renewed with the next round
            raise

    async def _keep(self) -> None:
        """Renew the keeper lease of each call this instance keeps alive, and take that of
        each established call nobody keeps alive (its keeper stopped, crashed, or lost its
        lease to a pause): one live instance sends each call's keep-alives. Whether the call
        goes on is the lifecycle's to say; the lease only says who sends.

        Every ``_keep_every`` seconds (see :func:`keeper_timing`), never on a notification's
        way."""
        now = time.monotonic()
        if not self._settings.keep_alive or now < self._next_keep:
            return
        # half a tick early: a round woken a little before its time does not wait another
        self._next_keep = now + self._keep_every - self._tick / 2
        if not self._draining:
            # Calls known not established when last read may be now: read once a look, not
            # with every sync (a sender inventing calls would decide how many reads that is).
            await self._read_known([c for c, k in self._known.items() if k.phase < LIVE_PHASE])
        lifecycle = self._lifecycle
        held: list[str] = []
        going: list[str] = []
        for call in self._keeping:
            life = lifecycle.get(call)
            (held if life is not None and life.established else going).append(call)
        # Calls to take up, with the record they are known from when this instance has no
        # established life of them (another instance ran them): none while draining.
        wanted: dict[str, CallRecord | None] = {}
        if not self._draining:
            for life in lifecycle.active():
                if life.established and life.key not in self._keeping:
                    wanted[life.key] = None
            for call, known in self._known.items():
                if call in self._keeping or call in wanted:
                    continue
                if known.phase != LIVE_PHASE or known.closed:
                    continue
                life = lifecycle.get(call)
                # One that ended here, or that this instance let go, is left to the others.
                if not (life.ended if life is not None else lifecycle.knows(call)):
                    wanted[call] = known
        keys = self._keys
        asked = [*held, *wanted]
        self._asking.update(wanted)
        answers = await self._run_all(
            [
                *(
                    _cmd(_scripts.KEEP, keys.of(c, "keeper"), self.token, self._keeper_ms)
                    for c in asked
                ),
                *(_cmd(_scripts.KEEP, keys.of(c, "keeper"), self.token, "") for c in going),
            ]
        )
        self._keeping.difference_update(going)
        self._asking.clear()
        taken = 0
        for call, holds in zip(asked, answers[: len(asked)], strict=True):
            if not int(holds):
                if call in self._keeping:
                    # Another instance took it (this one was cut off past the lease).
                    self._keeping.discard(call)
                    lifecycle.keeper_changed(call)
                    self._lines.info("keep_alive_moved", call_key=call)
                continue
            if call in self._keeping:
                continue
            record, life = wanted[call], lifecycle.get(call)
            if (
                record is not None
                and call not in self._owned
                and (life is None or not (life.ended or life.established))
            ):
                # Known from the shared index only: taken up as on a start (see _rehydrate).
                lifecycle.adopt(
                    record.call_id,
                    phase=record.phase,
                    state=record.state,
                    ended=False,
                    proven=record.life.proven,
                )
            self._keeping.add(call)
            lifecycle.keeper_changed(call)
            taken += 1
        if taken:
            log.info("keep_alives_taken", count=taken)

    async def _unpend(self, key: str, *, ended: bool = False) -> None:
        """Take a call whose inbox was empty off the pending index, unless work came back."""
        if ended:
            # What still comes is dropped as after the end: no need to look again, and
            # the removal can wait for the next upkeep round.
            self._ended_pending.add(key)
            return
        try:
            await self._take_off([key])
        except RedisError as exc:
            log.info("pending_index_deferred", call_key=key, error=str(exc))

    async def _take_off(self, calls: Sequence[str]) -> int:
        """Take calls off the pending index and look at them again; how many of them it
        made runnable."""
        keys = self._keys
        # Moved aside, not dropped: should this instance stop before its second look,
        # the reaper looks in its place.
        moves = [(call, self._generation()) for call in calls]
        moved = await self._run_all(
            [
                _cmd(_scripts.UNPEND, (keys.pending, keys.unpending), call, generation)
                for call, generation in moves
            ]
        )
        aside = [move for move, done in zip(moves, moved, strict=True) if int(done)]
        return await self._settle(aside) if aside else 0

    def _generation(self) -> str:
        """A name for one move of a call off the pending index, used by no other move."""
        self._moves += 1
        return f"{self.token}/{self._moves}"

    async def _settle(self, calls: Sequence[tuple[str, str]]) -> int:
        """The second look at calls taken off the pending index (with the generation of
        that move): an entry appended before the removal is seen here, one appended
        after it indexed the call again itself. How many calls it made runnable."""
        keys = self._keys
        probes = await self._run_all(
            [_cmd(_scripts.PROBE, keys.of(call, "inbox", "lease", "fence")) for call, _ in calls]
        )
        waiting: list[tuple[str, float, bool]] = []
        settled: list[Any] = []
        for (call, generation), probe in zip(calls, probes, strict=True):
            if int(probe[0]) == 1:
                waiting.append((call, _stream_id(_text(probe[1]))[0], bool(int(probe[2]))))
            settled += [call, generation, "1" if int(probe[0]) else "0"]
        # A call with work goes back into ``pending`` in the step that takes it out of
        # ``unpending``: stopped at any point, the reaper still finds it.
        commands = [self._wake(waiting)] if waiting else []
        commands.append(_cmd(_scripts.SETTLE, (keys.pending, keys.unpending), *settled))
        answers = await self._run_all(commands)
        return int(answers[0]) if waiting else 0

    def _wake(self, waiting: Sequence[tuple[str, float, bool]]) -> tuple[Any, ...]:
        """The script making calls runnable, each scored by its oldest waiting entry (ms),
        and ringing too if its incoming call waits to be answered: a script that runs when
        Redis is full, since handing a call over frees memory."""
        return _cmd(
            _scripts.WAKE,
            (self._keys.runnable, self._keys.ringing),
            *[
                part
                for call, score, ringing in waiting
                for part in (score, call, "1" if ringing else "0")
            ],
        )

    def _resting_record(self, key: str, stored: str) -> CallRecord | None:
        resting = self._resting.pop(key, None)
        if not stored:
            return None
        if resting is not None and resting[0] == stored:
            return resting[1]
        return _decode_record(key, stored)

    async def _release(self, state: _Owned, *, handover: bool, ran: str | None = None) -> int:
        state.releasing = True
        try:
            answer = await self._steady(
                self._script_run,
                _cmd(
                    _scripts.RELEASE,
                    self._keys.of(state.key, "inbox", "lease", "fence"),
                    state.lease,
                    state.epoch,
                    self._lease_ms,
                    "1" if handover else "0",
                    ran or "",
                ),
            )
        finally:
            state.releasing = False
        outcome = int(answer[0])
        state.releasing = outcome > 0  # a renewal refused from now on only means it is released
        if outcome == -1:
            self._lose(state, "release_refused")
        elif outcome == 1:
            self._rest(state)
        elif outcome == 2:
            waiting = (state.key, _stream_id(_text(answer[1]))[0], bool(int(answer[2])))
            with contextlib.suppress(RedisError):  # else the reaper wakes it
                await self._script_run(self._wake([waiting]))
        return outcome

    def _rest(self, state: _Owned) -> None:
        """Keep the record of a call given up, as stored: the next run here need not
        decode it again."""
        if state.saved is not None and not state.saved[1].closed:
            if len(self._resting) >= _RESTING_LIMIT:
                self._resting.clear()
            self._resting[state.key] = state.saved

    def _extend(self, state: _Owned, started: float) -> None:
        """A step of the run sent at ``started`` was accepted: its lease holds from then."""
        # Leases are timed on the real clock (time.monotonic), not the loop's: Redis expires
        # them in real time, whatever a test's simulated time says.
        state.deadline = max(state.deadline, started + self._lease_ms / 1000)

    def _lose(self, state: _Owned, why: str) -> None:
        if state.lost:
            return
        state.lost = True
        state.changed.set()
        log.warning(
            "call_lease_lost",
            call_key=state.key,
            reason=why,
            epoch=state.epoch,
            detail="another instance runs this call's unacknowledged notifications again",
        )

    # -- upkeep: leases, the reaper, the list of calls --------------------------------

    async def _maintain_loop(self) -> None:
        last_sync = time.monotonic()
        while True:
            refusals = self._refusals
            try:
                if not self._rehydrated:
                    await self._prepare()
                await self._follow_primary()
                await self._renew()  # first: once Redis is back, owners keep their calls
                await self._index_step(self._flush_indexes)
                await self._prolong()
                await self._keep()
                await self._index_step(self._let_go_pending)
                await self._reap()
                if time.monotonic() - last_sync >= _SYNC_SECONDS:
                    await self._sync_known()
                    last_sync = time.monotonic()
                # The reaper's SET, at least, was taken, unless a refusal came while this
                # round ran (its writes may have gone before Redis filled up).
                self._mark(True, wrote=self._refusals == refusals)
            except RedisError as exc:
                self._mark(False, exc)
            except ConfigurationError as exc:
                # Reached only now, and unfit: unready until a fit server answers.
                if self._unfit is None:
                    log.error("store_unusable", store="redis", error=str(exc))
                self._mark(False, exc)
                self._unfit = exc
            except Exception:
                log.exception("store_upkeep_failed")
            await asyncio.sleep(self._tick if self._reachable else _STEADY_PAUSE)

    async def _index_step(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run a step writing the ``active`` or ``pending`` index. A write Redis refuses
        (full, read-only) is noted, not raised: the step's writes are tried again with the
        next round, and what follows (handing calls over, waking them) runs all the same."""
        try:
            await step()
        except RedisError as exc:
            if not _refuses_writes(exc):
                raise
            self._mark(False, exc)

    async def _follow_primary(self) -> None:
        for client in (self._redis, self._blocking):
            await follow_primary(client)

    async def _renew_one(self, state: _Owned) -> bool:
        """Whether the run still holds its call, extending its lease if so."""
        command = _cmd(
            _scripts.RENEW,
            self._keys.of(state.key, "lease", "fence"),
            state.lease,
            state.epoch,
            self._lease_ms,
        )
        started, renewed = await self._steady_script(command)
        if not int(renewed):
            self._lose(state, "renewal_refused")
            return False
        self._extend(state, started)
        return True

    async def _renew(self) -> None:
        # A run giving its call up is not renewed: its lease is going.
        held = [state for state in self._owned.values() if not state.lost and not state.releasing]
        if not held:
            await self._batch.run("PING")
            return
        started = time.monotonic()
        renewed = await self._run_all(
            [
                _cmd(
                    _scripts.RENEW,
                    self._keys.of(state.key, "lease", "fence"),
                    state.lease,
                    state.epoch,
                    self._lease_ms,
                )
                for state in held
            ]
        )
        for state, ok in zip(held, renewed, strict=True):
            if int(ok):
                self._extend(state, started)
            elif self._owned.get(state.key) is state and not state.releasing:
                self._lose(state, "renewal_refused")

    async def _reap(self) -> None:
        keys = self._keys
        # One instance reaps per round; the others would only repeat its work.
        turn = max(int(self._tick * 1000), 10)
        try:
            mine = await self._batch.run("SET", keys.reaper, self.token, "NX", "PX", turn)
        except RedisError as exc:
            if not _refuses_writes(exc):
                raise
            # Full: noted (the SET is the round's proof that Redis takes writes), and the
            # calls of an instance lost meanwhile are woken all the same.
            self._mark(False, exc)
            mine = await self._script_run(_cmd(_scripts.TURN, (keys.reaper,), self.token, turn))
        if not mine:  # "OK", or the script's 1
            return
        woken = 0
        async for calls in self._scan("SSCAN", keys.pending):
            probes = await self._run_all(
                [_cmd(_scripts.PROBE, keys.of(call, "inbox", "lease", "fence")) for call in calls]
            )
            waiting: list[tuple[str, float, bool]] = []
            idle: list[str] = []
            for call, probe in zip(calls, probes, strict=True):
                if int(probe[0]) == 1:
                    waiting.append((call, _stream_id(_text(probe[1]))[0], bool(int(probe[2]))))
                elif int(probe[0]) == 0:
                    idle.append(call)
            if waiting:
                woken += int(await self._script_run(self._wake(waiting)))
            if idle:
                woken += await self._take_off(idle)
        # Calls an instance took off the index and stopped before looking at them again.
        async for pairs in self._scan("HSCAN", keys.unpending):
            woken += await self._settle(list(zip(pairs[::2], pairs[1::2], strict=True)))
        await self._expire_indexes()
        if woken:
            log.info("calls_reclaimed", count=woken, detail="their owner's lease expired")

    async def _scan(self, command: str, key: str) -> AsyncIterator[list[str]]:
        """A set's members (``SSCAN``) or a hash's fields and values, flat (``HSCAN``), a
        few hundred at a time (one may come twice)."""
        cursor: Any = 0
        while True:
            cursor, found = await self._batch.run(command, key, cursor, "COUNT", 200)
            if isinstance(found, dict):  # a hash's answer, as redis-py shapes it
                found = [part for pair in found.items() for part in pair]
            if found:
                yield [_text(member) for member in found]
            if int(cursor) == 0:
                return

    async def _load_records(self, calls: Sequence[str]) -> dict[str, CallRecord | None]:
        found: dict[str, CallRecord | None] = {}
        values = await self._run_all([("GET", self._keys.record(call)) for call in calls])
        for call, value in zip(calls, values, strict=True):
            found[call] = _decode_record(call, _text(value)) if value else None
        return found

    def known(self, call_key: str) -> CallRecord | None:
        """The record of a call this instance runs, or last read from Redis."""
        return self._sequencer.record(call_key) or self._known.get(call_key)

    def _forgotten(self, call_key: str, reason: str) -> None:
        if reason == "gone":
            # Graph no longer knows the call: no instance should count or rehydrate it
            # (taken off the index with the next upkeep round, as an ended call is).
            self._known.pop(call_key, None)
            self._indexed.pop(call_key, None)
            self._letting_go.discard(call_key)
            self._index_changes[call_key] = False
        elif reason in PENDING_LET_GO and self._indexed.pop(call_key, None) is not None:
            # Let go where it ran or was taken up (elsewhere it is known only from the
            # index, and let go here alone): no instance lists or rehydrates it, unless it
            # is real after all (see _let_go_pending).
            self._known.pop(call_key, None)
            self._resting.pop(call_key, None)
            self._index_changes.pop(call_key, None)
            self._letting_go.add(call_key)
        elif call_key not in self._owned:
            # Ended where another instance ran it: that instance takes it off the index.
            self._indexed.pop(call_key, None)

    async def _rehydrate(self) -> None:
        """Know the calls that are going on again, with their snapshots; resume keep-alives."""
        members = await self._batch.run("SMEMBERS", self._keys.active)
        calls = sorted(_text(call) for call in members)
        records = await self._load_records(calls)
        gone = [call for call, record in records.items() if record is None]
        if gone:
            await self._batch.run("SREM", self._keys.active, *gone)
        established = 0
        for call, record in records.items():
            if record is None or record.closed:
                continue
            self._known[call] = record
            if not record.life.proven:
                # Taken up pending: when its time is up here, this instance takes it off the
                # index (its instance may have restarted before letting it go).
                self._indexed[call] = False
            # Kept alive by whichever instance holds its keeper lease, or takes it (_keep).
            life = self._lifecycle.adopt(
                record.call_id,
                phase=record.phase,
                state=record.state,
                ended=False,
                proven=record.life.proven,
            )
            established += life.established
        self._rehydrated = True
        log.info("calls_rehydrated", count=len(self._known), established=established)

    async def _sync_known(self) -> None:
        members = {_text(call) for call in await self._batch.run("SMEMBERS", self._keys.active)}
        for call in list(self._known):
            if call not in members and call not in self._owned:
                del self._known[call]
        await self._read_known([call for call in members if call not in self._known])

    async def _read_known(self, calls: Sequence[str]) -> None:
        """Read the records of calls this instance does not run, and know them as they are."""
        calls = [call for call in calls if call not in self._owned]
        if calls:
            for call, record in (await self._load_records(calls)).items():
                if record is not None and not record.closed:
                    self._known[call] = record
                elif call not in self._owned:
                    self._known.pop(call, None)

    # -- operation outcomes, tones and call ends, from every instance ---------------

    async def _events_loop(self) -> None:
        stream = self._keys.events
        last: str | None = None
        pause = _RETRY_PAUSE
        while True:
            try:
                if last is None:
                    # Start after what is there now: earlier outcomes have no waiter here.
                    tail = await self._blocking.xrevrange(stream, "+", "-", 1)
                    last = str(tail[0][0]) if tail else "0-0"
                block = int(_BLOCK_SECONDS * 1000)
                if isinstance(self._blocking, RedisCluster):
                    answer: Any = await self._blocking.xread({stream: last}, count=256, block=block)
                else:
                    # sent and read as the batcher does: redis-py's packing and reply
                    # callbacks cost more than the entries themselves
                    answer = await _one_command(
                        self._blocking.connection_pool,
                        ("XREAD", "COUNT", 256, "BLOCK", block, "STREAMS", stream, last),
                    )
            except Exception as exc:
                if isinstance(exc, RedisError):
                    self._mark(False, exc)
                else:
                    # redis-py's internals broke with the connection (from Python 3.12 on,
                    # asyncio's writelines on a connection closed meanwhile raises TypeError):
                    # read again rather than stop relaying for good.
                    log.exception("store_events_failed")
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
                continue
            pause = _RETRY_PAUSE
            for _name, entries in answer or ():
                for entry_id, fields in entries:
                    last = str(entry_id)
                    try:
                        self._relay(fields)
                    except Exception:
                        log.exception("store_event_failed", entry=last)

    def _relay(self, fields: Any) -> None:
        if not isinstance(fields, dict):
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        if fields.get("o") == self.token:
            return  # this instance told itself when it accepted it (see ingest)
        try:
            event = decode_entry(fields["e"])
        except Exception as exc:
            log.error("store_event_unreadable", error=repr(exc))
            return
        self._tell(event)

    def _tell(self, event: events.Event) -> None:
        """Resolve what waits here for an operation outcome, a tone, a call established or
        its end."""
        if self._lifecycle.belongs_elsewhere(event.call_id, event.tenant_id):
            # Told before the store refused it: what waits here is the call's own tenant's.
            return
        # An end ends waits and keep-alives here now; the owner delivers it in order.
        tell_waiting(event, self._lifecycle, self._outcomes)
        if isinstance(event, events.CallTerminated):
            known = self._known.get(event.call_key)
            if known is not None and event.call_key not in self._owned:
                del self._known[event.call_key]

    # -- plumbing -------------------------------------------------------------------

    async def _prepare(self) -> None:
        """What a first answer from Redis allows: check the server (once it passed, not
        again), load the scripts, take up the calls still going on."""
        if not self._server_checked:
            try:
                info = await self._redis.info()
            except ResponseError as exc:  # INFO is not this ACL user's, or was renamed away
                log.info("store_server_unchecked", store="redis", error=str(exc))
                info = {}
            warning = server_fitness(info)
            self._server_checked, self._unfit = True, None
            if warning is not None:
                log.warning("store_may_lose_calls", store="redis", **warning)
        await self._load_scripts()
        await self._rehydrate()

    async def _load_scripts(self) -> None:
        for script in _scripts.ALL:
            await self._redis.script_load(script.source)

    async def _script_run(self, command: tuple[Any, ...]) -> Any:
        """One command's answer (its error raised)."""
        return (await self._run_all((command,)))[0]

    async def _run_all(
        self, commands: Sequence[tuple[Any, ...]], *, then: tuple[Any, ...] | None = None
    ) -> list[Any]:
        """The answers of commands sent together (see :meth:`_answers`); the first error
        is raised. ``then``'s answer is not returned."""
        answers = await self._answers(commands, then=then)
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers[: len(commands)]

    async def _answers(
        self, commands: Sequence[tuple[Any, ...]], *, then: tuple[Any, ...] | None = None
    ) -> list[Any]:
        """The answers of commands sent together, then ``then``'s if given: an error Redis
        answers is one of them (a round trip that failed raises, nothing being known).

        Scripts missing from the server (it restarted or failed over) are loaded and
        those commands sent again. ``then`` takes effect after every one of ``commands``
        has, those sent again included.
        """
        if not commands:
            if then is None:
                return []
            (answer,) = await self._batch.submit((then,))
            return [answer]
        if then is not None and not self._batch.ordered:
            # A Cluster's nodes run a pipeline in no common order: ``then`` goes after the
            # answers, also after a failure (what landed is covered all the same).
            try:
                answers = await self._answers(commands)
            except RedisError:
                with contextlib.suppress(RedisError):  # the first failure is the one raised
                    await self._batch.run(*then)
                raise
            try:
                answers.append(await self._batch.run(*then))
            except RedisError as exc:
                answers.append(exc)  # the commands' answers are known all the same
            return answers
        last = [then] if then is not None else []
        answers = await self._batch.submit([*commands, *last])
        missing = [
            n
            for n, answer in enumerate(answers[: len(commands)])
            if isinstance(answer, NoScriptError)
        ]
        if missing:
            # Redis lost its scripts (it restarted or failed over): its indexes too, maybe.
            self._index_again(list(self._indexed))
            await self._load_scripts()
            again = await self._batch.submit([*(commands[n] for n in missing), *last])
            for n, answer in zip(missing, again, strict=False):
                answers[n] = answer
            answers[len(commands) :] = again[len(missing) :]
        return answers

    async def _steady(self, step: Any, *args: Any) -> Any:
        """``step(*args)``, retried while Redis fails (the lease may still hold; scripts
        are fenced, so a late attempt can do no harm). Only closing stops it.

        Tried again soon: once Redis is back, the first instance to reach a call whose
        lease ran out meanwhile takes it over, and the owner had better be first."""
        pause = _STEADY_PAUSE
        while True:
            try:
                result = await step(*args)
            except RedisError as exc:
                pause = await self._wait_after(exc, pause)
                continue
            self._mark(True)
            return result

    async def _wait_after(self, failure: RedisError, pause: float) -> float:
        """A steady step failed: raised again when closing, else waited ``pause`` for; the
        pause before the next attempt."""
        self._mark(False, failure)
        if self._closing:
            raise failure
        await asyncio.sleep(pause)
        return min(pause * 2, _STEADY_PAUSE * 5)

    def _mark(
        self, reachable: bool, error: BaseException | None = None, *, wrote: bool = False
    ) -> None:
        """What a round trip says of Redis: answered (``wrote``: a write of it was taken) or
        failed with ``error``."""
        if error is not None and _refuses_writes(error):
            self._writes_refused = True
            self._refusals += 1
        elif wrote:
            self._writes_refused = False
        if reachable == self._reachable or (
            reachable and (self._unfit is not None or self._writes_refused)
        ):
            return
        self._reachable = reachable
        if reachable:
            log.info("store_reachable", store="redis")
        else:
            log.warning("store_unreachable", store="redis", error=str(error or ""))


class _Journal:
    """The action journal (``callbot._journal``) kept in each call's ``journal`` hash."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    async def admits(self, attempt: Attempt) -> bool:
        store = self._store
        state = store._running.get(attempt.call_key)
        if state is None or state.epoch != attempt.epoch or state.lost:
            return False
        if time.monotonic() < state.deadline:
            return True
        # The lease may have run out (the process was paused, Redis was away): ask.
        return await store._renew_one(state)

    async def recall(self, attempt: Attempt, step: int) -> dict[str, Any] | None:
        store = self._store
        journal = store._keys.of(attempt.call_key, "journal")[0]
        found = await store._batch.run("HGET", journal, f"{attempt.entry}/{step}")
        return None if found is None else dict(json.loads(found))

    async def record(self, attempt: Attempt, step: int, outcome: dict[str, Any]) -> None:
        store = self._store
        name = f"{attempt.entry}/{step}"
        command = _cmd(
            _scripts.RECORD,
            store._keys.of(attempt.call_key, "fence", "journal"),
            attempt.epoch,
            name,
            json.dumps(outcome, separators=(",", ":")),
            _LIFETIME_MS,
        )
        try:
            # Retried while Redis is away, as the run's other steps: an action Graph carried
            # out and left unrecorded would be sent again by a later re-run. Fenced by epoch.
            _, kept = await store._steady_script(command)
        except RedisError as exc:
            # Only while closing: the action went out, a re-run would send it again.
            log.warning("graph_action_not_recorded", call_key=attempt.call_key, error=str(exc))
            return
        state = store._running.get(attempt.call_key)
        if int(kept) and state is not None and state.epoch == attempt.epoch:
            state.journaled.append(name)
        elif not int(kept):
            # A negative step is a collection of digits (graph._digits), not a Graph action.
            what = "digits_after_takeover" if step < 0 else "graph_action_after_takeover"
            log.warning(what, call_key=attempt.call_key, step=step)

    async def tones_after(self, attempt: Attempt) -> list[events.ToneReceived]:
        # The entries after the run's own were never acknowledged (acknowledgement goes in
        # order), so the inbox still has every one of them.
        store, key = self._store, attempt.call_key
        tones: list[events.ToneReceived] = []
        after = attempt.entry
        for _ in range(_EARLIER_BATCHES):
            try:
                entries = await store._steady(store._read, key, after)
            except RedisError as exc:
                # Only while closing: the collection goes on with the keys pressed from now.
                log.warning("earlier_tones_unread", call_key=key, error=str(exc))
                break
            for entry_id, text in entries:
                event = store._parsed.get((key, entry_id))
                if event is None:
                    if not any(name in text for name in _TONE_KEYS):
                        continue  # no tone: not built (a roster of a large meeting takes 100 ms)
                    with contextlib.suppress(Exception):  # the run logs it when it feeds it
                        event = decode_entry(text)
                    await asyncio.sleep(0)  # one entry built per turn of the loop
                if isinstance(event, events.ToneReceived) and len(tones) < SEEN_DIGESTS:
                    tones.append(event)
            if len(entries) < _READ_BATCH:
                break
            after = entries[-1][0]
        return tones


_WRITE_REFUSAL = re.compile(r"(?:^|-)(?:OOM|READONLY|MISCONF|NOREPLICAS) ")
"""The codes of Redis's refusals of writes (a script's error names its command's code
after a dash on Redis 6; redis-py strips the code of the classes it maps)."""


def _refuses_writes(error: BaseException) -> bool:
    """Whether Redis refused a write for a state of its own that reads do not share."""
    if isinstance(error, OutOfMemoryError | ReadOnlyError):
        return True
    return isinstance(error, ResponseError) and _WRITE_REFUSAL.search(str(error)) is not None


async def _until(event: asyncio.Event, seconds: float) -> None:
    """Wait for ``event`` at most ``seconds`` (no task of its own, unlike wait_for)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


async def _cancelled(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again those that go on.

    On Python 3.11 a cancellation that arrives as an ``asyncio.timeout`` inside
    redis-py expires can be taken for that timeout, and the task reads on.
    """
    pending = set(tasks)
    for _ in range(20):
        if not pending:
            return
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=0.5)
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: a task that failed on the way out says nothing
    log.warning("store_tasks_left_running", tasks=len(pending))


def _ringing_arg(event: events.Event) -> str:
    """What the ingest notes of a call's ringing: ``1`` for a new incoming call (left to
    others, it is taken whatever the room), ``0`` for a later state (answered, redirected
    or ended, it is taken as any call: its handler may run on long after)."""
    if type(event) is events.IncomingCall:
        return "1"
    if isinstance(event, events.CallStateChanged) and event.state != "incoming":
        return "0"
    return ""


def _members(popped: Any) -> list[str]:
    """Members from ZPOPMIN, as pairs or as a flat list."""
    if popped and isinstance(popped[0], list | tuple):
        return [_text(member) for member, _score in popped]
    return [_text(member) for member in popped[::2]]
