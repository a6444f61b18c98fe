"""The Redis store's cheaper paths: packing, entry encoding, acknowledging bursts, and
fencing a run that gave its call up (one redis-server on 127.0.0.1, in process)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot
from structlog.testing import capture_logs

from benchmarks._inproc import InProcessBot
from benchmarks.bench_store import measure
from benchmarks.security_figures import held_behind_a_blocked_handler
from callbot import events
from callbot._lifecycle import LIVE_PHASE, CallLife, Lifecycle
from callbot._parse import parse_payload
from callbot._sequencing import SEEN_DIGESTS, CallRecord, Sequencer
from callbot.store import _redis, _scripts
from callbot.store._codec import decode_entry, decode_record, encode_entry, encode_record
from callbot.testing import FakeGraph
from callbot.testing import builders as b

from .test_redis import KEY_PREFIX, rdb, redis_server, redis_url, wait_for

__all__ = ["rdb", "redis_server", "redis_url"]  # fixtures this module uses


def test_commands_are_packed_alike_in_c_and_in_python() -> None:
    pytest.importorskip("hiredis")
    commands = [
        ("EVALSHA", "a" * 40, 2, "p:{c}:inbox", "p:{c}:lease", "", "é" * 3, 600_000, -1),
        ("ZADD", "p:runnable", "NX", 1.5, "c", b"\x00raw"),
        ("PING",),
    ]
    assert _redis._pack_hiredis(commands) == _redis._pack_python(commands)


def test_an_entry_reads_back_exactly_whatever_json_it_holds() -> None:
    item = b.call_state("c", "established")
    item["resourceData"]["futureProperty"] = {
        "huge": 2**70,  # beyond 64 bits
        "overflow": math.inf,  # what a literal like 1e400 parses to
        "lone": "\ud800",
        "accents": "éà",
        "nothing": None,
    }
    (event,) = parse_payload(b.notifications(item))
    again = decode_entry(encode_entry(event))
    assert again.raw == event.raw
    plain = b.call_state("c", "establishing")
    plain["resourceData"]["note"] = "éà"
    (event,) = parse_payload(b.notifications(plain))
    assert decode_entry(encode_entry(event)).raw == event.raw


# A caller whose display name Teams cut in the middle of an emoji: half of a UTF-16
# surrogate pair, valid JSON ("\ud83d") with no UTF-8 form.
CUT_NAME = "Ana \ud83d"


async def test_a_record_whose_call_and_roster_hold_a_lone_surrogate_reads_back() -> None:
    incoming = b.incoming_call("cut", caller_name=CUT_NAME)
    roster = b.roster("cut", [b.participant("p1", display_name=CUT_NAME)])
    sequencer = Sequencer(lambda delivery: None, Lifecycle(termination_grace=60.0))
    for item in (incoming, roster):
        (event,) = parse_payload(b.notifications(item))
        sequencer.accept(event)
    record = sequencer.record("cut")
    assert record is not None
    again = decode_record(encode_record(record))
    assert again is not None
    assert again.snapshot == record.snapshot
    assert list(again.roster.values()) == list(record.roster.values())
    sequencer.close()


async def test_a_call_whose_caller_name_holds_a_lone_surrogate_runs_on(redis_url: str) -> None:
    """The call's record is written after its first notification: written so, the rest of
    the call followed."""
    seen: list[str] = []

    async def note(call: Any, event: events.Event) -> None:
        seen.append(type(event).__name__)

    with capture_logs() as logs:
        async with InProcessBot(on_event=note, store=redis_url, keep_alive=False) as bot:
            incoming = b.incoming_call("cut-name", caller_name=CUT_NAME)
            assert await bot.post(json.dumps(b.notifications(incoming)).encode()) == 202
            establishing = b.call_state("cut-name", "establishing")
            assert await bot.post(json.dumps(b.notifications(establishing)).encode()) == 202
            await _until(lambda: seen == ["IncomingCall", "CallStateChanged"])
    assert [line for line in logs if line.get("log_level") == "error"] == []


def test_every_key_of_a_call_is_in_one_slot_and_no_two_calls_share_one() -> None:
    """The call key is the keys' hash tag: braces, an empty key or escapes in it never
    spread a call over several Cluster slots, nor make two calls' keys meet."""
    keys = _redis._Keys("callbot:app:")
    names = ("inbox", "seen", "lease", "fence", "call", "tenant", "journal")
    calls = ["abc", "}x", "}", "", "{a}", "a}b{c", "x{", "%", "%7B", "{", "%7Bx%7D", "{x}", "%25"]
    made: dict[str, str] = {}
    for call in calls:
        found = keys.of(call, *names)
        assert len({key_slot(key.encode()) for key in found}) == 1, call
        assert keys.record(call) == found[names.index("call")]
        for key in found:
            assert made.setdefault(key, call) == call, (key, call, made[key])


async def _script(
    client: aioredis.Redis, script: _scripts.Script, keys: list[str], *args: Any
) -> Any:
    return await client.evalsha(script.sha, len(keys), *keys, *args)


