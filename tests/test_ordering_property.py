"""The ordering promise, checked on real calls delivered the ways Graph delivers them.

Each recorded call (the two P2P calls, the group call, the failed P2P call, the beta
outgoing call that rings) and each documented flow (answer and hang up, answer and
transfer, reject, redirect, create a call that shares content, join a meeting) is
delivered to a real bot, one notification per request, in every order of a bounded,
deterministic set built from its published one:

(a) each pair of neighbours swapped;
(b) seeded shuffles moving each notification at most ``SPREAD`` places;
(c) each notification repeated once, at each later point before the call's end;
(d) each notification repeated after the call's end.

What the handlers saw must keep the promise: one call's events in lifecycle order
(``previous_state`` and the handle's state agreeing with what handlers saw before),
each transition once, ``on_incoming_call`` at most once, ``on_terminated`` once and
last, an update (``on_call_updated``) only of the state the call is in, a roster, tone,
content sharing or operation outcome never before the state it follows in the
published order (once the call has any state: a call known by nothing else yet holds
nothing), nothing that came before the end lost but a stale state, and no notification
run twice, except a copy that design.md says is news (a roster or content sharing after
a different one, a live call's state after the call moved on).

Both stores are checked. Each request waits for its 202 and for the bot to have run
everything it accepted, by condition; the reorder window is one no test reaches, so a
held event goes only with what it waits for or the call's end: nothing depends on
timing.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from callbot import Call, CallBot, events, models
from callbot._ids import id_key
from callbot.store import _redis
from callbot.testing import TokenAuthority
from callbot.testing import builders as b

from .conftest import (
    BotServer,
    load_notification_text,
    make_bot,
    normalized_json,
    notification_files,
)
from .test_recorded import CALLS, ending
from .test_redis import KEY_PREFIX, redis_server, redis_url

__all__ = ["redis_server", "redis_url"]  # fixtures this module uses

# A window no test reaches: a held event goes with what it waits for or the call's end.
NEVER = 300.0
SPREAD = 3
SHUFFLES = 24

_PHASE = {state: n for n, states in enumerate(models.CALL_LIFECYCLE) for state in states}
_LIVE = _PHASE["established"]
_ESTABLISHING = _PHASE["establishing"]
_TERMINATING = _PHASE["terminating"]

# Documented flows: the numbers of their examples in fixtures/notifications.
DOCUMENTED = {
    "answer-hangup": ["09", "10", "11", "40", "41"],
    "answer-transfer": ["09", "10", "11", "24", "25", "26"],
    "reject": ["16", "17"],
    "redirect": ["18", "19"],
    "create-call-sharing": ["01", "02", "03", "04", "05"],
    "join-meeting": ["06", "07", "08"],
}


# -- the calls -----------------------------------------------------------------------------


def _path(item: dict[str, Any]) -> str:
    return str(item.get("resourceUrl") or item.get("resource") or "")


def state_of(item: dict[str, Any]) -> str | None:
    """The state a notification moves its call into; ``None`` for anything else (a tone)."""
    if not re.search(r"calls/[^/]+/?$", _path(item)):
        return None
    data = item.get("resourceData")
    data = data if isinstance(data, dict) else {}
    if "toneInfo" in data:
        return None
    if str(item.get("changeType", "")).lower() == "deleted":
        return "terminated"
    state = data.get("state")
    return models.canonical_call_state(state) if isinstance(state, str) else None


def flows() -> dict[str, list[dict[str, Any]]]:
    """Each call's notifications in published order, a termination last."""
    out = {
        name: [item for body in call.bodies() for item in body["value"]]
        for name, call in CALLS.items()
    }
    files = {name[:2]: name for name in notification_files()}
    for flow, numbers in DOCUMENTED.items():
        items: list[dict[str, Any]] = [
            item
            for number in numbers
            for item in normalized_json(load_notification_text(files[number]))["value"]
        ]
        if state_of(items[-1]) != "terminated":
            items += ending({"value": items})["value"]
        out[flow] = items
    return out


