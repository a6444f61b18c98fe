"""The memory store and the Redis store give handlers the same events for the same traffic.

Each test feeds one stream of requests to three groups of bots: one on the memory
store, one instance on the Redis store, and two instances sharing another Redis
database, the requests alternating between them. What every handler saw (the event,
what only order tells: previous state, changed properties, who joined or left, and
the call as its handle shows it) and how every request was answered must be the same
in the three groups. Traffic: the recorded calls, the documented examples, and
perturbations of them (repeats, repeats written differently, swapped and stale states,
rosters, tones, operation outcomes, terminations and stragglers, another tenant).

The groups are compared once all of them have settled (nothing queued, held,
leased, runnable or unacknowledged): no sleeps, no time limits in the assertions.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import random
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from callbot import Call, CallBot, GraphError, Target, _sequencing, current_attempt, events, models
from callbot._ids import id_key
from callbot._lifecycle import ENDED_MEMORY
from callbot._sequencing import MAX_BACKLOG_BYTES, MAX_HELD_BYTES, roster_key
from callbot.store import MemoryStore, _redis
from callbot.store._codec import encode_record
from callbot.testing import (
    TEST_TENANT_ID,
    FakeGraph,
    FakeResponse,
    RecordedRequest,
    TokenAuthority,
)
from callbot.testing import builders as b

from .conftest import (
    BotServer,
    load_notification_text,
    make_bot,
    normalized_json,
    notification_files,
    until,
)
from .test_recorded import CALLS, EXPECTED, recorded_body
from .test_redis import KEY_PREFIX, RedisServer, redis_server, redis_url
from .test_redis import settled as redis_settled
from .test_security_tokens import (
    FLOOD_ROUNDS,
    OTHER_TENANT,
    flooding,
    record_bound,
    without_tenant,
)
from .test_sequencing import FLOOD_ITEM_BYTES, documented_item, flood_item
from .test_simulator import MEETING_URL

__all__ = ["redis_server", "redis_url"]  # fixtures this module uses

pytestmark = pytest.mark.redis

# The recorded call's establishing, established and tone (sequenceId 6).
SIMPLE = (
    "sb01-p2p-simpletest-p2ptest1event1callestablishing.json",
    "sb02-p2p-simpletest-p2ptest1event2callestablished.json",
    "sb04-p2p-simpletest-p2ptest1event4tonepress.json",
)
# A window no test reaches: a held state is released by its predecessor or the call's end,
# whatever the machine's load, so the outcome never depends on timing.
NEVER = 300.0
SETTLE_WITHIN = 60.0


# -- traffic ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Post:
    """One request: a notifications body, with a token of ``tenant`` (``None``: the
    tenant the body names, else the test tenant)."""

    body: dict[str, Any]
    tenant: str | None = None


@dataclass(frozen=True)
class GraceOver:
    """Wait until every group has forgotten the ended call (its ``termination_grace`` is
    over) before the next request."""

    call_id: str


Step = Post | GraceOver


def items_of(*bodies: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for body in bodies for item in body["value"]]


def post(*items: dict[str, Any], tenant: str | None = None) -> Post:
    return Post(b.notifications(*items), tenant)


def _path(item: dict[str, Any]) -> str:
    return str(item.get("resourceUrl") or item.get("resource") or "")


def call_of(item: dict[str, Any]) -> str:
    match = re.search(r"calls/([^/]+)", _path(item))
    assert match is not None, item
    return match.group(1)


def as_resource(item: dict[str, Any]) -> dict[str, Any]:
    """The item in the older dialect: ``resource`` under ``/app/calls`` (or back)."""
    out = {k: v for k, v in item.items() if k not in ("resource", "resourceUrl")}
    tail = _path(item).split("calls/", 1)[1]
    if "resourceUrl" in item:
        out["resource"] = "/app/calls/" + tail
    else:
        out["resourceUrl"] = "/communications/calls/" + tail
    return out


def recased(item: dict[str, Any]) -> dict[str, Any]:
    """The item with its call id upper case and without dashes, its ``changeType``
    capitalised and its keys in reverse order."""
    call = call_of(item)
    path = _path(item).replace(call, call.replace("-", "").upper(), 1)
    out = {k: item[k] for k in reversed(list(item))}
    out["resourceUrl" if "resourceUrl" in item else "resource"] = path
    change = item.get("changeType")
    if isinstance(change, str):
        out["changeType"] = change.capitalize()
    return out


def ending_of(call_id: str) -> dict[str, Any]:
    return b.call_terminated(call_id)


def _is_roster(item: dict[str, Any]) -> bool:
    return "/participants" in _path(item)


def perturbed(items: list[dict[str, Any]], seed: int) -> list[Step]:
    """A call's items (its termination last) as Graph might deliver them: repeats exact and
    written otherwise, neighbours swapped, stale and late copies, several in one request,
    the termination repeated and stragglers after it."""
    rng = random.Random(seed)
    *middle, last = items
    order = list(middle)
    for index in range(len(order) - 1):
        if rng.random() < 0.3:
            order[index], order[index + 1] = order[index + 1], order[index]
    flow: list[dict[str, Any]] = []
    for item in order:
        flow.append(item)
        roll = rng.random()
        if _is_roster(item):
            if roll < 0.3:
                flow.append(item)  # a roster's retry follows it
        elif roll < 0.2:
            flow.append(item)
        elif roll < 0.4:
            flow.append(as_resource(item))
        elif roll < 0.6:
            flow.append(recased(item))
    for item in middle:
        if not _is_roster(item) and rng.random() < 0.3:
            flow.insert(rng.randint(flow.index(item) + 1, len(flow)), recased(item))
    if middle:
        flow.append(middle[0])  # the first state again, once the call is past it
    flow += [last, recased(last)]
    flow += [rng.choice(middle)] if middle else []
    steps: list[Step] = []
    while flow:
        size = rng.choice((1, 1, 1, 2, 3))
        steps.append(post(*flow[:size]))
        flow = flow[size:]
    return steps


def recorded_calls() -> dict[str, list[dict[str, Any]]]:
    return {name: items_of(*call.bodies()) for name, call in CALLS.items()}


def documented_bodies() -> list[dict[str, Any]]:
    """Every documented example, as its body (repaired when the docs wrote no strict JSON)."""
    return [normalized_json(load_notification_text(name)) for name in notification_files()]


def _named_tenant(body: dict[str, Any]) -> str | None:
    for item in body.get("value") or ():
        for source in (item.get("resourceData"), item, body):
            tenant = source.get("tenantId") if isinstance(source, dict) else None
            if isinstance(tenant, str) and tenant:
                return tenant
    return None


def one_per_request(bodies: Iterable[dict[str, Any]]) -> list[Step]:
    """Each body as its own request, then a termination for every call named (a held state
    goes with it)."""
    posts = [Post(body) for body in bodies]
    calls = dict.fromkeys(call_of(item) for step in posts for item in step.body["value"])
    return [*posts, *(post(ending_of(call)) for call in calls)]


# -- three groups of bots ------------------------------------------------------------------


def observe(call: Call, event: events.Event) -> dict[str, Any]:
    """What a handler reads of its delivery."""
    seen: dict[str, Any] = {
        "type": type(event).__name__,
        "call_id": event.call_id,
        "change_type": event.change_type,
        "resource_url": event.resource_url,
        "tenant": event.tenant_id,
    }
    if isinstance(event, events.CallStateChanged):
        seen |= {"state": event.state, "previous": event.previous_state}
    if isinstance(event, events.CallUpdated):
        seen |= {"state": event.state, "changed": sorted(event.changed)}
    if isinstance(event, events.CallStateChanged | events.CallUpdated):
        info = event.result_info
        seen["result"] = None if info is None else info.model_dump(mode="json", exclude_unset=True)
        seen["transfer_failed"] = event.transfer_failed
        target = event.transfer_target
        seen["transfer_target"] = None if target is None else target.model_dump(mode="json")
    if isinstance(event, events.ToneReceived):
        seen |= {"tone": event.tone, "digit": event.digit, "sequence": event.sequence_id}
    if isinstance(event, events.ParticipantsUpdated):
        seen |= {
            name: [roster_key(p) for p in getattr(event, name)]
            for name in ("participants", "joined", "left", "updated")
        }
        seen |= {"sequence": event.sequence_number, "delta": event.delta}
    if isinstance(event, events.OperationUpdated):
        seen |= {"operation": event.operation_key, "status": event.status}
    if isinstance(event, events.ContentSharingUpdated):
        seen |= {"session": event.session_id}
    snapshot = call.snapshot
    seen["snapshot"] = (
        None
        if snapshot is None
        else snapshot.model_dump(mode="json", by_alias=True, exclude_unset=True)
    )
    seen["state_now"] = call.state
    seen["roster"] = {
        key: p.model_dump(mode="json", by_alias=True, exclude_unset=True)
        for key, p in sorted(call.roster.items())
    }
    return seen


@dataclass
class Group:
    """Bots sharing one store, and what their handlers saw, by call."""

    name: str
    bots: list[CallBot]
    servers: list[BotServer] = field(default_factory=list)
    seen: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    statuses: list[int] = field(default_factory=list)
    retry_after: list[str | None] = field(default_factory=list)
    reruns: list[str] = field(default_factory=list)
    unattempted: list[str] = field(default_factory=list)
    """Events a shared store ran without their run's attempt (no journal, no fencing)."""
    client: aioredis.Redis | None = None
    posted: int = 0

    def watch(self) -> None:
        for bot in self.bots:

            @bot.on(events.Event)
            async def record(call: Call, event: events.Event) -> None:
                self.seen.setdefault(call.key, []).append(observe(call, event))
                attempt = current_attempt()
                if attempt is not None and attempt.redelivered:
                    self.reruns.append(event.call_id)
                if attempt is None and self.client is not None:
                    self.unattempted.append(type(event).__name__)

    async def post(self, step: Post) -> None:
        server = self.servers[self.posted % len(self.servers)]
        self.posted += 1
        tenant = step.tenant or _named_tenant(step.body)
        token = server.token(tenant_id=tenant) if tenant else server.token()
        response = await server.post(step.body, token=token)
        self.statuses.append(response.status)
        self.retry_after.append(response.headers.get("Retry-After"))

    def _idle_here(self) -> bool:
        for bot in self.bots:
            runtime = bot._running()
            if runtime.dispatcher.busy_calls or runtime.dispatcher.queued:
                return False
            if any(record.holding for record in runtime.sequencer._records.values()):
                return False
        return True

    async def settled(self) -> bool:
        """Nothing queued or running here; with Redis, nothing leased, runnable or waiting
        in an inbox either (entries are acknowledged once their handlers finished)."""
        if not self._idle_here():
            return False
        if self.client is None:
            return True
        return await redis_settled(self.client) and self._idle_here()

    async def saw(self, call_id: str) -> bool:
        """A handler here was given an event of the call."""
        return id_key(call_id) in self.seen

    async def forgotten(self, call_id: str) -> bool:
        """The ended call's grace is over here: no process knows it but as ended lately,
        and the Redis record's time to live shows the grace spent."""
        if any(bot._running().lifecycle.get(call_id) is not None for bot in self.bots):
            return False
        if self.client is None:
            return True
        record = _redis._Keys(KEY_PREFIX).record(id_key(call_id))
        return int(await self.client.pttl(record)) < ENDED_MEMORY * 1000

    def drops(self) -> int:
        """Notifications dropped (why may differ: a repeat of an ended call's notification
        past its grace is a ``duplicate`` for Redis, ``after_end`` in memory)."""
        reasons = ("duplicate", "stale", "after_end", "roster_full")
        return sum(bot._running().store.counts[reason] for bot in self.bots for reason in reasons)


