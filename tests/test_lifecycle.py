"""The lifecycle: one owner for when a call ends, is forgotten, is kept alive or warned about.

Timers run on a virtual clock: a test moves time on and every timer due runs,
so nothing here waits for real time to pass.
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from callbot import CallEnded, GraphError, OperationFailed, Target, events, models
from callbot import _lifecycle as lifecycle_module
from callbot._ids import id_key
from callbot._lifecycle import ENDED_MEMORY, LIVE_PHASE, KeepAliveResult, Lifecycle
from callbot._parse import parse_payload
from callbot._sequencing import Sequencer
from callbot.graph import CallServices, RetryPolicy
from callbot.testing import FakeGraph
from callbot.testing import builders as b

from .conftest import Clock, spin, until

CALL_ID = "57dab8b1-894c-409a-b240-bd8beae78896"
OTHER = "2f1a1100-b174-40a0-aba7-0b405e01ed92"


class KeepAlives:
    """A keep-alive sender that answers what a test tells it to."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.answer = KeepAliveResult.OK

    async def __call__(self, call_id: str) -> KeepAliveResult:
        self.sent.append(call_id)
        return self.answer


def lifecycle(
    send: Callable[[str], Awaitable[KeepAliveResult]] | None = None, **options: Any
) -> Lifecycle:
    settings: dict[str, Any] = {
        "termination_grace": 30.0,
        "answer_warning_after": 10.0,
        "keep_alive_interval": 900.0,
        "send_keep_alive": send,
    }
    settings.update(options)
    return Lifecycle(**settings)


async def test_a_call_belongs_to_its_tenant_however_a_token_spells_it() -> None:
    lifecycle = Lifecycle(termination_grace=30)
    lifecycle.life("C-1", "Tenant-A")
    for spelling in ("Tenant-A", "tenant-a", "TENANT-A"):
        assert not lifecycle.belongs_elsewhere("c1", spelling)
    assert lifecycle.belongs_elsewhere("C-1", "Tenant-B")
    assert lifecycle.belongs_elsewhere("C-1", "Tenant-A ")
    assert not lifecycle.belongs_elsewhere("C-1", None)
    assert not lifecycle.belongs_elsewhere("other", "Tenant-B")


async def test_a_state_is_new_once(clock: Clock) -> None:
    calls = lifecycle()
    life = calls.life(CALL_ID)
    assert calls.enter(life, "establishing") == (True, None)
    assert calls.enter(life, "established") == (True, "establishing")
    assert calls.enter(life, "established") == (False, "established")
    assert calls.enter(life, "hold") == (True, "established")
    assert calls.enter(life, "established") == (True, "hold")
    assert (life.phase, life.state, life.ended) == (3, "established", False)
    assert [c.call_id for c in calls.active()] == [CALL_ID]


async def test_past_the_bound_the_tenant_with_the_most_pending_calls_lets_go(
    clock: Clock,
) -> None:
    """A flood from one tenant's token lets its own calls go: another tenant keeps as many
    as the flooder (a tie goes against the tenant adding); a call first known without a
    tenant counts as its tenant's once bound, in its place in line."""
    calls = lifecycle(max_pending=4)
    first = calls.life("a-first")  # as a call taken over from a shared store: no tenant yet
    calls.bind(first, "Tenant-A")
    assert first.tenant_id == "tenant-a"
    calls.life("a-second", "tenant-a")
    for n in range(20):
        calls.life(f"b-{n}", "tenant-b")
    kept = sorted(life.call_id for life in calls._lives.values())
    assert kept == ["a-first", "a-second", "b-18", "b-19"]
    # Once tenant A has more than its share, it lets its own oldest go too.
    calls.life("a-third", "tenant-a")
    assert calls.get("a-first") is None
    assert calls.get("b-18") is not None


class _Compared(float):
    """A time that counts how often it is compared."""

    count = 0

    def __lt__(self, other: float, /) -> bool:
        _Compared.count += 1
        return float(self) < float(other)

    def __gt__(self, other: float, /) -> bool:
        _Compared.count += 1
        return float(self) > float(other)


def test_a_call_bound_to_its_tenant_moves_only_the_tenant_s_calls_kept_after_it() -> None:
    """A call known without a tenant (placed by the bot, or taken over from a shared store
    while it still rings) takes its place in its tenant's line once bound. All of the
    tenant's calls were sorted for it: with a flood of that tenant's invented calls pending,
    every such call cost a sort of the whole bound."""
    kept = lifecycle_module._ByTenant(10_000)
    for n in range(1_000):
        kept.add(f"a-{n}", _Compared(n), "tenant-a")
    kept.add("taken-over", _Compared(1_000), None)
    kept.add("a-late", _Compared(1_001), "tenant-a")
    _Compared.count = 0
    kept.bind("taken-over", "tenant-a")
    assert _Compared.count <= 2
    assert list(kept._of["tenant-a"])[-3:] == ["a-999", "taken-over", "a-late"]
    assert None not in kept._of
    kept.limit = 1_001
    assert kept.over("tenant-a") == "a-0"