def readdressed(items: list[dict[str, Any]], call_id: str) -> list[dict[str, Any]]:
    """The items as notifications of one call, ``call_id`` (the documented examples of a
    flow name several)."""
    text = json.dumps(items)
    named = {m.group(1) for item in items if (m := re.search(r"calls/([^/]+)", _path(item)))}
    for original in sorted(named, key=len, reverse=True):
        text = text.replace(original, call_id)
    out: list[dict[str, Any]] = json.loads(text)
    return out


def perturbations(size: int, seed: str) -> Iterator[tuple[str, list[int]]]:
    """Orders of a call's ``size`` notifications, as indexes (the termination is last),
    each once (a shuffle may give an order already given)."""
    given: set[tuple[int, ...]] = set()
    for label, order in _perturbations(size, seed):
        if tuple(order) not in given:
            given.add(tuple(order))
            yield label, order


def _perturbations(size: int, seed: str) -> Iterator[tuple[str, list[int]]]:
    published = list(range(size))
    yield "as published", published
    for i in range(size - 1):
        swapped = list(published)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        yield f"swap {i}", swapped
    for n in range(SHUFFLES):
        rng = random.Random(f"{seed}/{n}")
        keys = [i + rng.uniform(0, SPREAD) for i in published]
        yield f"shuffle {n}", sorted(published, key=keys.__getitem__)
    for i in range(size):
        for at in range(i + 1, size):
            yield f"repeat {i} at {at}", [*published[:at], i, *published[at:]]
    for i in range(size):
        yield f"repeat {i} after the end", [*published, i]


# -- what handlers saw, and the promise ----------------------------------------------------


@dataclass
class Seen:
    """A handler run: which handler, the event, and the call's state on its handle."""

    handler: str
    event: events.Event
    state: str | None


def observing(bot: CallBot) -> dict[str, list[Seen]]:
    """What each of the bot's handlers saw, by call."""
    seen: dict[str, list[Seen]] = {}

    def note(name: str) -> Callable[[Call, Any], Awaitable[None]]:
        async def handler(call: Call, event: events.Event) -> None:
            seen.setdefault(event.call_key, []).append(Seen(name, event, call.state))

        return handler

    bot.on_incoming_call(note("incoming"))
    bot.on_state(*(s for s in models.CALL_STATES if s != "incoming"))(note("state"))
    bot.on_call_updated(note("updated"))
    bot.on_tone(note("tone"))
    bot.on_participants(note("roster"))
    bot.on_operation(note("operation"))
    bot.on(events.ContentSharingUpdated)(note("sharing"))
    bot.on(events.UnknownNotification)(note("unknown"))
    bot.on_terminated(note("terminated"))
    return seen


def _phase(state: str | None) -> int:
    return -1 if state is None else _PHASE.get(state, _LIVE)


def _kind(event: events.Event) -> str | None:
    """Of what a copy may be news again after another of its kind (design.md, Duplicate)."""
    if isinstance(event, events.ParticipantsUpdated):
        return "roster"
    if isinstance(event, events.ContentSharingUpdated):
        return "sharing"
    if isinstance(event, events.CallStateChanged | events.CallUpdated):
        return "live" if _phase(event.state) == _LIVE else None
    return None


@dataclass
class Delivery:
    event: events.Event
    index: int
    handlers: list[str]
    state: str | None


