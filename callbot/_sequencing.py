"""Per-call order: lifecycle ranks, the reorder window, stale and duplicate drops.

Graph may deliver ``established`` before ``establishing``, repeat a
notification, or send stragglers after a call ended. The sequencer sees every
accepted event of a call in arrival order and decides, for each, one of:

* deliver it now (and compute what only order can tell: ``previous_state``,
  who joined or left the roster, the call's merged snapshot);
* hold it, when it skipped its predecessor, for ``reorder_window`` seconds;
  later events of that call wait behind it, except its predecessors;
* drop it, with a log line saying why: ``duplicate``, ``stale`` or ``after_end``.

Lifecycle phases: incoming < establishing < established (and the states a
live call moves between: hold, transferring, transferAccepted, redirecting)
< terminating < terminated.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import events
from ._attempts import Attempt
from ._ids import id_key
from ._log import get_logger
from .models import Call as CallResource
from .models import Participant, ResultInfo

__all__ = ["CallRecord", "Delivery", "Sequencer", "phase_of"]

log = get_logger("callbot.sequencing")

_PHASES = {
    "incoming": 0,
    "establishing": 1,
    "established": 2,
    "hold": 2,
    "transferring": 2,
    "transferAccepted": 2,
    "redirecting": 2,
    "terminating": 3,
    "terminated": 4,
}
# A state listed here is held until its predecessor was delivered (or the window closes).
_PREDECESSOR = {"established": "establishing"}
_SEEN_DIGESTS = 128
_MAX_BACKLOG = 1000


def _state(event: events.Event) -> str | None:
    return event.state if isinstance(event, events.CallStateChanged) else None


def _call_of(event: events.Event) -> CallResource | None:
    if isinstance(event, events.IncomingCall | events.CallStateChanged | events.ToneReceived):
        return event.call
    return None


def phase_of(event: events.Event) -> int | None:
    """Where an event stands in the call lifecycle; ``None`` for events without a state."""
    if isinstance(event, events.IncomingCall):
        return 0
    if isinstance(event, events.CallStateChanged):
        # Unknown future states belong to a live call.
        return _PHASES.get(event.state, 2)
    return None


@dataclass(frozen=True, slots=True)
class Delivery:
    """An event released for its handlers, with the call as it stands after it."""

    event: events.Event
    snapshot: CallResource | None
    roster: dict[str, Participant]
    attempt: Attempt | None = None
    """Set by a shared store: which run of the event's handlers this is."""


@dataclass(slots=True)
class CallRecord:
    """What the sequencer remembers of one call."""

    call_id: str
    phase: int = -1
    state: str | None = None
    snapshot: CallResource | None = None
    roster: dict[str, Participant] = field(default_factory=dict)
    roster_sequence: int | None = None
    seen: deque[bytes] = field(default_factory=lambda: deque(maxlen=_SEEN_DIGESTS))
    roster_digest: bytes | None = None
    ended: bool = False
    held: events.Event | None = None
    hold_timer: asyncio.TimerHandle | None = None
    backlog: list[events.Event] = field(default_factory=list)
    forget_timer: asyncio.TimerHandle | None = None


def _digest(raw: dict[str, Any]) -> bytes:
    try:
        # orjson's sorted compact form is canonical too, at a tenth of json.dumps's cost.
        canonical = orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        # Integers beyond 64 bits and lone surrogates, which orjson refuses, take the slower
        # road; ASCII escapes keep a lone surrogate encodable.
        text = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        canonical = text.encode()
    return hashlib.blake2b(canonical, digest_size=16).digest()


def _participant_key(participant: Participant, index: int) -> str:
    if participant.id:
        return id_key(participant.id)
    # Some documented rosters omit the participant id; fall back to the identity.
    if participant.info is not None:
        return "info:" + json.dumps(participant.info.model_dump(mode="json"), sort_keys=True)
    return f"#{index}"