class _PlainByTenant:
    """The rule of :class:`_ByTenant` written plainly: each time past the bound, every
    tenant is looked at to find those keeping the most."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self.of: dict[str | None, list[str]] = {}  # in the order tenants started keeping
        self.ties_to_adding = 0  # several keep the most, the one adding among them
        self.ties_to_first = 0  # several keep the most, the one adding not among them

    def add(self, key: str, when: float, tenant: str | None) -> None:
        self.pop(key)
        self.kept[key] = (when, tenant)
        self.of.setdefault(tenant, []).append(key)

    def pop(self, key: str) -> None:
        kept = self.kept.pop(key, None)
        if kept is not None:
            self.of[kept[1]].remove(key)
            if not self.of[kept[1]]:
                del self.of[kept[1]]

    def bind(self, key: str, tenant: str) -> None:
        kept = self.kept.get(key)
        if kept is None or kept[1] is not None:
            return
        self.kept[key] = (kept[0], tenant)
        self.of[None].remove(key)
        if not self.of[None]:
            del self.of[None]
        own = self.of.setdefault(tenant, [])
        own.append(key)
        own.sort(key=lambda k: self.kept[k][0])  # stable: after those kept at the same time

    def expire(self, before: float) -> None:
        while self.kept and next(iter(self.kept.values()))[0] < before:
            self.pop(next(iter(self.kept)))

    def over(self, adding: str | None) -> str | None:
        if len(self.kept) <= self.limit:
            return None
        most = max(len(own) for own in self.of.values())
        tied = [tenant for tenant, own in self.of.items() if len(own) == most]
        if len(tied) > 1:
            if adding in tied:
                self.ties_to_adding += 1
            else:
                self.ties_to_first += 1
        giving_up = adding if adding in tied else tied[0]
        return self.of[giving_up][0]


@pytest.mark.parametrize("limit", [1, 6, 40, 150])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_tenant_giving_up_a_key_is_the_one_a_look_at_every_tenant_finds(
    seed: int, limit: int
) -> None:
    """Past the bound, the tenant keeping the most is tracked as counts move instead of
    found by looking at every tenant: the same random adds, pops, binds and expiries, across
    many tenants, give up the same key as the plain rule at every step, ties included."""
    rng = random.Random(seed)
    kept, plain = lifecycle_module._ByTenant(limit), _PlainByTenant(limit)
    tenants: list[str | None] = [f"tenant-{n}" for n in range(40)] + [None]
    weights = [rng.choice([1, 1, 1, 5, 20]) for _ in tenants]  # a few flood
    keys = [f"call-{n}" for n in range(limit * 3 + 10)]
    given_up = 0
    for step in range(3_000):
        when = float(step // 3)  # some keys kept at the same time
        tenant = rng.choices(tenants, weights)[0]
        action = rng.random()
        if action < 0.55:
            key = rng.choice(keys)
            kept.add(key, when, tenant)
            plain.add(key, when, tenant)
            while (let_go := plain.over(tenant)) is not None:
                assert kept.over(tenant) == let_go
                kept.pop(let_go)
                plain.pop(let_go)
                given_up += 1
            assert kept.over(tenant) is None
        elif action < 0.75:
            key = rng.choice(keys)
            assert kept.pop(key) == plain.kept.get(key)
            plain.pop(key)
        elif action < 0.9:
            key, bound = rng.choice(keys), rng.choice(tenants[:-1])
            assert bound is not None
            kept.bind(key, bound)
            plain.bind(key, bound)
        elif action < 0.92:
            before = when - rng.randrange(300, 600)
            kept.expire(before)
            plain.expire(before)
        else:
            # Whoever would add next, past a bound just lowered, gives up the same key.
            kept.limit = plain.limit = rng.randrange(limit + 1)
            assert kept.over(tenant) == plain.over(tenant)
            kept.limit = plain.limit = limit
        assert list(kept._kept.items()) == list(plain.kept.items())
        assert [(t, list(own)) for t, own in kept._of.items()] == list(plain.of.items())
    assert given_up > 300
    assert plain.ties_to_adding > 100
    assert plain.ties_to_first > 50 or limit == 1  # with one key kept, the one adding is tied


def test_tenants_moving_between_counts_leave_no_growing_trace() -> None:
    """Each tenant's count moving up and down leaves its number in the heap of the tenants it
    left: those are dropped as they pile up, so 100,000 moves between two counts take no more
    room than the tenants themselves."""
    kept = lifecycle_module._ByTenant(1_000)
    tenants = [f"tenant-{n}" for n in range(50)]
    for n in range(1_000):
        kept.add(f"call-{n}", float(n), tenants[n % 50])
    rng = random.Random(0)
    for n in range(1_000, 101_000):
        tenant = rng.choice(tenants)
        kept.add(f"call-{n}", float(n), tenant)
        kept.pop(next(iter(kept._of[tenant])))  # up a key then down, as a popped call does
    tied = kept._keeping.values()
    assert sum(len(t.first) for t in tied) <= sum(2 * len(t.members) + 8 for t in tied)


class _Hashed(str):
    """A tenant id that counts how often it is looked up."""

    lookups = 0

    def __hash__(self) -> int:
        _Hashed.lookups += 1
        return str.__hash__(self)


def test_the_tenant_giving_up_a_key_is_found_without_looking_at_every_tenant() -> None:
    """With 500 tenants each keeping its share, every key added past the bound looked up all
    500 to find the one keeping the most (504 look-ups of tenant ids each): with a token of
    each tenant, every call added cost as much. Now the tenants keeping the most are known
    as counts move, whether the one adding is among them or not."""
    tenants = [_Hashed(f"tenant-{n}") for n in range(500)]
    kept = lifecycle_module._ByTenant(2_000)
    for n in range(2_000):
        kept.add(f"call-{n}", float(n), tenants[n % 500])
    looked_up = []
    for n in range(2_000, 3_000):
        tenant = tenants[n % 500] if n % 2 else _Hashed("newcomer")
        kept.add(f"call-{n}", float(n), tenant)
        _Hashed.lookups = 0
        let_go = kept.over(tenant)
        looked_up.append(_Hashed.lookups)
        assert let_go is not None
        kept.pop(let_go)
    assert max(looked_up) <= 4


async def test_ended_calls_are_remembered_fairly_between_tenants(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ended calls are remembered for ENDED_MEMORY, as many as a bound for every tenant
    together: one tenant's token ending invented calls used to push another tenant's out
    first (oldest first across tenants), so a late retry of one started it again as a new
    call, nobody's. Now the tenant remembering the most gives up its own oldest."""
    monkeypatch.setattr(lifecycle_module, "_MAX_ENDED", 4)
    calls = lifecycle(termination_grace=1.0)

    async def end(call_id: str, tenant: str) -> None:
        life = calls.life(call_id, tenant)
        calls.enter(life, "established")
        calls.enter(life, "terminated")
        await clock.advance(1.5)  # past the grace: forgotten, and remembered as ended

    for call_id in ("a-first", "a-second"):
        await end(call_id, "tenant-a")
    for n in range(20):
        await end(f"b-{n}", "tenant-b")
    for call_id in ("a-first", "a-second"):
        again = calls.life(call_id, "tenant-a")  # a late retry of one of its notifications
        assert (again.ended, again.tenant_id) == (True, "tenant-a")
    assert calls.belongs_elsewhere("a-first", "tenant-b")
    assert calls.life("b-19", "tenant-b").ended
    assert not calls.life("b-0", "tenant-b").ended  # the flooder's oldest went first