def broken_promises(items: list[dict[str, Any]], order: list[int], seen: list[Seen]) -> list[str]:
    """How what handlers saw of ``items`` delivered in ``order`` breaks the promise."""
    problems: list[str] = []
    index_of = {json.dumps(item, sort_keys=True): i for i, item in enumerate(items)}
    states = [state_of(item) for item in items]
    deliveries: list[Delivery] = []
    for run in seen:
        if deliveries and deliveries[-1].event is run.event:
            deliveries[-1].handlers.append(run.handler)
        else:
            index = index_of[json.dumps(run.event.raw, sort_keys=True)]
            deliveries.append(Delivery(run.event, index, [run.handler], run.state))

    def said(delivery: Delivery, what: str) -> None:
        problems.append(f"{'+'.join(delivery.handlers)} of #{delivery.index}: {what}")

    ends = [d for d in deliveries if "terminated" in d.handlers]
    if len(ends) != 1:
        problems.append(f"on_terminated ran {len(ends)} times")
    if deliveries and "terminated" not in deliveries[-1].handlers:
        said(deliveries[-1], "after the termination")
    if sum("incoming" in d.handlers for d in deliveries) > 1:
        problems.append("on_incoming_call ran more than once")
    current: str | None = None
    moves: list[str] = []
    last_seen: dict[int, int] = {}
    for position, delivery in enumerate(deliveries):
        event, index = delivery.event, delivery.index
        news_again = False
        if index in last_seen:
            kind = _kind(event)
            since = deliveries[last_seen[index] + 1 : position]
            news_again = kind is not None and any(
                _kind(d.event) == kind and d.index != index for d in since
            )
            if not news_again:
                said(delivery, "a copy run again")
        last_seen[index] = position
        if isinstance(event, events.IncomingCall | events.CallStateChanged):
            state = event.state
            if not {"incoming", "state"} & set(delivery.handlers):
                said(delivery, "a move no on_state or on_incoming_call handler saw")
            if state in moves and not news_again:
                said(delivery, f"a second move into {state}")
            if _phase(state) < _phase(current):
                said(delivery, f"{current} -> {state} goes backwards")
            previous = getattr(event, "previous_state", None)
            if previous != current:
                said(delivery, f"previous_state {previous}, handlers saw {current}")
            moves.append(state)
            current = state
        elif isinstance(event, events.CallUpdated):
            if event.state != current:
                said(delivery, f"an update of {event.state} while handlers saw {current}")
        else:
            follows = next((s for s in reversed(states[:index]) if s is not None), None)
            if current is not None and _phase(current) < _phase(follows):
                said(delivery, f"(after {follows}) while handlers saw {current}")
        if delivery.state != current:
            said(delivery, f"the handle says {delivery.state}, handlers saw {current}")
    # Nothing that came before the end is lost, but a stale state.
    first = {i: order.index(i) for i in set(order)}
    for index in sorted(first):
        if first[index] > first[len(items) - 1] or index in last_seen:
            continue
        if not _stale(index, states, first):
            problems.append(f"#{index} ({states[index] or 'no state'}) never delivered")
    return problems


def _stale(index: int, states: list[str | None], first: dict[int, int]) -> bool:
    """Whether notification ``index`` is a state older than one that came before it and was
    not held for it (a state past ``establishing`` before the call was seen establishing
    waits for its predecessors)."""
    state = states[index]
    if state is None:
        return False
    for later in (j for j in first if first[j] < first[index]):
        phase = _phase(states[later])
        if phase <= _phase(state):
            continue
        held = _ESTABLISHING < phase < _TERMINATING and not any(
            first[k] < first[later] and _phase(states[k]) >= _ESTABLISHING for k in first
        )
        if not (held and _phase(state) <= _ESTABLISHING):
            return True
    return False


# -- delivering ----------------------------------------------------------------------------