async def _milliseconds(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _milliseconds_past(client: aioredis.Redis, then: int) -> bool:
    return await _milliseconds(client) > then


async def test_a_call_s_duplicate_digests_stay_bounded(rdb: aioredis.Redis) -> None:
    """A flood of distinct notifications for one call keeps the newest digests of its
    dedupe window, as many as the sequencer recognises repeats among; a repeat of a recent
    one is still recognised, one of an older one is news (as in memory)."""
    await rdb.script_load(_scripts.INGEST.source)
    keys = _redis._Keys("t:").of("flood", "inbox", "seen", "lease", "fence", "call", "tenant")

    def args(digest: str) -> tuple[Any, ...]:
        # digest, entry, dedupe window, token, no lease, read batch, lifetime, no tenant, kept,
        # placed in no tenant
        return (digest, "{}", 600_000, "me", "", 64, 600_000, "", SEEN_DIGESTS, "")

    async def ingest(digest: str) -> int:
        fresh: int = (await _script(rdb, _scripts.INGEST, list(keys), *args(digest)))[0]
        return fresh

    pipe = rdb.pipeline(transaction=False)
    for n in range(1200):
        pipe.evalsha(_scripts.INGEST.sha, len(keys), *keys, *args(f"d{n}"))
    await pipe.execute()
    assert await rdb.zcard(keys[1]) == SEEN_DIGESTS
    assert await ingest("d1199") == 0
    assert await ingest(f"d{1200 - SEEN_DIGESTS}") == 0  # the oldest kept
    assert await ingest(f"d{1199 - SEEN_DIGESTS}") == 1  # forgotten: before the newest


async def test_a_call_s_inbox_is_bounded_in_entries_and_bytes(rdb: aioredis.Redis) -> None:
    """The ingest script refuses a new entry (-2) once the call's inbox holds as many entries
    or bytes as it may (a repeat is still recognised, a fact of the bot's own still kept);
    an acknowledgement takes its entries' bytes off, and an inbox that expired counts none."""
    for script in _scripts.ALL:
        await rdb.script_load(script.source)
    keys = _redis._Keys("t:")
    inbox, seen, lease, fence, record, tenant, journal = keys.of(
        "full", "inbox", "seen", "lease", "fence", "call", "tenant", "journal"
    )
    entry = "x" * 40

    async def ingest(digest: str, *, bounded: bool = True) -> int:
        bounds = (10, 100) if bounded else ("", "")
        args = (digest, entry, 600_000, "me", "", 64, 600_000, "", SEEN_DIGESTS, "", *bounds)
        answer = await _script(
            rdb, _scripts.INGEST, [inbox, seen, lease, fence, record, tenant], *args
        )
        return int(answer[0])

    assert [await ingest(f"d{n}") for n in range(4)] == [1, 1, 1, -2]  # 120 bytes >= 100
    assert await rdb.hget(fence, "b") == "120"
    assert await ingest("d0") == 0  # a repeat: nothing more to keep
    assert await ingest("", bounded=False) == 1  # a fact of the bot's own
    assert await rdb.xlen(inbox) == 4
    epoch, _, entries, _ = await _script(
        rdb, _scripts.CLAIM, [inbox, lease, fence, record], "me", 5000, 64, 60_000
    )
    acked = entries[1][0]
    checkpoint = [
        *(f"me/{epoch}", epoch, _redis._after(acked), "", "0", 1000, 5000, 60_000),
        *("0", 64, "", "0"),  # no read, nothing about to be fed, keep the call
    ]
    keys5 = [inbox, lease, fence, record, journal]
    assert await _script(rdb, _scripts.CHECKPOINT, keys5, *checkpoint) == [1]
    assert await rdb.hget(fence, "b") == "80"  # two entries of 40 acknowledged
    assert await ingest("d4") == 1
    assert await ingest("d5") == -2
    await rdb.delete(inbox)  # expired, its count left behind
    assert await ingest("d6") == 1
    assert await rdb.hget(fence, "b") == "40"


async def test_a_call_rings_while_its_incoming_call_waits_unacknowledged(
    rdb: aioredis.Redis,
) -> None:
    """The ingest notes a new incoming call's entry; while it waits in the inbox, the
    scripts that leave the call to others (the ingest of an instance not taking it, the
    release handing it over, the reaper's probe) say it waits to be answered, and a claim
    asked to take only such a call takes it. Once acknowledged, it no longer rings."""
    for script in _scripts.ALL:
        await rdb.script_load(script.source)
    keys = _redis._Keys("t:")
    inbox, seen, lease, fence, record, tenant, journal = keys.of(
        "c", "inbox", "seen", "lease", "fence", "call", "tenant", "journal"
    )

    async def ingest(digest: str, incoming: bool) -> list[Any]:
        args = (digest, "{}", 600_000, "me", "", 64, 600_000, "", SEEN_DIGESTS, "", 10, 1000)
        keys6 = [inbox, seen, lease, fence, record, tenant]
        answer: list[Any] = await _script(
            rdb, _scripts.INGEST, keys6, *args, "1" if incoming else ""
        )
        return answer

    _, who, ringing_entry, oldest, ringing = await ingest("ring", incoming=True)
    assert (who, oldest, ringing) == (3, ringing_entry, 1)
    assert (await ingest("ring", incoming=True))[4] == 1  # a repeat: noted once
    _, who, after, _, ringing = await ingest("establishing", incoming=False)
    assert (who, ringing) == (3, 1)
    assert await _script(rdb, _scripts.PROBE, [inbox, lease, fence]) == [1, ringing_entry, 1]
    claim = [inbox, lease, fence, record]
    epoch, _, entries, _ = await _script(rdb, _scripts.CLAIM, claim, "me", 5000, 64, 60_000, "1")
    assert [e[0] for e in entries] == [ringing_entry, after]
    mine = f"me/{epoch}"
    released = await _script(rdb, _scripts.RELEASE, claim[:3], mine, epoch, 5000, "1")
    assert released == [2, ringing_entry, 1]
    epoch, *_ = await _script(rdb, _scripts.CLAIM, claim, "me", 5000, 64, 60_000, "1")
    checkpoint = [
        *(f"me/{epoch}", epoch, _redis._after(ringing_entry), "", "0", 1000, 5000, 60_000),
        *("0", 64, "", "0"),  # the incoming call acknowledged, the call kept
    ]
    keys5 = [inbox, lease, fence, record, journal]
    assert await _script(rdb, _scripts.CHECKPOINT, keys5, *checkpoint) == [1]
    released = await _script(rdb, _scripts.RELEASE, claim[:3], f"me/{epoch}", epoch, 5000, "1")
    assert released == [2, after, 0]
    assert await _script(rdb, _scripts.PROBE, [inbox, lease, fence]) == [1, after, 0]
    assert await _script(rdb, _scripts.CLAIM, claim, "me", 5000, 64, 60_000, "1") == []
    assert await _script(rdb, _scripts.CLAIM, claim, "me", 5000, 64, 60_000)  # with room


async def test_a_claim_asked_again_answers_the_lease_an_ingest_took(rdb: aioredis.Redis) -> None:
    """An ingest that took a call keeps its epoch and the fed mark it found in ``fence.c``,
    as a claim does: a CLAIM asked again by that instance (the ingest's answer lost) is
    answered as the ingest was while that lease holds (saying it took nothing anew: a fifth
    value), and takes nothing anew; another instance's takes nothing."""
    for script in _scripts.ALL:
        await rdb.script_load(script.source)
    keys = _redis._Keys("t:")
    inbox, seen, lease, fence, record, tenant = keys.of(
        "taken", "inbox", "seen", "lease", "fence", "call", "tenant"
    )
    args = ("d", "{}", 600_000, "me", 5000, 64, 600_000, "", SEEN_DIGESTS, "", 10, 1000, "1")
    keys6 = [inbox, seen, lease, fence, record, tenant]
    _, who, _, epoch, stored, entries, fed = await _script(rdb, _scripts.INGEST, keys6, *args)
    assert who == 2
    claim = [inbox, lease, fence, record]
    assert await _script(rdb, _scripts.CLAIM, claim, "other", 5000, 64, 60_000, "", "1") == []
    again = await _script(rdb, _scripts.CLAIM, claim, "me", 5000, 64, 60_000, "", "1")
    assert again == [epoch, stored, entries, fed, 1]
    assert await rdb.get(lease) == f"me/{epoch}"


async def test_a_run_that_gave_its_call_up_cannot_renew_it_back(rdb: aioredis.Redis) -> None:
    """A renewal sent before a release may reach Redis after it: refused, the lease stays
    gone. The release itself, sent again (its answer lost), answers the same."""
    for script in _scripts.ALL:
        await rdb.script_load(script.source)
    keys = _redis._Keys("t:")
    inbox, lease, fence, record, journal = keys.of(
        "c", "inbox", "lease", "fence", "call", "journal"
    )
    entry = str(await rdb.xadd(inbox, {"e": "{}"}))
    epoch, _, entries, _ = await _script(
        rdb, _scripts.CLAIM, [inbox, lease, fence, record], "me", 5000, 64, 60_000
    )
    assert [e[0] for e in entries] == [entry]
    mine = f"me/{epoch}"
    checkpoint = [
        *(mine, epoch, _redis._after(entry), "", "0", 1000, 5000, 60_000),
        *("1", 64, "", "1"),  # read on, nothing about to be fed, give the call up
    ]
    keys5 = [inbox, lease, fence, record, journal]
    assert await _script(rdb, _scripts.CHECKPOINT, keys5, *checkpoint) == [2]
    assert not await rdb.exists(lease)
    assert await _script(rdb, _scripts.RENEW, [lease, fence], mine, epoch, 5000) == 0
    assert not await rdb.exists(lease)
    assert await _script(rdb, _scripts.CHECKPOINT, keys5, *checkpoint) == [2]
    assert await _script(rdb, _scripts.RELEASE, [inbox, lease, fence], mine, epoch, 5000, "0") == [
        1
    ]
    assert not await rdb.exists(lease)
    # The next acquisition is a new epoch, which renews as usual.
    await rdb.xadd(inbox, {"e": "{}"})
    again = await _script(
        rdb, _scripts.CLAIM, [inbox, lease, fence, record], "me", 5000, 64, 60_000
    )
    assert int(again[0]) > int(epoch)
    assert await _script(rdb, _scripts.RENEW, [lease, fence], f"me/{again[0]}", again[0], 5000) == 1


async def test_a_keeper_lease_is_held_by_one_instance_and_given_up_only_by_it(
    rdb: aioredis.Redis,
) -> None:
    """One instance holds a call's keeper lease: it renews it, another is refused until it
    runs out or is given up, and only its holder gives it up."""
    for script in _scripts.ALL:
        await rdb.script_load(script.source)
    (keeper,) = _redis._Keys("t:").of("c", "keeper")
    assert await _script(rdb, _scripts.KEEP, [keeper], "a", 5000) == 1
    assert await _script(rdb, _scripts.KEEP, [keeper], "b", 5000) == 0
    assert await _script(rdb, _scripts.KEEP, [keeper], "a", 9000) == 1
    assert 5000 < await rdb.pttl(keeper) <= 9000
    assert await _script(rdb, _scripts.KEEP, [keeper], "b", "") == 0
    assert await rdb.get(keeper) == "a"
    assert await _script(rdb, _scripts.KEEP, [keeper], "a", "") == 0
    assert not await rdb.exists(keeper)
    assert await _script(rdb, _scripts.KEEP, [keeper], "b", 5000) == 1


async def test_a_full_redis_refuses_the_ingest_and_runs_every_other_script(
    rdb: aioredis.Redis,
) -> None:
    """At ``maxmemory`` Redis refuses a new notification (the callback gets 503, Graph sends
    it again) and runs every other script, each where its first write may add memory (a
    lease taken back after it ran out, a new key): they only carry on with what Redis
    holds, and running accepted entries is what frees memory (their acknowledgement trims
    the inbox)."""
    assert [s.name for s in _scripts.ALL if not s.runs_when_full] == ["ingest", "probe"]
    for script in _scripts.ALL:
        await rdb.script_load(script.source)
    keys = _redis._Keys("t:")
    inbox, seen, lease, fence, record, tenant, journal, keeper = keys.of(
        "c", "inbox", "seen", "lease", "fence", "call", "tenant", "journal", "keeper"
    )
    first, second = [str(await rdb.xadd(inbox, {"e": "{}"})) for _ in range(2)]
    await rdb.sadd(keys.pending, "c")
    ingest_keys = [inbox, seen, lease, fence, record, tenant]
    ingest = ("d", "{}", 600_000, "me", "", 64, 600_000, "", SEEN_DIGESTS, "", 10, 1000)
    await rdb.config_set("maxmemory", "1")  # every write that may add memory refused
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            await _script(rdb, _scripts.INGEST, ingest_keys, *ingest)
        epoch, _, entries, _ = await _script(
            rdb, _scripts.CLAIM, [inbox, lease, fence, record], "me", 5000, 64, 60_000
        )
        assert [e[0] for e in entries] == [first, second]
        mine = f"me/{epoch}"
        await rdb.delete(lease)  # run out: each step takes it back
        assert await _script(rdb, _scripts.MARK, [lease, fence], mine, epoch, 5000, second) == 1
        await rdb.delete(lease)
        assert await _script(rdb, _scripts.RENEW, [lease, fence], mine, epoch, 5000) == 1
        step = f"{first}/1"
        assert await _script(rdb, _scripts.RECORD, [fence, journal], epoch, step, "{}", 60_000) == 1
        await rdb.delete(lease)
        checkpoint = [
            *(mine, epoch, _redis._after(first), '{"r":1}', "0", 1000, 5000, 60_000),
            *("1", 64, "", "0", step),  # read on, keep the call, the entry's journal done
        ]
        keys5 = [inbox, lease, fence, record, journal]
        answer = await _script(rdb, _scripts.CHECKPOINT, keys5, *checkpoint)
        assert [answer[0], [e[0] for e in answer[1]]] == [1, [second]]
        assert await rdb.xlen(inbox) == 1
        await rdb.delete(lease)
        released = await _script(
            rdb, _scripts.RELEASE, [inbox, lease, fence], mine, epoch, 5000, "1", first
        )
        assert released == [2, second, 0]
        assert await _script(rdb, _scripts.PROBE, [inbox, lease, fence]) == [1, second, 0]
        # handed over: runnable for the others (ringing too), and the reaper's round taken
        wake = [keys.runnable, keys.ringing]
        assert await _script(rdb, _scripts.WAKE, wake, 7, "c", "1") == 1
        assert await _script(rdb, _scripts.TURN, [keys.reaper], "me", 5000) == 1
        assert await _script(rdb, _scripts.TURN, [keys.reaper], "other", 5000) == 0
        assert await _script(rdb, _scripts.KEEP, [keeper], "me", 5000) == 1
        pending = [keys.pending, keys.unpending]
        assert await _script(rdb, _scripts.UNPEND, pending, "c", "g") == 1
        assert await _script(rdb, _scripts.SETTLE, pending, "c", "g", "1") == 0
    finally:
        await rdb.config_set("maxmemory", "0")
    assert (await rdb.hget(fence, "fed"), await rdb.get(record)) == (first, '{"r":1}')
    assert await rdb.smembers(keys.pending) == {"c"}
    assert not await rdb.exists(keys.unpending)
    assert await rdb.zrange(keys.runnable, 0, -1, withscores=True) == [("c", 7.0)]
    assert await rdb.zrange(keys.ringing, 0, -1, withscores=True) == [("c", 7.0)]


@pytest.mark.parametrize("interval", [1.0, 60.0, 900.0, 1800.0, 2640.0, 2699.0])
def test_a_lost_keeper_s_calls_get_a_keep_alive_well_within_graph_s_limit(
    interval: float,
) -> None:
    """The longest gap between two keep-alives of a call whose keeper is lost: an interval,
    then the keeper lease running out, the next look of another instance, and the first
    keep-alive it sends, spread over a look. It stays within half of what Graph leaves after
    an interval (45 minutes), and a look comes at least three times an interval."""
    every, lease_ms = _redis.keeper_timing(interval, tick=1.0)
    limit = 45 * 60.0
    worst = interval + lease_ms / 1000 + 2 * every
    assert worst <= interval + (limit - interval) / 2 or every == 1.0
    assert every <= max(interval / 3, 1.0)
    assert lease_ms == int(every * 3000)
    if interval == 900.0:
        assert (every, lease_ms) == (60.0, 180_000)  # the default: 20 minutes at worst


async def test_a_call_s_epochs_keep_growing_after_redis_lost_them(rdb: aioredis.Redis) -> None:
    """Redis restarted without persistence (or a failover that lost the last writes) has
    forgotten a call's fence while its owner's run still goes on. The next acquisition is
    still a later epoch than that run's: the old run cannot take the call back once the
    new lease expires, and a handler fencing its own writes with the epoch keeps working."""
    for script in _scripts.ALL:
        await rdb.script_load(script.source)
    keys = _redis._Keys("t:")
    inbox, lease, fence, record, journal = keys.of(
        "lost", "inbox", "lease", "fence", "call", "journal"
    )
    claim = [inbox, lease, fence, record]
    await rdb.xadd(inbox, {"e": "{}"})
    before, *_ = await _script(rdb, _scripts.CLAIM, claim, "old", 5000, 64, 60_000)
    await rdb.delete(inbox, lease, fence, record, journal)  # what the restart loses
    # A restart takes longer than the millisecond of Redis' clock the epoch is read from.
    lost_at = await _milliseconds(rdb)
    await wait_for(lambda: _milliseconds_past(rdb, lost_at))
    await rdb.xadd(inbox, {"e": "{}"})
    after, *_ = await _script(rdb, _scripts.CLAIM, claim, "new", 5000, 64, 60_000)
    assert int(after) > int(before)
    await rdb.delete(lease)  # the new owner's lease expired: nobody holds the call
    renewal = await _script(rdb, _scripts.RENEW, [lease, fence], f"old/{before}", before, 5000)
    assert renewal == 0
    assert not await rdb.exists(lease)
    # The one epoch stored is the new run's, which goes on as usual; later ones grow from it.
    assert await _script(rdb, _scripts.RENEW, [lease, fence], f"new/{after}", after, 5000) == 1
    await rdb.delete(lease)
    again, *_ = await _script(rdb, _scripts.CLAIM, claim, "next", 5000, 64, 60_000)
    assert int(again) > int(after)


async def test_bursts_run_once_and_leave_nothing_leased_or_waiting(
    redis_url: str, rdb: aioredis.Redis
) -> None:
    """Calls whose notifications follow one another on one instance (fed by the ingest,
    acknowledged a burst at a time, given up with the last checkpoint): every handler
    runs once, and every call ends acknowledged and released."""
    _, repeated = await measure(redis_url, "burst", calls=40, concurrency=8)
    assert repeated == 0

    async def settled() -> bool:
        leases = [key async for key in rdb.scan_iter(match=KEY_PREFIX + "*:lease")]
        inboxes = [key async for key in rdb.scan_iter(match=KEY_PREFIX + "*:inbox")]
        waiting = [await rdb.xlen(inbox) for inbox in inboxes]
        return not leases and not any(waiting) and len(inboxes) == 40

    await wait_for(settled)
    assert await rdb.zcard(KEY_PREFIX + "runnable") == 0


async def test_a_group_is_answered_before_the_rest_of_its_round_trip(
    redis_url: str, rdb: aioredis.Redis
) -> None:
    """Groups of commands sent in one round trip: the first one's caller has its answer
    while Redis still blocks on the second."""
    commands, blocking = _redis.connect(redis_url)
    batch = _redis._Batcher(commands)
    try:
        first = batch.submit([("PING",), ("ECHO", "one")])
        second = batch.submit([("BLPOP", "t:wake", 0)])
        assert await first == ["PONG", "one"]
        assert not second.done()
        await rdb.lpush("t:wake", "go")
        assert await second == [["t:wake", "go"]]
        # the connection kept from that round trip serves the next one
        assert await batch.run("ECHO", "again") == "again"
    finally:
        batch.close()
        await _redis.disconnect(commands)
        await _redis.disconnect(blocking)


async def test_commands_submitted_as_every_sender_finishes_are_still_sent(
    redis_url: str,
) -> None:
    """Every sender's answer comes in one turn of the loop, and a caller woken by the first
    submits at once (as the ingest does its second round trip): its commands were queued
    while the finished senders still counted, and nothing sent them until some unrelated
    submit came (in a burst of calls, never: every caller waited on that queue)."""
    commands, blocking = _redis.connect(redis_url)
    batch = _redis._Batcher(commands)
    pool = commands.connection_pool
    answers_held = asyncio.Event()
    get_connection = pool.get_connection

    async def holding(*args: Any, **kwargs: Any) -> Any:
        connection = await get_connection(*args, **kwargs)
        if not getattr(connection, "held_by_test", False):
            read = connection.read_response

            async def read_when_let(*a: Any, **k: Any) -> Any:
                await answers_held.wait()
                return await read(*a, **k)

            connection.read_response = read_when_let
            connection.held_by_test = True
        return connection

    pool.get_connection = holding
    try:
        firsts = []
        for n in range(_redis._SENDERS):
            firsts.append(batch.submit([("ECHO", f"first-{n}")]))
            await wait_for(_nothing_waiting(batch))  # a sender took it and reads its answer
        assert len(batch._senders) == _redis._SENDERS

        async def next_round_trip() -> list[Any]:
            await firsts[0]
            return await batch.submit([("ECHO", "next")])

        follower = asyncio.create_task(next_round_trip())
        answers_held.set()  # the four answers come in together
        assert await asyncio.wait_for(follower, 10) == ["next"]
    finally:
        batch.close()
        await _redis.disconnect(commands)
        await _redis.disconnect(blocking)


def _nothing_waiting(batch: Any) -> Any:
    async def check() -> bool:
        return not batch._waiting

    return check


async def test_an_entry_the_run_read_while_its_request_awaited_redis_is_fed_once(
    redis_url: str,
) -> None:
    """The request's second round trip (a tone told to the other instances) is slow; the
    call's lingering run reads the new entry from the inbox meanwhile and feeds it. The
    request, answered, does not feed it a second time."""
    handled: list[str] = []

    async def count(call: Any, event: events.Event) -> None:
        handled.append(type(event).__name__)

    async with InProcessBot(on_event=count, store=redis_url, keep_alive=False) as bot:
        assert bot.bot is not None
        store = bot.bot._running().store
        assert isinstance(store, _redis.RedisStore)
        fed: list[str] = []
        feed, run_all = store._feed, store._run_all
        second_trip_held = asyncio.Event()
        let_it_go = asyncio.Event()

        def feeding(state: Any, entry_id: str, item: str | events.Event) -> None:
            fed.append(entry_id)
            feed(state, entry_id, item)

        async def slow_broadcast(commands: Any, *, then: Any = None) -> Any:
            if any(command[0] == "XADD" for command in commands) and not let_it_go.is_set():
                second_trip_held.set()
                await let_it_go.wait()
            return await run_all(commands, then=then)

        store._feed = feeding  # type: ignore[method-assign]
        store._run_all = slow_broadcast  # type: ignore[method-assign]
        body = json.dumps(b.notifications(b.incoming_call("fed-once"))).encode()
        assert await bot.post(body) == 202
        await _until(lambda: handled == ["IncomingCall"])
        (state,) = store._owned.values()
        tone = json.dumps(b.notifications(b.tone("fed-once", "tone1", 1))).encode()
        request = asyncio.create_task(bot.post(tone))
        await second_trip_held.wait()
        # The run's linger ends: it reads the inbox, feeds the tone, and lingers again.
        await _until(lambda: len(fed) == 2 and state.waiting and not state.outstanding)
        let_it_go.set()
        assert await request == 202
        await _until(lambda: handled == ["IncomingCall", "ToneReceived"])
        assert len(fed) == len(set(fed)) == 2
        assert store.counts["duplicate"] == 0


async def test_a_blocked_call_s_owner_holds_what_it_read_ahead_once(redis_url: str) -> None:
    """While a call's handler waits, its owner reads a read's worth of the call's inbox ahead
    (the rest waits in Redis). Each entry it accepted itself was kept both as its text and
    as parsed: 125 MiB traced once 68 bodies of 1 MB were accepted. Each is held once now."""
    size, bodies = 200_000, _redis._READ_BATCH + 16
    accepted, held = await held_behind_a_blocked_handler(bodies, size, store=redis_url)
    assert accepted == bodies  # within the call's backlog: none refused
    # the handler's event and a read's worth of the inbox, each once (twice was 2 * 65)
    assert held < 1.5 * (_redis._READ_BATCH + 1) * size, held


async def _until(predicate: Any) -> None:
    async with asyncio.timeout(30):
        while not predicate():  # noqa: ASYNC110 - the store's state has no event to wait on
            await asyncio.sleep(0.01)


async def test_closing_cancels_again_a_task_that_took_its_cancellation_for_a_timeout() -> None:
    swallowed = asyncio.Event()

    async def reads_on() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # as a timeout expiring at the same moment would
        await asyncio.Event().wait()

    task = asyncio.get_running_loop().create_task(reads_on())
    await asyncio.sleep(0)
    await _redis._cancelled([task])
    assert swallowed.is_set()
    assert task.cancelled()


def _store(bot: InProcessBot) -> _redis.RedisStore:
    assert bot.bot is not None
    store = bot.bot._running().store
    assert isinstance(store, _redis.RedisStore)
    return store


def _quiet(store: _redis.RedisStore) -> None:
    """Stop the store's claim and upkeep loops: the test plays their steps itself."""
    for task in store._tasks:
        if task.get_name() in (
            "callbot-store-claim",
            "callbot-store-answer",
            "callbot-store-maintain",
        ):
            task.cancel()


def _bystander(bot: InProcessBot) -> _redis.RedisStore:
    """The store of a bot whose loops the test plays, and which takes no call on: what it
    accepts is made runnable for others (but a new incoming call, taken whatever the room)."""
    store = _store(bot)
    _quiet(store)
    store._capacity = 0
    return store


async def _owner_waiting(bot: InProcessBot, rdb: aioredis.Redis, call_id: str) -> _redis.RedisStore:
    """The store of a bot that took on the call ``call_id`` begins and keeps it idle,
    waiting for its next entry (the test then plays the store's loops)."""
    store = _store(bot)
    store._linger = 3600.0
    assert await bot.post(_body(b.incoming_call(call_id))) == 202
    call = call_id.replace("-", "")
    inbox = store._keys.of(call, "inbox")[0]

    async def idle_and_waiting() -> bool:
        state = store._owned.get(call)
        return state is not None and state.waiting and await rdb.xlen(inbox) == 0

    await wait_for(idle_and_waiting)
    _quiet(store)
    return store


async def _reap_now(store: _redis.RedisStore, rdb: aioredis.Redis) -> None:
    """One upkeep round of the reaper, as whichever instance holds the role would run it."""
    await rdb.delete(KEY_PREFIX + "reaper")
    await store._reap()


async def test_an_owner_that_takes_its_lapsed_lease_back_indexes_what_it_accepts(
    redis_url: str, rdb: aioredis.Redis
) -> None:
    """Redis away past the lease: the owner's call, idle, is taken off the pending index by
    the reaper; the owner takes its lease back (its epoch is unchanged) and accepts the
    next entry itself. If the owner is then lost, the reaper must still find the entry."""
    tone_started = asyncio.Event()
    go_on = asyncio.Event()

    async def on_event(call: Any, event: Any) -> None:
        if isinstance(event, events.ToneReceived):
            tone_started.set()
            await go_on.wait()

    async with InProcessBot(
        store=redis_url, keep_alive=False, store_lease=30, on_event=on_event
    ) as bot:
        try:
            store = await _owner_waiting(bot, rdb, "strand-1")
            call = "strand1"
            inbox, lease = store._keys.of(call, "inbox", "lease")
            pending, runnable = KEY_PREFIX + "pending", KEY_PREFIX + "runnable"
            await rdb.delete(lease)  # it expired while Redis was away
            await _reap_now(store, rdb)  # idle, nobody on it: off the index
            assert not await rdb.sismember(pending, call)
            await store._renew()  # the owner's epoch is unchanged: it goes on
            assert await rdb.exists(lease)
            assert await bot.post(_body(b.tone("strand-1", "tone1", 1))) == 202
            await asyncio.wait_for(tone_started.wait(), 10)
            assert await rdb.xlen(inbox) == 1
            assert await rdb.sismember(pending, call)
            await rdb.delete(lease)  # the owner is lost: nobody renews its lease
            await _reap_now(store, rdb)
            assert await rdb.zscore(runnable, call) is not None
        finally:
            go_on.set()


async def test_an_ingest_sent_again_after_a_restart_indexes_its_call_after_its_entry(
    redis_url: str, rdb: aioredis.Redis
) -> None:
    """After a restart Redis has no scripts: an ingest's script is sent again once they are
    loaded. A call given up in between (taken off the index and looked at again) must be
    indexed after the entry lands; the entry, made runnable, is then popped by an instance
    that dies before it claims the call. The reaper must still find the entry."""
    async with InProcessBot(store=redis_url, keep_alive=False, store_lease=30) as bot:
        store = _bystander(bot)
        call = "strand2"
        pending, runnable = KEY_PREFIX + "pending", KEY_PREFIX + "runnable"
        inbox, lease = store._keys.of(call, "inbox", "lease")
        await rdb.sadd(pending, call)  # the call was given up: its removal is on its way
        await rdb.script_flush()  # as a restart leaves Redis
        real = store._load_scripts

        async def load_then_unpend() -> None:
            await real()
            await store._unpend(call)  # the removal lands between the two round trips
            assert not await rdb.sismember(pending, call)

        store._load_scripts = load_then_unpend  # type: ignore[method-assign]
        assert await bot.post(_body(b.call_state("strand-2", "establishing"))) == 202
        store._load_scripts = real  # type: ignore[method-assign]
        assert await rdb.xlen(inbox) == 1
        assert await rdb.sismember(pending, call)
        # popped by an instance that dies at once (its claim taken or not)
        assert await rdb.zpopmin(runnable)
        await _reap_now(store, rdb)
        assert await rdb.zscore(runnable, call) is not None
        assert not await rdb.exists(lease)


async def test_an_ingest_overtaken_by_its_own_run_s_release_indexes_its_call(
    redis_url: str, rdb: aioredis.Redis
) -> None:
    """This instance runs the call, so its ingest leaves the index alone; but its run gives
    the call up (and takes it off the index) before the ingest's script lands, as round
    trips on different connections may. The ingest sees nobody runs the call: it indexes
    it after its entry, which the reaper must then find."""
    async with InProcessBot(store=redis_url, keep_alive=False, store_lease=30) as bot:
        store = await _owner_waiting(bot, rdb, "strand-4")
        call = "strand4"
        inbox = store._keys.of(call, "inbox")[0]
        pending, runnable = KEY_PREFIX + "pending", KEY_PREFIX + "runnable"
        state = store._owned[call]
        real = store._answers

        async def release_first(commands: Any, **options: Any) -> Any:
            if commands and commands[0][:2] == ("EVALSHA", _scripts.INGEST.sha):
                store._answers = real  # type: ignore[method-assign]
                assert await store._release(state, handover=False) == 1
                await store._unpend(call)
                assert not await rdb.sismember(pending, call)
            return await real(commands, **options)

        store._capacity = 0  # the instance takes nothing on: the call is made runnable
        store._answers = release_first  # type: ignore[method-assign]
        assert await bot.post(_body(b.tone("strand-4", "tone1", 1))) == 202
        assert await rdb.xlen(inbox) == 1
        assert await rdb.sismember(pending, call)
        assert await rdb.zpopmin(runnable)  # popped by an instance that dies at once
        await _reap_now(store, rdb)
        assert await rdb.zscore(runnable, call) is not None


async def test_a_late_second_look_leaves_a_newer_removal_for_the_reaper(
    redis_url: str, rdb: aioredis.Redis
) -> None:
    """Two instances take the same call off the pending index one after the other; the
    first one's second look comes last: it must not clear the second removal, whose own
    look may never come (its instance died)."""
    async with InProcessBot(store=redis_url, keep_alive=False) as bot:
        store = _bystander(bot)
        keys = store._keys
        pending, unpending = keys.pending, keys.unpending
        moves = []
        for _ in range(2):
            await rdb.sadd(pending, "somecall")
            generation = store._generation()
            assert await _script(rdb, _scripts.UNPEND, [pending, unpending], "somecall", generation)
            moves.append(generation)
        await store._settle([("somecall", moves[0])])  # the first look, late: nothing waits
        assert await rdb.hget(unpending, "somecall") == moves[1]
        await store._settle([("somecall", moves[1])])
        assert not await rdb.exists(unpending)


@pytest.mark.parametrize("stop", ["dies", "unreachable"])
async def test_a_call_whose_second_look_never_came_is_looked_at_by_the_reaper(
    redis_url: str, rdb: aioredis.Redis, stop: str
) -> None:
    """A run gives its call up with nothing waiting; an entry comes just after, and the
    run's instance takes the call off the pending index, then dies (or Redis goes away)
    before its second look. The entry, made runnable, is popped by an instance that dies
    too: the reaper must still find it."""
    async with InProcessBot(store=redis_url, keep_alive=False, store_lease=30) as bot:
        store = _bystander(bot)
        call = "strand3"
        pending, runnable = KEY_PREFIX + "pending", KEY_PREFIX + "runnable"
        assert await bot.post(_body(b.call_state("strand-3", "establishing"))) == 202
        assert await rdb.sismember(pending, call)
        real = store._run_all

        async def stops_at_the_second_look(commands: Any, **options: Any) -> Any:
            if commands[0][:2] == ("EVALSHA", _scripts.PROBE.sha):
                if stop == "dies":
                    raise asyncio.CancelledError  # the process ends: nothing more is sent
                raise aioredis.ConnectionError("gone between the two steps")
            return await real(commands, **options)

        store._run_all = stops_at_the_second_look  # type: ignore[method-assign]
        try:
            await store._unpend(call)
        except asyncio.CancelledError:
            assert stop == "dies"
        finally:
            store._run_all = real  # type: ignore[method-assign]
        assert not await rdb.sismember(pending, call)
        assert await rdb.zpopmin(runnable)
        await _reap_now(store, rdb)
        assert await rdb.zscore(runnable, call) is not None
        assert await rdb.sismember(pending, call)
        assert not await rdb.exists(store._keys.unpending)


async def test_the_events_loop_reads_on_after_redis_py_breaks_with_an_odd_error(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From Python 3.12 on, asyncio's writelines on a connection closed meanwhile raises
    TypeError, which redis-py passes on: the loop relaying other instances' outcomes reads
    on instead of ending."""
    async with InProcessBot(store=redis_url, keep_alive=False) as bot:
        store = _store(bot)
        (relay,) = [t for t in store._tasks if t.get_name() == "callbot-store-events"]
        real = _redis._one_command
        broke, read_again = asyncio.Event(), asyncio.Event()

        async def breaks_once(pool: Any, command: tuple[Any, ...]) -> Any:
            if not broke.is_set():
                broke.set()
                raise TypeError("'NoneType' object is not callable")
            read_again.set()
            return await real(pool, command)

        monkeypatch.setattr(_redis, "_one_command", breaks_once)
        async with asyncio.timeout(30):
            await read_again.wait()
        assert not relay.done()


def _body(*items: dict[str, Any]) -> bytes:
    return json.dumps(b.notifications(*items)).encode()


@pytest.mark.parametrize("stored", ["first entry", "nothing"])
async def test_a_run_after_a_lost_burst_starts_again_from_the_stored_state(
    redis_url: str, rdb: aioredis.Redis, stored: str
) -> None:
    """A failover loses what the primary took after a call's first entry was acknowledged
    (or all its checkpoints): its record goes back to that entry (or is gone), and the later
    entries wait again. The same process, which ran them before and saw the call end, runs
    them again from the stored state: each a transition again, the last one the call's
    end, none dropped as stale."""
    seen: list[tuple[str, str | None]] = []
    hold = asyncio.Event()
    hold.set()

    async def on_event(call: Any, event: Any) -> None:
        await hold.wait()
        if isinstance(event, events.CallStateChanged):
            seen.append((type(event).__name__, event.state))

    async with InProcessBot(
        store=redis_url, keep_alive=False, store_lease=30, on_event=on_event
    ) as bot:
        store = _store(bot)
        call = "rerun1"
        inbox, record, lease = store._keys.of(call, "inbox", "call", "lease")
        assert await bot.post(_body(b.incoming_call("rerun-1"))) == 202
        await wait_for(lambda: _acknowledged(rdb, inbox, record))
        first_record = await rdb.dump(record)
        assert first_record is not None
        hold.clear()  # nothing after the first entry is acknowledged until the dump below
        for state in ("establishing", "established", "terminated"):
            assert await bot.post(_body(b.call_state("rerun-1", state))) == 202
        assert await rdb.xlen(inbox) == 3
        later_entries = await rdb.dump(inbox)
        assert later_entries is not None
        hold.set()
        await wait_for(lambda: _ended(rdb, inbox, lease, seen))
        assert seen == [
            ("CallStateChanged", "establishing"),
            ("CallStateChanged", "established"),
            ("CallTerminated", "terminated"),
        ]
        # The failover: the new primary has the entries, not what acknowledged them.
        if stored == "nothing":
            await rdb.delete(record)
        else:
            await rdb.restore(record, 0, first_record, replace=True)
        await rdb.restore(inbox, 0, later_entries, replace=True)
        await rdb.sadd(KEY_PREFIX + "pending", call)
        await rdb.zadd(KEY_PREFIX + "runnable", {call: 0})
        await wait_for(lambda: _ended(rdb, inbox, lease, seen, runs=2))
        assert seen[3:] == seen[:3]


async def _acknowledged(rdb: aioredis.Redis, inbox: str, record: str) -> bool:
    return bool(await rdb.exists(record)) and await rdb.xlen(inbox) == 0


async def _ended(
    rdb: aioredis.Redis, inbox: str, lease: str, seen: list[Any], runs: int = 1
) -> bool:
    return len(seen) >= 3 * runs and await rdb.xlen(inbox) == 0 and not await rdb.exists(lease)


async def test_whether_graph_accepted_the_bot_s_answer_is_in_the_call_s_record(
    redis_url: str, rdb: aioredis.Redis, graph: FakeGraph
) -> None:
    """The proof that a call is real is kept where every instance reads it: an instance
    taking the call the bot answered over keeps it as a live call, while an id posted
    straight into ``established`` is stored unproven (pending wherever it runs)."""

    graph.add_call("answered-1")
    async with InProcessBot(
        store=redis_url,
        keep_alive=False,
        reorder_window=0.2,
        on_event=_answer,
        **_on_graph(graph),
    ) as bot:
        store = _store(bot)
        await _play_the_answered_call(bot, graph)
        assert await bot.post(_body(b.call_state("invented-1", "established"))) == 202

        async def stored(call: str) -> CallRecord | None:
            text = await rdb.get(store._keys.record(call))
            return None if text is None else decode_record(str(text))

        async def both_established() -> bool:
            records = [await stored(call) for call in ("answered1", "invented1")]
            return all(r is not None and r.state == "established" for r in records)

        await wait_for(both_established)
        answered, invented = await stored("answered1"), await stored("invented1")
        assert answered is not None
        assert invented is not None
        assert answered.life.proven
        assert not invented.life.proven
        # Another instance taking the calls over reads them so.
        other = Sequencer(lambda delivery: None, Lifecycle(termination_grace=30))
        other.adopt(answered)
        other.adopt(invented)
        assert not other.lifecycle.life("answered-1").pending
        assert other.lifecycle.life("invented-1").pending
        other.close()


async def test_an_invented_call_its_owner_lets_go_leaves_the_list_of_calls(
    redis_url: str, rdb: aioredis.Redis, graph: FakeGraph
) -> None:
    """An id posted straight into ``established``, let go as pending by the instance that ran
    it, is no longer listed: not in the ``active`` index, nor in the instance's list, nor
    taken up by an instance started after; the call the bot answered stays listed."""

    graph.add_call("answered-1")
    settings: dict[str, Any] = {
        "store": redis_url,
        "keep_alive": False,
        # one pending call kept at once: a second one lets the first go, with no timer
        "max_pending_calls": 1,
        **_on_graph(graph),
    }
    active = KEY_PREFIX + "active"
    async with InProcessBot(on_event=_answer, **settings) as bot:
        store = _store(bot)
        await _play_the_answered_call(bot, graph)

        async def listed(call: str) -> bool:
            return bool(await rdb.sismember(active, call)) and call in store._known

        async def answered_and_proven() -> bool:
            text = await rdb.get(store._keys.record("answered1"))
            record = None if text is None else decode_record(str(text))
            return record is not None and record.life.proven and await listed("answered1")

        await wait_for(answered_and_proven)
        invented = [b.call_state("invented-1", s) for s in ("establishing", "established")]
        assert await bot.post(_body(*invented)) == 202
        await wait_for(lambda: listed("invented1"))
        invented = [b.call_state("invented-2", s) for s in ("establishing", "established")]
        assert await bot.post(_body(*invented)) == 202
        await wait_for(lambda: _unlisted(bot, store, rdb, "invented-1"))
        assert await listed("answered1")
    await _started_takes_up_the_answered_call_only(settings)


async def test_a_pending_call_taken_up_after_a_restart_and_let_go_leaves_the_list_of_calls(
    redis_url: str, rdb: aioredis.Redis, graph: FakeGraph
) -> None:
    """The instance that ran an invented call restarts before the call's pending time is up:
    taken up again, then let go when that time is up, the call leaves the ``active`` index
    and the instance's list, and no instance started later takes it up; the call the bot
    answered stays listed."""

    graph.add_call("answered-1")
    settings: dict[str, Any] = {"store": redis_url, "keep_alive": False, **_on_graph(graph)}
    async with InProcessBot(on_event=_answer, **settings) as bot:
        store = _store(bot)
        await _play_the_answered_call(bot, graph)
        assert await bot.post(_body(b.call_state("invented-1", "establishing"))) == 202

        async def indexed(call: str) -> bool:
            return bool(await rdb.sismember(KEY_PREFIX + "active", call))

        async def both_indexed() -> bool:
            text = await rdb.get(store._keys.record("answered1"))
            record = None if text is None else decode_record(str(text))
            proven = record is not None and record.life.proven
            return proven and await indexed("answered1") and await indexed("invented1")

        await wait_for(both_indexed)
    async with InProcessBot(pending_call_ttl=0.2, **settings) as restarted:
        later = _store(restarted)
        await wait_for(lambda: _true(later._rehydrated))
        await wait_for(lambda: _unlisted(restarted, later, rdb, "invented-1"))
        assert "answered1" in later._known
        assert await indexed("answered1")
    await _started_takes_up_the_answered_call_only(settings)


async def _answer(call: Any, event: Any) -> None:
    if isinstance(event, events.IncomingCall):
        await call.answer()


async def _play_the_answered_call(bot: InProcessBot, graph: FakeGraph) -> None:
    """``answered-1`` rings, the bot answers it (``_answer``), and it is established."""
    assert await bot.post(_body(b.incoming_call("answered-1"))) == 202
    await graph.wait_for_request("answer")
    for state in ("establishing", "established"):
        assert await bot.post(_body(b.call_state("answered-1", state))) == 202


async def _started_takes_up_the_answered_call_only(settings: dict[str, Any]) -> None:
    """An instance started now takes ``answered-1`` up, and not ``invented-1``."""
    async with InProcessBot(**settings) as started:
        store = _store(started)
        await wait_for(lambda: _true(store._rehydrated))
        assert started.bot is not None
        assert started.bot._running().lifecycle.get("invented-1") is None
        assert "invented1" not in store._known
        assert "answered1" in store._known


def _on_graph(graph: FakeGraph) -> dict[str, Any]:
    """The settings of a bot that acts on the call through ``graph``."""
    return {
        "tenant_id": graph.tenant_id,
        "app_secret": "fake-graph-secret",
        "graph_url": graph.graph_url,
        "authority_url": graph.authority_url,
    }


async def _true(value: bool) -> bool:
    return value


async def _unlisted(
    bot: InProcessBot, store: _redis.RedisStore, rdb: aioredis.Redis, call_id: str
) -> bool:
    """Whether the call is out of the bot's lifecycle, the instance's list of calls and the
    cluster's ``active`` index."""
    key = call_id.replace("-", "")
    return (
        bot.bot is not None
        and bot.bot._running().lifecycle.get(call_id) is None
        and key not in store._known
        and not await rdb.sismember(KEY_PREFIX + "active", key)
    )


async def test_a_call_let_go_unproven_stays_listed_if_real_or_run_elsewhere(
    redis_url: str, rdb: aioredis.Redis
) -> None:
    """The instance that let a call go as pending may know it from an older run: a call
    stored proven, or held by another instance's run, stays in the ``active`` index; one
    proven after it was indexed unproven is indexed again."""
    async with InProcessBot(store=redis_url, keep_alive=False) as bot:
        store = _store(bot)
        await wait_for(lambda: _true(store._rehydrated))
        _quiet(store)
        active = KEY_PREFIX + "active"

        def record(call_id: str, *, proven: bool) -> CallRecord:
            life = CallLife(call_id, phase=LIVE_PHASE, state="established", proven=proven)
            return CallRecord(life)

        for call_id, proven in (("real-1", True), ("held-1", False), ("idle-1", False)):
            call = call_id.replace("-", "")
            await rdb.set(store._keys.record(call), encode_record(record(call_id, proven=proven)))
            await rdb.sadd(active, call)
            store._indexed[call] = False  # indexed by an older run of this instance
            store._forgotten(call, "unproven")
        await rdb.set(store._keys.of("held1", "lease")[0], "elsewhere:1:0/7")
        await store._let_go_pending()
        assert await rdb.smembers(active) == {"real1", "held1"}
        # Proven after its first checkpoint here: listed again, though indexed before.
        store._indexed["idle1"] = False
        store._index("idle1", record("idle-1", proven=True))
        await store._flush_indexes()
        assert await rdb.sismember(active, "idle1")


async def test_a_call_that_ended_where_another_instance_ran_it_is_no_longer_indexed_here(
    redis_url: str,
) -> None:
    """An instance that indexed a call, or took it up when it started, and then heard of its
    end from the instance that ran it last keeps nothing of it once it forgets the call
    (calls move between instances behind a load balancer: nothing may stay per call)."""
    async with InProcessBot(store=redis_url, keep_alive=False, termination_grace=0.1) as bot:
        store = _store(bot)
        await wait_for(lambda: _true(store._rehydrated))
        assert bot.bot is not None
        lifecycle = bot.bot._running().lifecycle
        for call_id, proven in (("moved-1", True), ("moved-2", False)):
            lifecycle.adopt(call_id, phase=LIVE_PHASE, state="established", ended=False)
            store._indexed[call_id.replace("-", "")] = proven  # indexed here, or taken up
            lifecycle.end(call_id, None)  # as the end told by the other instance is
        await wait_for(lambda: _true(lifecycle.get("moved-2") is None))
        assert lifecycle.get("moved-1") is None
        assert "moved1" not in store._indexed
        assert "moved2" not in store._indexed


async def test_a_call_graph_no_longer_knows_leaves_the_list_of_calls(
    redis_url: str, rdb: aioredis.Redis, graph: FakeGraph
) -> None:
    """An id posted straight into ``established``, whose keep-alive Graph answers 404 once
    its pending time is up, is gone: off the ``active`` index and the instance's list, with
    the upkeep round that takes ended calls off (no task left behind per call)."""
    async with InProcessBot(
        store=redis_url,
        pending_call_ttl=0.2,
        reorder_window=0.2,
        termination_grace=0.2,
        **_on_graph(graph),
    ) as bot:
        store = _store(bot)
        await wait_for(lambda: _true(store._rehydrated))
        tasks = len(store._tasks)
        invented = [b.call_state("invented-1", s) for s in ("establishing", "established")]
        assert await bot.post(_body(*invented)) == 202
        await graph.wait_for_request("keepAlive")
        await wait_for(lambda: _unlisted(bot, store, rdb, "invented-1"))
        assert len(store._tasks) == tasks
