"""The ordering promise, checked on real calls delivered the ways Graph delivers them.

Each recorded call (the two P2P calls, the group call, the failed P2P call, the beta
outgoing call that rings, and two calls whose operation was reported running, then
done) and each documented flow (answer and hang up, answer and
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
nothing), an operation only going forward and ending once, nothing that came before the
end lost but a stale state or an operation's stale progress, and no notification run
twice, except a copy that design.md says is news (a roster or content sharing after a
different one, a live call's state after the call moved on).

Both stores are checked. Each request waits for its 202 and for the bot to have run
everything it accepted, by condition; the reorder window is one no test reaches, so a
held event goes only with what it waits for or the call's end: nothing depends on
timing.

Live calls are also generated (seeded): keys, moves between states and updates, transfers
the bot asks (some twice before any news, some refused) and their news, delivered out of
order, partly twice, the call ending at any point; on both stores, and on a sequencer alone
whose window closes at chosen points (live_call_broken says what they must keep).
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
from callbot import _sequencing as sequencing
from callbot._ids import id_key
from callbot._lifecycle import Lifecycle
from callbot._parse import parse_payload
from callbot.store import _redis
from callbot.testing import TokenAuthority
from callbot.testing import builders as b

from .conftest import (
    BotServer,
    load_notification_text,
    make_bot,
    normalized_json,
    notification_files,
    until,
)
from .test_recorded import CALLS, OPERATION_CALLS, ending
from .test_redis import KEY_PREFIX, redis_server, redis_url
from .test_robustness_sequencer import WINDOW, Run

__all__ = ["redis_server", "redis_url"]  # fixtures this module uses

# A window no test reaches: a held event goes with what it waits for or the call's end.
NEVER = 300.0
SPREAD = 3
SHUFFLES = 24

_PHASE = {state: n for n, states in enumerate(models.CALL_LIFECYCLE) for state in states}
_LIVE = _PHASE["established"]
_ESTABLISHING = _PHASE["establishing"]
_TERMINATING = _PHASE["terminating"]
# Within the live phase, a transfer goes forward: accepted, it is never transferring again.
_TRANSFER_BACK = ("transferAccepted", "transferring")

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
        for name, call in {**CALLS, **OPERATION_CALLS}.items()
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


def operation_of(item: dict[str, Any]) -> tuple[str, int] | None:
    """The operation a notification reports (its key) and how far it got, if it reports one."""
    (event,) = parse_payload(b.notifications(item))
    if not isinstance(event, events.OperationUpdated) or event.operation_key is None:
        return None
    return event.operation_key, _STEPS.get(event.status, _STEPS["running"])


# An operation's life: not started, running (or a status Graph adds later), its outcome.
_STEPS = {"notStarted": 0, "running": 1, "completed": 2, "failed": 2}
_SETTLED = _STEPS["completed"]


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
    operations = [operation_of(item) for item in items]
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
    reached: dict[str, int] = {}
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
            if _phase(state) < _phase(current) or (current, state) == _TRANSFER_BACK:
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
            operation = operations[index]
            if operation is not None:
                key, step = operation
                if reached.get(key) == _SETTLED:
                    said(delivery, "the operation again after its outcome")
                elif step < reached.get(key, step):
                    said(delivery, "the operation back where it was before")
                reached[key] = max(step, reached.get(key, step))
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
        if not _stale(index, states, first) and not _behind(index, operations, first):
            problems.append(f"#{index} ({states[index] or 'no state'}) never delivered")
    return problems


def _behind(index: int, operations: list[tuple[str, int] | None], first: dict[int, int]) -> bool:
    """Whether notification ``index`` reports an operation that one coming before it reported
    further on, or ended."""
    operation = operations[index]
    if operation is None:
        return False
    key, step = operation
    return any(
        first[other] < first[index]
        and (told := operations[other]) is not None
        and told[0] == key
        and (told[1] > step or told[1] == _SETTLED)
        for other in first
    )


def _stale(index: int, states: list[str | None], first: dict[int, int]) -> bool:
    """Whether notification ``index`` is a state older than one that came before it and was
    not held for it (a state past ``establishing`` before the call was seen establishing
    waits for its predecessors)."""
    state = states[index]
    if state is None:
        return False
    accepted, back = _TRANSFER_BACK
    if state == back and any(first[j] < first[index] and states[j] == accepted for j in first):
        # A transfer only goes forward: in these flows the bot asks none, so nothing holds
        # transferAccepted for its transferring (each flow has one transfer).
        return True
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

    async def deliver_live(self, seed: int) -> tuple[list[LiveStep], list[Seen]]:
        """The live call ``seed`` makes (with no window closing), each step as its own
        request (the bot's own transfers told to its store): the steps, and what handlers
        saw."""
        self.calls += 1
        call_id = f"{self.calls:08x}-0000-4000-8000-0000000011fe"
        key = id_key(call_id)
        steps = live_call(seed, call_id, windows=False)
        for step in steps:
            if isinstance(step, Asked):
                await self.runtime.store.note(sequencing.TransferAsked(call_id))
            elif isinstance(step, Refused):
                await self.runtime.store.note(sequencing.TransferRefused(call_id))
            else:
                news = _told(step)
                assert news is not None, "the window never closes here"
                response = await self.server.post(b.notifications(news.item))
                assert response.status == 202, await response.text()
            await _wait(lambda: self._idle(key))
        await _wait(lambda: self._settled(key))
        return steps, self.seen.get(key, [])


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
        "transfer-2018": 5,
        "recording-2019": 5,
    }
    kinds = Counter(
        label.split()[0] + (" after the end" if label.endswith("end") else "")
        for name, items in flows().items()
        for label, _ in perturbations(len(items), name)
    )
    assert kinds == {
        "as": 13,
        "swap": 46,
        "shuffle": 51,
        "repeat": 121,
        "repeat after the end": 59,
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


# -- live calls: keys, states and transfers, generated --------------------------------------
#
# A live call's keys (tones numbered one by one), moves between established and hold and
# updates (each different), transfers the bot asks (once, or twice before any news: its first
# request failed without a refusal) that Graph refuses or that fail (transferring, at times
# transferAccepted, then the failure, worded alike each time; or the failure alone, at times
# after transferAccepted, which waits out the window), and its end. Graph's news arrives out of
# order (neighbours swapped: keys with anything, a transfer's own news, the end with what came
# before it; never two other states, and never a transfer's news before the bot asked it),
# some of it twice, and the window closes at any point. What handlers see must keep the
# promise (live_call_broken).

TRANSFER_FAILED = models.ResultInfo(code=500, subcode=7000, message="Transfer failed.")
LIVE_CALLS = 400
LIVE_CALLS_SERVED = 150


@dataclass(frozen=True)
class News:
    """A notification, numbered in the order Graph sent it."""

    number: int
    kind: str  # setup, tone, state, transferring, accepted, failure, end
    item: dict[str, Any]
    state: str | None = None
    sequence: int | None = None
    transfer: int | None = None
    """The transfer whose news it is, counted from 1."""
    copyable: bool = True
    """False for a transfer's news while another transfer was asked: a copy of it is news
    of that other transfer (worded alike), for the bot as for anyone reading it."""


@dataclass(frozen=True)
class Again:
    """Graph sends ``news`` once more."""

    news: News


@dataclass(frozen=True)
class Asked:
    """The bot asks Graph for a transfer (``Store.note(TransferAsked)``)."""


@dataclass(frozen=True)
class Refused:
    """Graph refused the transfer asked (``Store.note(TransferRefused)``)."""


@dataclass(frozen=True)
class WindowCloses:
    """The reorder window closes on what is held."""


LiveStep = News | Again | Asked | Refused | WindowCloses


def live_call(seed: int, call_id: str, *, windows: bool) -> list[LiveStep]:
    """A live call's notifications and the bot's transfers, in the order the bot gets them."""
    rng = random.Random(seed)
    return _arriving(rng, _as_sent(rng, call_id, windows=windows), windows=windows)


def _as_sent(rng: random.Random, call_id: str, *, windows: bool) -> list[LiveStep]:
    sent: list[LiveStep] = []

    def send(kind: str, item: dict[str, Any], state: str | None, **known: Any) -> None:
        sent.append(News(len(sent), kind, item, state, **known))

    key = rng.choice([1, 6])  # a call's count need not start at 1

    def key_pressed() -> None:
        nonlocal key
        send("tone", b.tone(call_id, f"tone{key % 10}", key), None, sequence=key)
        key += 1

    send("setup", b.call_state(call_id, "establishing"), "establishing")
    send("setup", b.call_state(call_id, "established"), "established")
    state = "established"
    transfers = 0
    for _ in range(rng.randint(3, 16)):
        roll = rng.random()
        if roll < 0.45:
            key_pressed()
        elif roll < 0.65 or state != "established":
            if rng.random() < 0.7:
                state = "hold" if state == "established" else "established"
            n = len(sent)  # values no other state has
            subject: dict[str, Any] = {"subject": f"s{n}"}
            uri: dict[str, Any] = {"callback_uri": f"https://bot.example.test/{n}"}
            values = rng.choice([subject, uri, subject | uri])
            send("state", b.call_state(call_id, state, **values), state)
        else:
            asked = rng.choice([1, 1, 2])
            sent += [Asked() for _ in range(asked)]
            for _ in range(asked):
                transfers += 1
                outcome = rng.choice(["refused", "failed", "failed", *(["alone"] * windows)])
                if outcome == "refused":
                    sent.append(Refused())
                    continue
                told = {"transfer": transfers, "copyable": asked == 1}
                if outcome == "failed":
                    transferring = b.call_state(call_id, "transferring")
                    send("transferring", transferring, "transferring", **told)
                    if rng.random() < 0.4:
                        key_pressed()
                # Not when two were asked at once: whose a late one is, no one can tell.
                if asked == 1 and rng.random() < 0.4:
                    accepted = b.call_state(call_id, "transferAccepted")
                    send("accepted", accepted, "transferAccepted", **told)
                failure = b.call_state(call_id, "established", result_info=TRANSFER_FAILED)
                send("failure", failure, "established", **told)
                if outcome == "alone":
                    sent.append(WindowCloses())  # its transferring never comes
    if rng.random() < 0.4:
        send("end", b.call_state(call_id, "terminating"), "terminating")
    send("end", b.call_terminated(call_id), "terminated")
    return sent


# A transfer's news in the order Graph sends it.
_TRANSFER_NEWS = {"transferring": 0, "accepted": 1, "failure": 2}
# What of its transfer's news held a transfer's progress overtakes (with what came behind).
_OVERTAKES = {"transferring": ("accepted", "failure"), "accepted": ("failure",)}


def _free(step: LiveStep) -> bool:
    """News that may cross the bot's own steps and the window: a key, a state of no transfer."""
    return isinstance(step, News) and step.kind in ("tone", "state")


def _may_swap(first: LiveStep, then: LiveStep) -> bool:
    """Whether ``then`` may arrive before ``first``, its neighbour."""
    if isinstance(first, Again) or isinstance(then, Again):
        other = then if isinstance(first, Again) else first
        return isinstance(other, News) and other.kind == "tone"
    if not isinstance(first, News) or not isinstance(then, News):
        return _free(first) or _free(then)
    kinds = {first.kind, then.kind}
    if kinds == {"setup"}:
        return True  # establishing and established, swapped
    if first.kind in _TRANSFER_NEWS and then.kind in _TRANSFER_NEWS:
        # One transfer's requests, swapped.
        ranks = _TRANSFER_NEWS[first.kind], _TRANSFER_NEWS[then.kind]
        return first.transfer == then.transfer and ranks[0] < ranks[1]
    if "end" in kinds:
        return "setup" not in kinds and kinds != {"end"}  # the end, at any point once live
    return "tone" in kinds and "setup" not in kinds


def _arriving(rng: random.Random, sent: list[LiveStep], *, windows: bool) -> list[LiveStep]:
    steps = list(sent)
    for news in [step for step in sent if isinstance(step, News)]:
        if news.kind == "end" or not news.copyable or rng.random() >= 0.25:
            continue
        # Sent again soon after: past keys, and a state past later states too.
        at = steps.index(news) + 1
        while at < len(steps) and rng.random() < 0.6:
            passed = steps[at]
            if not isinstance(passed, News) or passed.kind not in ("tone", news.kind):
                break
            if passed.kind != "tone" and news.kind != "state":
                break
            at += 1
        steps.insert(at, Again(news))
    if windows:
        for _ in range(rng.randint(0, 3)):
            steps.insert(rng.randint(2, len(steps) - 1), WindowCloses())
    for _ in range(rng.randint(0, 3 * len(steps))):
        i = rng.randrange(len(steps) - 1)
        if _may_swap(steps[i], steps[i + 1]):
            steps[i], steps[i + 1] = steps[i + 1], steps[i]
    return steps


@dataclass
class Handled:
    """An event handlers ran, the news it tells, and when it arrived (``None`` when Graph sent
    its news more than once: which arrival it was is not told)."""

    event: events.Event
    news: News
    arrived: int | None


def live_call_broken(
    steps: list[LiveStep], handled: list[Handled], *, order_given_up: bool
) -> list[str]:
    """How what handlers saw of a live call delivered in ``steps`` breaks the promise:
    nothing run twice but a state that is news again, nothing lost that came before the
    end, states in the order sent and never backwards, each transfer's transferring and
    failure told once (and its transferAccepted, unless it came after both), keys in
    ``sequenceId`` order (unless the window or the end let a key go with a number missing:
    ``order_given_up``), nothing overtaken but by what it waited for, and the call left in
    the state Graph left it in."""
    problems: list[str] = []
    news = {step.number: step for step in steps if isinstance(step, News)}
    arrivals: dict[int, list[int]] = {}
    for position, step in enumerate(steps):
        if isinstance(step, News | Again):
            brought = step if isinstance(step, News) else step.news
            arrivals.setdefault(brought.number, []).append(position)
    ends = [came[0] for n, came in arrivals.items() if news[n].kind == "end"]
    end = min(ends, default=None)
    runs: Counter[int] = Counter(h.news.number for h in handled)
    for number, came in arrivals.items():
        kind = news[number].kind
        if end is not None and came[0] > end:
            continue
        if not runs[number] and kind not in _TRANSFER_NEWS:
            problems.append(f"#{number} ({kind}) never handled")
        if runs[number] > 1 and kind != "state":
            problems.append(f"#{number} ({kind}) handled {runs[number]} times")
    for kind in ("transferring", "failure"):
        sent = {
            n
            for n, came in arrivals.items()
            if news[n].kind == kind and (end is None or came[0] < end)
        }
        told = {h.news.number for h in handled if h.news.kind == kind}
        if sent != told:
            problems.append(f"{kind} {sorted(sent)} came, {sorted(told)} told")
    # A transferAccepted is told unless its transfer's transferring and failure came before
    # it (then it is stale once the failure went: a transfer only goes forward). Each
    # transfer's is worded alike: how many were told is what can be checked.
    accepted = [
        n
        for n, came in arrivals.items()
        if news[n].kind == "accepted" and (end is None or came[0] < end)
    ]
    late = [n for n in accepted if _after_its_transfer(n, news, arrivals)]
    told_accepted = len({h.news.number for h in handled if h.news.kind == "accepted"})
    if not len(accepted) - len(late) <= told_accepted <= len(accepted):
        problems.append(f"accepted {accepted} came ({late} late), {told_accepted} told")
    current: str | None = None
    seen_before: set[int] = set()
    for h in handled:
        event = h.event
        if isinstance(event, events.CallStateChanged):
            if event.previous_state != current:
                problems.append(f"#{h.news.number} from {event.previous_state}, seen {current}")
            if _phase(event.state) < _phase(current) or (current, event.state) == _TRANSFER_BACK:
                problems.append(f"#{h.news.number}: {current} -> {event.state} goes backwards")
            current = event.state
        elif isinstance(event, events.CallUpdated):
            if event.state != current:
                problems.append(f"#{h.news.number} updates {event.state}, seen {current}")
            if h.news.number in seen_before and not event.changed and event.result_info is None:
                problems.append(f"#{h.news.number} handled again, changing nothing")
        seen_before.add(h.news.number)
    states = [h.news.number for h in handled if h.news.kind == "state"]
    if list(dict.fromkeys(states)) != sorted(dict.fromkeys(states)):
        problems.append(f"states handled in the order {list(dict.fromkeys(states))}")
    keys = [h.news.sequence or 0 for h in handled if h.news.kind == "tone"]
    # A key numbered below the first one handled is late: it goes at once.
    keys = [key for key in keys if key >= keys[0]]
    if not order_given_up and keys != sorted(keys):
        problems.append(f"keys handled in the order {keys}")
    problems += _overtaken(handled)
    # With no window closed nor a state sent again, the call ends from the state Graph left.
    left = news[max(n for n in news if news[n].kind not in ("end", "tone"))].state
    moved_back = any(isinstance(s, Again) and s.news.kind == "state" for s in steps)
    closed = any(isinstance(s, WindowCloses) for s in steps)
    ending = next((h.event for h in handled if h.news.kind == "end"), None)
    ended_last = end is not None and all(
        came[0] < end for n, came in arrivals.items() if news[n].kind != "end"
    )
    ending_from = ending.previous_state if isinstance(ending, events.CallStateChanged) else left
    if ended_last and not (moved_back or closed) and ending_from != left:
        problems.append(f"the call ended from {ending_from}, Graph left it {left}")
    return problems


def _after_its_transfer(number: int, news: dict[int, News], arrivals: dict[int, list[int]]) -> bool:
    """Whether news ``number`` first came after its transfer's transferring and failure."""
    came, transfer = arrivals[number][0], news[number].transfer
    before = {
        other.kind
        for n, other in news.items()
        if other.transfer == transfer and n in arrivals and arrivals[n][0] < came
    }
    return {"transferring", "failure"} <= before


def _overtaken(handled: list[Handled]) -> list[str]:
    """An event handled before one that arrived before it, but for what it overtakes:
    establishing before established; a key the first held event waits for (or that goes before
    a key numbered after it, and what came after that key); a transfer's progress the news of
    its transfer held for it (or that it goes before: a transferring overtakes
    transferAccepted and the failure, transferAccepted the failure), and what came behind."""
    problems: list[str] = []
    for i, ahead in enumerate(handled):
        if ahead.arrived is None or ahead.news.kind == "setup":
            continue
        passed = [
            h for h in handled[i + 1 :] if h.arrived is not None and h.arrived < ahead.arrived
        ]
        if not passed:
            continue
        first = min(passed, key=lambda h: h.arrived or 0)
        for behind in passed:
            if ahead.news.kind == "tone" and ahead.news.sequence is not None:
                after = [
                    h
                    for h in handled
                    if h.news.kind == "tone"
                    and (h.news.sequence or 0) > ahead.news.sequence
                    and h.arrived is not None
                    and h.arrived <= (behind.arrived or 0)
                ]
                if after or first.news.kind == "tone":
                    continue
            overtakes = _OVERTAKES.get(ahead.news.kind, ())
            if any(
                h.news.kind in overtakes and (h.arrived or 0) <= (behind.arrived or 0)
                for h in passed
            ):
                continue
            problems.append(
                f"#{ahead.news.number} ({ahead.news.kind}) overtook "
                f"#{behind.news.number} ({behind.news.kind})"
            )
    return problems


def _told(step: LiveStep) -> News | None:
    """The news a step brings, if any."""
    return step if isinstance(step, News) else step.news if isinstance(step, Again) else None


def handled_of(steps: list[LiveStep], seen: list[Seen]) -> list[Handled]:
    """What handlers saw, with the news each event tells and when it arrived (``None`` when
    that cannot be told: news that arrived more than once). Each transfer's news is worded
    as the others': the first handled is taken for the first transfer's, and so on."""
    arrivals: dict[str, list[int]] = {}
    news_of: dict[str, list[News]] = {}
    for at, step in enumerate(steps):
        news = _told(step)
        if news is not None:
            text = json.dumps(news.item, sort_keys=True)
            arrivals.setdefault(text, []).append(at)
            if isinstance(step, News):
                news_of.setdefault(text, []).append(news)
    handled: list[Handled] = []
    told: Counter[str] = Counter()
    for run in seen:
        if handled and handled[-1].event is run.event:
            continue  # another handler of the same delivery
        text = json.dumps(run.event.raw, sort_keys=True)
        alike, came = news_of[text], arrivals[text]
        news = alike[min(told[text], len(alike) - 1)]
        told[text] += 1
        handled.append(Handled(run.event, news, came[0] if len(came) == 1 else None))
    return handled


def _key_missing(record: sequencing.CallRecord, delivered: list[sequencing.Delivery]) -> bool:
    """Whether a key held waits for a number that has not come, after the keys
    ``delivered`` (the window or the call's end lets it go without it: the call's keys may
    then go as they arrive)."""
    held = sorted(
        e.sequence_id
        for e in record.held
        if isinstance(e, events.ToneReceived) and e.sequence_id is not None
    )
    went = [
        d.event.sequence_id
        for d in delivered
        if isinstance(d.event, events.ToneReceived) and d.event.sequence_id is not None
    ]
    expected = max(went) + 1 if went else (held or [0])[0]
    for sequence in held:
        if sequence > expected:
            return True
        expected = max(expected, sequence + 1)
    return False


async def _window_closed(record: sequencing.CallRecord) -> None:
    """Wait for the call's window to close on what it holds."""
    await until(lambda: not record.held)


async def on_a_sequencer(
    steps: list[LiveStep], call_id: str
) -> tuple[list[Handled], bool, list[str]]:
    """What a sequencer hands on of ``steps`` (its window closing where they say), whether
    a key went with a number missing, and how it broke its own promise: an event neither
    handed on nor dropped, or handed on twice, or held with no window to let it go."""
    delivered: list[sequencing.Delivery] = []
    dropped: list[events.Event] = []
    sequencer = sequencing.Sequencer(
        delivered.append,
        Lifecycle(termination_grace=60.0),
        reorder_window=0.001,
        on_drop=dropped.append,
    )
    key = id_key(call_id)
    arrived: dict[int, tuple[int, News]] = {}
    given_up = False
    problems: list[str] = []
    for at, step in enumerate(steps):
        record = sequencer.record(key)
        news = _told(step)
        ending = news is not None and news.kind == "end"
        if record is not None and (ending or isinstance(step, WindowCloses)):
            given_up = given_up or _key_missing(record, delivered)
        if isinstance(step, WindowCloses):
            if record is not None and record.held:
                await _window_closed(record)
        elif isinstance(step, Asked):
            sequencer.note(sequencing.TransferAsked(call_id))
        elif isinstance(step, Refused):
            sequencer.note(sequencing.TransferRefused(call_id))
        elif news is not None:
            (event,) = parse_payload(b.notifications(news.item))
            arrived[id(event.raw)] = (at, news)
            sequencer.accept(event)
            record = sequencer.record(key)
            if record is not None and record.held and record.hold_timer is None:
                problems.append(f"#{news.number} arrived: held with no window running")
    record = sequencer.record(key)
    if record is not None and record.held:
        problems.append("held after the call's end")
    sequencer.close()
    runs = Counter(id(d.event.raw) for d in delivered)
    gone = {id(event.raw) for event in dropped}
    for raw, (at, news) in arrived.items():
        if runs[raw] > 1 or (not runs[raw] and raw not in gone):
            problems.append(f"#{news.number} arriving {at}: handed on {runs[raw]} times")
    handled = []
    for delivery in delivered:
        at, news = arrived[id(delivery.event.raw)]
        handled.append(Handled(delivery.event, news, at))
    return handled, given_up, problems


async def test_live_calls_keep_the_promise_whenever_the_window_closes() -> None:
    """The calls on a sequencer of their own, its window closing at each step that says so
    (and only there: nothing else awaits between the steps)."""
    broken: list[str] = []
    for seed in range(LIVE_CALLS):
        steps = live_call(seed, "c", windows=True)
        handled, given_up, problems = await on_a_sequencer(steps, "c")
        problems += live_call_broken(steps, handled, order_given_up=given_up)
        broken += (f"seed {seed}: {problem}" for problem in problems)
    assert not broken, "\n".join(broken)


def test_live_calls_hold_nothing_past_its_own_window_whenever_the_steps_come() -> None:
    """The calls on a sequencer whose clock is virtual, from 0 as a simulated clock's, each
    step coming a number of hundredths of a second after the one before (sums a float rounds)
    and each window closing wherever it falls: nothing is held past its own window, the
    call's timer is set for the first window to close, and every event is handed on or
    dropped once."""

    async def played(seed: int) -> list[str]:
        run = Run()
        rng = random.Random(seed)
        key = id_key("c")
        arrived: list[events.Event] = []
        problems: list[str] = []
        for at, step in enumerate(live_call(seed, "c", windows=True)):
            news = _told(step)
            if isinstance(step, WindowCloses):
                await run.advance(rng.choice([0.3, 0.7, 1.1]) * WINDOW)
            elif isinstance(step, Asked):
                run.sequencer.note(sequencing.TransferAsked("c"))
            elif isinstance(step, Refused):
                run.sequencer.note(sequencing.TransferRefused("c"))
            elif news is not None:
                (event,) = parse_payload(b.notifications(news.item))
                arrived.append(event)
                run.sequencer.accept(event)
            await run.advance(0.01 * rng.randint(0, 50))
            record = run.sequencer.record(key)
            if record is None or not record.held:
                if record is not None and (record.hold_timer or record.held_at):
                    problems.append(f"step {at}: a timer or arrivals kept, nothing held")
                continue
            came = record.held_at or {}
            if any(run.now - came[id(held)] >= WINDOW for held in record.held):
                problems.append(f"step {at}: held past its window at {run.now}")
            timer = record.hold_timer
            if timer is None or timer.when() != min(came.values()) + WINDOW:
                problems.append(f"step {at}: no timer for the first window to close")
        await run.advance(2 * WINDOW)
        run.sequencer.close()
        handled = Counter(id(d.event.raw) for d in run.deliveries)
        handled.update(id(event.raw) for event in run.dropped)
        problems += (
            f"{type(event).__name__} handed on or dropped {handled[id(event.raw)]} times"
            for event in arrived
            if handled[id(event.raw)] != 1
        )
        return [f"seed {seed}: {problem}" for problem in problems]

    broken = [problem for seed in range(LIVE_CALLS) for problem in asyncio.run(played(seed))]
    assert not broken, "\n".join(broken[:20])


async def test_live_calls_keep_the_promise_in_every_store(harness: Harness) -> None:
    """The same calls served by a bot on each store, with a window no test reaches."""
    broken: list[str] = []
    for seed in range(LIVE_CALLS_SERVED):
        steps, seen = await harness.deliver_live(seed)
        handled = handled_of(steps, seen)
        # Only the call's end lets a key go with a number missing: a key coming after it may
        # then go before one numbered below it.
        kinds = [news.kind if (news := _told(step)) else None for step in steps]
        late_key = "tone" in kinds[kinds.index("end") :]
        problems = live_call_broken(steps, handled, order_given_up=late_key)
        broken += (f"seed {seed}: {problem}" for problem in problems)
    assert not broken, "\n".join(broken)