async def test_an_end_is_told_once_and_forgotten_after_the_grace(clock: Clock) -> None:
    calls = lifecycle()
    ended: list[tuple[str, models.ResultInfo | None]] = []
    forgotten: list[tuple[str, str]] = []
    calls.when_ended(lambda key, info: ended.append((key, info)))
    calls.when_forgotten(lambda key, why: forgotten.append((key, why)))
    life = calls.life(CALL_ID)
    calls.enter(life, "established")
    why = models.ResultInfo(code=200, subcode=5002)
    calls.enter(life, "terminated", why)
    calls.end(CALL_ID, None)  # told again by another instance: nothing more happens
    assert ended == [(life.key, why)]
    assert life.ended
    assert list(calls.active()) == []
    await clock.advance(29.0)
    assert calls.get(CALL_ID) is life
    await clock.advance(2.0)
    assert calls.get(CALL_ID) is None
    assert forgotten == [(life.key, "grace_over")]


async def test_keep_alive_starts_on_the_transition_and_stops_at_the_end(clock: Clock) -> None:
    send = KeepAlives()
    calls = lifecycle(send, keep_alive_interval=60.0)
    life = calls.life(CALL_ID)
    calls.enter(life, "establishing")
    calls.enter(life, "established")
    calls.enter(life, "established")  # an update starts no second loop
    await clock.advance(61.0)
    assert send.sent == [CALL_ID]
    send.answer = KeepAliveResult.FAILED  # Graph unreachable: tried again next time
    await clock.advance(60.0)
    await clock.advance(60.0)
    assert send.sent == [CALL_ID] * 3
    calls.enter(life, "terminated")
    await clock.advance(600.0)
    assert send.sent == [CALL_ID] * 3


async def test_a_failed_keep_alive_is_tried_again_within_a_minute(clock: Clock) -> None:
    """Graph ends a call with no keep-alive for 45 minutes: at the 15-minute default, two
    failures in a row waited for the next interval would reach it."""
    send = KeepAlives()
    calls = lifecycle(send, keep_alive_interval=900.0)
    life = calls.life(CALL_ID)
    calls.enter(life, "establishing")
    calls.enter(life, "established")
    send.answer = KeepAliveResult.FAILED
    await clock.advance(901.0)
    assert send.sent == [CALL_ID]
    await clock.advance(61.0)  # tried again a minute later, and fails again
    assert send.sent == [CALL_ID] * 2
    send.answer = KeepAliveResult.OK
    await clock.advance(61.0)  # taken: the next one a whole interval later
    assert send.sent == [CALL_ID] * 3
    await clock.advance(800.0)
    assert send.sent == [CALL_ID] * 3
    await clock.advance(101.0)
    assert send.sent == [CALL_ID] * 4
    calls.enter(life, "terminated")


async def test_a_call_graph_forgot_is_ended_at_once_and_forgotten_after_the_grace(
    clock: Clock,
) -> None:
    send = KeepAlives()
    send.answer = KeepAliveResult.GONE
    calls = lifecycle(send, keep_alive_interval=60.0)
    forgotten: list[str] = []
    calls.when_forgotten(lambda key, why: forgotten.append(why))
    life = calls.life(CALL_ID)
    calls.enter(life, "established")
    with capture_logs() as logs:
        await clock.advance(61.0)
    assert life.ended
    assert not life.keeping_alive
    assert any(e["event"] == "keep_alive_call_gone" for e in logs)
    await clock.advance(29.0)
    assert forgotten == []
    await clock.advance(2.0)
    assert forgotten == ["gone"]
    await clock.advance(600.0)
    assert send.sent == [CALL_ID]


async def test_a_termination_coming_after_the_keep_alive_s_404_is_delivered(
    clock: Clock,
) -> None:
    """Graph answers a keep-alive 404 as soon as the call has ended, while the termination
    it posts is still on its way: that termination reaches the handlers (it was dropped as
    coming after the end). One that never comes leaves the call forgotten as ``gone``."""
    send = KeepAlives()
    send.answer = KeepAliveResult.GONE
    calls = lifecycle(send, keep_alive_interval=60.0)
    forgotten: list[str] = []
    calls.when_forgotten(lambda key, why: forgotten.append(why))
    delivered: list[str] = []
    sequencer = Sequencer(lambda d: delivered.append(type(d.event).__name__), calls)
    for call_id in (CALL_ID, OTHER):
        sequencer.accept(_event(b.call_state(call_id, "establishing")))
        sequencer.accept(_event(b.call_state(call_id, "established")))
    await clock.advance(61.0)
    assert send.sent == [CALL_ID, OTHER]
    sequencer.accept(_event(b.call_terminated(CALL_ID)))
    assert delivered == ["CallStateChanged"] * 4 + ["CallTerminated"]
    await clock.advance(31.0)
    assert forgotten == ["grace_over", "gone"]
    with capture_logs() as logs:  # both ended, and remembered so: Graph sends one again
        sequencer.accept(_event(b.call_terminated(CALL_ID)))
        sequencer.accept(_event(b.call_terminated(OTHER)))
    assert len(delivered) == 5
    assert [e["reason"] for e in logs if e["event"] == "notification_dropped"] == ["after_end"] * 2
    sequencer.close()