class Sequencer:
    """Orders each call's events and hands them to ``deliver`` exactly once.

    ``accept`` is synchronous and never waits: the receiver calls it while the
    request is still open, so everything it accepts is queued before the 202.
    ``on_ended`` is told at once when a call terminates (to fail operations that
    handlers are waiting for), ``on_operation`` at once when an operation
    notification is accepted (to resolve waits even while the call's handler runs).
    """

    def __init__(
        self,
        deliver: Callable[[Delivery], None],
        *,
        reorder_window: float = 1.0,
        termination_grace: float = 30.0,
        on_ended: Callable[[str, ResultInfo | None], None] | None = None,
        on_operation: Callable[[events.OperationUpdated], None] | None = None,
    ) -> None:
        self._deliver_fn = deliver
        self._window = reorder_window
        self._grace = termination_grace
        self._on_ended = on_ended
        self._on_operation = on_operation
        self._records: dict[str, CallRecord] = {}
        self.counts: Counter[str] = Counter()
        """Outcomes so far: delivered, held, duplicate, stale, after_end, released_late."""

    # -- public -----------------------------------------------------------------

    def accept(self, event: events.Event) -> None:
        """Take one accepted event: deliver, hold or drop it (with a log line)."""
        key = event.call_key
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = CallRecord(call_id=event.call_id)
        digest = _digest(event.raw)
        if isinstance(event, events.ParticipantsUpdated):
            # A roster is a snapshot: the same one after a different one is a real change.
            if digest == record.roster_digest:
                self._drop(event, "duplicate")
                return
            record.roster_digest = digest
        elif digest in record.seen:
            self._drop(event, "duplicate")
            return
        else:
            record.seen.append(digest)
        if isinstance(event, events.OperationUpdated) and self._on_operation is not None:
            self._on_operation(event)
        self._route(record, event)

    def record(self, call_key: str) -> CallRecord | None:
        """The record of a call, if it is known."""
        return self._records.get(call_key)

    def active_records(self) -> list[CallRecord]:
        """Records of calls that have not ended."""
        return [r for r in self._records.values() if not r.ended]

    def adopt(self, record: CallRecord) -> None:
        """Continue a call from a record loaded from a store, replacing what was known of it."""
        key = id_key(record.call_id)
        self.evict(key)
        self._records[key] = record

    def evict(self, call_key: str) -> CallRecord | None:
        """Forget a call now (another process carries it on); a held event is discarded."""
        record = self._records.pop(call_key, None)
        if record is not None:
            for timer in (record.hold_timer, record.forget_timer):
                if timer is not None:
                    timer.cancel()
            record.hold_timer = record.forget_timer = None
        return record

    def release_all(self) -> None:
        """Deliver every held event now (on shutdown: nothing waits for a window)."""
        for record in list(self._records.values()):
            if record.held is not None:
                self._release(record, "shutdown")

    def close(self) -> None:
        """Cancel timers; held events are released first."""
        self.release_all()
        for record in self._records.values():
            if record.forget_timer is not None:
                record.forget_timer.cancel()
        self._records.clear()

    # -- ordering ---------------------------------------------------------------

    def _route(self, record: CallRecord, event: events.Event) -> None:
        if record.ended:
            self._drop(event, "after_end")
            return
        if record.held is not None:
            phase = phase_of(event)
            held_phase = phase_of(record.held)
            if phase is not None and held_phase is not None and phase < held_phase:
                # A predecessor of the held state overtakes it.
                self._admit(record, event)
                if self._predecessor_done(record, record.held):
                    self._release(record, "predecessor")
                return
            if len(record.backlog) >= _MAX_BACKLOG:
                self._release(record, "backlog_full")
                self._route(record, event)
                return
            record.backlog.append(event)
            return
        self._admit(record, event)

    def _admit(self, record: CallRecord, event: events.Event) -> None:
        phase = phase_of(event)
        if phase is not None:
            if phase < record.phase:
                self._drop(event, "stale", state=_state(event), current_state=record.state)
                return
            if not self._predecessor_done(record, event):
                record.held = event
                record.hold_timer = asyncio.get_running_loop().call_later(
                    self._window, self._release_on_timer, record
                )
                self.counts["held"] += 1
                log.debug(
                    "notification_held",
                    call_id=record.call_id,
                    state=_state(event),
                    window=self._window,
                )
                return
        self._deliver(record, event)

    def _predecessor_done(self, record: CallRecord, event: events.Event) -> bool:
        predecessor = _PREDECESSOR.get(_state(event) or "")
        return predecessor is None or record.phase >= _PHASES[predecessor]

    def _release_on_timer(self, record: CallRecord) -> None:
        if record.held is not None:
            self._release(record, "window_closed")

    def _release(self, record: CallRecord, why: str) -> None:
        held = record.held
        if held is None:
            return
        record.held = None
        if record.hold_timer is not None:
            record.hold_timer.cancel()
            record.hold_timer = None
        if why != "predecessor":
            self.counts["released_alone"] += 1
            log.info(
                "held_notification_released",
                call_id=record.call_id,
                state=_state(held),
                reason=why,
            )
        self._admit_released(record, held)
        backlog, record.backlog = record.backlog, []
        for event in backlog:
            self._route(record, event)

    def _admit_released(self, record: CallRecord, event: events.Event) -> None:
        phase = phase_of(event)
        if phase is not None and phase < record.phase:
            self._drop(event, "stale", state=_state(event), current_state=record.state)
            return
        self._deliver(record, event)

    # -- delivery ---------------------------------------------------------------

    def _deliver(self, record: CallRecord, event: events.Event) -> None:
        if isinstance(event, events.ParticipantsUpdated):
            diffed = self._diff_roster(record, event)
            if diffed is None:
                return
            event = diffed
        snapshot_source = _call_of(event)
        if snapshot_source is not None:
            record.snapshot = _merge(record.snapshot, snapshot_source)
        phase = phase_of(event)
        if phase is not None and isinstance(event, events.CallStateChanged):
            event = event.model_copy(update={"previous_state": record.state})
            record.phase = max(record.phase, phase)
            record.state = event.state
        elif isinstance(event, events.IncomingCall):
            record.phase = max(record.phase, 0)
            record.state = "incoming"
        self.counts["delivered"] += 1
        # The roster dict is replaced, never changed in place, so it can be shared.
        self._deliver_fn(Delivery(event, record.snapshot, record.roster))
        if isinstance(event, events.CallTerminated):
            self._end(record, event)

    def _end(self, record: CallRecord, event: events.CallTerminated) -> None:
        record.ended = True
        for stranded in record.backlog:
            self._drop(stranded, "after_end")
        record.backlog = []
        if self._on_ended is not None:
            self._on_ended(event.call_key, event.result_info)
        key = event.call_key
        record.forget_timer = asyncio.get_running_loop().call_later(
            self._grace, self._forget, key, record
        )

    def _forget(self, key: str, record: CallRecord) -> None:
        if self._records.get(key) is record:
            del self._records[key]

    def _diff_roster(
        self, record: CallRecord, event: events.ParticipantsUpdated
    ) -> events.ParticipantsUpdated | None:
        sequence = event.sequence_number
        if sequence is not None:
            if record.roster_sequence is not None and sequence <= record.roster_sequence:
                self._drop(event, "stale", roster_sequence=sequence)
                return None
            record.roster_sequence = sequence
        old = record.roster
        incoming = {_participant_key(p, i): p for i, p in enumerate(event.participants)}
        delta = bool(
            record.snapshot is not None
            and record.snapshot.call_options is not None
            and getattr(record.snapshot.call_options, "is_delta_roster_enabled", False)
        )
        joined: list[Participant] = []
        left: list[Participant] = []
        updated: list[Participant] = []
        new = dict(old) if delta else {}
        for key, participant in incoming.items():
            if participant.removed_state is not None:
                left.append(participant)
                new.pop(key, None)
                continue
            new[key] = participant
            if key not in old:
                joined.append(participant)
            elif old[key] != participant:
                updated.append(participant)
        if not delta:
            left.extend(p for key, p in old.items() if key not in incoming)
        record.roster = new
        return event.model_copy(update={"joined": joined, "left": left, "updated": updated})

    def _drop(self, event: events.Event, reason: str, **details: Any) -> None:
        self.counts[reason] += 1
        log.info(
            "notification_dropped",
            call_id=event.call_id,
            reason=reason,
            kind=type(event).__name__,
            **details,
        )


def _merge(old: CallResource | None, new: CallResource) -> CallResource:
    """The call as last known: fields a notification carries replace the old ones."""
    if old is None:
        return new
    changes: dict[str, Any] = {name: getattr(new, name) for name in new.model_fields_set}
    if new.model_extra:
        changes.update(new.model_extra)
    return old.model_copy(update=changes)
