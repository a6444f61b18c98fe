"""Properties of the sequencer over shuffled, repeated and delayed real call lifecycles.

Whatever order Graph's notifications arrive in, however often each is
repeated and however long the gaps between them:

* every unique notification is delivered once, or dropped with a counted reason (the
  copies of a state a live call moves between arrive together: see ``_retried_together``);
* nothing is delivered twice;
* the lifecycle states a call's handlers see never go back a phase;
* nothing of a call is delivered after its termination, which is always delivered.

The sequencer runs on an event loop whose clock is virtual, so reorder
windows open and close without any real waiting.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from callbot import events, models
from callbot._lifecycle import LIVE_PHASE, Lifecycle
from callbot._parse import parse_payload
from callbot._sequencing import Delivery, Sequencer, notification_digest, phase_of
from callbot.testing import builders as b

WINDOW = 1.0
# Far beyond any scenario's virtual duration, so no ended call is forgotten mid-scenario.
GRACE = 1e6
DROP_REASONS = ("duplicate", "stale", "after_end")


def _answered(call_id: str, tones: int) -> list[dict[str, Any]]:
    return [
        b.incoming_call(call_id),
        b.call_state(call_id, "establishing"),
        b.call_state(call_id, "established"),
        *(b.tone(call_id, f"tone{n % 10}", n) for n in range(1, tones + 1)),
        b.call_state(call_id, "terminating"),
        b.call_terminated(call_id),
    ]


def _transferred(call_id: str, tones: int) -> list[dict[str, Any]]:
    return [
        b.incoming_call(call_id),
        b.call_state(call_id, "establishing"),
        b.call_state(call_id, "established"),
        *(b.tone(call_id, "star", n) for n in range(1, tones + 1)),
        b.call_state(call_id, "transferring"),
        b.call_state(call_id, "transferAccepted"),
        b.call_terminated(call_id, code=0, subcode=7015, message="transferred"),
    ]


def _outgoing(call_id: str, tones: int) -> list[dict[str, Any]]:
    people = [b.participant("alice"), b.participant("bob")]
    return [
        b.call_state(call_id, "establishing"),
        b.call_state(call_id, "established"),
        b.roster(call_id, people[:1]),
        b.operation_update(call_id, f"op-{call_id}"),
        *(b.tone(call_id, "pound", n) for n in range(1, tones + 1)),
        b.call_terminated(call_id),
    ]


def _establishing_lost(call_id: str, tones: int) -> list[dict[str, Any]]:
    # Only the reorder window lets ``established`` through when its predecessor never comes.
    return [
        b.incoming_call(call_id),
        b.call_state(call_id, "established"),
        *(b.tone(call_id, "tone5", n) for n in range(1, tones + 1)),
        b.call_terminated(call_id),
    ]


def _rejected(call_id: str, tones: int) -> list[dict[str, Any]]:
    return [b.incoming_call(call_id), b.call_terminated(call_id, code=603, message="rejected")]


def _ringing_with_updates(call_id: str, tones: int) -> list[dict[str, Any]]:
    # As recorded from Teams: an outgoing call rings, then established repeats to add content.
    return [
        b.call_state(call_id, "establishing"),
        b.call_state(call_id, "ringing"),
        b.call_state(call_id, "established"),
        b.call_state(call_id, "established", media_state=models.CallMediaState(audio="active")),
        *(b.tone(call_id, "tone2", n) for n in range(1, tones + 1)),
        b.call_state(call_id, "established", subject="with chat info"),
        b.call_terminated(call_id),
    ]


SHAPES = (_answered, _transferred, _outgoing, _establishing_lost, _rejected, _ringing_with_updates)


@dataclass
class Scenario:
    """What arrives, in which order, and the virtual seconds before each arrival."""

    lifecycles: dict[str, list[dict[str, Any]]]
    arrivals: list[dict[str, Any]]
    gaps: list[float]

    @property
    def unique(self) -> int:
        return len({notification_digest(one(item)) for item in self.arrivals})


def _retried_together(arrivals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The copies of a state a live call moves between, together where the first arrives.

    Graph writes each entry into such a state alike, so a copy arriving once its call has
    moved to another of them is an entry into it again (a transfer tried again fails with
    the first failure's very notification), not a repeat: these go where repeats go."""
    together: list[dict[str, Any]] = []
    placed: set[int] = set()
    for item in arrivals:
        if not _enters_a_live_state(item):
            together.append(item)
        elif id(item) not in placed:
            placed.add(id(item))
            together.extend(copy for copy in arrivals if copy is item)
    return together


def _enters_a_live_state(item: dict[str, Any]) -> bool:
    event = one(item)
    return (
        isinstance(event, events.CallStateChanged)
        and phase_of(event) == LIVE_PHASE
        and not isinstance(event, events.CallTerminated)
    )