async def wait_until(predicate: Callable[[], Any], within: float = SETTLE_WITHIN) -> None:
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110 - state in Redis and in other tasks
            await asyncio.sleep(0.02)


class Parity:
    """The three groups, fed the same traffic."""

    def __init__(self, groups: list[Group]) -> None:
        self.groups = groups

    async def run(self, steps: Iterable[Step]) -> None:
        for step in steps:
            if isinstance(step, GraceOver):
                await self.settle()
                for group in self.groups:
                    await wait_until(functools.partial(group.forgotten, step.call_id))
                continue
            await asyncio.gather(*(group.post(step) for group in self.groups))
        await self.settle()

    async def settle(self) -> None:
        async def all_settled() -> bool:
            return all([await group.settled() for group in self.groups])

        await wait_until(all_settled)

    def check(self) -> None:
        reference, *others = self.groups
        assert reference.seen, "the traffic gave handlers nothing at all"
        for group in others:
            assert group.statuses == reference.statuses, group.name
            for call in sorted(set(reference.seen) | set(group.seen)):
                mine, theirs = group.seen.get(call, []), reference.seen.get(call, [])
                assert mine == theirs, _difference(group.name, call, theirs, mine)
            assert not group.reruns, (group.name, group.reruns)
            assert not group.unattempted, (group.name, group.unattempted)
            assert group.drops() == reference.drops(), group.name


def _difference(name: str, call: str, expected: list[Any], got: list[Any]) -> str:
    for index, (one, other) in enumerate(zip(expected, got, strict=False)):
        if one != other:
            keys = sorted(k for k in set(one) | set(other) if one.get(k) != other.get(k))
            detail = {k: (one.get(k), other.get(k)) for k in keys}
            return f"{name}, call {call}, delivery {index}: memory vs {name}: {detail}"
    labels = [[e["type"], e.get("state")] for e in expected]
    others = [[e["type"], e.get("state")] for e in got]
    return f"{name}, call {call}: memory saw {labels}, {name} saw {others}"


@pytest.fixture
async def parity(
    authority: TokenAuthority, serve: Any, redis_server: RedisServer, redis_url: str
) -> Any:
    """Start three groups with ``options``; returns a ``Parity``."""
    clients: list[aioredis.Redis] = []

    async def start(**options: Any) -> Parity:
        settings = {"reorder_window": NEVER, "termination_grace": 60.0, **options}
        groups = [Group("memory", [make_bot(authority, **settings)])]
        for name, db, count in (("redis", 1, 1), ("redis-pair", 2, 2)):
            url = f"redis://127.0.0.1:{redis_server.port}/{db}"
            client = aioredis.Redis.from_url(url, decode_responses=True)
            clients.append(client)
            bots = [make_bot(authority, store=url, **settings) for _ in range(count)]
            groups.append(Group(name, bots, client=client))
        for group in groups:
            group.watch()
            group.servers = [await serve(bot) for bot in group.bots]
        return Parity(groups)

    yield start
    for client in clients:
        await client.aclose()


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_a_recorded_call_in_published_order(parity: Any, name: str) -> None:
    groups: Parity = await parity()
    await groups.run(post(item) for item in recorded_calls()[name])
    groups.check()


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("seed", range(4))
async def test_a_recorded_call_perturbed(parity: Any, name: str, seed: int) -> None:
    groups: Parity = await parity()
    await groups.run(perturbed(recorded_calls()[name], seed))
    groups.check()


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
async def test_every_recorded_file(parity: Any, reverse: bool) -> None:
    bodies = [recorded_body(name) for name in sorted(EXPECTED, reverse=reverse)]
    groups: Parity = await parity()
    await groups.run(one_per_request(bodies))
    groups.check()


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
async def test_every_documented_example(parity: Any, reverse: bool) -> None:
    bodies = documented_bodies()
    if reverse:
        bodies.reverse()
    groups: Parity = await parity()
    await groups.run(one_per_request(bodies))
    groups.check()


async def test_every_documented_example_repeated_and_rewritten(parity: Any) -> None:
    bodies: list[dict[str, Any]] = []
    for body in documented_bodies():
        items = body["value"]
        bodies += [body, b.notifications(*map(as_resource, items))]
        bodies.append(b.notifications(*map(recased, items)))
    groups: Parity = await parity()
    await groups.run(one_per_request(bodies))
    groups.check()


def lifecycle_of(call_id: str, *middle: dict[str, Any]) -> list[Step]:
    """An answered call: incoming, establishing, established, ``middle``, terminated."""
    return [
        post(b.incoming_call(call_id)),
        post(b.call_state(call_id, "establishing")),
        post(b.call_state(call_id, "established")),
        *(post(item) for item in middle),
        post(b.call_terminated(call_id)),
    ]