class Harness:
    """One bot on a store, and how to tell it has run everything it accepted."""

    def __init__(
        self, server: BotServer, seen: dict[str, list[Seen]], client: aioredis.Redis | None
    ) -> None:
        self.server = server
        self.seen = seen
        self.client = client
        self.calls = 0

    @property
    def runtime(self) -> Any:
        return self.server.bot._running()

    async def _fed(self, key: str) -> bool:
        """With Redis: every entry of the call's inbox handed to the sequencer."""
        if self.client is None:
            return True
        inbox = _redis._Keys(KEY_PREFIX).of(key, "inbox")[0]
        last = await self.client.xrevrange(inbox, "+", "-", count=1)
        if not last:
            return True
        run = self.runtime.store._running.get(key)
        return run is not None and not run.buffer and run.fed == last[0][0]

    async def _idle(self, key: str) -> bool:
        return not self.runtime.dispatcher.busy_with(key) and await self._fed(key)

    async def _settled(self, key: str) -> bool:
        """Idle, nothing held, and with Redis the call given up with its inbox empty."""
        if not await self._idle(key) or not self.runtime.settled(key):
            return False
        if self.client is None:
            return True
        inbox, lease = _redis._Keys(KEY_PREFIX).of(key, "inbox", "lease")
        return not await self.client.exists(lease) and not await self.client.xlen(inbox)

    async def deliver(
        self, items: list[dict[str, Any]], order: list[int]
    ) -> tuple[list[dict[str, Any]], list[Seen]]:
        """``items`` as notifications of a new call, in ``order``: the items as posted, and
        what handlers saw."""
        self.calls += 1
        call_id = f"{self.calls:08x}-0000-4000-8000-00000000c0de"
        key = id_key(call_id)
        posted = readdressed(items, call_id)
        for index in order:
            response = await self.server.post(b.notifications(posted[index]))
            assert response.status == 202, await response.text()
            await _wait(lambda: self._idle(key))
        await _wait(lambda: self._settled(key))
        return posted, self.seen.get(key, [])


async def _wait(predicate: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110 - state in the bot's tasks and in Redis
            await asyncio.sleep(0.001)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def harness(
    request: pytest.FixtureRequest, authority: TokenAuthority, serve: Any
) -> AsyncIterator[Harness]:
    options: dict[str, Any] = {"reorder_window": NEVER, "termination_grace": 60.0}
    client: aioredis.Redis | None = None
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        client = aioredis.Redis.from_url(url, decode_responses=True)
        options["store"] = url
    bot = make_bot(authority, **options)
    seen = observing(bot)
    try:
        yield Harness(await serve(bot), seen, client)
    finally:
        if client is not None:
            await client.aclose()


def test_the_perturbations_are_the_ones_meant() -> None:
    sizes = {name: len(items) for name, items in flows().items()}
    assert sizes == {
        "p2p-simple": 6,
        "p2p-updates": 7,
        "group": 5,
        "failed-p2p": 2,
        "outgoing-ringing": 4,
        "answer-hangup": 5,
        "answer-transfer": 6,
        "reject": 2,
        "redirect": 2,
        "create-call-sharing": 6,
        "join-meeting": 4,
    }
    kinds = Counter(
        label.split()[0] + (" after the end" if label.endswith("end") else "")
        for name, items in flows().items()
        for label, _ in perturbations(len(items), name)
    )
    assert kinds == {
        "as": 11,
        "swap": 38,
        "shuffle": 43,
        "repeat": 101,
        "repeat after the end": 49,
    }
    orders = list(perturbations(3, "seed"))
    assert orders[:3] == [("as published", [0, 1, 2]), ("swap 0", [1, 0, 2]), ("swap 1", [0, 2, 1])]
    assert all(sorted(set(order)) == [0, 1, 2] for _, order in orders)
    assert list(perturbations(3, "seed")) == orders  # seeded: the same every run
    assert ("repeat 0 at 1", [0, 0, 1, 2]) in orders
    assert ("repeat 1 at 2", [0, 1, 1, 2]) in orders
    assert ("repeat 2 after the end", [0, 1, 2, 2]) in orders


async def test_handlers_see_each_call_in_order_whatever_graph_does(harness: Harness) -> None:
    broken: list[str] = []
    for name, items in flows().items():
        for label, order in perturbations(len(items), name):
            posted, seen = await harness.deliver(items, order)
            broken += (
                f"{name}, {label} {order}: {p}" for p in broken_promises(posted, order, seen)
            )
    assert not broken, "\n".join(broken)