@st.composite
def scenarios(draw: st.DrawFn, *, shuffle: bool = True) -> Scenario:
    """A few calls' lifecycles, each notification repeated 1-3 times, in some order."""
    calls = draw(st.integers(min_value=1, max_value=4))
    lifecycles: dict[str, list[dict[str, Any]]] = {}
    for index in range(calls):
        shape = draw(st.sampled_from(SHAPES))
        lifecycles[f"call-{index}"] = shape(f"call-{index}", draw(st.integers(0, 3)))
    copies: list[dict[str, Any]] = []
    for lifecycle in lifecycles.values():
        for item in lifecycle:
            copies.extend([item] * draw(st.integers(min_value=1, max_value=3)))
    arrivals = _retried_together(draw(st.permutations(copies)) if shuffle else copies)
    gap = st.sampled_from((0.0, 0.0, 0.0, 0.1 * WINDOW, 0.6 * WINDOW, 1.5 * WINDOW))
    gaps = draw(st.lists(gap, min_size=len(arrivals), max_size=len(arrivals)))
    return Scenario(lifecycles, list(arrivals), gaps)


@dataclass
class Outcome:
    """What the sequencer did with a scenario."""

    deliveries: list[Delivery]
    counts: Counter[str]
    drop_lines: Counter[str] = field(default_factory=Counter)

    def by_call(self) -> Iterator[tuple[str, list[events.Event]]]:
        calls: dict[str, list[events.Event]] = {}
        for delivery in self.deliveries:
            calls.setdefault(delivery.event.call_id, []).append(delivery.event)
        yield from calls.items()


def one(item: dict[str, Any]) -> events.Event:
    (event,) = parse_payload(b.notifications(item))
    return event


async def _play(scenario: Scenario) -> Outcome:
    loop = asyncio.get_running_loop()
    now = [0.0]
    # Timers read this clock; advancing it lets due timers run on the next loop turns.
    loop.time = lambda: now[0]  # type: ignore[method-assign]

    async def advance(seconds: float) -> None:
        now[0] += seconds
        for _ in range(3):
            await asyncio.sleep(0)

    deliveries: list[Delivery] = []
    sequencer = Sequencer(
        deliveries.append, Lifecycle(termination_grace=GRACE), reorder_window=WINDOW
    )
    with capture_logs() as logs:
        for gap, item in zip(scenario.gaps, scenario.arrivals, strict=True):
            await advance(gap)
            sequencer.accept(one(item))
        # Every reorder window closes; nothing may stay held.
        await advance(2 * WINDOW)
        counts = Counter(sequencer.counts)
        sequencer.close()
    drops = Counter(e["reason"] for e in logs if e["event"] == "notification_dropped")
    return Outcome(deliveries, counts, drops)


def play(scenario: Scenario) -> Outcome:
    return asyncio.run(_play(scenario))


def check_invariants(scenario: Scenario, outcome: Outcome) -> None:
    """The properties that hold for any arrival order."""
    delivered = [notification_digest(d.event) for d in outcome.deliveries]
    # Nothing is delivered twice.
    assert len(delivered) == len(set(delivered))
    # Every unique notification is delivered once or dropped with a counted reason, and
    # these counts were taken before close() released anything still held.
    counts = outcome.counts
    assert counts["delivered"] == len(delivered)
    assert counts["duplicate"] == len(scenario.arrivals) - scenario.unique
    assert counts["delivered"] + counts["stale"] + counts["after_end"] == scenario.unique
    # Each drop wrote its log line.
    for reason in DROP_REASONS:
        assert outcome.drop_lines[reason] == counts[reason], reason
    for call_id, seen in outcome.by_call():
        phases = [p for p in map(phase_of, seen) if p is not None]
        assert phases == sorted(phases), (call_id, [type(e).__name__ for e in seen])
        # A state handler runs on transitions only; a repeat of the state is an update of it.
        current = None
        for event in seen:
            if isinstance(event, events.CallStateChanged):
                assert event.state != event.previous_state, call_id
                assert event.previous_state == current, call_id
                current = event.state
            elif isinstance(event, events.IncomingCall):
                current = "incoming"
            elif isinstance(event, events.CallUpdated):
                assert event.state == current, call_id
        terminated = [i for i, e in enumerate(seen) if isinstance(e, events.CallTerminated)]
        assert terminated == [len(seen) - 1], call_id
    assert {call_id for call_id, _ in outcome.by_call()} == set(scenario.lifecycles)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_any_arrival_order_keeps_order_and_exactly_once(scenario: Scenario) -> None:
    check_invariants(scenario, play(scenario))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(("established", "hold", "transferring")), min_size=1, max_size=10),
    st.data(),
)
def test_a_live_state_entered_again_is_delivered_each_time_and_its_repeats_never(
    states: list[str], data: st.DataObject
) -> None:
    """Graph writes every entry into a state alike: the same notification once the call
    moved to another state is the call entering it again; while it is still in it, a
    repeat. (``_retried_together`` keeps the other properties' copies apart from this.)"""
    arrivals = [b.incoming_call("c"), b.call_state("c", "establishing")]
    for state in states:
        arrivals += [b.call_state("c", state)] * data.draw(st.integers(1, 3))
    arrivals.append(b.call_terminated("c"))
    outcome = play(Scenario({"c": arrivals}, arrivals, [0.0] * len(arrivals)))
    moves, current = [("establishing", "incoming")], "establishing"
    for state in states:
        if state != current:
            moves.append((state, current))
            current = state
    seen = [
        (e.state, e.previous_state)
        for _, delivered in outcome.by_call()
        for e in delivered
        if isinstance(e, events.CallStateChanged)
    ]
    assert seen == [*moves, ("terminated", current)]
    assert outcome.counts["duplicate"] == len(arrivals) - len(moves) - 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(shuffle=False))