def with_extra(item: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The item with properties the models do not know added to its call."""
    return {**item, "resourceData": {**item["resourceData"], **extra}}


async def test_rosters_repeated_alternating_and_delta(parity: Any) -> None:
    alice, bob = b.participant("alice"), b.participant("bob")
    carol = b.participant("carol", user_id="carol-user")
    invitee = carol.model_copy(update={"id": None})
    muted = b.participant("alice", muted=True)
    gone = b.participant("bob", removed_reason="left")
    full = [
        b.roster("full", people)
        for people in (
            [alice],
            [alice],
            [alice, bob],
            [alice],
            [alice],
            [alice, bob],
            [alice, bob, invitee],
            [alice, bob, carol],
            [muted, bob, carol],
            [muted, gone, carol],
            [],
        )
    ]
    delta = [
        b.delta_roster("delta", [alice, bob], sequence_number=2, change_type="created"),
        b.delta_roster("delta", [carol], sequence_number=1, change_type="created"),
        b.delta_roster("delta", [muted], sequence_number=3),
        b.delta_roster("delta", [muted], sequence_number=3),
        b.delta_roster("delta", [bob], sequence_number=5, change_type="deleted"),
        b.delta_roster("delta", [carol], sequence_number=4, change_type="created"),
        b.delta_roster("delta", [bob], sequence_number=6, change_type="deleted"),
        b.delta_roster("delta", [invitee], sequence_number=7, change_type="created"),
        b.delta_roster("delta", [carol], sequence_number=8),
    ]
    groups: Parity = await parity()
    await groups.run([*lifecycle_of("full", *full), *lifecycle_of("delta", *delta)])
    groups.check()


async def test_rosters_of_a_call_with_delta_rosters_on(parity: Any) -> None:
    alice, bob = b.participant("alice"), b.participant("bob")
    options = {
        "callOptions": {
            "@odata.type": "#microsoft.graph.outgoingCallOptions",
            "isDeltaRosterEnabled": True,
        }
    }
    steps = [
        post(with_extra(b.call_state("opted", "establishing"), **options)),
        post(b.call_state("opted", "established")),
        post(b.roster("opted", [alice])),
        post(b.roster("opted", [bob])),
        post(b.roster("opted", [alice, b.participant("bob", removed_reason="left")])),
        post(b.call_terminated("opted")),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()


async def test_tones_out_of_order_repeated_and_late(parity: Any) -> None:
    tones = [b.tone("keys", f"tone{n}", n) for n in range(1, 6)]
    steps = [
        post(b.call_state("keys", "establishing")),
        post(b.call_state("keys", "established")),
        post(tones[1]),
        post(tones[0]),
        post(recased(tones[0])),
        post(tones[3], tones[2], as_resource(tones[3])),
        post(b.tone("keys", "pound", 7), b.tone("keys", "star", 6)),
        post(tones[4]),
        post(b.call_terminated("keys")),
        post(tones[4]),
        post(b.tone("keys", "tone9", 9)),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()
    (seen,) = groups.groups[0].seen.values()
    # In sequenceId order, each waiting for the one before it, but for the first two: the
    # first tone goes at once (a call's count need not start at 1), so 1 comes late.
    assert [e["sequence"] for e in seen if e["type"] == "ToneReceived"] == [2, 1, 3, 4, 5, 6, 7]


async def test_a_tone_before_its_call_is_established(parity: Any) -> None:
    """The recorded call's tone overtaking both states, and another call's tone overtaking
    only ``established``: each follows ``established`` in every store."""
    recorded = dict(
        zip(
            ("establishing", "established", "tone"),
            items_of(*map(recorded_body, SIMPLE)),
            strict=True,
        )
    )
    steps = [
        post(recorded["tone"]),
        post(recorded["established"]),
        post(recorded["tone"]),  # a repeat, while held
        post(recorded["establishing"]),
        post(b.call_state("late", "establishing")),
        post(b.tone("late", "tone2", 1), b.roster("late", [b.participant("alice")])),
        post(b.call_state("late", "established")),
        post(b.call_terminated("late")),
        post(ending_of(call_of(recorded["tone"]))),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()
    seen = groups.groups[0].seen
    for call in seen.values():
        kinds = [(entry["type"], entry.get("state")) for entry in call]
        live = kinds.index(("CallStateChanged", "established"))
        assert kinds[live + 1] == ("ToneReceived", None), kinds


async def test_a_state_behind_a_tone_waiting_for_the_one_before_it(parity: Any) -> None:
    """A state of the live call (and a copy of it) arriving while a tone waits for the one
    before it waits behind it in every store: the keys were pressed before the call moved."""
    steps = [
        post(b.call_state("keys", "establishing")),
        post(b.call_state("keys", "established")),
        post(b.tone("keys", "tone1", 1)),
        post(b.tone("keys", "tone3", 3)),
        post(b.call_state("keys", "hold")),
        post(recased(b.call_state("keys", "hold"))),  # a repeat, written another way
        post(b.tone("keys", "tone2", 2)),
        post(b.call_terminated("keys")),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()
    (seen,) = groups.groups[0].seen.values()
    assert [(e["type"], e.get("state") or e.get("tone")) for e in seen[2:]] == [
        ("ToneReceived", "tone1"),
        ("ToneReceived", "tone2"),
        ("ToneReceived", "tone3"),
        ("CallStateChanged", "hold"),
        ("CallTerminated", "terminated"),
    ]


async def test_operation_outcomes_before_during_and_after(parity: Any) -> None:
    def outcome(op: str, status: str = "completed", **options: Any) -> dict[str, Any]:
        return b.operation_update("ops", op, status=status, **options)

    steps = [
        post(outcome("early")),
        post(b.incoming_call("ops")),
        post(outcome("early")),
        post(b.call_state("ops", "established")),  # held: overtaken by what follows
        post(outcome("held")),
        post(b.call_state("ops", "establishing")),
        post(outcome("prompt", "running", code=None)),
        post(outcome("prompt")),
        post(recased(outcome("prompt"))),
        post(outcome("record", "failed", operation_type="recordOperation", code=500)),
        post(outcome("prompt", "running", code=None)),
        post(b.call_terminated("ops")),
        post(outcome("late")),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()


async def test_a_held_state_and_what_waits_behind_it(parity: Any) -> None:
    steps = [
        post(b.call_state("held", "established")),
        post(b.tone("held", "tone1", 1), b.roster("held", [b.participant("alice")])),
        post(b.call_state("held", "established", subject="again")),
        post(b.operation_update("held", "op-1")),
        post(b.call_state("held", "ringing")),
        post(b.incoming_call("held")),
        post(b.call_state("held", "establishing")),
        post(b.call_state("held", "ringing")),  # stale now
        post(b.call_state("held2", "established")),
        post(b.call_state("held2", "terminating")),  # the call ends: nothing to wait for
        post(b.call_terminated("held2")),
        post(b.call_terminated("held")),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()


async def test_states_moving_back_and_forth(parity: Any) -> None:
    failed = b.call_state(
        "moves", "established", result_info=models.ResultInfo(code=500, subcode=7000)
    )
    steps = [
        *lifecycle_of(
            "moves",
            b.call_state("moves", "transferring"),
            b.call_state("moves", "transferAccepted"),
            failed,
            failed,
            b.call_state("moves", "hold"),
            b.call_state("moves", "established"),
            b.call_state("moves", "futureState"),
            b.call_state("moves", "ringing"),  # stale
            b.call_state("moves", "terminating"),
            b.call_state("moves", "established"),  # stale: the call is ending
        )
    ]
    steps.insert(1, post(b.incoming_call("moves")))  # a second incoming: an update
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()


TRANSFER_DOCUMENTS = (
    "24-call-transfer-transferring.json",
    "27-call-transfer-transfer-failed-7000.json",
)


def transfer_items() -> list[dict[str, Any]]:
    """A transfer's ``transferring`` and its failure (7000), as documents 24 and 27 tell them."""
    return [
        normalized_json(load_notification_text(name))["value"][0] for name in TRANSFER_DOCUMENTS
    ]


async def test_a_transfer_tried_again_fails_again(parity: Any) -> None:
    """Graph writes each entry into a state alike: a transfer tried again after a failure
    brings the same two notifications (documents 24 and 27). Both are news; a copy of one
    while the call is still in its state is a repeat."""
    transferring, failed = transfer_items()
    call = call_of(transferring)
    steps = [
        post(b.call_state(call, "establishing")),
        post(b.call_state(call, "established")),
        post(transferring),
        post(failed),
        post(failed),  # a repeat: the call is still back in "established"
        post(transferring),
        post(transferring),  # a repeat
        post(failed),
        post(ending_of(call)),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()
    for group in groups.groups:
        seen = [
            (entry["type"], entry.get("state"), entry.get("previous"))
            for entry in group.seen[id_key(call)]
        ]
        moves = [
            ("CallStateChanged", state, previous)
            for state, previous in (
                ("establishing", None),
                ("established", "establishing"),
                ("transferring", "established"),
                ("established", "transferring"),
                ("transferring", "established"),
                ("established", "transferring"),
            )
        ]
        assert seen == [*moves, ("CallTerminated", "terminated", "established")], group.name


async def transferring_groups(
    parity: Any,
    graph: FakeGraph,
    call: str,
    transfer: Callable[[Call, events.CallStateChanged], Awaitable[None]],
    asked: int = 1,
    **options: Any,
) -> Parity:
    """Every store's bots, with ``transfer`` run on each ``established`` of ``call``, after
    the call was set up: each group asked ``asked`` transfers. ``options`` are settings."""
    graph.add_call(call)
    groups: Parity = await parity(
        graph_url=graph.graph_url,
        authority_url=graph.authority_url,
        app_secret="fake-graph-secret",
        **options,
    )
    for group in groups.groups:
        for bot in group.bots:
            bot.on_state("established")(transfer)
    await groups.run(
        [post(b.call_state(call, "establishing")), post(b.call_state(call, "established"))]
    )
    assert len(graph.requests_for("transfer")) == asked * len(groups.groups)  # each group asked
    return groups


T = TypeVar("T")


def failures_told(
    groups: Parity, note: Callable[[events.CallStateChanged | events.CallUpdated], T]
) -> dict[str, list[T]]:
    """By group, what ``note`` says of each event its bots' ``on_transfer_failed`` ran for."""
    told: dict[str, list[T]] = {}
    for group in groups.groups:
        heard = told.setdefault(group.name, [])
        for bot in group.bots:

            @bot.on_transfer_failed
            async def noted(
                handle: Call,
                event: events.CallStateChanged | events.CallUpdated,
                heard: list[T] = heard,
            ) -> None:
                heard.append(note(event))

    return told


async def test_a_transfer_failure_arriving_before_its_transferring(parity: Any) -> None:
    """Graph posts a transfer's ``transferring`` and its failure (documents 24 and 27) as
    requests of their own: they may arrive swapped. The failure went at once, and the
    ``transferring`` after it left the call transferring, though the transfer had failed.
    In every store the failure waits for the ``transferring`` the bot's transfer brings
    (a copy of it meanwhile is a repeat), and the call is back in ``established``."""
    transferring, failed = transfer_items()
    call = call_of(transferring)

    async def transfer(call: Call, event: events.CallStateChanged) -> None:
        if event.previous_state == "establishing":
            await call.transfer(Target.user("agent-id", "Agent"))

    async with FakeGraph() as graph:
        groups = await transferring_groups(parity, graph, call, transfer)
        await groups.run([post(failed), post(failed), post(transferring), post(ending_of(call))])
    groups.check()
    for group in groups.groups:
        seen = [
            (entry["type"], entry.get("state"), entry.get("previous"), entry["state_now"])
            for entry in group.seen[id_key(call)]
        ]
        assert seen == [
            ("CallStateChanged", "establishing", None, "establishing"),
            ("CallStateChanged", "established", "establishing", "established"),
            ("CallStateChanged", "transferring", "established", "transferring"),
            ("CallStateChanged", "established", "transferring", "established"),
            ("CallTerminated", "terminated", "established", "terminated"),
        ], group.name


async def test_a_transfer_asked_again_before_the_first_one_s_news(parity: Any) -> None:
    """The bot asked a transfer twice before any news of the first came; each transfer's
    failure (documents 24 and 27, worded alike) arrives before its ``transferring``. The
    first ``transferring`` was taken for the second transfer's, so the second failure was
    taken for a repeat of the first, and the call left ``transferring``. In every store
    each failure waits for its own transfer's ``transferring``."""
    transferring, failed = transfer_items()
    call = call_of(transferring)

    async def transfer(call: Call, event: events.CallStateChanged) -> None:
        if event.previous_state == "establishing":
            await call.transfer(Target.user("agent-id", "Agent"))
            await call.transfer(Target.user("other-agent-id", "Other agent"))

    async with FakeGraph() as graph:
        groups = await transferring_groups(parity, graph, call, transfer, asked=2)
        steps = [post(failed), post(transferring), post(failed), post(transferring)]
        await groups.run([*steps, post(ending_of(call))])
    groups.check()
    for group in groups.groups:
        seen = [
            (entry["type"], entry.get("state"), entry["state_now"])
            for entry in group.seen[id_key(call)]
        ]
        back = ("CallStateChanged", "established", "established")
        away = ("CallStateChanged", "transferring", "transferring")
        assert seen == [
            ("CallStateChanged", "establishing", "establishing"),
            back,
            away,
            back,
            away,
            back,
            ("CallTerminated", "terminated", "terminated"),
        ], group.name


async def test_a_transfer_graph_refuses_waits_for_no_news(parity: Any) -> None:
    """A transfer failed (documents 24 and 27), and the bot asked it again: Graph refused
    the request (400). No news of that transfer can come, yet it stayed counted: a copy of
    the first failure was held for the refused transfer's ``transferring``, then told as
    its failure. In every store the refusal settles the transfer: the copy is a repeat."""
    transferring, failed = transfer_items()
    call = call_of(transferring)
    refusals: list[int] = []

    async def transfer(call: Call, event: events.CallStateChanged) -> None:
        try:
            await call.transfer(Target.user("agent-id", "Agent"))
        except GraphError as exc:
            refusals.append(exc.status)

    async with FakeGraph() as graph:
        groups = await transferring_groups(parity, graph, call, transfer)
        graph.fail_next("transfer", 400, times=len(groups.groups))
        await groups.run([post(transferring), post(failed)])
        assert refusals == [400] * len(groups.groups)  # each group asked again, refused
        await groups.run([post(failed), post(ending_of(call))])
    groups.check()
    for group in groups.groups:
        seen = [(entry["type"], entry.get("state")) for entry in group.seen[id_key(call)]]
        assert seen == [
            ("CallStateChanged", "establishing"),
            ("CallStateChanged", "established"),
            ("CallStateChanged", "transferring"),
            ("CallStateChanged", "established"),
            ("CallTerminated", "terminated"),
        ], group.name


async def test_a_transfer_asked_twice_while_a_key_waits(parity: Any) -> None:
    """The bot asked a transfer twice before any news; a key waits for the one numbered
    before it, and each transfer's failure (documents 24 and 27, worded alike) arrives
    before its ``transferring``, behind that key. In every store each ``transferring``
    waits behind the key, right before its own failure, and the second failure is not
    taken for a copy of the first: the call is back in ``established``."""
    transferring, failed = transfer_items()
    call = call_of(transferring)

    async def transfer(call: Call, event: events.CallStateChanged) -> None:
        if event.previous_state == "establishing":
            await call.transfer(Target.user("agent-id", "Agent"))
            await call.transfer(Target.user("other-agent-id", "Other agent"))

    def key(n: int) -> Post:
        return post(b.tone(call, f"tone{n}", n))

    async with FakeGraph() as graph:
        groups = await transferring_groups(parity, graph, call, transfer, asked=2)
        news = [post(failed), post(transferring)] * 2
        await groups.run([key(5), key(7), *news, key(6), post(ending_of(call))])
    groups.check()
    for group in groups.groups:
        seen = [
            (entry["type"], entry.get("state") or entry.get("tone"), entry["state_now"])
            for entry in group.seen[id_key(call)]
        ]
        keys = [("ToneReceived", f"tone{n}", "established") for n in (5, 6, 7)]
        away = ("CallStateChanged", "transferring", "transferring")
        back = ("CallStateChanged", "established", "established")
        ending = ("CallTerminated", "terminated", "terminated")
        assert seen[2:] == [*keys, away, back, away, back, ending], group.name


async def test_each_failed_transfer_is_told_once_in_every_store(parity: Any) -> None:
    """A bot trying another agent when a transfer fails: Graph tells the first failure after
    ``transferring``, the second by the update alone (worded alike, documents 24 and 27),
    then refuses the third transfer (400) and sends the last failure again; a fourth
    transfer goes through (7015). In every store ``on_transfer_failed`` runs once for each
    of the two failures, and for nothing else."""
    transferring, failed = transfer_items()
    call = call_of(transferring)
    told: dict[str, list[tuple[str, str | None]]] = {}
    refusals: list[int] = []

    async def transfer(handle: Call, target: str) -> None:
        try:
            await handle.transfer(Target.user(target, "Agent"))
        except GraphError as exc:
            refusals.append(exc.status)

    async with FakeGraph() as graph:
        graph.add_call(call)
        groups: Parity = await parity(
            graph_url=graph.graph_url,
            authority_url=graph.authority_url,
            app_secret="fake-graph-secret",
            reorder_window=0.2,  # the failure told alone waits for no transferring longer
        )
        for group in groups.groups:
            heard = told.setdefault(group.name, [])
            for bot in group.bots:

                @bot.on_state("established")
                async def established(handle: Call, event: events.CallStateChanged) -> None:
                    if event.previous_state == "establishing":
                        await transfer(handle, "agent-id")

                @bot.on_transfer_failed
                async def next_agent(
                    handle: Call,
                    event: events.CallStateChanged | events.CallUpdated,
                    heard: list[tuple[str, str | None]] = heard,
                ) -> None:
                    heard.append((type(event).__name__, getattr(event, "previous_state", None)))
                    await transfer(handle, f"agent-{len(heard) + 1}")

        await groups.run(
            [post(b.call_state(call, "establishing")), post(b.call_state(call, "established"))]
        )
        await groups.run([post(transferring), post(failed)])  # back from transferring
        graph.fail_next("transfer", 400, times=len(groups.groups))
        await groups.run([post(failed)])  # told alone, once the window closed
        assert refusals == [400] * len(groups.groups)  # each group's third transfer
        await groups.run([post(failed)])  # a copy: the refused transfer brings no news
        for group in groups.groups:
            await transfer(group.bots[0].services.call(call), "last-agent-id")
        completed = b.call_terminated(call, code=0, subcode=7015, message="transferred")
        going = [transferring, b.call_state(call, "transferAccepted"), completed]
        await groups.run(post(item) for item in going)
        assert len(graph.requests_for("transfer")) == 4 * len(groups.groups)
    groups.check()
    for group in groups.groups:
        assert told[group.name] == [
            ("CallStateChanged", "transferring"),
            ("CallUpdated", None),
        ], group.name
        flagged = [entry for entry in group.seen[id_key(call)] if entry.get("transfer_failed")]
        assert len(flagged) == 2, group.name


async def test_a_transfer_failure_in_graph_s_2019_shape_is_told_in_every_store(
    parity: Any,
) -> None:
    """Graph's 2019 shape (recorded gdh28 and gdh29): the call back to ``established`` after
    ``transferring``, with no ``resultInfo``, past the reorder window (the target rang).
    Not counted as the transfer's failure, it ran no ``on_transfer_failed``, and the guide's
    bot (its ``established`` handler transferring unless told of a failure) transferred
    again."""
    (transferring,) = recorded_body("gdh28-beta-call-transfer-2019.json")["value"]
    (back,) = recorded_body("gdh29-beta-call-transfer-2019.json")["value"]
    call = call_of(transferring)
    window = 0.2

    async def route(handle: Call, event: events.CallStateChanged) -> None:
        if not event.transfer_failed:
            await handle.transfer(Target.user("agent-id", "Agent"))

    async with FakeGraph() as graph:
        groups = await transferring_groups(parity, graph, call, route, reorder_window=window)
        told = failures_told(
            groups, lambda event: (getattr(event, "previous_state", None), event.result_info)
        )
        await groups.run([post(transferring)])
        await asyncio.sleep(window)  # at least this long: the target rings past the window
        await groups.run([post(back)])
        assert len(graph.requests_for("transfer")) == len(groups.groups)  # not again
    groups.check()
    for group in groups.groups:
        assert told[group.name] == [("transferring", None)], group.name


async def test_an_update_sent_before_a_transfer_began_is_no_failure_in_every_store(
    parity: Any,
) -> None:
    """The guide's bot transfers as soon as the call is established; one of Teams' repeated
    ``established`` updates (recorded sb03: audio active, no ``resultInfo``), sent before
    the transfer began, arrives behind its ``transferring`` (document 24), and the transfer
    goes through (documents 25, 26). It was told as the transfer's failure: the bot
    transferred again, and ``established`` handlers ran a second time."""
    transferring, _ = transfer_items()
    call = call_of(transferring)
    (update,) = recorded_body("sb03-p2p-simpletest-p2ptest1event3callestablishedwithaudio.json")[
        "value"
    ]
    update["resourceUrl"] = f"/communications/calls/{call}"
    later = [
        normalized_json(load_notification_text(name))["value"][0]
        for name in (
            "25-call-transfer-transfer-accepted.json",
            "26-call-transfer-transfer-completed-7015.json",
        )
    ]

    async def route(handle: Call, event: events.CallStateChanged) -> None:
        if not event.transfer_failed:
            await handle.transfer(Target.user("agent-id", "Agent"))

    async with FakeGraph() as graph:
        groups = await transferring_groups(parity, graph, call, route)
        told = failures_told(groups, lambda event: event.state)
        await groups.run([post(transferring), post(update), *(post(item) for item in later)])
        assert len(graph.requests_for("transfer")) == len(groups.groups)  # not again
    groups.check()
    for group in groups.groups:
        assert told[group.name] == [], group.name


@pytest.mark.parametrize("accepted", [True, False], ids=["accepted", "failing-at-once"])
async def test_an_update_sent_after_a_transfer_s_failure_goes_after_it_in_every_store(
    parity: Any, accepted: bool
) -> None:
    """A transfer goes (document 24, audio inactive; then document 25 if the target rings)
    and fails (document 27); Teams then updates the call back in ``established`` with audio
    active (no ``resultInfo``), each a request of its own, and the update arrives first. It
    was dropped as sent before the transfer began, and the call kept audio inactive: in
    every store it waits for the failure, and goes after it."""
    transferring, failed = transfer_items()
    transferring["resourceData"]["mediaState"] = {"audio": "inactive"}
    call = call_of(transferring)
    accepting = normalized_json(load_notification_text("25-call-transfer-transfer-accepted.json"))
    update = b.call_state(call, "established")
    update["resourceData"]["mediaState"] = {"audio": "active"}

    async def transfer(handle: Call, event: events.CallStateChanged) -> None:
        if event.previous_state == "establishing":
            await handle.transfer(Target.user("agent-id", "Agent"))

    async with FakeGraph() as graph:
        groups = await transferring_groups(parity, graph, call, transfer)
        told = failures_told(groups, lambda event: event.state)
        news = [transferring, *([accepting["value"][0]] if accepted else []), update, failed]
        await groups.run([post(item) for item in news])
    groups.check()
    progress = ["transferring", "transferAccepted"] if accepted else ["transferring"]
    for group in groups.groups:
        seen = [(e["type"], e.get("state")) for e in group.seen[id_key(call)][2:]]
        assert seen == [
            *(("CallStateChanged", state) for state in progress),
            ("CallStateChanged", "established"),
            ("CallUpdated", "established"),
        ], group.name
        last = group.seen[id_key(call)][-1]
        assert last["changed"] == ["media_state"], group.name
        assert last["snapshot"]["mediaState"]["audio"] == "active", group.name
        assert told[group.name] == ["established"], group.name


def user_of(event: events.CallStateChanged | events.CallUpdated) -> str | None:
    """The user id of the target a failed transfer went to, if it named one."""
    target = event.transfer_target
    user = None if target is None or target.identity is None else target.identity.user
    return None if user is None else user.id


def agent_of(request: RecordedRequest) -> str:
    """The user a transfer request asked for."""
    return str(json.loads(request.body)["transferTarget"]["identity"]["user"]["id"])


async def test_each_failed_transfer_names_its_own_target_in_every_store(parity: Any) -> None:
    """A bot trying agent A, then B, then C: it asks the three before any news, Graph refuses
    B (400), and A's and C's failures arrive (documents 24 and 27, worded alike, each before
    its ``transferring``). In every store each failure names its own transfer's target, A
    then C: the refused one shifts nothing."""
    transferring, failed = transfer_items()
    call = call_of(transferring)
    refused: list[str] = []

    def answer(request: RecordedRequest) -> FakeResponse:
        if agent_of(request) == "agent-b":
            error = {"error": {"code": "BadRequest", "message": "Refused."}}
            return FakeResponse(status=400, body=error)
        return FakeResponse(status=202)

    async def transfer(handle: Call, event: events.CallStateChanged) -> None:
        if event.previous_state != "establishing":
            return
        for agent in ("agent-a", "agent-b", "agent-c"):
            try:
                await handle.transfer(Target.user(agent, "Agent"))
            except GraphError:
                refused.append(agent)

    async with FakeGraph() as graph:
        graph.route("transfer", answer)
        groups = await transferring_groups(parity, graph, call, transfer, asked=3)
        assert refused == ["agent-b"] * len(groups.groups)
        told = failures_told(groups, user_of)

        steps = [post(failed), post(transferring), post(failed), post(transferring)]
        await groups.run([*steps, post(ending_of(call))])
    groups.check()
    for group in groups.groups:
        assert told[group.name] == ["agent-a", "agent-c"], group.name
        flagged = [e["transfer_target"] for e in group.seen[id_key(call)] if e["transfer_failed"]]
        assert [target["identity"]["user"]["id"] for target in flagged] == told[group.name]
        unflagged = [e for e in group.seen[id_key(call)] if not e.get("transfer_failed")]
        assert all(e.get("transfer_target") is None for e in unflagged), group.name


async def test_a_copy_of_a_state_held_behind_a_key(parity: Any) -> None:
    """Two updates of ``hold`` held behind a key waiting for the one numbered before it, the
    second naming a value the first did not: the first sent again is a repeat in every
    store, as it is with nothing held."""
    call = "held-copy"
    first = b.call_state(call, "hold", subject="on hold")
    steps = [
        post(b.tone(call, "tone1", 1)),
        post(b.tone(call, "tone3", 3)),
        post(first),
        post(b.call_state(call, "hold", media_state={"audio": "inactive"})),
        post(recased(first)),
        post(b.tone(call, "tone2", 2)),
    ]
    groups: Parity = await parity()
    await groups.run(lifecycle_of(call, *(step.body["value"][0] for step in steps)))
    groups.check()
    (seen,) = groups.groups[0].seen.values()
    assert [(e["type"], e.get("state") or e.get("tone")) for e in seen[3:]] == [
        ("ToneReceived", "tone1"),
        ("ToneReceived", "tone2"),
        ("ToneReceived", "tone3"),
        ("CallStateChanged", "hold"),
        ("CallUpdated", "hold"),
        ("CallTerminated", "terminated"),
    ]


def with_audio(item: dict[str, Any], audio: str) -> dict[str, Any]:
    data = item["resourceData"]
    return {**item, "resourceData": {**data, "mediaState": {**data["mediaState"], "audio": audio}}}


async def test_an_update_bringing_a_value_back(parity: Any) -> None:
    """Teams writes each update alike (sb09: audio active): audio going inactive and then
    active again brings sb09's very notification back. It changes the call again, so it is
    news; a copy of it while audio is still active is a repeat."""
    establishing, established, active = (
        recorded_body(name)["value"][0]
        for name in (
            "sb07-p2p-callupdates-p2ptest2event1establishing.json",
            "sb08-p2p-callupdates-p2ptest2event2established.json",
            "sb09-p2p-callupdates-p2ptest2event3updatedwithmediastate.json",
        )
    )
    call = call_of(active)
    steps = [
        post(establishing),
        post(established),
        post(active),
        post(with_audio(active, "inactive")),
        post(active),  # audio back
        post(active),  # a repeat: audio is still active
        post(ending_of(call)),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()
    for group in groups.groups:
        seen = group.seen[id_key(call)]
        audio = [
            entry["snapshot"]["mediaState"]["audio"]
            for entry in seen
            if entry["type"] == "CallUpdated"
        ]
        assert audio == ["active", "inactive", "active"], group.name
        assert seen[-1]["type"] == "CallTerminated"


async def test_content_sharing_started_again(parity: Any) -> None:
    """Documents 13 and 14: a session starts and ends as ``created`` and ``deleted`` on its
    path, with no data. The presenter sharing again brings the same two notifications; a
    copy of the latest is a repeat."""
    started, ended = (
        normalized_json(load_notification_text(name))["value"][0]
        for name in (
            "13-call-answer-ex2-contentsharing-started-no-resourcedata.json",
            "14-call-answer-ex2-contentsharing-ended-no-resourcedata.json",
        )
    )
    call = call_of(started)
    steps = [
        post(b.call_state(call, "establishing")),
        post(b.call_state(call, "established")),
        *(post(item) for item in (started, started, ended, started, ended, ended)),
        post(ending_of(call)),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()
    for group in groups.groups:
        sharing = [
            entry["change_type"]
            for entry in group.seen[id_key(call)]
            if entry["type"] == "ContentSharingUpdated"
        ]
        assert sharing == ["created", "deleted", "created", "deleted"], group.name


async def test_updates_with_properties_the_models_do_not_know(parity: Any) -> None:
    first = {f"future{n}": n for n in range(200)}
    second = {f"later{n}": {"n": n} for n in range(100)}
    steps = lifecycle_of(
        "extra",
        with_extra(b.call_state("extra", "established"), **first),
        with_extra(b.call_state("extra", "established"), **{**first, "future0": "changed"}),
        with_extra(b.call_state("extra", "established"), **second),
        with_extra(b.call_state("extra", "established"), **second),
        b.content_sharing("extra", ["s1"]),
        b.content_sharing("extra", ["s1"], change_type="deleted"),
        b.unknown("extra", "/someFutureResource", resource_data={"a": 1}),
        b.unknown("extra", "/someFutureResource", resource_data={"a": 1}),
    )
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()


async def test_a_call_flooded_with_long_names_and_messages(parity: Any) -> None:
    """Each store keeps a flooded call's record within its bytes (in memory, and as written
    to Redis), and handlers see the same in all: each notification as sent, and the call as
    it kept it."""
    call = "flooded"
    flood = [item for n in range(1, FLOOD_ROUNDS + 1) for item in flooding(call, n)]
    # Not ended: its record keeps its roster and snapshot.
    steps = lifecycle_of(call, *flood)[:-1]
    groups: Parity = await parity(max_roster_size=100)
    await groups.run(steps)
    memory, *shared = groups.groups
    record = memory.bots[0]._running().store.known(id_key(call))
    assert record is not None
    sizes = [len(encode_record(record).encode())]
    for group in shared:
        assert group.client is not None
        stored = await group.client.get(_redis._Keys(KEY_PREFIX).record(id_key(call)))
        assert isinstance(stored, str)
        sizes.append(len(stored.encode()))
    assert max(sizes) < record_bound(100), sizes
    groups.check()


async def test_a_window_flooded_past_its_bytes(parity: Any) -> None:
    """Each store holds a call's events in its process through the same sequencer: behind a
    tone waiting for its predecessor, bodies a token holder posts (1 MiB each here) go on
    once they would take the window past ``MAX_HELD_BYTES``, in the order they came, with
    one line; the late tone after them."""
    call = "held-flood"
    flood = [flood_item(call, n) for n in range(MAX_HELD_BYTES // FLOOD_ITEM_BYTES + 4)]
    waiting = [b.tone(call, "tone1", 1), b.tone(call, "tone3", 3), *flood]
    steps = lifecycle_of(call, *waiting, b.tone(call, "tone2", 2))
    groups: Parity = await parity()
    with capture_logs() as logs:
        await groups.run(steps)
    groups.check()
    for group in groups.groups:
        seen = group.seen[id_key(call)]
        tones = [entry["sequence"] for entry in seen if entry["type"] == "ToneReceived"]
        assert tones == [1, 3, 2], group.name  # the flood did not wait for tone 2
        news = [entry["resource_url"] for entry in seen if entry["type"] == "UnknownNotification"]
        assert news == [item["resourceUrl"] for item in flood], group.name
    released = [line for line in logs if line["event"] == "held_notification_released"]
    # One line per group: the memory bot's, and the Redis instance's that ran the call.
    assert [line["reason"] for line in released] == ["backlog_full"] * len(groups.groups)
    for group in groups.groups:
        # What the window let go was counted in the call's backlog until its handlers ran.
        assert await backlog_bytes(group, call) == 0, group.name


async def backlog_bytes(group: Group, call: str) -> int:
    """What the call's accepted notifications not yet done take, as its store counts them."""
    if group.client is None:
        store = group.bots[0]._running().store
        assert isinstance(store, MemoryStore)
        return store.backlog(id_key(call))[1]
    fence = _redis._Keys(KEY_PREFIX).of(id_key(call), "fence")[0]
    return int(await group.client.hget(fence, "b") or 0)


def waiting_for_a_prompt(groups: Parity) -> asyncio.Event:
    """Make each bot's handler of news callbot does not model wait (as for a prompt) until
    the event returned is set."""
    release = asyncio.Event()
    for group in groups.groups:
        for bot in group.bots:

            @bot.on(events.UnknownNotification)
            async def wait_for_the_prompt(call: Call, event: events.UnknownNotification) -> None:
                await release.wait()

    return release


async def test_a_call_whose_handler_is_blocked_refuses_past_its_backlog(parity: Any) -> None:
    """While a call's handler waits (for a prompt, say), what a token holder posts for the
    call queued behind it without end: 999 bodies of 1 MiB held 1 GiB in memory, 2 GiB on a
    Redis store's owner. Every store keeps what the call accepted and its handlers have not
    finished under ``MAX_BACKLOG_BYTES``: past it the call's notifications get 503 with
    Retry-After and one line each, other calls of the same request are kept, and once the
    handler goes on everything accepted is delivered in order and the retries are taken."""
    call, bystander = "backlogged", "bystander"
    flood = [flood_item(call, n) for n in range(MAX_BACKLOG_BYTES // FLOOD_ITEM_BYTES + 3)]
    groups: Parity = await parity()
    await groups.run(lifecycle_of(call)[:3])
    release = waiting_for_a_prompt(groups)

    steps = [post(item) for item in flood[:-1]]
    # The last request also names another call: that call's item is kept all the same.
    steps.append(post(flood[-1], b.incoming_call(bystander)))
    with capture_logs() as logs:
        for step in steps:
            await asyncio.gather(*(group.post(step) for group in groups.groups))
    for group in groups.groups:
        await wait_until(functools.partial(group.saw, bystander))
    reference = groups.groups[0]
    accepted = reference.statuses.count(202) - 3
    assert 0 < accepted < len(flood), reference.statuses
    assert reference.statuses[3:] == [202] * accepted + [503] * (len(flood) - accepted)
    refused = [line for line in logs if line.get("reason") == "call_backlog_full"]
    assert len(refused) == (len(flood) - accepted) * len(groups.groups), refused
    assert {line["event"] for line in refused} == {"callback_refused"}
    for group in groups.groups:
        assert group.statuses == reference.statuses, group.name
        assert group.retry_after[3 + accepted :] == ["1"] * (len(flood) - accepted)
        taken = await backlog_bytes(group, call)
        assert accepted * FLOOD_ITEM_BYTES <= taken < MAX_BACKLOG_BYTES + FLOOD_ITEM_BYTES * 1.01
        receivers = [bot._running().receiver.counts for bot in group.bots]
        assert (
            sum(c["unavailable", "call_backlog_full"] for c in receivers) == len(flood) - accepted
        )
        for bot in group.bots:
            store = bot._running().store
            if isinstance(store, _redis.RedisStore):
                # Its owner holds a read's worth at most in the process, each entry once (as
                # read or as parsed): the rest waits in Redis.
                buffered = sum(len(state.buffer) for state in store._owned.values())
                assert buffered + len(store._parsed) <= _redis._READ_BATCH

    release.set()
    await groups.settle()
    for group in groups.groups:
        assert await backlog_bytes(group, call) == 0, group.name
    await groups.run(steps[accepted:])  # Graph sends the refused requests again
    await groups.run([*lifecycle_of(call)[-1:], post(b.call_terminated(bystander))])
    groups.check()
    for group in groups.groups:
        assert group.statuses[-(len(flood) - accepted) - 2 :] == [202] * (len(flood) - accepted + 2)
        seen = group.seen[id_key(call)]
        news = [entry["resource_url"] for entry in seen if entry["type"] == "UnknownNotification"]
        assert news == [item["resourceUrl"] for item in flood], group.name
        kinds = [entry["type"] for entry in group.seen[id_key(bystander)]]
        assert kinds == ["IncomingCall", "CallTerminated"], group.name


async def test_what_a_blocked_handler_waits_for_reaches_it_though_refused(parity: Any) -> None:
    """The handler holding a call's backlog up may be waiting for a notification of its own
    call (a prompt's outcome, the call established): refused with the backlog full, it is
    told to the handler all the same, as while draining, so the call goes on rather than
    wait for Graph's retries in vain; the retries are then taken and delivered."""
    call = "waits"
    flood = [flood_item(call, n) for n in range(MAX_BACKLOG_BYTES // FLOOD_ITEM_BYTES + 2)]
    groups: Parity = await parity()
    await groups.run(lifecycle_of(call)[:2])  # incoming, establishing
    went_on: list[str] = []
    for group in groups.groups:
        for bot in group.bots:

            @bot.on(
                events.UnknownNotification,
                matches=lambda e: e.resource_url == flood[0]["resourceUrl"],
            )
            async def wait_to_be_established(call: Call, event: events.UnknownNotification) -> None:
                await call.wait_until_established()
                went_on.append(call.key)

    steps = [*(post(item) for item in flood), post(b.call_state(call, "established"))]
    for step in steps:
        await asyncio.gather(*(group.post(step) for group in groups.groups))
    await groups.settle()  # the handler went on: its queue was worked off
    assert len(went_on) == len(groups.groups)
    answers = zip(steps, groups.groups[0].statuses[2:], strict=True)
    refused = [step for step, status in answers if status == 503]
    assert refused[-1] == steps[-1]
    await groups.run([*refused, *lifecycle_of(call)[-1:]])
    groups.check()
    for group in groups.groups:
        seen = group.seen[id_key(call)]
        news = [entry["resource_url"] for entry in seen if entry["type"] == "UnknownNotification"]
        assert news == [item["resourceUrl"] for item in flood], group.name
        states = [entry.get("state") for entry in seen if entry["type"] == "CallStateChanged"]
        assert states == ["establishing", "established"], group.name
        assert seen[-1]["type"] == "CallTerminated", group.name


async def test_terminations_repeated_and_stragglers_within_the_grace(parity: Any) -> None:
    steps = [
        *lifecycle_of("ends", b.call_state("ends", "terminating")),
        post(b.call_terminated("ends")),
        post(recased(b.call_terminated("ends"))),
        post(b.call_terminated("ends", code=500, subcode=5001)),
        post(b.tone("ends", "tone1", 1), b.roster("ends", [b.participant("alice")])),
        post(b.incoming_call("ends")),
        post(b.call_state("ends", "establishing")),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()


async def test_stragglers_after_the_termination_grace(parity: Any) -> None:
    stragglers = [
        b.call_terminated("late"),
        b.tone("late", "tone1", 1),
        b.call_state("late", "established", subject="late"),
        b.roster("late", [b.participant("alice")]),
        b.incoming_call("late"),
        b.operation_update("late", "op-late"),
    ]
    steps: list[Step] = [*lifecycle_of("late"), GraceOver("late")]
    steps += [post(item) for item in stragglers]
    groups: Parity = await parity(termination_grace=1.0)
    await groups.run(steps)
    groups.check()


async def test_terminations_of_calls_forgotten_while_ringing(parity: Any) -> None:
    """With the Redis store, a termination told to the lifecycle on arrival (to wake what
    waits) made the sequencer's fresh record of a forgotten call closed: the termination
    itself was dropped as after_end, and on_terminated never ran."""
    steps: list[Step] = [
        post(b.incoming_call("first")),
        post(b.incoming_call("second")),  # one pending call at most: "first" is forgotten
        post(b.call_terminated("first")),
        post(b.call_terminated("second")),
    ]
    groups: Parity = await parity(max_pending_calls=1)
    await groups.run(steps)
    # Not whole parity: a forgotten call's record is gone from memory, not from Redis (so
    # the termination's previous state and snapshot differ), but every store delivers it.
    for group in groups.groups:
        for call in ("first", "second"):
            kinds = [entry["type"] for entry in group.seen.get(call, [])]
            assert kinds == ["IncomingCall", "CallTerminated"], (group.name, call, kinds)


async def test_another_tenants_token_on_a_call_forgotten_while_ringing(parity: Any) -> None:
    """A ringing call the memory store let go (too many pending calls) lost its tenant: any
    tenant could then take it over, and its own tenant's termination got 403. Redis keeps
    the binding; so does the lifecycle now, as long as it remembers ended calls."""
    steps: list[Step] = [
        post(b.incoming_call("first")),
        post(b.incoming_call("second")),  # one pending call at most: "first" is forgotten
        post(b.call_state("first", "establishing"), tenant=OTHER_TENANT),
        post(b.call_terminated("first")),
    ]
    groups: Parity = await parity(max_pending_calls=1)
    await groups.run(steps)
    for group in groups.groups:
        assert group.statuses == [202, 202, 403, 202], group.name
        kinds = [entry["type"] for entry in group.seen.get("first", [])]
        assert kinds == ["IncomingCall", "CallTerminated"], (group.name, kinds)


async def test_another_tenants_token(parity: Any) -> None:
    def theirs(*items: dict[str, Any]) -> Post:
        return post(*items, tenant=OTHER_TENANT)

    steps: list[Step] = [
        post(b.call_state("mine", "establishing")),
        theirs(b.call_state("mine", "established")),
        theirs(b.call_terminated("mine")),
        theirs(b.call_state("theirs", "establishing")),
        post(b.call_state("theirs", "established")),
        post(b.call_state("mine", "established")),
        theirs(b.call_state("theirs", "established")),
        post(b.call_terminated("mine")),
        theirs(b.call_terminated("theirs")),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()


async def test_another_tenants_token_on_the_call_s_id_in_braces(parity: Any) -> None:
    """A GUID in braces (or parentheses) is the same GUID to a .NET service such as Graph:
    another tenant's token naming ``{id}`` of a call took it for another call, past the
    tenant check, and a handler acting on it would have reached the call itself. In every
    store it is the same call: refused (403), and the call goes on for its own tenant."""
    call = "57dab8b1-894c-409a-b240-bd8beae78896"
    steps: list[Step] = [
        post(b.call_state(call, "establishing")),
        post(b.call_state("{" + call.upper() + "}", "established"), tenant=OTHER_TENANT),
        post(b.call_terminated(f"({call})"), tenant=OTHER_TENANT),
        post(b.call_state(call, "established")),
        post(b.call_terminated(call)),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()
    for group in groups.groups:
        assert group.statuses == [202, 403, 403, 202, 202], group.name
        seen = [entry.get("state") for entry in group.seen[id_key(call)]]
        assert seen == ["establishing", "established", "terminated"], group.name


async def test_another_tenants_token_on_any_spelling_dotnet_reads_as_the_call_s_guid(
    parity: Any,
) -> None:
    """.NET's ``Guid.Parse`` reads more than braces: white space around the GUID (any
    Unicode space: ASCII ones never pass the parser), the ``{0x..,0x..,0x..,{0x..,...}}``
    form (its 16-bit parts cut to 16 bits), ``+`` and ``0x`` before a part. Each was another
    call to the tenant check, accepted for another tenant's token; each is the call now."""
    call = "07dab8b1-004c-409a-b240-bd8beae78896"
    octets = "0xb2,0x40,0xbd,0x8b,0xea,0xe7,0x88,0x96"
    spellings = [
        "\u00a0" + call,
        call.upper() + "\u3000",
        "{0x07dab8b1,0x004c,0x409a,{" + octets + "}}",
        "{\u20030x+7dab8b1\u3000,0x1004c,0x0x409A,\u00a0{" + octets.upper() + "}}",
        "+7dab8b1-0x4c-409a-b240-bd8beae78896",
        "\u2003(+7dab8b1-+04c-409a-b240-bd8beae78896)",
    ]
    steps: list[Step] = [post(b.call_state(call, "establishing"))]
    steps += [post(b.call_state(other, "established"), tenant=OTHER_TENANT) for other in spellings]
    steps += [post(b.call_state(call, "established")), post(b.call_terminated(call))]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()
    for group in groups.groups:
        assert group.statuses == [202, *[403] * len(spellings), 202, 202], group.name
        seen = [entry.get("state") for entry in group.seen[id_key(call)]]
        assert seen == ["establishing", "established", "terminated"], group.name
        assert set(group.seen) == {id_key(call)}, group.name
    # What .NET reads as another GUID, or as none, stays another id.
    for other in (
        "+7dab8b1-0x4d-409a-b240-bd8beae78896",
        "0x7dab8b1-004c-409a-b240-bd8beae78896",  # nine characters where eight go
        "{0x07dab8b1,0x004c,0x409a,{" + octets.replace("0x96", "0x196") + "}}",
        "{0x07dab8b1,0x004c,0x409a,{" + octets + "}",
    ):
        assert id_key(other) != id_key(call), other


async def test_a_tenant_named_in_another_case_than_the_token_s(parity: Any) -> None:
    """An item may spell its tenant in another case than its token's ``tid``: every store
    gives handlers the token's spelling (Redis once gave the item's, read back)."""
    token_s = TEST_TENANT_ID.lower()

    def shouted(item: dict[str, Any]) -> dict[str, Any]:
        data = item.get("resourceData")
        if isinstance(data, dict):
            data = {**data, "tenantId": token_s.upper()}
        return {**item, "tenantId": token_s.upper(), "resourceData": data}

    steps: list[Step] = [
        post(shouted(b.incoming_call("loud")), tenant=token_s),
        post(shouted(b.call_state("loud", "established")), tenant=token_s),
        post(shouted(b.tone("loud", "tone1", 1)), tenant=token_s),
        post(shouted(b.call_terminated("loud")), tenant=token_s),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()
    for group in groups.groups:
        tenants = {entry["tenant"] for entry in group.seen.get("loud", [])}
        assert tenants == {token_s}, (group.name, tenants)


async def test_many_calls_in_large_batches(parity: Any) -> None:
    calls = [f"batch-{n}" for n in range(3)]
    flows = [
        [
            b.call_state(call, "established"),
            b.incoming_call(call),
            b.call_state(call, "establishing"),
            *(b.tone(call, "tone2", n) for n in range(1, 40)),
            b.roster(call, [b.participant("alice")]),
            b.call_terminated(call),
        ]
        for call in calls
    ]
    items = [item for group in zip(*flows, strict=True) for item in group]
    groups: Parity = await parity()
    await groups.run([post(*items[:60]), post(*items[60:]), post(*items[30:90])])
    groups.check()


async def test_a_state_released_alone_when_the_window_closes(parity: Any) -> None:
    groups: Parity = await parity(reorder_window=0.1)
    await groups.run([post(b.call_state("alone", "established"))])
    groups.check()


@pytest.mark.parametrize("seed", range(3))
async def test_the_documented_examples_perturbed(parity: Any, seed: int) -> None:
    by_call: dict[str, list[dict[str, Any]]] = {}
    for body in documented_bodies():
        if _named_tenant(body) is None:  # a token of the test tenant for every request
            for item in body["value"]:
                by_call.setdefault(id_key(call_of(item)), []).append(item)
    flows = [perturbed([*items, ending_of(call_of(items[0]))], seed) for items in by_call.values()]
    steps = [step for group in itertools.zip_longest(*flows) for step in group if step]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()


async def test_another_tenants_token_after_the_termination_grace(parity: Any) -> None:
    steps: list[Step] = [
        *lifecycle_of("ended"),
        GraceOver("ended"),
        post(b.call_terminated("ended"), tenant=OTHER_TENANT),
        post(b.tone("ended", "tone1", 1)),
    ]
    groups: Parity = await parity(termination_grace=1.0)
    await groups.run(steps)
    groups.check()
    # Still its tenant's once forgotten: another tenant is refused, its own straggler dropped.
    assert groups.groups[0].statuses[-2:] == [403, 202]


async def test_another_tenants_token_on_a_batch_of_two_calls(parity: Any) -> None:
    steps: list[Step] = [
        post(b.call_state("bound", "establishing")),
        post(b.call_state("other", "establishing"), tenant=OTHER_TENANT),
        post(
            b.call_state("fresh", "establishing"),
            b.call_state("bound", "established"),
            tenant=OTHER_TENANT,
        ),
        post(b.call_terminated("bound"), b.call_terminated("fresh"), b.call_terminated("other")),
        post(b.call_terminated("fresh"), b.call_terminated("other"), tenant=OTHER_TENANT),
    ]
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()
    # Only the items naming another tenant's call are refused: the others run, in memory too.
    memory = groups.groups[0]
    assert memory.statuses == [202, 202, 403, 403, 202]
    assert [e["type"] for e in memory.seen["bound"]] == ["CallStateChanged", "CallTerminated"]
    assert [e["type"] for e in memory.seen["fresh"]] == ["CallStateChanged", "CallTerminated"]
    # The items kept of a refused request count as accepted, in every store.
    for group in groups.groups:
        accepted = sum(bot.receiver.counts["accepted", ""] for bot in group.bots)
        assert accepted == 6, (group, accepted)


async def test_a_repeat_after_many_other_notifications(parity: Any) -> None:
    tones = [b.tone("many", "tone1", n) for n in range(1, 141)]
    steps = lifecycle_of("many", *tones, tones[0], recased(tones[-1]))
    groups: Parity = await parity()
    await groups.run(steps)
    groups.check()
    # A repeat is recognised among the call's last 128 notifications, in every store.
    sequences = [
        e["sequence"] for e in groups.groups[0].seen["many"] if e["type"] == "ToneReceived"
    ]
    assert sequences == [*range(1, 141), 1]


@pytest.mark.parametrize("stores", ["memory", "redis", "redis-pair", "redis-placer-stopped"])
async def test_handlers_of_a_placed_call_find_the_bot_in_the_roster_in_every_store(
    authority: TokenAuthority, serve: Any, redis_url: str, stores: str
) -> None:
    """Graph names the bot's own participant in its answer to the join, never in the
    notifications of a call the bot placed: every handler of the call has it in the call's
    snapshot (a notification later naming another or none takes nothing away), on whichever
    instance runs the call, the one that placed it being gone too, and finds the bot alone
    in the roster once everyone else left."""
    async with FakeGraph() as graph:
        options: dict[str, Any] = {
            "graph_url": graph.graph_url,
            "authority_url": graph.authority_url,
            "app_secret": "fake-graph-secret",
        }
        if stores != "memory":
            options["store"] = redis_url
        count = 2 if stores in ("redis-pair", "redis-placer-stopped") else 1
        bots = [make_bot(authority, **options) for _ in range(count)]
        seen: list[tuple[str, str | None, list[str]]] = []
        for bot in bots:

            @bot.on(events.Event)
            async def record(call: Call, event: events.Event) -> None:
                mine = call.snapshot.my_participant_id if call.snapshot is not None else None
                others = [p.id or "" for p in call.roster.values() if p.id != mine]
                seen.append((type(event).__name__, mine, others))

        servers = [await serve(bot) for bot in bots]
        placed = await bots[0].join_meeting(MEETING_URL)
        assert placed.snapshot is not None
        mine = placed.snapshot.my_participant_id
        assert mine is not None
        if stores == "redis-placer-stopped":
            await bots[0].stop()
        me = b.participant(mine, display_name="Bot", kind="applicationInstance")
        alice = b.participant("alice", display_name="Alice Smith")
        someone_else = b.call_state(placed.id, "established", subject="renamed")
        someone_else["resourceData"]["myParticipantId"] = "someone-else"
        nobody = b.call_state(placed.id, "established", subject="again")
        nobody["resourceData"]["myParticipantId"] = None
        items = [
            b.call_state(placed.id, "establishing"),
            b.call_state(placed.id, "established"),
            b.roster(placed.id, [me, alice]),
            someone_else,
            nobody,
            b.roster(placed.id, [me]),
            b.call_terminated(placed.id),
        ]
        for item in items:
            assert (await servers[-1].post(b.notifications(item))).status == 202
        await until(lambda: len(seen) == len(items), within=SETTLE_WITHIN)
    assert [mine_then for _, mine_then, _ in seen] == [mine] * len(items)
    rosters = [others for kind, _, others in seen if kind == "ParticipantsUpdated"]
    assert rosters == [["alice"], []]


@pytest.mark.parametrize("stores", ["memory", "redis", "redis-pair", "redis-placer-stopped"])
async def test_a_placed_call_s_roster_waits_for_established_in_every_store(
    authority: TokenAuthority, serve: Any, redis_url: str, stores: str
) -> None:
    """The bot joins a meeting, and Graph's documented roster of it (each notification a
    request of its own) arrives before the call's ``establishing`` and ``established``: the
    call is being set up from Graph's answer on, so the roster waits for ``established`` as
    an answered call's does, on whichever instance runs the call (the one that placed it
    being gone too: the answer is in the call's record then), and its handler sees the call
    established."""
    async with FakeGraph() as graph:
        options: dict[str, Any] = {
            "graph_url": graph.graph_url,
            "authority_url": graph.authority_url,
            "app_secret": "fake-graph-secret",
            "reorder_window": NEVER,
        }
        if stores != "memory":
            options["store"] = redis_url
        count = 2 if stores in ("redis-pair", "redis-placer-stopped") else 1
        bots = [make_bot(authority, **options) for _ in range(count)]
        seen: list[tuple[str, str | None]] = []
        for bot in bots:

            @bot.on(events.Event)
            async def record(call: Call, event: events.Event) -> None:
                label = event.state if isinstance(event, events.CallStateChanged) else None
                seen.append((label or type(event).__name__, call.state))

        servers = [await serve(bot) for bot in bots]
        placed = await bots[0].join_meeting(MEETING_URL)
        if stores == "redis-placer-stopped":
            await bots[0].stop()
        names = (
            "08-application-post-calls-ex5-join-meeting-roster.json",
            "06-application-post-calls-ex5-join-meeting-establishing.json",
            "07-application-post-calls-ex5-join-meeting-established.json",
        )
        for name in names:
            item = documented_item(name, placed.id)
            assert (await servers[-1].post(b.notifications(item))).status == 202
        await until(lambda: len(seen) == len(names), within=SETTLE_WITHIN)
    assert seen == [
        ("establishing", "establishing"),
        ("established", "established"),
        ("ParticipantsUpdated", "established"),
    ]


@pytest.mark.parametrize("stores", ["memory", "redis"])
async def test_the_answer_placing_a_call_counts_for_what_comes_after_it_in_every_store(
    authority: TokenAuthority, serve: Any, redis_url: str, stores: str
) -> None:
    """Graph may post a placed call's first notification before the bot reads its answer to
    the request: the handler of that one runs without the bot's participant id (nothing
    named it yet), the handlers of what comes after the answer with it, the run of the call
    holding it meanwhile (with Redis: the instance that placed it runs it already)."""
    async with FakeGraph() as graph:
        graph.route(
            "createCall",
            lambda request: FakeResponse(
                status=201,
                body={"id": "early-call", "state": "establishing", "myParticipantId": "me-1"},
            ),
        )
        options: dict[str, Any] = {
            "graph_url": graph.graph_url,
            "authority_url": graph.authority_url,
            "app_secret": "fake-graph-secret",
        }
        if stores != "memory":
            options["store"] = redis_url
        bot = make_bot(authority, **options)
        running = asyncio.Event()
        go_on = asyncio.Event()
        seen: list[tuple[str | None, str | None]] = []

        @bot.on(events.CallStateChanged)
        async def record(call: Call, event: events.CallStateChanged) -> None:
            seen.append((event.state, call.snapshot.my_participant_id if call.snapshot else None))
            running.set()
            await go_on.wait()  # the call's run is busy with it as Graph's answer is read

        server = await serve(bot)
        first = b.call_state("early-call", "establishing")
        assert (await server.post(b.notifications(first))).status == 202
        await asyncio.wait_for(running.wait(), SETTLE_WITHIN)
        placed = await bot.create_call(Target.user("user-1", "Lee Gu"))
        go_on.set()
        for item in (b.call_state(placed.id, "established"), b.call_terminated(placed.id)):
            assert (await server.post(b.notifications(item))).status == 202
        await until(lambda: len(seen) == 3, within=SETTLE_WITHIN)
    assert seen == [("establishing", None), ("established", "me-1"), ("terminated", "me-1")]


@pytest.mark.parametrize("answer", ["naming-the-bot", "naming-no-participant"])
@pytest.mark.parametrize("stores", ["memory", "redis", "redis-pair"])
async def test_a_placed_call_is_its_tenant_s_before_graph_posts_anything_of_it_in_every_store(
    authority: TokenAuthority, serve: Any, redis_url: str, stores: str, answer: str
) -> None:
    """Graph places a call in the tenant the bot's token acts in. Between its answer and its
    first notification, another tenant's token naming the call was taken as the call's
    tenant: the call became that tenant's, and its own notifications were refused. It is
    its tenant's from the answer on, whether or not the answer names the bot's participant,
    on every instance (with Redis, the other one too): the other tenant's is refused, and
    the call's own reach its handlers."""
    async with FakeGraph() as graph:
        if answer == "naming-no-participant":
            graph.route(
                "createCall",
                lambda request: FakeResponse(
                    status=201, body={"id": "placed-call", "state": "establishing"}
                ),
            )
        options: dict[str, Any] = {
            "graph_url": graph.graph_url,
            "authority_url": graph.authority_url,
            "app_secret": "fake-graph-secret",
        }
        if stores != "memory":
            options["store"] = redis_url
        bots = [make_bot(authority, **options) for _ in range(2 if stores == "redis-pair" else 1)]
        seen: list[tuple[str, str | None]] = []
        for bot in bots:

            @bot.on(events.CallStateChanged)
            async def record(call: Call, event: events.CallStateChanged) -> None:
                seen.append((event.state, event.tenant_id))

        servers = [await serve(bot) for bot in bots]
        placed = await bots[0].create_call(Target.user("user-1", "Lee Gu"))
        server = servers[-1]
        # Naming no tenant itself: the parser would refuse it for that alone.
        claim = without_tenant(b.call_state(placed.id, "establishing"))
        response = await server.post(
            b.notifications(claim), token=server.token(tenant_id=OTHER_TENANT)
        )
        assert (response.status, (await response.json())["error"]) == (403, "tenant_mismatch")
        for state in ("establishing", "established"):
            item = b.call_state(placed.id, state)
            assert (await server.post(b.notifications(item))).status == 202
        await until(lambda: len(seen) == 2, within=SETTLE_WITHIN)
    assert seen == [("establishing", TEST_TENANT_ID), ("established", TEST_TENANT_ID)]


@pytest.mark.parametrize("stores", ["memory", "redis"])
async def test_a_call_placed_by_a_bot_naming_its_tenant_by_domain_gets_its_notifications(
    authority: TokenAuthority, serve: Any, redis_url: str, stores: str
) -> None:
    """The token endpoint takes a tenant's domain name as well as its id, but Graph's tokens
    prove the id (``tid``): a call placed by a bot whose tenant_id is a domain name is not
    bound to that name, else each of its own notifications would be refused (403)."""
    async with FakeGraph() as graph:
        options: dict[str, Any] = {
            "tenant_id": "contoso.onmicrosoft.com",
            "graph_url": graph.graph_url,
            "authority_url": graph.authority_url,
            "app_secret": "fake-graph-secret",
        }
        if stores != "memory":
            options["store"] = redis_url
        bot = make_bot(authority, **options)
        seen: list[str] = []

        @bot.on(events.CallStateChanged)
        async def record(call: Call, event: events.CallStateChanged) -> None:
            seen.append(event.state)

        server = await serve(bot)
        placed = await bot.create_call(Target.user("user-1", "Lee Gu"))
        for state in ("establishing", "established"):
            item = b.call_state(placed.id, state)
            assert (await server.post(b.notifications(item))).status == 202
        await until(lambda: len(seen) == 2, within=SETTLE_WITHIN)
    assert seen == ["establishing", "established"]


@pytest.mark.parametrize("stores", ["memory", "redis-running", "redis-idle"])
async def test_a_transfer_asked_from_another_call_s_handler_counts_where_the_call_runs(
    authority: TokenAuthority, serve: Any, redis_url: str, stores: str
) -> None:
    """A consultative transfer is asked from the consult call's handler, through the handle
    of the caller's call: with Redis, on an instance that does not run the caller's call
    (another one runs it, or none does at that moment). The transfer was counted where it
    was asked, not where the call runs next: Graph told the second transfer's failure by an
    update alone, worded as the first, and it was dropped there as a repeat. The ask is now
    in the call's inbox: every store tells both failures (a copy of the second is a
    repeat), then the call's end."""
    caller = "caller-call"
    async with FakeGraph() as graph:
        graph.add_call(caller)
        options: dict[str, Any] = {
            "graph_url": graph.graph_url,
            "authority_url": graph.authority_url,
            "app_secret": "fake-graph-secret",
        }
        if stores != "memory":
            options["store"] = redis_url
        bots = [make_bot(authority, **options) for _ in range(1 if stores == "memory" else 2)]
        # The caller's call's run is busy with a handler of it while the transfer is asked.
        busy = stores != "redis-idle"
        handling = [asyncio.Event(), asyncio.Event()]
        go_on = [asyncio.Event(), asyncio.Event()]
        heard: list[str] = []
        asked: list[tuple[int, bool, bool]] = []

        def running_caller(bot: CallBot) -> bool:
            store = bot._running().store
            return isinstance(store, _redis.RedisStore) and id_key(caller) in store._owned

        for index, bot in enumerate(bots):

            @bot.on_state("established")
            async def established(
                call: Call, event: events.CallStateChanged, bot: CallBot = bot, index: int = index
            ) -> None:
                if call.id == caller:
                    if busy:
                        handling[0].set()
                        await go_on[0].wait()
                    return
                # The agent on a consult call answered: the caller goes to the agent.
                asked.append((index, running_caller(bot), running_caller(bots[0])))
                transferred = bot.services.call(caller)
                await transferred.transfer(
                    Target.user("agent-id", "Agent"), replaces_call_id=call.id
                )

            @bot.on_call_updated
            async def failed(call: Call, event: events.CallUpdated) -> None:
                if call.id == caller and event.result_info is not None:
                    heard.append(f"failed {event.result_info.subcode}")
                    if busy and len(heard) == 1:
                        handling[1].set()
                        await go_on[1].wait()

            @bot.on_terminated
            async def over(call: Call, event: events.CallTerminated) -> None:
                if call.id == caller:
                    heard.append("ended")

        def heard_failures(count: int) -> bool:
            return len(heard) == count

        def transfers_asked(count: int) -> bool:
            return len(graph.requests_for("transfer")) == count

        servers = [await serve(bot) for bot in bots]
        for state in ("establishing", "established"):
            item = b.notifications(b.call_state(caller, state))
            assert (await servers[0].post(item)).status == 202
        why = models.ResultInfo(code=500, subcode=7000, message="Transfer failed.")
        failure = b.notifications(b.call_state(caller, "established", result_info=why))
        for attempt in range(2):
            if busy:
                await asyncio.wait_for(handling[attempt].wait(), SETTLE_WITHIN)
            else:
                await until(functools.partial(heard_failures, attempt), within=SETTLE_WITHIN)
                # Given up by its run after a moment with nothing to do: nobody runs it.
                await until(lambda: not any(map(running_caller, bots)), within=SETTLE_WITHIN)
            # A consult call of its own each time, in one request: the last instance, which
            # nobody else runs it on, takes it on and runs both.
            consult = f"consult-{attempt}"
            setup = [b.call_state(consult, "establishing"), b.call_state(consult, "established")]
            assert (await servers[-1].post(b.notifications(*setup))).status == 202
            await until(functools.partial(transfers_asked, attempt + 1), within=SETTLE_WITHIN)
            assert (await servers[0].post(failure)).status == 202
            go_on[attempt].set()
        assert (await servers[0].post(failure)).status == 202  # Graph sent the second twice
        ended = b.notifications(b.call_terminated(caller))
        assert (await servers[0].post(ended)).status == 202
        await until(lambda: heard[-1:] == ["ended"], within=SETTLE_WITHIN)
    assert heard == ["failed 7000", "failed 7000", "ended"]
    if stores == "redis-running":
        assert asked == [(1, False, True)] * 2  # asked on the instance not running the call
    elif stores == "redis-idle":
        assert asked == [(1, False, False)] * 2  # asked while no instance ran it


async def test_a_request_sent_again_after_part_of_it_was_refused(
    parity: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graph sends a request again whole when part of it was refused (a call's backlog full):
    what was kept of it the first time is a repeat, though a roster (or a live state) coming
    back after another is news otherwise. Rosters A and B kept, C refused: the request sent
    again delivers C only, a change from B, in every store."""
    monkeypatch.setattr(_sequencing, "MAX_BACKLOG_ENTRIES", 3)
    monkeypatch.setattr(_redis, "MAX_BACKLOG_ENTRIES", 3)
    call = "resent"
    alice, bob, carol = (b.participant(name) for name in ("alice", "bob", "carol"))
    rosters = [b.roster(call, people) for people in ([alice], [alice, bob], [bob, carol])]
    groups: Parity = await parity()
    for step in lifecycle_of(call)[:3]:
        await groups.run([step])  # one at a time: the call's backlog holds three
    release = waiting_for_a_prompt(groups)

    prompt = post(b.unknown(call, "/someFutureResource"))
    refused = post(*rosters)
    for step in (prompt, refused):  # A and B wait behind the prompt, C is refused
        await asyncio.gather(*(group.post(step) for group in groups.groups))
    release.set()
    await groups.settle()
    await groups.run([refused])  # Graph sends it again
    # Its end once what it kept has run: sent at once, it may find the call's backlog of
    # three still full where handlers run on another instance.
    await groups.run(lifecycle_of(call)[-1:])
    groups.check()
    for group in groups.groups:
        assert group.statuses[-4:] == [202, 503, 202, 202], group.name
        seen = group.seen[id_key(call)]
        told = [entry["participants"] for entry in seen if entry["type"] == "ParticipantsUpdated"]
        assert told == [["alice"], ["alice", "bob"], ["bob", "carol"]], group.name
