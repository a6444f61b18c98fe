"""The Redis store: several instances behind a load balancer, one truth.

Graph posts a call's notifications to whichever instance the balancer picks.
Every instance appends what it accepts to the call's inbox in Redis (a Lua
script that also drops exact repeats), and answers 202 only once Redis has it.
Whoever holds the call's lease runs the call: it feeds the inbox, in order,
through the same :class:`~callbot._sequencing.Sequencer` the in-memory store
uses, with the call's record loaded from Redis; runs the handlers; and
acknowledges each entry, saving the record, once its handlers finished. A
crashed instance's leases expire and its calls move to the others, which run
the unacknowledged entries again. docs/scaling.md has the whole design.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, RedisError

from .. import events
from .._config import Settings
from .._dispatch import Dispatcher
from .._errors import StoreUnavailable
from .._lifecycle import Lifecycle
from .._log import get_logger
from .._sequencing import CallRecord, Delivery, Sequencer
from . import _scripts
from ._base import Outcomes
from ._codec import decode_entry, decode_record, digest_of, encode_entry, encode_record

__all__ = ["RedisStore"]

log = get_logger("callbot.store")

_READ_BATCH = 64
"""Inbox entries read at once."""
_CLAIM_BATCH = 32
"""Calls taken in one step at most."""
_PARSED_LIMIT = 10_000
_RESTING_LIMIT = 10_000
"""Bounds of the caches that spare parsing an entry or decoding a record again."""
_BLOCK_SECONDS = 1.0
"""How long a blocking read waits; below the socket timeout, so a wait is never an error."""
_SOCKET_TIMEOUT = 3.0
_EVENTS_MAXLEN = 10_000
"""Roughly how many operation outcomes, tones and call ends the shared events stream keeps."""
_ACTIVE_RECORD_MS = 24 * 3600 * 1000
"""A record of a call that never ended is dropped after a day without notifications."""
_MIN_DEDUPE_MS = 10 * 60 * 1000
"""Exact repeats are dropped at least this long after the first copy (Graph's retries)."""
_SYNC_SECONDS = 2.0
"""How often the list of the cluster's active calls is refreshed."""
_RETRY_PAUSE = 0.2
"""How long a background loop waits after Redis failed it."""
_MAX_CONNECTIONS = 64
"""Connections to Redis per instance; requests beyond wait for one."""


@dataclass(eq=False)
class _Owned:
    """A call this instance holds the lease of."""

    key: str
    deadline: float
    """Monotonic time after which the lease may have expired in Redis."""
    outstanding: int = 0
    """Deliveries handed to the dispatcher whose handlers have not finished."""
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    lost: bool = False
    releasing: bool = False
    """A release is on its way: a renewal refused meanwhile only means it went through."""
    task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.idle.set()


class _Keys:
    """Key names (the scripts name the same keys from the prefix; see ``_scripts``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.runnable = prefix + "runnable"
        self.active = prefix + "active"
        self.events = prefix + "events"
        self.reaper = prefix + "reaper"

    def inbox(self, call: str) -> str:
        return f"{self.prefix}inbox:{call}"

    def record(self, call: str) -> str:
        return f"{self.prefix}call:{call}"


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


def _decode_record(call: str, stored: str) -> CallRecord | None:
    try:
        return decode_record(stored)
    except Exception as exc:
        # The call goes on from a fresh record rather than not at all.
        log.error("call_record_unreadable", call_key=call, error=repr(exc))
        return None


def _after(entry_id: str) -> str:
    """The smallest stream id greater than ``entry_id`` (XTRIM MINID keeps it and later)."""
    millis, _, sequence = entry_id.partition("-")
    return f"{millis}-{int(sequence or 0) + 1}"


class RedisStore:
    """Keeps calls and their accepted notifications in Redis, shared by every instance.

    ``url`` is a ``redis://`` (or ``rediss://``, ``unix://``) URL. Keys start
    with ``prefix`` (by default ``callbot:{app_id}:``, so bots can share a
    server). ``settings.store_lease`` is how long a crashed instance's calls
    wait before the others take them over.
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
        self._keys = _Keys(prefix if prefix is not None else f"callbot:{settings.app_id}:")
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        """This instance's name in the leases it holds."""
        self._lease_ms = max(int(settings.store_lease * 1000), 100)
        self._grace_ms = max(int(settings.termination_grace * 1000), 1000)
        self._dedupe_ms = max(_MIN_DEDUPE_MS, self._grace_ms)
        self._tick = min(settings.store_lease / 3, 1.0)
        self._hold_poll = min(0.02, max(settings.reorder_window / 10, 0.002))
        self._capacity = settings.max_concurrent_handlers
        # Requests beyond the pool wait for a connection; one retry, then a 503 at once.
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=_MAX_CONNECTIONS,
            timeout=_SOCKET_TIMEOUT,
            decode_responses=True,
            protocol=2,
            socket_timeout=_SOCKET_TIMEOUT,
            socket_connect_timeout=_SOCKET_TIMEOUT,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
        )
        self._redis: aioredis.Redis = aioredis.Redis(connection_pool=self._pool)
        self._sequencer = Sequencer(
            self._deliver, lifecycle, reorder_window=settings.reorder_window
        )
        lifecycle.when_forgotten(self._forgotten)
        self._owned: dict[str, _Owned] = {}
        self._known: dict[str, CallRecord] = {}
        self._own_counts: Counter[str] = Counter()
        self._parsed: dict[tuple[str, str], events.Event] = {}
        """Events this instance accepted for calls it runs, by call and inbox entry id."""
        self._resting: dict[str, tuple[str, CallRecord]] = {}
        """Records of calls this instance gave up, as stored, in case it takes them again."""
        self._running: dict[str, _Owned] = {}
        """The run feeding each call now (a new lease may wait for an old run to end)."""
        self._in_flight: dict[int, _Owned] = {}
        """The run that fed each delivery still in the dispatcher (by the delivery's id)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._claimer: asyncio.Task[None] | None = None
        self._slot_freed = asyncio.Event()
        self._reachable = False
        self._rehydrated = False
        self._draining = False

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
        """Load the scripts and the calls still going on; start claiming calls."""
        try:
            await self._load_scripts()
            await self._rehydrate()
            self._mark(True)
        except RedisError as exc:
            # Serve anyway: /readyz fails and callbacks get 503 until Redis is back.
            self._mark(False, exc)
        loop = asyncio.get_running_loop()
        self._claimer = loop.create_task(self._claim_loop(), name="callbot-store-claim")
        self._tasks = [
            self._claimer,
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
            try:
                answers = await self._append(batch)
            except NoScriptError:
                # Redis restarted or failed over: its script cache is empty.
                await self._load_scripts()
                answers = await self._append(batch)
        except RedisError as exc:
            self._mark(False, exc)
            raise StoreUnavailable(f"the Redis store cannot be reached: {exc}") from exc
        self._mark(True)
        for event, answer in zip(batch, answers, strict=True):
            if not int(answer[0]):
                self._own_counts["duplicate"] += 1
                log.info(
                    "notification_dropped",
                    call_id=event.call_id,
                    reason="duplicate",
                    kind=type(event).__name__,
                )
                continue
            owner = int(answer[1])
            if owner == 0:
                continue
            # This instance runs the call: it need not parse the entry again.
            self._parsed[event.call_key, _text(answer[2])] = event
            if owner == 2:
                self._begin(event.call_key, started, _text(answer[3]), _entries(answer[4]))
            else:
                state = self._running.get(event.call_key)
                if state is not None:
                    state.changed.set()  # a held call need not wait for its next look

    def active_records(self) -> list[CallRecord]:
        """The calls of every instance that have not ended (refreshed every few seconds)."""
        return [record for record in self._known.values() if not record.closed]

    async def drain(self, timeout: float) -> None:
        """Stop claiming; let each held call finish its running entry, then hand it over."""
        self._draining = True
        if self._claimer is not None:
            self._claimer.cancel()
        owners = [state.task for state in self._owned.values() if state.task is not None]
        for state in self._owned.values():
            state.changed.set()
        if owners:
            await asyncio.wait(owners, timeout=max(timeout, 0.001))

    async def close(self) -> None:
        """Stop every task, hand the calls still held over to the others, disconnect."""
        self._draining = True
        owners = [state.task for state in self._owned.values() if state.task is not None]
        tasks = [*self._tasks, *owners]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        left = list(self._owned.values())
        self._owned.clear()
        for state in left:
            # Their entries were not acknowledged; another instance runs them again.
            with contextlib.suppress(RedisError, OSError):
                await self._release(state, handover=True)
        self._sequencer.close()
        await self._redis.aclose()
        await self._pool.disconnect()
        log.info("store_closed", store="redis", handed_over=len(left))

    # -- accepting ----------------------------------------------------------------

    async def _append(self, batch: Sequence[events.Event]) -> list[Any]:
        room = len(self._owned) < self._capacity and not self._draining
        taking: set[str] = set()
        calls: list[list[Any]] = []
        for event in batch:
            call = event.call_key
            # Whoever waits for these (op.wait, collect_digits, ...) may run on any instance.
            broadcast = isinstance(
                event, events.OperationUpdated | events.CallTerminated | events.ToneReceived
            )
            # Only the first item of a call in this batch may take it on.
            take = room and call not in self._owned and call not in taking
            if take:
                taking.add(call)
            calls.append(
                [
                    self._keys.prefix,
                    call,
                    # A roster repeated after another one is news: the sequencer decides.
                    "" if isinstance(event, events.ParticipantsUpdated) else digest_of(event),
                    encode_entry(event),
                    self._dedupe_ms,
                    "1" if broadcast else "0",
                    _EVENTS_MAXLEN,
                    self.token,
                    self._lease_ms if take else "",
                    _READ_BATCH,
                ]
            )
        sha = _scripts.INGEST.sha
        if len(calls) == 1:
            return [await self._redis.evalsha(sha, 0, *calls[0])]
        pipe = self._redis.pipeline(transaction=False)
        for args in calls:
            pipe.evalsha(sha, 0, *args)
        return list(await pipe.execute())

    # -- claiming and running calls -------------------------------------------------

    async def _claim_loop(self) -> None:
        keys = self._keys
        while not self._draining:
            free = self._capacity - len(self._owned)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                # Returns at once while calls wait; then take more of them in the same step.
                popped = await self._redis.bzpopmin(keys.runnable, timeout=_BLOCK_SECONDS)
                if not popped:
                    continue
                started = time.monotonic()
                claimed: Any = await self._script(
                    _scripts.CLAIM,
                    keys.prefix,
                    self.token,
                    self._lease_ms,
                    min(free, _CLAIM_BATCH) - 1,
                    _READ_BATCH,
                    str(popped[1]),
                )
            except RedisError as exc:
                # A popped call is not lost: the reaper wakes it again.
                self._mark(False, exc)
                await asyncio.sleep(_RETRY_PAUSE)
                continue
            except Exception:
                log.exception("store_claim_failed")
                await asyncio.sleep(_RETRY_PAUSE)
                continue
            self._mark(True)
            for call, stored, entries in claimed:
                self._begin(str(call), started, str(stored), _entries(entries))

    def _begin(
        self, call: str, started: float, stored: str, entries: list[tuple[str, str]]
    ) -> None:
        state = _Owned(call, deadline=started + self._lease_ms / 1000)
        previous = self._owned.get(call)
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
        except RedisError as exc:
            # The lease runs out; the reaper then hands the call to another instance.
            self._mark(False, exc)
            log.warning("call_run_interrupted", call_key=state.key, error=str(exc))
        except Exception:
            log.exception("call_run_failed", call_key=state.key)
        finally:
            self._sequencer.evict(state.key)
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
            stored, first = await self._load_call(key)
        record = self._resting_record(key, stored)
        if record is not None:
            # The lifecycle resumes its keep-alive: the instance that kept it may be gone.
            self._sequencer.adopt(record)
        else:
            self._sequencer.evict(key)
        fed: str | None = None
        acked: str | None = None
        buffer = deque(first)
        while not state.lost:
            if state.outstanding:
                await state.idle.wait()
                continue
            holding = self._holding(key)
            if not holding and fed is not None and fed != acked:
                outcome = await self._checkpoint(state, fed, read_on=not buffer)
                if outcome is None:
                    return
                acked = fed
                released, more = outcome
                if released:
                    return
                buffer.extend(more)
                continue
            if self._draining:
                await self._release(state, handover=True)
                return
            if buffer:
                entry_id, text = buffer.popleft()
                fed = entry_id
                self._feed(key, entry_id, text)
                continue
            if holding:
                # Wait for the window to close or for the missing predecessor to arrive.
                state.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.changed.wait(), self._hold_poll)
                buffer.extend(await self._read(key, after=fed))
                continue
            if await self._release(state, handover=False) != 0:
                return
            buffer.extend(await self._read(key, after=fed))

    async def _load_call(self, key: str) -> tuple[str, list[tuple[str, str]]]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._keys.record(key))
        pipe.xrange(self._keys.inbox(key), "-", "+", _READ_BATCH)
        stored, entries = await pipe.execute()
        return (_text(stored) if stored else ""), _entries(entries)

    async def _read(self, key: str, *, after: str | None) -> list[tuple[str, str]]:
        start = "-" if after is None else "(" + after
        entries: Any = await self._redis.xrange(self._keys.inbox(key), start, "+", _READ_BATCH)
        return _entries(entries)

    def _holding(self, key: str) -> bool:
        record = self._sequencer.record(key)
        return record is not None and record.holding

    def _feed(self, key: str, entry_id: str, text: str) -> None:
        event = self._parsed.pop((key, entry_id), None)
        if event is None:
            try:
                event = decode_entry(text)
            except Exception as exc:
                # Acknowledged with the next checkpoint: it can never be read.
                log.error("inbox_entry_unreadable", call_key=key, entry=entry_id, error=repr(exc))
                return
        self._sequencer.accept(event)

    def _deliver(self, delivery: Delivery) -> None:
        state = self._running.get(delivery.event.call_key)
        if state is not None:
            state.outstanding += 1
            state.idle.clear()
            state.changed.set()
            # The run that fed it is told, even if a newer run of the call has begun.
            self._in_flight[id(delivery)] = state
        self._dispatcher.submit(delivery, done=self._delivered)

    def _delivered(self, delivery: Delivery) -> None:
        state = self._in_flight.pop(id(delivery), None)
        if state is not None:
            state.outstanding -= 1
            if state.outstanding == 0:
                state.idle.set()

    async def _checkpoint(
        self, state: _Owned, entry_id: str, *, read_on: bool
    ) -> tuple[bool, list[tuple[str, str]]] | None:
        """Acknowledge entries up to ``entry_id`` with the record as it stands now.

        With ``read_on``, also give the call up if nothing else waits (``(True, [])``),
        else read what does (``(False, entries)``). ``None``: the lease was lost.
        """
        key = state.key
        record = self._sequencer.record(key)
        payload = "" if record is None else encode_record(record)
        started = time.monotonic()
        state.releasing = read_on
        try:
            answer: Any = await self._script(
                _scripts.CHECKPOINT,
                self._keys.prefix,
                key,
                self.token,
                _after(entry_id),
                payload,
                "1" if record is not None and record.closed else "0",
                self._grace_ms,
                self._lease_ms,
                _ACTIVE_RECORD_MS,
                "1" if read_on else "0",
                _READ_BATCH,
            )
        finally:
            state.releasing = False
        if not int(answer[0]):
            self._lose(state, "checkpoint_refused")
            return None
        state.deadline = started + self._lease_ms / 1000
        if record is not None:
            if record.closed:
                self._known.pop(key, None)
            else:
                self._known[key] = record
        released = len(answer) > 1 and bool(int(answer[1]))
        if released and record is not None and not record.closed:
            # Left exactly as stored: the next run here need not decode it again.
            if len(self._resting) >= _RESTING_LIMIT:
                self._resting.clear()
            self._resting[key] = (payload, record)
        return released, _entries(answer[2]) if len(answer) > 2 else []

    def _resting_record(self, key: str, stored: str) -> CallRecord | None:
        resting = self._resting.pop(key, None)
        if not stored:
            return None
        if resting is not None and resting[0] == stored:
            return resting[1]
        return _decode_record(key, stored)

    async def _release(self, state: _Owned, *, handover: bool) -> int:
        state.releasing = True
        try:
            outcome = await self._script(
                _scripts.RELEASE,
                self._keys.prefix,
                state.key,
                self.token,
                "1" if handover else "0",
            )
        finally:
            state.releasing = False
        if outcome == -1:
            self._lose(state, "release_refused")
        return int(outcome)

    def _lose(self, state: _Owned, why: str) -> None:
        if state.lost:
            return
        state.lost = True
        state.changed.set()
        log.warning(
            "call_lease_lost",
            call_key=state.key,
            reason=why,
            detail="another instance may run this call's unacknowledged notifications again",
        )

    # -- upkeep: leases, the reaper, the list of calls --------------------------------

    async def _maintain_loop(self) -> None:
        last_sync = time.monotonic()
        while True:
            try:
                if not self._rehydrated:
                    await self._load_scripts()
                    await self._rehydrate()
                await self._renew()
                await self._reap()
                if time.monotonic() - last_sync >= _SYNC_SECONDS:
                    await self._sync_known()
                    last_sync = time.monotonic()
                self._mark(True)
            except RedisError as exc:
                self._mark(False, exc)
            except Exception:
                log.exception("store_upkeep_failed")
            now = time.monotonic()
            for state in list(self._owned.values()):
                if now > state.deadline:
                    self._lose(state, "not_renewed")
            await asyncio.sleep(self._tick)

    async def _renew(self) -> None:
        held = [state for state in self._owned.values() if not state.lost]
        if not held:
            await self._redis.ping()
            return
        started = time.monotonic()
        renewed = await self._script(
            _scripts.RENEW,
            self._keys.prefix,
            self.token,
            self._lease_ms,
            *(state.key for state in held),
        )
        for state, ok in zip(held, renewed, strict=True):
            if ok:
                state.deadline = started + self._lease_ms / 1000
            elif self._owned.get(state.key) is state and not state.releasing:
                self._lose(state, "renewal_refused")

    async def _reap(self) -> None:
        keys = self._keys
        # One instance reaps per round; the others would only repeat its work.
        mine = await self._redis.set(
            keys.reaper, self.token, nx=True, px=max(int(self._tick * 1000), 10)
        )
        if not mine:
            return
        cursor = "0"
        woken = 0
        while True:
            cursor, count = await self._script(_scripts.REAP, keys.prefix, cursor, 200)
            woken += int(count)
            if str(cursor) == "0":
                break
        if woken:
            log.info("calls_reclaimed", count=woken, detail="their owner's lease expired")

    async def _load_records(self, calls: Sequence[str]) -> dict[str, CallRecord | None]:
        found: dict[str, CallRecord | None] = {}
        for start in range(0, len(calls), 500):
            chunk = list(calls[start : start + 500])
            values = await self._redis.mget([self._keys.record(call) for call in chunk])
            for call, value in zip(chunk, values, strict=True):
                found[call] = _decode_record(call, _text(value)) if value else None
        return found

    def known(self, call_key: str) -> CallRecord | None:
        """The record of a call this instance runs, or last read from Redis."""
        return self._sequencer.record(call_key) or self._known.get(call_key)

    def _forgotten(self, call_key: str, reason: str) -> None:
        if reason == "gone":
            # Graph no longer knows the call: no instance should count or rehydrate it.
            task = asyncio.get_running_loop().create_task(self.forget(call_key))
            self._tasks.append(task)

    async def forget(self, call_key: str) -> None:
        """Take the call off the active set, so no instance rehydrates it again."""
        self._known.pop(call_key, None)
        try:
            await self._redis.srem(self._keys.active, call_key)
        except (RedisError, OSError) as exc:
            # Its record still expires a day after its last notification.
            log.warning("forget_failed", call_key=call_key, error=str(exc))

    async def _rehydrate(self) -> None:
        """Know the calls that are going on again, with their snapshots; resume keep-alives."""
        calls = sorted(_text(call) for call in await self._redis.smembers(self._keys.active))
        records = await self._load_records(calls)
        gone = [call for call, record in records.items() if record is None]
        if gone:
            await self._redis.srem(self._keys.active, *gone)
        resumed = 0
        for call, record in records.items():
            if record is None or record.closed:
                continue
            self._known[call] = record
            life = self._lifecycle.adopt(
                record.call_id, phase=record.phase, state=record.state, ended=False
            )
            resumed += life.keeping_alive
        self._rehydrated = True
        log.info("calls_rehydrated", count=len(self._known), keep_alives=resumed)

    async def _sync_known(self) -> None:
        members = {_text(call) for call in await self._redis.smembers(self._keys.active)}
        for call in list(self._known):
            if call not in members and call not in self._owned:
                del self._known[call]
        new = [call for call in members if call not in self._known]
        if new:
            for call, record in (await self._load_records(new)).items():
                if record is not None and not record.closed:
                    self._known[call] = record

    # -- operation outcomes, tones and call ends, from every instance ---------------

    async def _events_loop(self) -> None:
        stream = self._keys.events
        last: str | None = None
        while True:
            try:
                if last is None:
                    # Start after what is there now: earlier outcomes have no waiter here.
                    tail = await self._redis.xrevrange(stream, "+", "-", 1)
                    last = str(tail[0][0]) if tail else "0-0"
                answer: Any = await self._redis.xread(
                    {stream: last}, count=256, block=int(_BLOCK_SECONDS * 1000)
                )
            except RedisError as exc:
                self._mark(False, exc)
                await asyncio.sleep(_RETRY_PAUSE)
                continue
            for _name, entries in answer or ():
                for entry_id, fields in entries:
                    last = str(entry_id)
                    try:
                        self._relay(fields)
                    except Exception:
                        log.exception("store_event_failed", entry=last)

    def _relay(self, fields: dict[str, str]) -> None:
        try:
            event = decode_entry(fields["e"])
        except Exception as exc:
            log.error("store_event_unreadable", error=repr(exc))
            return
        if isinstance(event, events.OperationUpdated):
            self._outcomes.on_operation(event)
        elif isinstance(event, events.ToneReceived):
            self._outcomes.on_tone(event)
        elif isinstance(event, events.CallTerminated):
            # Waits and keep-alives here end now; the owner delivers the termination in order.
            self._lifecycle.end(event.call_id, event.result_info)
            known = self._known.get(event.call_key)
            if known is not None and event.call_key not in self._owned:
                del self._known[event.call_key]

    # -- plumbing -------------------------------------------------------------------

    async def _load_scripts(self) -> None:
        for script in _scripts.ALL:
            await self._redis.script_load(script.source)

    async def _script(self, script: _scripts.Script, *args: Any) -> Any:
        try:
            return await self._redis.evalsha(script.sha, 0, *args)
        except NoScriptError:
            await self._redis.script_load(script.source)
            return await self._redis.evalsha(script.sha, 0, *args)

    def _mark(self, reachable: bool, error: BaseException | None = None) -> None:
        if reachable == self._reachable:
            return
        self._reachable = reachable
        if reachable:
            log.info("store_reachable", store="redis")
        else:
            log.warning("store_unreachable", store="redis", error=str(error or ""))