async def test_a_call_whose_end_was_told_first_is_not_kept_alive(clock: Clock) -> None:
    """Another instance took the call's termination (or this one refused it while draining)
    before this one delivered ``established``: the call has ended, and no keep-alive loop
    starts for it, now or once its life is taken back from its end by a shared store."""
    send = KeepAlives()
    # Remembered past a keep-alive interval: still delivering what came before the end.
    calls = lifecycle(send, keep_alive_interval=60.0, termination_grace=600.0)
    life = calls.life(CALL_ID)
    calls.enter(life, "establishing")
    calls.end(CALL_ID, None)
    assert calls.enter(life, "established") == (True, "establishing")
    assert not life.keeping_alive
    await clock.advance(61.0)
    assert send.sent == []
    # A store's checkpoint, from before the end: the call runs again, kept alive by one loop.
    assert calls.adopt(CALL_ID, phase=LIVE_PHASE, state="established", ended=False) is life
    assert life.keeping_alive
    await clock.advance(61.0)
    assert send.sent == [CALL_ID]


async def test_a_call_taken_back_from_its_end_has_one_keep_alive_loop(clock: Clock) -> None:
    """A call kept alive ends, then a shared store gives it back from a checkpoint before its
    end: the timer set before the end must not send (and start a second loop) beside the one
    the takeover starts."""
    send = KeepAlives()
    calls = lifecycle(send, keep_alive_interval=60.0)
    life = calls.life(CALL_ID)
    calls.enter(life, "established")
    await clock.advance(10.0)
    calls.end(CALL_ID, None)
    calls.adopt(CALL_ID, phase=LIVE_PHASE, state="established", ended=False)
    for _ in range(3):
        await clock.advance(60.0)
    # One loop: the takeover's, at 70, 130 and 190 s; not the old one at 60, 120 and 180.
    assert send.sent == [CALL_ID] * 3


async def test_a_keep_alive_answered_after_the_end_starts_no_loop(clock: Clock) -> None:
    """A keep-alive is on its way when the call ends: its answer starts nothing, also when a
    shared store has given the call back meanwhile (its own loop keeps it alive)."""
    held: list[asyncio.Future[KeepAliveResult]] = []
    sent: list[str] = []

    async def send(call_id: str) -> KeepAliveResult:
        sent.append(call_id)
        if len(held) < 2:  # the first keep-alive of each call waits for the test to answer
            held.append(asyncio.get_running_loop().create_future())
            return await held[-1]
        return KeepAliveResult.OK

    calls = lifecycle(send, keep_alive_interval=60.0)
    life = calls.life(CALL_ID)
    calls.enter(life, "established")
    await clock.advance(61.0)
    assert sent == [CALL_ID]
    calls.end(CALL_ID, None)
    held[0].set_result(KeepAliveResult.OK)
    await clock.advance(0.0)
    assert not life.keeping_alive
    await clock.advance(120.0)
    assert sent == [CALL_ID]

    other = calls.life(OTHER)
    calls.enter(other, "established")
    await clock.advance(61.0)
    assert sent == [CALL_ID, OTHER]
    calls.end(OTHER, None)
    calls.adopt(OTHER, phase=LIVE_PHASE, state="established", ended=False)  # a new loop
    held[1].set_result(KeepAliveResult.OK)  # the old loop's answer
    for _ in range(3):
        await clock.advance(60.0)
    assert sent == [CALL_ID] + [OTHER] * 4


async def test_no_keep_alive_without_a_sender(clock: Clock) -> None:
    calls = lifecycle(None)
    life = calls.life(CALL_ID)
    calls.enter(life, "established")
    assert not life.keeping_alive


async def test_an_unanswered_incoming_call_is_warned_about(clock: Clock) -> None:
    calls = lifecycle(answer_warning_after=10.0)
    with capture_logs() as logs:
        calls.enter(calls.life(CALL_ID), "incoming")
        calls.enter(calls.life(OTHER), "incoming")
        calls.enter(calls.life(OTHER), "establishing")  # answered: Graph says establishing
        await clock.advance(11.0)
    warnings = [e for e in logs if e["event"] == "incoming_call_not_answered"]
    assert [w["call_id"] for w in warnings] == [CALL_ID]
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["deadline"] == 15.0


async def test_a_call_ending_unanswered_is_not_warned_about(clock: Clock) -> None:
    calls = lifecycle(answer_warning_after=10.0)
    with capture_logs() as logs:
        life = calls.life(CALL_ID)
        calls.enter(life, "incoming")
        calls.enter(life, "terminated")  # rejected or redirected
        await clock.advance(11.0)
    assert not any(e["event"] == "incoming_call_not_answered" for e in logs)


async def test_calls_never_established_are_bounded(clock: Clock) -> None:
    calls = lifecycle(pending_ttl=60.0, max_pending=3)
    forgotten: list[tuple[str, str]] = []
    calls.when_forgotten(lambda key, why: forgotten.append((key, why)))
    kept = calls.life("kept")
    calls.prove("kept")  # Graph accepted the bot's answer
    calls.enter(kept, "establishing")
    for n in range(5):
        life = calls.life(f"invented-{n}")
        if n % 2:
            calls.enter(life, "incoming")  # ringing, and never answered
    # Past the bound the oldest go first; a call that got further is never counted.
    assert len(calls) == 4
    assert [why for _, why in forgotten] == ["too_many_pending_calls"] * 2
    await clock.advance(61.0)
    assert len(calls) == 1
    assert calls.get("kept") is kept
    assert {why for _, why in forgotten[2:]} == {"never_established"}


async def test_a_call_past_ringing_stays_pending_until_proven(clock: Clock) -> None:
    """Whatever state its notifications claim, a call counts against the bound (and is let
    go after the ttl) until Graph accepted a request of the bot's own on it."""
    calls = lifecycle(pending_ttl=60.0, max_pending=2)
    forgotten: list[tuple[str, str]] = []
    calls.when_forgotten(lambda key, why: forgotten.append((key, why)))
    answered = calls.life("answered")
    calls.enter(answered, "incoming")
    calls.prove("answered")
    assert answered.pending, "proven, but still ringing"
    calls.enter(answered, "established")
    assert not answered.pending
    for n in range(4):
        calls.enter(calls.life(f"invented-{n}"), ("established", "establishing")[n % 2])
    assert [why for _, why in forgotten] == ["too_many_pending_calls"] * 2
    assert {life.call_id for life in calls.active()} == {"answered", "invented-2", "invented-3"}
    calls.prove("invented-3")  # a request of the bot's own on it was accepted after all
    await clock.advance(61.0)
    assert forgotten[2:] == [("invented2", "unproven")]
    assert {life.call_id for life in calls.active()} == {"answered", "invented-3"}