def test_in_order_arrivals_are_all_delivered_whatever_the_repeats_and_gaps(
    scenario: Scenario,
) -> None:
    outcome = play(scenario)
    check_invariants(scenario, outcome)
    assert outcome.counts["stale"] == outcome.counts["after_end"] == 0
    for call_id, seen in outcome.by_call():
        assert [e.raw for e in seen] == scenario.lifecycles[call_id]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_established_before_establishing_is_put_back_in_order_within_the_window(
    data: st.DataObject,
) -> None:
    # Graph's one documented reordering, with repeats and gaps shorter than the window.
    lifecycle = _answered("c", data.draw(st.integers(0, 2)))
    swapped = [lifecycle[0], lifecycle[2], lifecycle[1], *lifecycle[3:]]
    arrivals = [item for item in swapped for _ in range(data.draw(st.integers(1, 2)))]
    gaps = data.draw(
        st.lists(
            st.sampled_from((0.0, 0.1 * WINDOW, 0.3 * WINDOW)),
            min_size=len(arrivals),
            max_size=len(arrivals),
        )
    )
    # Only the gap between the two swapped states must stay inside the window.
    outcome = play(Scenario({"c": lifecycle}, arrivals, gaps))
    check_invariants(Scenario({"c": lifecycle}, arrivals, gaps), outcome)
    delivered = [e.raw for _, seen in outcome.by_call() for e in seen]
    if sum(gaps[arrivals.index(lifecycle[2]) + 1 : arrivals.index(lifecycle[1]) + 1]) < WINDOW:
        assert delivered == lifecycle
        assert outcome.counts["held"] == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_tones_before_their_call_is_established_follow_it_within_the_window(
    data: st.DataObject,
) -> None:
    # Tones overtaking establishing and established, and each other, in any order, all
    # within the window: they follow established in Graph's sequenceId order.
    lifecycle = _answered("c", data.draw(st.integers(1, 3)))
    incoming, early, rest = lifecycle[0], lifecycle[1:-2], lifecycle[-2:]
    arrivals = [incoming, *data.draw(st.permutations(early)), *rest]
    gaps = [0.0] * len(arrivals)
    outcome = play(Scenario({"c": lifecycle}, arrivals, gaps))
    check_invariants(Scenario({"c": lifecycle}, arrivals, gaps), outcome)
    delivered = [e.raw for _, seen in outcome.by_call() for e in seen]
    # The call is established once both of its states came: tones before wait for that.
    established = max(arrivals.index(lifecycle[1]), arrivals.index(lifecycle[2]))
    held = sorted((i for i in arrivals[:established] if i in early[2:]), key=_sequence_id)
    after = [item for item in arrivals[established:] if item in early[2:]]
    assert delivered == [*lifecycle[:3], *_by_sequence_rule([*held, *after]), *rest]
    assert outcome.counts["released_alone"] == 0


def _sequence_id(item: dict[str, Any]) -> int:
    number: int = item["resourceData"]["toneInfo"]["sequenceId"]
    return number


def _by_sequence_rule(tones: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tones in the order handlers get them when they come in this order with no window
    closing: each goes once the one numbered before it went, but the first goes at once
    and one numbered below the next expected goes at once; the call's end lets the rest go."""
    out: list[dict[str, Any]] = []
    waiting: list[dict[str, Any]] = []
    expected: int | None = None
    for tone in tones:
        if expected is not None and _sequence_id(tone) > expected:
            waiting.append(tone)
            continue
        out.append(tone)
        expected = max(expected or 0, _sequence_id(tone) + 1)
        while waiting and min(map(_sequence_id, waiting)) <= expected:
            waiting.sort(key=_sequence_id)
            out.append(waiting.pop(0))
            expected = max(expected, _sequence_id(out[-1]) + 1)
    return out + sorted(waiting, key=_sequence_id)