async def test_a_call_told_established_elsewhere_stays_pending_until_proven(clock: Clock) -> None:
    """With a shared store every instance is told what another accepted: being told an
    invented call is established (a copy posted to another instance) proves nothing, and
    does not keep it here past the bound or the ttl; a proven one is kept until its end."""
    calls = lifecycle(pending_ttl=60.0, max_pending=10)
    forgotten: list[tuple[str, str]] = []
    calls.when_forgotten(lambda key, why: forgotten.append((key, why)))
    invented = calls.life("invented")
    calls.enter(invented, "established")
    placed = calls.life("placed")
    calls.prove("placed")  # placed by this instance, run by another
    for call_id in ("invented", "placed"):
        calls.told_established(call_id, None)
    assert invented.key in calls._pending  # still counted against the bound
    assert placed.key not in calls._pending
    await clock.advance(61.0)
    assert forgotten == [("invented", "unproven")]
    assert calls.get("placed") is placed


async def test_an_established_call_unproven_when_its_time_is_up_is_sent_a_keep_alive(
    clock: Clock,
) -> None:
    """A call a bot that restarted is told established (or an invented one): a keep-alive
    sent when its pending time is up proves it (accepted) or ends it (404)."""
    calls: Lifecycle

    async def send(call_id: str) -> KeepAliveResult:
        sent.append(call_id)
        if call_id == "real":
            calls.prove(call_id)  # as CallServices does for every request Graph accepts
            return KeepAliveResult.OK
        return KeepAliveResult.GONE

    sent: list[str] = []
    calls = lifecycle(send, keep_alive_interval=900.0, pending_ttl=60.0, termination_grace=30.0)
    forgotten: list[tuple[str, str]] = []
    calls.when_forgotten(lambda key, why: forgotten.append((key, why)))
    for call_id in ("real", "invented"):
        calls.enter(calls.life(call_id), "established")
    await clock.advance(59.0)
    assert sent == []
    await clock.advance(2.0)
    await until(lambda: len(sent) == 2)
    invented = calls.get("invented")
    assert invented is not None
    await until(lambda: invented.ended)
    real = calls.get("real")
    assert real is not None
    assert not real.pending
    assert real.keeping_alive
    await clock.advance(31.0)
    assert forgotten == [("invented", "gone")]
    assert calls.get("real") is real
    await clock.advance(900.0)
    await until(lambda: sent.count("real") == 2)  # then kept alive as any live call


async def test_an_adopted_call_keeps_being_kept_alive(clock: Clock) -> None:
    send = KeepAlives()
    calls = lifecycle(send, keep_alive_interval=60.0)
    life = calls.adopt(CALL_ID, phase=3, state="established", ended=False)
    assert life.keeping_alive
    await clock.advance(61.0)
    assert send.sent == [CALL_ID]
    ended = calls.adopt(OTHER, phase=5, state="terminated", ended=True)
    assert ended.ended
    assert not ended.keeping_alive


async def test_a_call_adopted_back_from_its_end_runs_to_its_end_again(clock: Clock) -> None:
    """A store whose later checkpoints were lost gives an earlier state than this process
    saw: the call goes back to it (and is not forgotten at the first end's grace), and its
    end, delivered again, is told again."""
    calls = lifecycle()
    ended: list[str] = []
    calls.when_ended(lambda key, info: ended.append(key))
    life = calls.life(CALL_ID)
    calls.enter(life, "established")
    calls.enter(life, "terminated")
    again = calls.adopt(CALL_ID, phase=1, state="establishing", ended=False)
    assert again is life
    assert (life.phase, life.state, life.ended) == (1, "establishing", False)
    await clock.advance(31.0)  # the first end's grace is over
    assert calls.get(CALL_ID) is life
    assert calls.enter(life, "established") == (True, "establishing")
    assert calls.enter(life, "terminated") == (True, "established")
    assert ended == [life.key, life.key]
    await clock.advance(31.0)
    assert calls.get(CALL_ID) is None


async def test_keep_alives_reach_graph_and_a_404_ends_the_call(graph: FakeGraph) -> None:
    calls = Lifecycle(termination_grace=30.0)
    services = CallServices(
        graph.settings(), retry=RetryPolicy(total_time=1.0, base_delay=0.001), lifecycle=calls
    )
    graph.add_call(CALL_ID, state="established")
    try:
        assert await services.keep_alive(CALL_ID) is KeepAliveResult.OK
        request = await graph.wait_for_request("keepAlive")
        assert request.path == f"/communications/calls/{CALL_ID}/keepAlive"
        assert request.scenario_id == services.call(CALL_ID).scenario_id
        graph.end_call(CALL_ID)
        assert await services.keep_alive(CALL_ID) is KeepAliveResult.GONE
        graph.fail_next("keepAlive", 500)
        with capture_logs() as logs:
            assert await services.keep_alive(OTHER) is KeepAliveResult.FAILED
        warned = [(e["event"], e["status"]) for e in logs if e["log_level"] == "warning"]
        assert warned == [("graph_request_failed", 500)]
    finally:
        await services.close()
        await calls.close()


async def test_a_request_graph_accepts_proves_its_call_and_one_it_refuses_does_not(
    graph: FakeGraph,
) -> None:
    """Whatever the request (a keep-alive here, placing a call), Graph's acceptance is what
    takes a call past ringing off the pending bound; a 404 proves nothing."""
    calls = Lifecycle(termination_grace=30.0)
    services = CallServices(
        graph.settings(), retry=RetryPolicy(total_time=1.0, base_delay=0.001), lifecycle=calls
    )
    graph.add_call(CALL_ID, state="established")
    try:
        real, invented = calls.life(CALL_ID), calls.life(OTHER)
        for life in (real, invented):
            calls.enter(life, "established")
        assert await services.keep_alive(OTHER) is KeepAliveResult.GONE
        assert await services.keep_alive(CALL_ID) is KeepAliveResult.OK
        assert (real.pending, invented.pending) == (False, True)
        assert [key for key in (real.key, invented.key) if key in calls._pending] == [invented.key]
        placed = await services.create_call(Target.user("callee-id"))
        placed_life = calls.get(placed.id)
        assert placed_life is not None
        assert placed_life.proven
    finally:
        await services.close()
        await calls.close()


async def test_an_end_fails_the_operations_awaited_on_the_call(graph: FakeGraph) -> None:
    calls = Lifecycle(termination_grace=30.0)
    services = CallServices(graph.settings(), lifecycle=calls)
    graph.add_call(CALL_ID, state="established")
    try:
        life = calls.life(CALL_ID)
        calls.enter(life, "established")
        call = services.call(CALL_ID)
        op = await call.play_prompt("https://cdn.contoso.com/beep.wav")
        assert not call.ended
        calls.enter(life, "terminated", models.ResultInfo(code=200, subcode=5002))
        assert call.ended, "a handle sees the end while its handler runs"
        with pytest.raises(OperationFailed) as failure:
            await op.wait(timeout=5)
        assert failure.value.result_info is not None
        assert failure.value.result_info.subcode == 5002
        await until(lambda: services.pending_operations == 0)
    finally:
        await services.close()
        await calls.close()


async def test_graph_saying_a_call_it_accepted_is_not_found_ends_it(graph: FakeGraph) -> None:
    """The caller hangs up while a handler plays a prompt, and Graph answers the bot's next
    action 404 ``Call not found.`` (8522) before its notification of the end has come (or
    when it never comes). The call went on here until that notification or a keep-alive's
    404, up to 15 minutes later: a wait on the prompt went on, keep-alives were sent, and
    ``call.ended`` read false. A 404 about a participant is no end of the call, nor one about
    a call Graph never accepted a request on (an id a sender invented: it stays pending)."""
    calls = Lifecycle(termination_grace=30.0)
    services = CallServices(
        graph.settings(), retry=RetryPolicy(total_time=1.0, base_delay=0.001), lifecycle=calls
    )
    graph.add_call(CALL_ID, state="established")
    try:
        life, invented = calls.life(CALL_ID), calls.life(OTHER)
        for each in (life, invented):
            calls.enter(each, "establishing")
            calls.enter(each, "established")
        call = services.call(CALL_ID)
        prompt = await call.play_prompt("https://cdn.contoso.com/hold.wav")
        with pytest.raises(GraphError) as participant_gone:
            await call.participants.remove("who-just-left")
        assert not isinstance(participant_gone.value, CallEnded)
        assert not call.ended
        graph.end_call(CALL_ID)  # the caller hung up: its notification is still on its way
        with pytest.raises(CallEnded):
            await call.transfer(Target.user("agent-id"))
        assert call.ended
        assert life.graph_forgot
        with pytest.raises(OperationFailed) as cut_short:
            await prompt.wait(timeout=30)  # ends with the call (reorder_window after it)
        assert cut_short.value.call_ended
        with pytest.raises(CallEnded):
            await services.call(OTHER).play_prompt("https://cdn.contoso.com/hold.wav")
        assert (invented.ended, invented.pending) == (False, True)
    finally:
        await services.close()
        await calls.close()


async def test_a_keep_alive_graph_answers_404_is_logged_when_its_request_ends_the_call(
    graph: FakeGraph, clock: Clock
) -> None:
    """A keep-alive of a call Graph accepted requests on is answered 404 ``Call not found.``:
    the request itself ends the call, and the keep-alive's line still says why."""

    async def send(call_id: str) -> KeepAliveResult:
        return await services.keep_alive(call_id)  # as the bot sends them

    calls = lifecycle(send, keep_alive_interval=60.0)
    services = CallServices(
        graph.settings(), retry=RetryPolicy(total_time=1.0, base_delay=0.001), lifecycle=calls
    )
    graph.add_call(CALL_ID, state="established")
    try:
        life = calls.life(CALL_ID)
        calls.enter(life, "established")
        calls.prove(CALL_ID)
        graph.end_call(CALL_ID)
        with capture_logs() as logs:
            await clock.advance(61.0)
            await spin(lambda: life.ended)
        assert life.graph_forgot
        assert [e["event"] for e in logs if e["event"] == "keep_alive_call_gone"] == [
            "keep_alive_call_gone"
        ]
    finally:
        await services.close()
        await calls.close()


async def test_an_ended_call_stays_ended_after_it_is_forgotten(clock: Clock) -> None:
    calls = lifecycle()
    ended: list[str] = []
    calls.when_ended(lambda key, info: ended.append(key))
    delivered: list[str] = []
    sequencer = Sequencer(lambda d: delivered.append(type(d.event).__name__), calls)
    established, terminated = b.call_state(CALL_ID, "established"), b.call_terminated(CALL_ID)
    for item in (b.call_state(CALL_ID, "establishing"), established, terminated):
        sequencer.accept(_event(item))
    await clock.advance(31.0)
    assert calls.get(CALL_ID) is None
    with capture_logs() as logs:
        # Graph sends the end again, and a straggler, once the call is forgotten.
        for item in (terminated, established, b.tone(CALL_ID, "tone1", 1)):
            sequencer.accept(_event(item))
    assert delivered == ["CallStateChanged", "CallStateChanged", "CallTerminated"]
    assert [e["reason"] for e in logs if e["event"] == "notification_dropped"] == ["after_end"] * 3
    assert ended == [id_key(CALL_ID)]
    assert list(calls.active()) == []
    # Remembered for a while after the last word of it, not for ever.
    await clock.advance(31.0)
    await clock.advance(ENDED_MEMORY + 1.0)
    sequencer.accept(_event(b.call_state(CALL_ID, "establishing")))
    assert delivered[-1] == "CallStateChanged"
    sequencer.close()


async def test_a_run_started_over_goes_through_a_forgotten_end_again(clock: Clock) -> None:
    calls = lifecycle()
    delivered: list[str] = []
    sequencer = Sequencer(lambda d: delivered.append(type(d.event).__name__), calls)
    sequencer.accept(_event(b.call_terminated(CALL_ID)))
    await clock.advance(31.0)
    # A shared store holds nothing of the call and hands this process its entries again.
    sequencer.start_over(id_key(CALL_ID))
    sequencer.accept(_event(b.call_terminated(CALL_ID)))
    assert delivered == ["CallTerminated", "CallTerminated"]
    sequencer.close()


async def test_a_steady_stream_of_calls_costs_the_timers_o1_each(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Calls ending within the grace keep four timers each; forgotten ones leave theirs
    # behind until due. Sweeping those out must not rescan the live ones every few calls.
    pushed, swept = 0, 0

    def push(heap: list[Any], entry: Any) -> None:
        nonlocal pushed
        pushed += 1
        heapq.heappush(heap, entry)

    def heapify(heap: list[Any]) -> None:
        nonlocal swept
        swept += len(heap)
        heapq.heapify(heap)

    counting = SimpleNamespace(heappush=push, heappop=heapq.heappop, heapify=heapify)
    monkeypatch.setattr(lifecycle_module, "heapq", counting)
    calls = lifecycle(KeepAlives(), answer_warning_after=3600.0)
    for second in range(120):
        for n in range(100):
            life = calls.life(f"call-{second}-{n}")
            for state in ("incoming", "establishing", "established", "terminated"):
                calls.enter(life, state)
        await clock.advance(1.0)
    assert 2_900 <= len(calls) <= 3_200  # the last 30 s of calls, within their grace
    # Each sweep keeps what it finds alive, and the next waits until the heap has doubled.
    assert swept <= 2 * pushed, (swept, pushed)


def _event(item: dict[str, Any]) -> events.Event:
    (event,) = parse_payload(b.notifications(item))
    return event


async def test_a_wait_for_a_call_established_returns_however_it_is_learnt() -> None:
    """A wait returns once the call is established: delivered here, taken over established
    from a shared store, or told established by another instance, before the wait started
    or while it runs; after the call's end it raises, a copy of ``established`` sent late
    or not. A wait on a call taken over established went on until its timeout, as did one
    started after another instance told the call established."""
    calls = lifecycle()
    taken_over = asyncio.create_task(calls.until_established(CALL_ID))
    await until(lambda: bool(calls._established_waiters))
    calls.adopt(CALL_ID, phase=LIVE_PHASE, state="established", ended=False)
    await asyncio.wait_for(taken_over, 5)
    calls.told_established(OTHER, "tenant-a")
    await asyncio.wait_for(calls.until_established(OTHER), 5)  # started after: at once
    calls.end(OTHER, None)  # told by the instance running it
    calls.told_established(OTHER, "tenant-a")  # a copy sent late
    with pytest.raises(CallEnded):
        await calls.until_established(OTHER)
    await calls.close()


async def test_a_placed_call_another_instance_runs_is_kept_until_its_end(clock: Clock) -> None:
    """The instance that placed a call keeps it while another instance runs it (Graph posts
    to either) and tells it established: the call is no longer let go as never established
    after ``pending_ttl``, so the handle ``create_call`` returned sees the end the running
    instance tells. It was let go (a ``never_established`` line for an established call),
    and that handle never saw the call end."""
    calls = lifecycle(pending_ttl=60.0)
    forgotten: list[str] = []
    calls.when_forgotten(lambda key, why: forgotten.append(why))
    placed = calls.life(CALL_ID)  # as create_call knows it, proven by Graph's answer
    calls.prove(CALL_ID)
    calls.told_established(CALL_ID, "tenant-a")
    calls.told_established(OTHER, "tenant-a")  # told before Graph's answer to placing it
    answered_late = calls.life(OTHER)
    calls.prove(OTHER)
    await clock.advance(61.0)
    assert forgotten == []
    assert (calls.get(CALL_ID), calls.get(OTHER)) == (placed, answered_late)
    assert len(calls._pending) == 0
    calls.end(CALL_ID, models.ResultInfo(code=200, subcode=5002))
    assert placed.ended
    await clock.advance(31.0)  # past the grace
    assert forgotten == ["grace_over"]
    await calls.close()


async def test_a_call_kept_alive_elsewhere_is_sent_keep_alives_once_kept_here(
    clock: Clock,
) -> None:
    """With a shared store, the instance the store names keeps a call alive: the others send
    nothing. Taken up here, the call is sent one at once (the last keeper's may be an interval
    old), then one per interval; given up, none more."""
    send = KeepAlives()
    calls = lifecycle(send, keep_alive_interval=60.0)
    kept: set[str] = set()
    calls.keep_alive_where(lambda key: key in kept)
    life = calls.life(CALL_ID)
    calls.prove(CALL_ID)  # the bot answered it
    calls.enter(life, "establishing")
    calls.enter(life, "established")
    assert not life.keeping_alive
    await clock.advance(121.0)
    assert send.sent == []
    kept.add(life.key)
    calls.keeper_changed(life.key)
    await clock.advance(0.0)
    assert send.sent == [CALL_ID]
    await clock.advance(61.0)
    assert send.sent == [CALL_ID] * 2
    kept.clear()
    calls.keeper_changed(life.key)
    assert not life.keeping_alive
    await clock.advance(121.0)
    assert send.sent == [CALL_ID] * 2


async def test_calls_taken_up_at_once_are_sent_their_first_keep_alives_spread_out(
    clock: Clock,
) -> None:
    """An instance taking up the calls of one that stopped sends each its first keep-alive
    within the spread it was given, at a moment of its own: thousands taken up in one look
    went to Graph in one burst."""
    send = KeepAlives()
    calls = lifecycle(send, keep_alive_interval=900.0)
    kept: set[str] = set()
    calls.keep_alive_where(lambda key: key in kept, spread=60.0)
    lives = [calls.life(f"call-{n}") for n in range(50)]
    for life in lives:
        calls.prove(life.call_id)
        calls.enter(life, "establishing")
        calls.enter(life, "established")
    kept.update(life.key for life in lives)
    for life in lives:
        calls.keeper_changed(life.key)
    await clock.advance(30.0)
    assert 0 < len(send.sent) < len(lives)  # some now, the rest later in the look
    await clock.advance(30.0)
    assert sorted(send.sent) == sorted(life.call_id for life in lives)


async def test_an_unproven_call_kept_alive_elsewhere_is_tried_again_after_a_failure(
    clock: Clock,
) -> None:
    """The keep-alive that proves or ends an established call unproven when its time is up is
    sent wherever the call is known: failed (Graph unreachable), it is tried again here too, as
    on the instance keeping the call alive. Else the call stayed pending here, never proven nor
    let go, counted against its tenant's bound."""
    send = KeepAlives()
    calls = lifecycle(send, keep_alive_interval=900.0, pending_ttl=60.0)
    calls.keep_alive_where(lambda key: False)  # another instance keeps it alive
    life = calls.life(CALL_ID)
    calls.enter(life, "establishing")
    calls.enter(life, "established")
    send.answer = KeepAliveResult.FAILED
    await clock.advance(61.0)
    assert send.sent == [CALL_ID]
    send.answer = KeepAliveResult.GONE
    await clock.advance(61.0)
    assert send.sent == [CALL_ID] * 2
    assert life.ended
    await clock.advance(900.0)
    assert send.sent == [CALL_ID] * 2


async def test_a_call_already_kept_alive_here_keeps_its_loop_when_told_again(
    clock: Clock,
) -> None:
    """Told its keeper changed while it is kept alive here already (a look taking the lease
    while the keep-alive proving the call is on its way, or confirming it), a call keeps its
    loop: it got an extra keep-alive within the look each time, and a timer more."""
    send = KeepAlives()
    calls = lifecycle(send, keep_alive_interval=900.0)
    kept: set[str] = set()
    calls.keep_alive_where(lambda key: key in kept, spread=60.0)
    life = calls.life(CALL_ID)
    calls.prove(CALL_ID)
    calls.enter(life, "establishing")
    calls.enter(life, "established")
    kept.add(life.key)
    calls.keeper_changed(life.key)  # taken up: its first keep-alive within the look
    await clock.advance(60.0)
    assert send.sent == [CALL_ID]
    loop = life.keep_alive_loop
    for _ in range(3):
        calls.keeper_changed(life.key)  # nothing changed
    assert life.keep_alive_loop == loop
    await clock.advance(899.0)
    assert send.sent == [CALL_ID]
    await clock.advance(1.0)  # an interval after the first, as before
    assert send.sent == [CALL_ID] * 2
    kept.clear()
    calls.keeper_changed(life.key)
    kept.add(life.key)
    calls.keeper_changed(life.key)  # given up and taken again: a real change
    await clock.advance(60.0)
    assert send.sent == [CALL_ID] * 3
    await calls.close()


async def test_a_call_taken_up_while_its_proving_keep_alive_is_on_its_way_is_sent_no_other(
    clock: Clock,
) -> None:
    """The keep-alive proving an established call unproven when its time is up is on its way
    when this instance takes the call's keeper lease: that keep-alive is the call's, and the
    next comes an interval after it, not a second one within the look."""
    answered: asyncio.Future[KeepAliveResult] = asyncio.get_running_loop().create_future()
    sent: list[str] = []

    async def send(call_id: str) -> KeepAliveResult:
        sent.append(call_id)
        return await answered

    calls = lifecycle(send, keep_alive_interval=900.0, pending_ttl=60.0)
    kept: set[str] = set()
    calls.keep_alive_where(lambda key: key in kept, spread=60.0)
    life = calls.life(CALL_ID)
    calls.enter(life, "establishing")
    calls.enter(life, "established")
    await clock.advance(61.0)
    assert sent == [CALL_ID]  # the proving keep-alive, sent wherever the call is known
    kept.add(life.key)
    calls.keeper_changed(life.key)  # taken up while it is on its way
    answered.set_result(KeepAliveResult.OK)
    await clock.advance(0.0)
    await clock.advance(60.0)
    assert sent == [CALL_ID]
    await clock.advance(839.0)
    assert sent == [CALL_ID]
    await clock.advance(1.0)  # an interval after the one that proved it
    assert sent == [CALL_ID] * 2
    await calls.close()


async def test_a_call_taken_up_proven_and_established_is_not_counted_as_pending(
    clock: Clock,
) -> None:
    """A call a shared store holds proven and established is taken up past the pending bound:
    it was counted as pending until taken up, and could be let go at once in its place (or
    push out a call pending here), though it is real."""
    calls = lifecycle(KeepAlives(), max_pending=1)
    forgotten: list[tuple[str, str]] = []
    calls.when_forgotten(lambda key, why: forgotten.append((key, why)))
    calls.life(OTHER, "tenant-a")  # pending here
    life = calls.adopt(CALL_ID, phase=LIVE_PHASE, state="established", ended=False, proven=True)
    assert forgotten == []
    assert calls.get(CALL_ID) is life
    assert calls.get(OTHER) is not None
    await calls.close()


async def test_a_call_taken_up_unproven_and_let_go_is_known_to_have_been_let_go(
    clock: Clock,
) -> None:
    """A call taken up unproven from a shared store (known with no tenant) and let go past the
    pending bound is known here as let go, as one with a tenant is: a store that took it up
    leaves it to the others rather than take it up again at once."""
    calls = lifecycle(KeepAlives(), max_pending=1)
    calls.adopt(CALL_ID, phase=LIVE_PHASE, state="established", ended=False)
    calls.adopt(OTHER, phase=LIVE_PHASE, state="established", ended=False)
    assert calls.get(CALL_ID) is None  # the oldest pending, let go
    assert calls.knows(CALL_ID)
    await clock.advance(ENDED_MEMORY + 1.0)
    assert not calls.knows(CALL_ID)
    await calls.close()
