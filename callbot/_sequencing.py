"""Per-call order: lifecycle phases, the reorder window, transitions and updates, drops.

Graph may deliver ``established`` before ``establishing``, repeat a
notification, repeat a state only to add content, or send stragglers after a
call ended. The sequencer sees every accepted event of a call in arrival order
and decides, for each, one of:

* deliver it now, computing what only order can tell: whether a state
  notification is a *transition* (:class:`~callbot.events.CallStateChanged`, with
  ``previous_state``) or an *update* of the state the call is already in
  (:class:`~callbot.events.CallUpdated`, with what changed), whether it is the news
  that a transfer the bot asked for failed (``transfer_failed``), who joined or left
  the roster, and the call's merged snapshot;
* hold it, when it arrives before the state it follows (a state past ``establishing``
  before the call was seen establishing, a tone before the call was seen established,
  a roster or other news without a state of a call seen being set up (or placed by the
  bot) but not yet established, a transfer's failure or its ``transferAccepted`` before
  that transfer's ``transferring``),
  for ``reorder_window`` seconds from when it came: later events of that call wait behind
  it, except its predecessors, which overtake it; when they have come, the held events go in
  lifecycle order; when its window closes, it goes alone, with what goes before it, and what
  came after it and still waits for its own predecessor waits on for its own window;
* drop it, with a log line saying why: ``duplicate``, ``stale`` or ``after_end``
  (an operation's progress after its outcome, or an outcome told again written
  otherwise, is ``stale``: an operation only goes forward, and ends once; so is a
  transfer's progress it is past: a ``transferring`` once every transfer asked had its
  progress or its failure, or behind its ``transferAccepted`` the window let go).

Lifecycle phases come from :data:`callbot.models.CALL_LIFECYCLE`, the one list
of call states: incoming < establishing < ringing < established (and the
states a live call moves between, including states Graph adds later) <
terminating < terminated.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeGuard, TypeVar

import orjson
from pydantic import BaseModel

from . import events
from ._clock import timer_at
from ._config import Settings
from ._counts import Counts
from ._errors import MalformedNotification
from ._ids import MAX_ID_LENGTH, clipped, id_key
from ._journal import Attempt
from ._lifecycle import CallLife, Lifecycle, phase_of_state
from ._log import RateLimitedLog, get_logger
from ._parse import CALL_PATH, roster_entries
from .models import Call as CallResource
from .models import Identity, InvitationParticipantInfo, Participant
from .models._operations import is_settled

__all__ = [
    "MAX_BACKLOG_BYTES",
    "MAX_BACKLOG_ENTRIES",
    "MAX_HELD_BYTES",
    "MAX_SNAPSHOT_BYTES",
    "MAX_WAITING_TONES",
    "ROSTER_BYTES_PER_PARTICIPANT",
    "SEEN_DIGESTS",
    "TONES_UNORDERED",
    "CallRecord",
    "Delivery",
    "KeeperLeft",
    "KeptOfRefused",
    "OwnFact",
    "Placed",
    "RecentDigests",
    "Sequencer",
    "TransferAsked",
    "TransferRefused",
    "backlog_full",
    "digest_decides",
    "entry_size",
    "json_size",
    "kept_of_refused",
    "model_json",
    "notification_digest",
    "phase_of",
    "refused_items",
    "roster_key",
    "tenant_mismatch",
    "tone_after",
    "tone_waits",
]

log = get_logger("callbot.sequencing")

_INCOMING = phase_of_state("incoming")
_ESTABLISHING = phase_of_state("establishing")
_TERMINATING = phase_of_state("terminating")
_LIVE = phase_of_state("established")
SEEN_DIGESTS = 128
"""How many of a call's latest notifications a repeat is recognised among (every store)."""


class RecentDigests(dict[bytes, None]):
    """The latest digests, at most :data:`SEEN_DIGESTS`, the oldest first. A dict: whether a
    digest is among them costs the same for 3 as for 128, and a call's few take a third of
    a ``deque(maxlen=128)``'s first block."""

    __slots__ = ()

    def add(self, digest: bytes) -> bool:
        """Remember ``digest``; whether it was new (a known one keeps its place)."""
        if digest in self:
            return False
        self[digest] = None
        if len(self) > SEEN_DIGESTS:
            del self[next(iter(self))]
        return True

    def last(self) -> bytes | None:
        """The digest remembered last, if any."""
        return next(reversed(self), None)


_MAX_BACKLOG = 1000
MAX_HELD_BYTES = 32 * 1024 * 1024
"""What the events a call holds in its reorder window take at most, in bytes of JSON (their
data as Graph sent it, counted as it is digested; what leaves the window no longer counts): a
real call's window holds a few notifications (recorded Teams bodies take 2 to 10 KB; a meeting's
whole roster, at most ``max_body_bytes``, 4 MiB). Past that, what is held goes at once, as
past 1,000 events (``backlog_full``): nothing accepted is lost."""
# A call's backlog bounds are twice its window's: a shared store's inbox counts what the window
# holds too, so a window past its bounds goes on before the call refuses, with either store.
MAX_BACKLOG_BYTES = 2 * MAX_HELD_BYTES
"""What a call may have accepted and not yet had its handlers finish, in bytes of JSON (its
notifications' data, as counted when digested; a shared store counts its inbox's entries):
Graph posts a call's notifications one at a time, 2 to 10 KB each (recorded), so a handler
waiting seconds for a prompt leaves a few behind it, never this much. Past it (or past
:data:`MAX_BACKLOG_ENTRIES`), the call's further notifications are refused before they are
accepted (503 with Retry-After, ``call_backlog_full``): Graph sends them again later."""
MAX_BACKLOG_ENTRIES = 2 * _MAX_BACKLOG
"""How many notifications a call may have accepted and not yet had its handlers finish (a
backstop to :data:`MAX_BACKLOG_BYTES` for a flood of small ones)."""
MAX_WAITING_TONES = 128
"""How many tones of a call may wait for their predecessors (the sequencer's and digit
collection's bound): no caller presses this many keys within a window, so a flood beyond
goes on at once rather than be kept and sorted."""
# Unknown properties a call's snapshot keeps across notifications (Graph's call has ~40).
_MAX_EXTRA_PROPERTIES = 256
ROSTER_BYTES_PER_PARTICIPANT = 4096
"""What a call's roster keeps at most, in bytes of JSON (each participant's key and the
participant as Graph sent it), for each participant its roster may hold (``max_roster_size``):
a Teams participant takes about 2.2 KB (recorded). Past that, a roster change that would grow
it is delivered as sent, but the call keeps its roster as it was (``call_record_full``)."""
MAX_SNAPSHOT_BYTES = 256 * 1024
"""What a call's merged snapshot keeps at most, in bytes of JSON (a recorded Teams call's,
with ``chatInfo``, ``meetingInfo`` and its meeting token, takes 2 to 3 KB). Past that, a
notification that would grow it is delivered as sent, but the call keeps its snapshot as it
was (its state moves all the same)."""


_Model = TypeVar("_Model", bound=BaseModel)
_set_attribute = object.__setattr__


def _copied(model: _Model, update: dict[str, Any]) -> _Model:
    """``model.model_copy(update=update)``, the same copy built directly: pydantic's goes
    through the ``copy`` module three times, which costs more than the rest of a delivery's
    copy (two or three per notification). As there, nothing is validated; a name the model
    does not declare goes to its unknown properties (``model_extra``) when it keeps them."""
    values = model.__dict__.copy()  # every declared field, and only those
    extra = model.__pydantic_extra__
    if extra is not None:
        extra = extra.copy()
    for name, value in update.items():
        if extra is None or name in values:
            values[name] = value
        else:
            extra[name] = value
    return _built(model, values, extra, model.__pydantic_fields_set__ | update.keys())


def _built(
    model: _Model, values: dict[str, Any], extra: dict[str, Any] | None, fields_set: set[str]
) -> _Model:
    """A model of ``model``'s class (and private values) holding ``values``, its unknown
    properties ``extra``, with ``fields_set`` set: built as pydantic's copies are, unvalidated."""
    cls = type(model)
    private = getattr(model, "__pydantic_private__", None)
    # object's own: pydantic's models keep it, and cls.__new__ is read through the metaclass's
    # __getattr__ hook (several hundred instructions, a copy or two a notification).
    built = object.__new__(cls)
    _set_attribute(built, "__dict__", values)
    _set_attribute(built, "__pydantic_extra__", extra)
    _set_attribute(built, "__pydantic_fields_set__", fields_set)
    _set_attribute(built, "__pydantic_private__", None if private is None else private.copy())
    return built


# An event is told apart by its exact class, not isinstance: callbot builds every event itself,
# and of its classes only CallTerminated derives from another (CallStateChanged). isinstance
# against a pydantic class calls the metaclass's __instancecheck__, several times the cost, a
# dozen times a notification (test_events_are_told_apart_by_their_exact_class keeps it true).


_STATE_CHANGES = frozenset((events.CallStateChanged, events.CallTerminated))


def _changes_state(event: events.Event) -> TypeGuard[events.CallStateChanged]:
    """Whether ``event`` moves its call to a state (an ending does too): the one test of it."""
    return type(event) in _STATE_CHANGES


def _state(event: events.Event) -> str | None:
    return event.state if _changes_state(event) else None


# How far an operation got: notStarted, then running (or a status Graph adds later), then
# its outcome (completed or failed), which ends it.
_OPERATION_STEPS = {"notStarted": 0}
_OPERATION_GOING = 1
_OPERATION_SETTLED = 2


def _operation_step(status: str) -> int:
    """Where an operation ``status`` (in Graph's spelling) stands in the operation's life."""
    if is_settled(status):
        return _OPERATION_SETTLED
    return _OPERATION_STEPS.get(status, _OPERATION_GOING)


# The events that carry the call, by class.
_CALL_EVENTS = frozenset(
    (
        events.IncomingCall,
        events.CallStateChanged,
        events.CallTerminated,
        events.CallUpdated,
        events.ToneReceived,
    )
)


def _call_of(event: events.Event) -> CallResource | None:
    call: CallResource | None = (
        getattr(event, "call", None) if type(event) in _CALL_EVENTS else None
    )
    return call


def phase_of(event: events.Event) -> int | None:
    """Where an event stands in the call lifecycle; ``None`` for events without a state."""
    if type(event) is events.IncomingCall:
        return _INCOMING
    if _changes_state(event):
        return phase_of_state(event.state)
    return None


TONES_UNORDERED = -1
"""The number expected next of a call whose tones skipped a number that never came within
the window: Graph numbers a call's tones one by one (its docs: an incremental identifier for
ordering them), so such a call's numbering is not that, or it lost a tone, and its tones go on
as they arrive instead of each waiting a window for a number that will not come."""


def tone_waits(sequence: int | None, expected: int | None) -> bool:
    """Whether a tone numbered ``sequence`` (Graph's ``sequenceId``) waits for its
    predecessor, ``expected`` being the number after the last tone passed on. The first tone
    has no known predecessor (a call's count need not start at 1: a recorded Teams call's
    first tone was 6), nor has a tone without a number: those go at once, as does one coming
    after a later one went. The one rule of tone order, kept by the sequencer (handlers) and
    the tone router (digit collection) alike."""
    return sequence is not None and expected is not None and 0 <= expected < sequence


def tone_after(sequence: int | None, expected: int | None) -> int | None:
    """The number expected next once a tone numbered ``sequence`` was passed on."""
    if sequence is None or expected == TONES_UNORDERED:
        return expected
    return sequence + 1 if expected is None else max(expected, sequence + 1)


def _follows(event: events.Event, reached: int) -> int | None:
    """The phase a call that has reached phase ``reached`` must reach before ``event`` is
    delivered, if any: a state past ``establishing`` (not an ending) follows
    ``establishing``; a tone follows ``established`` (Graph sends it on an established
    call); so does news without a state (a roster, content sharing) of a call seen being
    set up or placed by the bot (``reached`` is :func:`_reached`), which Graph may deliver
    before ``established`` as it may ``established`` before ``establishing``."""
    if type(event) is events.ToneReceived:
        return _LIVE
    phase = phase_of(event)
    if phase is None:
        return _LIVE if _INCOMING <= reached < _LIVE else None
    if _ESTABLISHING < phase < _TERMINATING:
        return _ESTABLISHING
    return None


# A transfer's own progress: never the news that it failed.
_TRANSFER_GOING = frozenset(("transferring", "transferAccepted"))


def _tells_failure(state: str | None, call: CallResource | None) -> bool:
    """Whether a notification of ``state`` carrying ``call`` is how Graph tells a transfer
    failed: a state of the live call other than the transfer's own progress, with a
    ``resultInfo`` saying why (``established`` again, documents 27, 29 and 30). Which
    transfer's failure it is, if any, is counted (:attr:`CallRecord.transfers_told`): the
    one rule the sequencer holds, repeats and tells such news by."""
    return call is not None and call.result_info is not None and _live_past_transfer(state)


def _fails_transfer(current: str | None, state: str | None, call: CallResource | None) -> bool:
    """Whether ``call`` in ``state``, delivered to the call in ``current``, is the news that a
    transfer failed: as :func:`_tells_failure` says, or the live call back from
    ``transferring`` with no ``resultInfo`` (Graph's 2019 shape, recorded gdh28 and gdh29): a
    transfer that went through ends the call, never brings it back (an update sent before the
    transfer began is stale first: :func:`_sent_before_transfer`)."""
    if current == "transferring" and _live_past_transfer(state):
        return True
    return _tells_failure(state, call)


def _live_past_transfer(state: str | None) -> bool:
    """A state of the live call other than a transfer's own progress."""
    return state is not None and state not in _TRANSFER_GOING and phase_of_state(state) == _LIVE


def _awaits_progress(
    state: str | None,
    call: CallResource | None,
    current: str | None,
    transfers: int,
    told: int,
    progressed: int,
) -> bool:
    """Whether a notification of ``state`` carrying ``call``, coming to the live call in
    ``current`` (``transfers`` asked, ``told`` of them had their failure, ``progressed`` their
    progress), arrived before its transfer's ``transferring``: while a transfer asked has had
    no failure and the first such no progress, its failure (:func:`_tells_failure`), and its
    ``transferAccepted`` unless the call is in a transfer's progress already. Each
    notification is a request of its own: Graph's can arrive swapped. The one rule the hold
    (:func:`_awaits_transferring`) and its walks (:func:`_held_states`) wait by."""
    if transfers <= told or progressed > told:
        return False
    if state == "transferAccepted":
        return current not in _TRANSFER_GOING
    return _tells_failure(state, call)


def _awaits_transferring(event: events.Event, record: CallRecord, window: float) -> bool:
    """Whether ``event``, coming to the call now (or held since it came), waits for its
    transfer's ``transferring`` (:func:`_awaits_progress`), or for the transfer's outcome
    (:func:`_awaits_outcome`)."""
    told = record.transfers_told
    life = record.life
    if life.transfers <= told or life.phase != _LIVE:
        return False  # the usual case, first: no transfer waits for its news
    state, call, progressed = _state(event), _call_of(event), record.transferring_told
    if progressed <= told:
        return _awaits_progress(state, call, life.state, life.transfers, told, progressed)
    counts = (told, progressed, record.transferring_at)
    arrived = _arrived(record, event)
    return _awaits_outcome(state, call, life.state, life.transfers, counts, window, arrived)


def _awaits_outcome(
    state: str | None,
    call: CallResource | None,
    current: str | None,
    transfers: int,
    counts: _TransferCounts,
    window: float,
    arrived: float | None,
) -> bool:
    """Whether a state of the live call other than a transfer's progress would be dropped as
    an update sent before the transfer began (:func:`_transfer_counts`): it waits for the
    transfer's outcome instead, at most ``reorder_window``. Its failure coming meanwhile
    shows the update was sent after it (it goes after it); the call's end drops it
    (``after_end``); the window closing with the transfer still going, as stale."""
    return (
        state is not None
        and state not in _TRANSFER_GOING
        and _transfer_counts(state, call, current, transfers, counts, window, arrived) is None
    )


def _arrived(record: CallRecord, event: events.Event) -> float | None:
    """When ``event`` came, if it is held (:attr:`CallRecord.held_at`); ``None``: now."""
    return record.held_at.get(id(event)) if record.held_at else None


def _progress_counted(
    state: str, current: str | None, transfers: int, told: int, transferring_told: int
) -> int | None:
    """:attr:`CallRecord.transferring_told` once ``state``, a transfer's own progress other
    than ``current``, is delivered to the live call in ``current`` (``transfers`` asked,
    ``told`` of them had their failure). A transfer's first progress (``transferring``, or
    ``transferAccepted`` that the window let go without it) is that of the first transfer
    asked that had neither progress nor a failure; ``transferAccepted`` after
    ``transferring`` is counted already. ``None`` when it is stale (a transfer only goes
    forward): a ``transferring`` behind its ``transferAccepted``, or a transfer's first
    progress once every transfer asked had progress or a failure, unless no transfer was
    asked (then whose is not known, and it goes)."""
    if current in _TRANSFER_GOING:
        return None if state == "transferring" else transferring_told
    passed = max(transferring_told, told)
    if transfers == 0 or passed < transfers:
        return min(passed + 1, transfers)
    return None


def _sent_before_transfer(
    state: str | None,
    call: CallResource | None,
    current: str | None,
    transferring_at: float | None,
    window: float,
    arrived: float | None,
) -> bool:
    """Whether a notification of ``state`` carrying ``call``, coming while a transfer the bot
    asked goes (``current`` is ``transferring``, then ``transferAccepted``) and has had no
    failure, is an update of the live call Graph sent before the transfer began: a live state
    with no ``resultInfo`` (Teams repeats ``established`` two to four times as a call starts,
    each a request of its own) once the transfer was accepted, or within ``window``
    (``reorder_window``) of its ``transferring`` (delivered at ``transferring_at``), judged
    when it ``arrived`` (``None``: now; a held one, when it was held). Later, while
    ``transferring``, the same is the transfer's failure in Graph's 2019 shape."""
    if not _live_past_transfer(state) or call is None or call.result_info is not None:
        return False
    if current != "transferring":
        return True
    at = transferring_at
    if at is None:
        return False
    if arrived is None:
        arrived = asyncio.get_running_loop().time()
    return arrived - at < window


_TransferCounts = tuple[int, int, float | None]
"""How many transfers asked had their failure (:attr:`CallRecord.transfers_told`), their
progress (:attr:`CallRecord.transferring_told`), and when the latest ``transferring`` went
(:attr:`CallRecord.transferring_at`)."""


def _transfer_counts(
    state: str,
    call: CallResource | None,
    current: str | None,
    transfers: int,
    counts: _TransferCounts,
    window: float,
    arrived: float | None = None,
) -> _TransferCounts | None:
    """``counts`` once a notification of ``state`` carrying ``call`` (which ``arrived`` then:
    :func:`_sent_before_transfer`) is delivered to the call in ``current`` (``transfers``
    asked): a transfer's progress counted
    (:func:`_progress_counted`), its failure (:func:`_fails_transfer`). ``None`` when it is
    stale for a transfer, and dropped: progress the transfer is past, or an update sent
    before the transfer began (:func:`_sent_before_transfer`). The one judgement delivery
    makes, the copy rule asks (:func:`_stale_by_transfer`) and the hold's walks simulate
    (:func:`_held_states`)."""
    told, progressed, at = counts
    if state in _TRANSFER_GOING:
        if state == current:
            return counts  # an update of the progress the call is in
        counted = _progress_counted(state, current, transfers, told, progressed)
        if counted is None:
            return None
        if state == "transferring":
            # What comes within the window of it may be an update sent before it.
            at = asyncio.get_running_loop().time()
        return told, counted, at
    if told >= transfers:
        return counts  # no transfer asked waits for its failure
    if current in _TRANSFER_GOING and _sent_before_transfer(
        state, call, current, at, window, arrived
    ):
        return None
    if _fails_transfer(current, state, call):
        # The failure of the first transfer asked that had none: transfers are one after another.
        return told + 1, progressed, at
    return counts


def _stale_by_transfer(record: CallRecord, event: events.Event, window: float) -> bool:
    """Whether ``event``, a state of the live call delivered now, would be dropped as stale
    for a transfer (:func:`_transfer_counts`): a copy of it is a repeat
    (:func:`_changes_call`)."""
    state = _state(event)
    if state is None:
        return False
    counts = (record.transfers_told, record.transferring_told, record.transferring_at)
    life = record.life
    judged = _transfer_counts(state, _call_of(event), life.state, life.transfers, counts, window)
    return judged is None


class _HeldState(NamedTuple):
    """A state held by a live call, judged as delivery will judge it (:func:`_held_states`)."""

    at: int
    """Its place among what is held."""
    event: events.Event
    call: CallResource | None
    before: str | None
    """The call's state once what is held before it went."""
    counts: _TransferCounts
    """The transfers' counts once what is held before it went."""
    after: _TransferCounts | None
    """The counts once it went (:func:`_transfer_counts`); ``None``: stale, dropped."""
    waits: bool
    """Whether it waits for its transfer's ``transferring`` (:func:`_awaits_progress`)."""
    outcome: bool
    """Whether it waits for its transfer's outcome (:func:`_awaits_outcome`)."""


def _held_states(record: CallRecord, window: float) -> Iterator[_HeldState]:
    """Each state of the live call held, judged by the functions delivery judges by, after
    the states held before it: all the hold's walks know of what is held, so that they differ
    from delivery only by the time between them (a ``transferring`` held behind a tone is the
    one of the failure held after it; an update sent before the transfer began, or a
    transfer's progress it is past, is stale, and moves nothing). One that waits for its
    transfer's progress is taken to go once that came."""
    life = record.life
    transfers, state = life.transfers, life.state
    counts: _TransferCounts = (
        record.transfers_told,
        record.transferring_told,
        record.transferring_at,
    )
    for index, held in enumerate(record.held):
        held_state = _state(held)
        if held_state is None or phase_of_state(held_state) != _LIVE:
            continue
        call = _call_of(held)
        waits = _awaits_progress(held_state, call, state, transfers, counts[0], counts[1])
        arrived = _arrived(record, held)
        after = _transfer_counts(held_state, call, state, transfers, counts, window, arrived)
        outcome = after is None and held_state not in _TRANSFER_GOING
        yield _HeldState(index, held, call, state, counts, after, waits, outcome)
        if after is not None:
            counts, state = after, held_state


def _held_for_transferring(
    record: CallRecord, window: float, progress: str | None = None
) -> tuple[int | None, int]:
    """Where the first held event waiting for its transfer's ``transferring`` is, if any
    (:func:`_awaits_progress`), and how many transfers have had their failure once what is
    held before it went (:func:`_held_states`). With ``progress``, a transfer's progress
    arriving: also where a held state is that would leave it stale (its transfer's failure
    held behind a tone, arrived before its ``transferAccepted``), so that it goes first."""
    transfers, told = record.life.transfers, record.transfers_told
    if transfers <= told:
        return None, told  # every transfer asked had its failure: nothing held waits
    for held in _held_states(record, window):
        if held.waits:
            return held.at, held.counts[0]
        if held.after is None:
            continue  # dropped as stale: the call stays where it is
        if progress is not None and _goes_before(progress, held, transfers, window):
            return held.at, held.counts[0]
        told = held.after[0]
    return None, told


def _ends_wait(
    state: str | None,
    call: CallResource | None,
    current: str | None,
    transfers: int,
    counts: _TransferCounts,
    window: float,
    arrived: float | None = None,
) -> bool:
    """Whether a notification of ``state`` carrying ``call``, delivered to the call in
    ``current`` (``counts`` as they stand), is news an update held for its transfer's outcome
    (:func:`_awaits_outcome`) goes after: the transfer going on (its ``transferAccepted``),
    its failure (as delivery counts it: :func:`_transfer_counts`), or the call's end. The one
    rule of what goes before such an update, arriving (:func:`_held_for_outcome`) or held
    behind it (:func:`_pull_progress`)."""
    if state is None or state == current:
        return False
    if phase_of_state(state) >= _TERMINATING:
        return True
    after = _transfer_counts(state, call, current, transfers, counts, window, arrived)
    return after is not None and (state in _TRANSFER_GOING or after[0] > counts[0])


def _held_for_outcome(record: CallRecord, event: events.Event, window: float) -> int | None:
    """Where the first update held for its transfer's outcome is (:func:`_awaits_outcome`),
    if ``event``, arriving, is news it goes after there (:func:`_ends_wait`): ``event`` goes
    right before it."""
    state = _state(event)
    if state is None:
        return None
    transfers = record.life.transfers
    for held in _held_states(record, window):
        if held.outcome:
            ends = _ends_wait(state, _call_of(event), held.before, transfers, held.counts, window)
            return held.at if ends else None
    return None


def _goes_before(progress: str, held: _HeldState, transfers: int, window: float) -> bool:
    """Whether a transfer's ``progress`` arriving moves the call where ``held`` will find it,
    and would be stale once ``held`` went: then it goes before it."""
    if progress == held.before or held.after is None:
        return False
    now = _transfer_counts(progress, None, held.before, transfers, held.counts, window)
    state = _state(held.event)
    return (
        now is not None
        and _transfer_counts(progress, None, state, transfers, held.after, window) is None
    )


def _pull_progress(
    ordered: list[events.Event], index: int, record: CallRecord, window: float
) -> bool:
    """Move the first transfer's progress held after ``ordered[index]`` right before it, if
    that waits for it (:func:`_awaits_transferring`): whether one moved. A failure waits for
    ``transferring`` or ``transferAccepted``, ``transferAccepted`` for ``transferring`` (which
    waits for nothing): a transfer's progress goes before its failure, whatever came first.
    An update held for its transfer's outcome has that outcome moved instead
    (:func:`_ends_wait`)."""
    event = ordered[index]
    if type(event) is events.ToneReceived or not _awaits_transferring(event, record, window):
        return False
    life = record.life
    told, progressed = record.transfers_told, record.transferring_told
    if progressed > told:
        # An update held for its transfer's outcome (:func:`_awaits_outcome`): that goes first.
        counts = (told, progressed, record.transferring_at)
        for later in range(index + 1, len(ordered)):
            news = ordered[later]
            state, call, arrived = _state(news), _call_of(news), _arrived(record, news)
            if _ends_wait(state, call, life.state, life.transfers, counts, window, arrived):
                ordered.insert(index, ordered.pop(later))
                return True
        return False
    wanted = ("transferring",) if _state(event) == "transferAccepted" else _TRANSFER_GOING
    for later in range(index + 1, len(ordered)):
        if _state(ordered[later]) in wanted:
            ordered.insert(index, ordered.pop(later))
            return True
    return False


def _reached(record: CallRecord) -> int:
    """The phase a call's news is ordered from (:func:`_follows`): its life's, or
    ``incoming`` for a call the bot placed (:attr:`CallRecord.placed`) not seen in a state
    yet: it is being set up as a call the bot answered is. The one rule of it."""
    phase = record.life.phase
    return _INCOMING if phase < _INCOMING and record.placed else phase


def _early(event: events.Event, record: CallRecord, window: float) -> bool:
    """Whether ``event`` arrived before what it follows: the state (:func:`_follows`); for a
    tone of an established call, the tone before it (:func:`tone_waits`); for a transfer's
    failure or its ``transferAccepted``, that transfer's ``transferring``
    (:func:`_awaits_transferring`)."""
    if record.life.phase >= _LIVE:
        # The usual case, first: nothing follows a later phase than established.
        if type(event) is not events.ToneReceived:
            return _awaits_transferring(event, record, window)
        return tone_waits(event.sequence_id, record.tone_next)
    reached = _reached(record)
    follows = _follows(event, reached)
    return follows is not None and reached < follows


def _unblocks(event: events.Event, record: CallRecord) -> bool:
    """Whether ``event`` is a numbered tone that need not wait: the one a held tone of the
    established call waits for, or one later than that already went."""
    if type(event) is not events.ToneReceived or event.sequence_id is None:
        return False
    return not tone_waits(event.sequence_id, record.tone_next)


def _awaited(held: list[events.Event], reached: int) -> int:
    """The latest phase a held event waits for: states up to it overtake what is held."""
    if reached >= _LIVE:
        # Nothing held by a live call waits for a state (a tone waits for the tone before
        # it, a failure for its transferring): only a stale one overtakes, to be dropped.
        return reached - 1
    awaited = -1
    for event in held:
        follows = _follows(event, reached)
        if follows is not None and follows > awaited:
            awaited = follows
            if awaited >= _LIVE:
                break  # nothing waits for a later phase: the rest need not be looked at
    return awaited


def _in_lifecycle_order(held: list[events.Event], reached: int) -> list[events.Event]:
    """Held events (of a call that has reached phase ``reached``) sorted by phase; an event
    without a state keeps its place after the state before it, but one held until its call
    is established (a tone, a roster) goes right after the first ``established`` (or other
    live state) held after it, with what came behind it. Tones then go in Graph's
    ``sequenceId`` order, each before whatever came after a tone numbered after it."""
    next_live: list[int | None] = [None] * len(held)
    following: int | None = None
    for index in range(len(held) - 1, -1, -1):
        next_live[index] = following
        if phase_of(held[index]) == _LIVE:
            following = index
    keyed: list[tuple[int, int, int, int, events.Event]] = []
    # Where an event goes: (phase, index of the state it goes after, 1 past that state's
    # own followers); the event's own index breaks ties.
    place = (-1, -1, 0)
    for index, event in enumerate(held):
        phase = phase_of(event)
        if phase is not None:
            place = (phase, index, 0)
        else:
            follows = _follows(event, reached)
            if follows is not None and reached < follows and place[0] < follows:
                anchor = next_live[index]
                place = (follows, index if anchor is None else anchor, 1)
        keyed.append((*place, index, event))
    keyed.sort(key=lambda entry: entry[:4])
    ordered = [entry[4] for entry in keyed]
    tones = sorted(
        (e for e in ordered if type(e) is events.ToneReceived and e.sequence_id is not None),
        key=_sequence_of,
    )
    if len(tones) < 2:
        return ordered
    # Where a tone came, every tone numbered up to it goes (it was pressed before): what
    # came after that tone goes after them.
    merged: list[events.Event] = []
    placed = 0
    for event in ordered:
        if type(event) is events.ToneReceived and event.sequence_id is not None:
            # The tones left to place are numbered above every tone before this one.
            while placed < len(tones) and _sequence_of(tones[placed]) <= event.sequence_id:
                merged.append(tones[placed])
                placed += 1
        else:
            merged.append(event)
    return merged


def _note_held(record: CallRecord, event: events.Event) -> None:
    """Keep the number of a tone being held (:attr:`CallRecord.waiting_tones`)."""
    if type(event) is events.ToneReceived and event.sequence_id is not None:
        bisect.insort(record.waiting_tones, event.sequence_id)


def _sequence_of(event: events.Event) -> int:
    return (
        event.sequence_id
        if type(event) is events.ToneReceived and event.sequence_id is not None
        else -1
    )


@dataclass(frozen=True, slots=True)
class Placed:
    """Graph answered the request that placed the call: the call is ``tenant_id``'s (the
    tenant the bot's token acts in, which Graph placed it in), and the answer may name the
    bot's own participant (``myParticipantId``), which its notifications of a placed call
    never carry."""

    call_id: str
    my_participant_id: str | None = None
    tenant_id: str | None = None


@dataclass(frozen=True, slots=True)
class TransferAsked:
    """The bot is about to ask Graph to transfer the call to ``target`` (the
    ``transferTarget`` it sends): its outcome, even worded as the last one, is news, and its
    failure names it. ``ask`` names this ask, for a :class:`TransferRefused` of it."""

    call_id: str
    target: InvitationParticipantInfo | None = None
    ask: str | None = None


@dataclass(frozen=True, slots=True)
class TransferRefused:
    """Graph refused the transfer the bot asked last (a 4xx answer), or the bot withdrew it
    unsent: no news of it will come, and a copy of the call's last failure is not that
    transfer's. With ``ask``, only if the ask counted last is that one: a withdrawn ask the
    store never took withdraws nothing."""

    call_id: str
    ask: str | None = None


@dataclass(frozen=True, slots=True)
class KeeperLeft:
    """The instance keeping the call alive stopped. This release keeps calls alive by the
    store's keeper lease, which that instance gave up, and orders nothing by the fact; an
    earlier release that runs the call next keeps it alive from then on (a quiet call may
    bring no notification for hours, and Graph ends a call not kept alive)."""

    call_id: str


@dataclass(frozen=True, slots=True)
class KeptOfRefused:
    """A request was refused in part (503: a call's backlog full, the store failing midway)
    and these of the call's notifications in it were kept (the digests of those a copy of
    is news otherwise: :func:`digest_decides`). Graph sends the whole request again: the
    copies of these in it are repeats, each once."""

    call_id: str
    digests: tuple[bytes, ...]


OwnFact = Placed | TransferAsked | TransferRefused | KeeperLeft | KeptOfRefused
"""What the bot itself knows of a call and no notification of it says. A store puts it in
line with the call's notifications (:meth:`Sequencer.note`), so that it counts for what is
accepted after it, on whichever process runs the call."""


@dataclass(slots=True)
class Delivery:
    """An event released for its handlers, with the call as it stands after it.

    ``event.raw`` is the very item the sequencer accepted (never a copy), however the event
    was rewritten: a shared store finds the delivery's attempt by it. Never changed once
    built (a new one is built instead); not frozen, as a frozen dataclass sets each field
    through ``object.__setattr__``, a cost on every notification."""

    event: events.Event
    snapshot: CallResource | None
    roster: dict[str, Participant]
    life: CallLife
    """The call's life (read only): whether it has ended, its state now."""
    attempt: Attempt | None = None
    """Set by a shared store: which run of the event's handlers this is."""
    size: int = 0
    """What its notification takes in bytes of JSON, as the sequencer counted it: what the
    call's backlog is relieved of once its handlers finish (:func:`backlog_full`)."""


@dataclass(slots=True)
class CallRecord:
    """What the sequencer remembers of one call; its life belongs to the :class:`Lifecycle`."""

    life: CallLife
    snapshot: CallResource | None = None
    roster: dict[str, Participant] = field(default_factory=dict)
    roster_sequence: int | None = None
    roster_floor: int | None = None
    """The ``sequenceNumber`` of the latest whole (not delta) roster: it tells everyone as of
    then, so a delta numbered at or below it is stale, whoever it names."""
    roster_changed: dict[str, int] = field(default_factory=dict)
    """The ``sequenceNumber`` of the latest delta roster that changed each participant, by key,
    the latest last (those who left too, at most :data:`SEEN_DIGESTS` of them): a delta that
    arrives after a later one still tells its news of whoever has not changed since."""
    seen: RecentDigests = field(default_factory=RecentDigests)
    latest: dict[str, bytes] = field(default_factory=dict)
    """The digest of the call's latest roster and latest content-sharing notification."""
    held: list[events.Event] = field(default_factory=list)
    """Events waiting for the window: one that came before the state it follows (a state
    past ``establishing``, a tone, a roster of a call being set up), then later ones."""
    held_bytes: int = 0
    """What the events in ``held`` take, in bytes of JSON (each as counted when it was digested),
    bounded by :data:`MAX_HELD_BYTES`."""
    held_sizes: dict[int, int] = field(default_factory=dict)
    """What each event in ``held`` takes, by its ``id``: subtracted as it leaves the hold."""
    held_at: dict[int, float] | None = None
    """When each event in ``held`` came (loop time), by its ``id``: an update is judged as of
    then (:func:`_sent_before_transfer`), however long it waited. Made when the call first
    holds: most calls never do, and an empty dict is 64 bytes of each."""
    hold_timer: asyncio.TimerHandle | None = None
    tone_next: int | None = None
    """The ``sequenceId`` after the call's last tone delivered (:func:`tone_waits`)."""
    waiting_tones: list[int] = field(default_factory=list)
    """The ``sequenceId`` of each tone held, in order: a tone passed on lets none of them go
    unless it reaches the first."""
    closed: bool = False
    """The call's termination was delivered: what comes after it is dropped."""
    transfers_told: int = 0
    """How many of the life's ``transfers`` had their failure (:func:`_tells_failure`)
    delivered, first asked first, each flagged ``transfer_failed`` for handlers: a copy of
    the last after another transfer was asked is that transfer's failure."""
    transferring_told: int = 0
    """How many of the life's ``transfers`` had their progress delivered (``transferring``, or
    ``transferAccepted`` that the window let go without it), first asked first (one whose
    failure came without it is passed over): a transfer's failure waits for its own progress
    (:func:`_awaits_transferring`), not that of one before (:func:`_progress_counted`)."""
    transferring_at: float | None = None
    """When this process delivered the call's latest ``transferring`` (loop time): what
    comes within ``reorder_window`` of it may be an update Graph sent before it
    (:func:`_sent_before_transfer`). ``None``: not delivered here."""
    operations: dict[str, int] = field(default_factory=dict)
    """How far each of the call's latest operations got in what was delivered
    (:func:`_operation_step`), by operation key, the latest last: Graph posts an operation's
    progress and its outcome as separate requests, which can arrive swapped."""
    roster_sizes: dict[str, int] = field(default_factory=dict)
    """What each participant of ``roster`` takes, by key (:func:`entry_size`)."""
    roster_bytes: int = 0
    """What ``roster`` takes in all (the sum of ``roster_sizes``)."""
    snapshot_bytes: int = 0
    """At least what ``snapshot`` takes, in bytes of JSON: the notifications merged into it
    are counted whole until it could be past :data:`MAX_SNAPSHOT_BYTES`, then it is measured."""
    told_full: bool = False
    """A change the call's record could not keep was logged (``call_record_full``, once)."""
    placed: bool = False
    """The bot placed the call (:class:`Placed`): until a state of it comes, it is being set
    up, and its news without a state waits for ``established`` as an answered call's does
    (:func:`_reached`)."""
    resent: dict[bytes, int] = field(default_factory=dict)
    """How many copies of each notification kept of a request refused in part are still to
    come (:class:`KeptOfRefused`), the latest last: each such copy is a repeat."""

    @property
    def call_id(self) -> str:
        return self.life.call_id

    @property
    def phase(self) -> int:
        """The life's phase. (The sequencer reads ``life.phase`` itself: a property is a call
        of Python on every notification.)"""
        return self.life.phase

    @property
    def state(self) -> str | None:
        """The life's state (read as ``life.state`` by the sequencer, as ``phase``)."""
        return self.life.state

    @property
    def holding(self) -> bool:
        """Whether events of this call wait for a predecessor (or the window to close)."""
        return bool(self.held)

    @property
    def established(self) -> bool:
        """Whether the call is established (or in a state a live call moves between)."""
        return self.life.established


def _changes_call(record: CallRecord, event: events.Event, window: float) -> bool:
    """Whether ``event``, a copy of a notification the call had before, would change the call
    as known now: a copy of a state a live call moves between is news when the call has left
    that state (a transfer tried again fails with the very notification the first failure
    had) or no longer has the values it carries (audio ``active``, ``inactive``, then
    ``active`` again: Teams writes each update alike). A copy that changes nothing is a
    repeat, and so is one that would be dropped as stale now (:func:`_stale_by_transfer`)."""
    state = _state(event)
    # The phase, not ``established``: an end told early by another instance ends no state.
    if state is None or record.life.phase != _LIVE or phase_of_state(state) != _LIVE:
        return False
    # The states held that will go (a stale one moves nothing): the last is where the call
    # goes next.
    going = [h for h in _held_states(record, window) if h.after is not None] if record.held else []
    if going:
        # A state waiting behind a held event is where the call goes next: a copy of it is a
        # repeat, a copy of the state before it the call moving back.
        if state != _state(going[-1].event):
            return True
    elif state != record.life.state:
        # Unless delivered now it would be dropped as stale: then it changes nothing.
        return not _stale_by_transfer(record, event, window)
    call = _call_of(event)
    if call is None:
        return False
    if _tells_failure(state, call):
        waiting, told = _held_for_transferring(record, window)
        if record.life.transfers != told:
            # Graph may tell a failed transfer by this update alone: tried again, it fails
            # alike (but while that failure waits for its transferring, a copy is that one).
            return waiting is None
    known = record.snapshot
    for held in going:
        # The call as it will be once every state held went, each in turn.
        if held.call is not None:
            known = _merge(known, held.call)
    return bool(_changed(known, call))


# Notifications telling how a part of the call stands now: the same one after another of
# its kind is a change back (a roster, a presenter who stops and shares again). By exact
# type: the parser builds no subclass of them.
_WHOLE: dict[type[events.Event], str] = {
    events.ParticipantsUpdated: "roster",
    events.ContentSharingUpdated: "sharing",
}


def digest_decides(event: events.Event) -> bool:
    """Whether a copy of an earlier notification of the call is a repeat whatever came between
    (a store may drop it on arrival). Not so for a roster or content sharing (the same one
    after another is a change) nor for a state a live call moves between (a copy may change
    the call again)."""
    if type(event) in _WHOLE:
        return False
    state = _state(event)
    return state is None or phase_of_state(state) != _LIVE


def notification_digest(event: events.Event) -> bytes:
    """What two copies of one notification share, however Graph wrote it: the call (by
    key), the path under it, the change and the resource data. ``resource`` or
    ``resourceUrl``, ``v1.0``/``beta`` or absolute, the id's case and dashes, and the order
    of keys do not count."""
    return _digest_of(event, event.call_key)[0]


def _digest_of(event: events.Event, call_key: str) -> tuple[bytes, int]:
    """:func:`notification_digest`, for a caller that has the event's ``call_key`` at hand,
    and how many bytes were digested: at least what the notification's data takes as JSON."""
    prefix, url = CALL_PATH + event.call_id, event.resource_url
    under_call = (url[len(prefix) :] if url.startswith(prefix) else url).lower()
    canonical = _canonical_bytes(
        [call_key, under_call, event.change_type, event.raw.get("resourceData")]
    )
    return hashlib.blake2b(canonical, digest_size=16).digest(), len(canonical)


def _canonical_bytes(value: Any) -> bytes:
    try:
        # orjson's sorted compact form is canonical too, at a tenth of json.dumps's cost.
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        # Integers beyond 64 bits and lone surrogates, which orjson refuses, take the slower
        # road; ASCII escapes keep a lone surrogate encodable.
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return text.encode()


def json_size(value: Any) -> int:
    """How many bytes ``value`` (decoded JSON) takes written as compact JSON."""
    try:
        return len(orjson.dumps(value))
    except TypeError:  # integers beyond 64 bits and lone surrogates, which orjson refuses
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=True))


def entry_size(key: str, participant: Any) -> int:
    """What one participant takes of its call's roster: its key, and the participant as
    sent (decoded JSON)."""
    return len(key) + json_size(participant)


def model_json(model: BaseModel) -> str:
    """A model as a call's record writes it: what Graph sent of it, as compact JSON. A lone
    surrogate (valid JSON, with no UTF-8 form) is kept as an ASCII escape."""
    try:
        text: str = model.model_dump_json(by_alias=True, exclude_unset=True)
    except ValueError:  # pydantic's serialization error, for a lone surrogate
        plain = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
        text = json.dumps(plain, separators=(",", ":"), ensure_ascii=True)
    return text


def _model_size(model: BaseModel) -> int:
    """What a model takes of a call's record, in bytes."""
    return len(model_json(model).encode("utf-8", "surrogatepass"))


# The property names and punctuation of ``{"id":...,"myParticipantId":...}``.
_PLACED_OVERHEAD = 32


def _participant_key(participant: Participant, index: int) -> str:
    """The key of a participant in a roster: its id, else who it is, else its place."""
    return roster_key(participant) or f"#{index}"


def roster_key(participant: Participant) -> str | None:
    """The key of a participant in a roster (its id, which the model reads from its
    ``@odata.id`` when Graph names it by that alone), or ``None`` when nothing names it."""
    if participant.id:
        return id_key(participant.id)
    return _identity_key(participant)


def _identity_key(participant: Participant) -> str | None:
    """Who a participant sent without an id is: the ids of its identities, else their names.

    Other properties (language, region, ...) change while the participant stays.
    """
    identity_set = participant.info.identity if participant.info is not None else None
    if identity_set is None:
        return None
    found: list[tuple[str, Any, Any]] = [
        (kind, value.id, value.display_name)
        for kind, value in vars(identity_set).items()
        if isinstance(value, Identity)
    ]
    # An identity kind Graph added after these models is kept as sent.
    found += [
        (kind, value.get("id"), value.get("displayName"))
        for kind, value in (identity_set.model_extra or {}).items()
        if isinstance(value, dict)
    ]
    ids = {kind: id_key(id_) for kind, id_, _ in found if isinstance(id_, str) and id_}
    if ids:
        return "identity:" + _canonical(ids)
    names = {kind: name for kind, _, name in found if isinstance(name, str) and name}
    return "name:" + _canonical(names) if names else None


def _canonical(value: dict[str, str]) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # a lone surrogate, which orjson refuses
        return json.dumps(value, sort_keys=True, ensure_ascii=True)


def _known_without_id(
    roster: dict[str, Participant], incoming: Container[str], participant: Participant
) -> str | None:
    """The key of the roster's entry for ``participant`` from before Graph gave it an id
    (an invitee is sent with ``"id": null`` until it is added), or ``None``."""
    if not roster:
        return None
    key = _identity_key(participant)
    return key if key is not None and key in roster and key not in incoming else None


class Sequencer:
    """Orders each call's events and hands them to ``deliver`` exactly once.

    ``accept`` is synchronous and never waits: the receiver calls it while the
    request is still open, so everything it accepts is queued before the 202.
    Each state a delivered event moves the call into is told to ``lifecycle``,
    which decides whether it is new and when the call has ended; who would join a roster
    past ``max_roster`` participants is left out of it (``roster_full``), a roster change
    that would grow it past ``max_roster`` times :data:`ROSTER_BYTES_PER_PARTICIPANT` bytes,
    or a snapshot past :data:`MAX_SNAPSHOT_BYTES`, is delivered but not kept;
    ``on_operation`` is told at once when an operation notification is accepted
    (to resolve waits even while the call's handler runs), ``on_tone`` at once
    when a tone is accepted (for a handler collecting digits), ``on_drop`` of every
    event dropped (with its log line). ``logger`` takes those lines (the module's by default).
    """

    def __init__(
        self,
        deliver: Callable[[Delivery], None],
        lifecycle: Lifecycle,
        *,
        reorder_window: float = 1.0,
        max_roster: int = Settings.max_roster_size,
        on_operation: Callable[[events.OperationUpdated], None] | None = None,
        on_tone: Callable[[events.ToneReceived], None] | None = None,
        on_drop: Callable[[events.Event], None] | None = None,
        logger: Any = None,
    ) -> None:
        self._deliver_fn = deliver
        self._log = logger if logger is not None else log
        # Lines of each notification or call: a sender posting 200 items a request decides
        # how many, so they are bounded in time.
        self._lines = RateLimitedLog(self._log)
        self.lifecycle = lifecycle
        """The owner of the calls' lives this sequencer reports to."""
        self._window = reorder_window
        self._max_roster = max_roster
        self._max_roster_bytes = max_roster * ROSTER_BYTES_PER_PARTICIPANT
        self._on_operation = on_operation
        self._on_tone = on_tone
        self._on_drop = on_drop
        self._records: dict[str, CallRecord] = {}
        # The item accepted last, and the bytes its digest took: what its delivery adds to
        # its call's snapshot, if it is delivered as it arrives (the usual case).
        self._arriving: tuple[dict[str, Any] | None, int] = (None, 0)
        lifecycle.when_forgotten(self._forgotten)
        self.counts: Counter[str] = Counts()
        """Outcomes so far: delivered, held, duplicate, stale, after_end, roster_full,
        call_forgotten (held when its call was let go), released_alone, not_kept (delivered,
        but what it would add was past the call's bytes: ``call_record_full``)."""

    # -- public -----------------------------------------------------------------

    def accept(self, event: events.Event) -> None:
        """Take one accepted event: deliver, hold or drop it (with a log line)."""
        self._accept(event, event.call_key)

    def _accept(self, event: events.Event, key: str) -> None:
        record = self._records.get(key)
        if record is None:
            record = self._new_record(key, event.call_id, event.tenant_id)
        if record.life.tenant_id is None and event.tenant_id is not None:
            self.lifecycle.bind(record.life, event.tenant_id)
        digest, written = _digest_of(event, key)
        if record.resent and _sent_again(record.resent, digest):
            self._drop(event, "duplicate")
            return
        whole = _WHOLE.get(type(event))
        if whole is not None:
            # A repeat only of the latest of its kind: one that came before is a change back.
            if digest == record.latest.get(whole):
                self._drop(event, "duplicate")
                return
            record.latest[whole] = digest
        elif not record.seen.add(digest) and not _changes_call(record, event, self._window):
            self._drop(event, "duplicate")
            return
        if type(event) is events.OperationUpdated and self._on_operation is not None:
            self._on_operation(event)
        elif type(event) is events.ToneReceived and self._on_tone is not None:
            # A handler collecting digits is still running: tones reach it now, not queued.
            self._on_tone(event)
        self._arriving = event.raw, written
        self._route(record, event)

    def note(self, fact: OwnFact) -> None:
        """Take in what the bot itself knows of a call (:data:`OwnFact`), in its place among
        the call's notifications: what is accepted after it is ordered knowing it."""
        if isinstance(fact, TransferAsked):
            # The call's life keeps the targets; the call's record stores them for the next run.
            self.lifecycle.transfer_asked(fact.call_id, fact.target, fact.ask)
        elif isinstance(fact, TransferRefused):
            self._transfer_refused(fact.call_id, fact.ask)
        elif isinstance(fact, KeeperLeft):
            return  # nothing to order by: the keeper lease says who keeps the call alive
        elif isinstance(fact, KeptOfRefused):
            self._kept_of_refused(fact)
        else:
            self.placed(fact.call_id, fact.my_participant_id, fact.tenant_id)

    def _kept_of_refused(self, fact: KeptOfRefused) -> None:
        record = self._records.get(id_key(fact.call_id))
        if record is None or record.closed:
            return  # nothing of the call is kept: its copies are stragglers, or news
        resent = record.resent
        for digest in fact.digests:
            # At most as many copies as a call's digests: a request can hold more, not Graph's.
            resent[digest] = min(resent.pop(digest, 0) + 1, SEEN_DIGESTS)
        while len(resent) > SEEN_DIGESTS:
            # Bounded as the digests are: a request Graph gave up sending is let go first.
            del resent[next(iter(resent))]

    def _transfer_refused(self, call_id: str, ask: str | None) -> None:
        if not self.lifecycle.transfer_refused(call_id, ask):
            return  # not the ask counted last: nothing changes
        record = self._records.get(id_key(call_id))
        if record is None:
            return  # nothing of the call is kept here: nothing waits for the transfer
        # No longer counted: a failure now is news only of a transfer Graph took on (one
        # asked before it may still wait for its own).
        transfers = record.life.transfers
        record.transfers_told = min(record.transfers_told, transfers)
        record.transferring_told = min(record.transferring_told, transfers)
        if record.held:
            self._release_ready(record)  # a failure held for its transferring goes now

    def placed(
        self, call_id: str, my_participant_id: str | None, tenant_id: str | None = None
    ) -> None:
        """Graph answered the request that placed the call: the call is ``tenant_id``'s unless
        a notification bound it first, and the bot's own participant id the answer named
        (``myParticipantId``, which its notifications of a placed call never carry) is in the
        call's snapshot from now on, whatever a later notification says."""
        key = id_key(call_id)
        record = self._records.get(key)
        if record is None:
            record = self._new_record(key, call_id, tenant_id)
        if record.life.tenant_id is None and tenant_id is not None:
            # Bound now, not by its first notification: another tenant's token cannot claim it.
            self.lifecycle.bind(record.life, tenant_id)
        self.lifecycle.prove(call_id)  # Graph made the call at the bot's request: it is real
        record.placed = True
        if record.closed or my_participant_id is None:
            return
        snapshot = record.snapshot
        if snapshot is None:
            # Nothing delivered yet: what comes first (a roster, even) is merged into it.
            snapshot = CallResource(id=call_id)
        record.snapshot = snapshot.model_copy(update={"my_participant_id": my_participant_id})
        # Graph's own answer, not a notification: counted, never refused.
        record.snapshot_bytes += len(call_id) + len(my_participant_id) + _PLACED_OVERHEAD

    def _new_record(self, key: str, call_id: str, tenant_id: str | None) -> CallRecord:
        life = self.lifecycle.life(call_id, tenant_id)
        # A call whose termination was delivered (and forgotten since) takes nothing more;
        # an end only told by another instance still has its termination to deliver.
        record = self._records[key] = CallRecord(life, closed=life.terminated)
        return record

    def accept_batch(
        self,
        batch: Sequence[events.Event],
        full: Callable[[events.Event, str], bool] | None = None,
    ) -> None:
        """``accept`` each event of a request but those naming a call of another tenant than
        their token's, and those ``full(event, call_key)`` refuses (its call's backlog is
        full); then, if there were such, raise :func:`refused_items`'s refusal."""
        belongs_elsewhere = self.lifecycle.key_belongs_elsewhere
        elsewhere: list[events.Event] = []
        backlogged: list[events.Event] = []
        for event in batch:
            key = event.call_key  # worked out once, for the checks and the ordering
            if belongs_elsewhere(key, event.tenant_id):
                elsewhere.append(event)
            elif full is not None and full(event, key):
                backlogged.append(event)
            else:
                self._accept(event, key)
        if backlogged:
            # Graph sends the whole request again (503): what was kept of it is a repeat then.
            refused = {id(event) for event in (*elsewhere, *backlogged)}
            for fact in kept_of_refused(e for e in batch if id(e) not in refused):
                self.note(fact)
        if elsewhere or backlogged:
            raise refused_items(len(batch), elsewhere=len(elsewhere), backlog=len(backlogged))

    def record(self, call_key: str) -> CallRecord | None:
        """The record of a call, if it is known."""
        return self._records.get(call_key)

    def adopt(self, record: CallRecord) -> None:
        """Continue a call from a record loaded from a store, replacing what was known of it."""
        key = id_key(record.call_id)
        self._drop_record(key)
        stored = record.life
        record.life = self.lifecycle.adopt(
            stored.call_id,
            phase=stored.phase,
            state=stored.state,
            ended=record.closed,
            proven=stored.proven,
        )
        # The record counts the transfers fed up to its checkpoint, and the inbox holds those
        # asked since: a count this process kept from an earlier run would count them twice.
        record.life.transfer_targets = stored.transfer_targets
        record.life.last_ask, record.life.withdrawn = stored.last_ask, stored.withdrawn
        self._records[key] = record

    def start_over(self, call_key: str) -> None:
        """Continue a call of which a store holds nothing: no record, and its life back to no
        state, whatever this process saw of it before."""
        self._drop_record(call_key)
        self.lifecycle.start_over(call_key)

    def evict(self, call_key: str) -> CallRecord | None:
        """Stop ordering a call here (another process carries it on); a held event is
        discarded. Its life goes on: the lifecycle still keeps it alive."""
        record = self._records.get(call_key)
        self._drop_record(call_key)
        return record

    def _forgotten(self, call_key: str, reason: str) -> None:
        record = self._records.get(call_key)
        for event in record.held if record is not None else ():
            # Still waiting for its window when the call was let go: said, not lost silently.
            self._drop(event, "call_forgotten", why=reason)
        self._drop_record(call_key)

    def _drop_record(self, call_key: str) -> None:
        record = self._records.pop(call_key, None)
        if record is not None and record.hold_timer is not None:
            record.hold_timer.cancel()
            record.hold_timer = None

    def release_all(self) -> None:
        """Deliver every held event now (on shutdown: nothing waits for a window)."""
        for record in list(self._records.values()):
            if record.held:
                self._release(record, "shutdown")

    def close(self) -> None:
        """Held events are released first; then nothing is kept."""
        self.release_all()
        self._records.clear()

    # -- ordering ---------------------------------------------------------------

    def _route(self, record: CallRecord, event: events.Event) -> None:
        if record.closed:
            self._drop(event, "after_end")
            return
        if not record.held:
            self._admit(record, event)
            return
        if (
            record.waiting_tones
            and record.life.phase >= _LIVE
            and type(record.held[0]) is events.ToneReceived
            and _unblocks(event, record)
        ):
            # The tone the first held one waits for (or a late one): it goes, then what it let
            # go. (Behind a transfer's failure held first, a tone waits as any later event.)
            self._admit(record, event)
            first = record.waiting_tones[0] if record.waiting_tones else None
            if not tone_waits(first, record.tone_next):
                self._release_ready(record)  # else it lets none go: no walk for it
            return
        phase = phase_of(event)
        # A transfer's progress goes right before what is held for it, if any (its failure, or
        # its transferAccepted, or an update held for its outcome): it overtakes it, or waits
        # right before it; so does its outcome (its failure, the call's end) before the update.
        failure: int | None = None
        state = _state(event)
        if record.life.phase == _LIVE and state is not None:
            if state in _TRANSFER_GOING:
                failure = _held_for_transferring(record, self._window, state)[0]
            if record.transfers_told < record.life.transfers:
                outcome = _held_for_outcome(record, event, self._window)
                if outcome is not None and (failure is None or outcome < failure):
                    failure = outcome
        if phase is not None and (
            phase <= _awaited(record.held, _reached(record))
            # A transferAccepted waiting for transferring too waits before its failure.
            or (failure == 0 and not _early(event, record, self._window))
        ):
            # A predecessor of what is held overtakes it.
            reached, waiting = record.life.phase, len(record.held)
            told, failed = record.transferring_told, record.transfers_told
            self._admit(record, event)
            if (
                record.life.phase != reached
                or len(record.held) != waiting
                or record.transferring_told != told
                or record.transfers_told != failed
            ):
                # The call moved on, the predecessor waits too, or a transfer's failure may
                # follow it now: what may go now goes. (An update or a stale copy changes
                # nothing held: no walk of the backlog.)
                self._release_ready(record)
            return
        if failure is not None:
            # Behind what came before that failure (a tone waiting for the one before it).
            record.held.insert(failure, event)
        else:
            record.held.append(event)
            _note_held(record, event)
        self._count_held(record, event)
        if phase is not None and phase >= _TERMINATING:
            # The call is ending: nothing is left to wait for.
            self._release(record, "call_ending")
        elif len(record.held) > _MAX_BACKLOG or record.held_bytes > MAX_HELD_BYTES:
            self._release(record, "backlog_full")
        elif record.life.phase >= _LIVE and len(record.waiting_tones) > MAX_WAITING_TONES:
            self._release(record, "too_many_waiting")

    def _admit(self, record: CallRecord, event: events.Event, *, may_hold: bool = True) -> None:
        phase = phase_of(event)
        if phase is not None and (
            phase < record.life.phase
            # A call redirected does not come back to incoming, though both share a phase.
            or (
                phase == _INCOMING
                and record.life.state == "redirecting"
                and _state(event) != "redirecting"
            )
        ):
            self._drop(
                event,
                "stale",
                state=clipped(_state(event)),
                current_state=clipped(record.life.state),
            )
            return
        if may_hold and _early(event, record, self._window):
            record.held.append(event)
            _note_held(record, event)
            self._count_held(record, event)
            if record.hold_timer is None:
                self._arm(record)
            self.counts["held"] += 1
            self._log.debug(
                "notification_held",
                call_id=record.call_id,
                kind=type(event).__name__,
                state=clipped(_state(event)),
                window=self._window,
            )
            if record.held_bytes > MAX_HELD_BYTES:
                # Held first, or a predecessor that waits too: bounded as one held behind.
                self._release(record, "backlog_full")
            return
        self._deliver(record, event)

    def _release_on_timer(self, record: CallRecord, deadline: float) -> None:
        record.hold_timer = None
        if record.held:
            # Each window closed by now goes at once, not one timer after another.
            now = asyncio.get_running_loop().time()
            self._let_go(record, max(deadline, now), "window_closed")

    def _release_ready(self, record: CallRecord) -> None:
        """Deliver, in lifecycle order, the held events whose predecessors have come; from
        the first still early on, they wait on, each for its own window."""
        self._let_go(record, -math.inf, None)

    def _release(self, record: CallRecord, why: str) -> None:
        """Deliver every held event now, in lifecycle order: nothing is left to wait for."""
        self._let_go(record, math.inf, why)

    def _let_go(self, record: CallRecord, closed_by: float, why: str | None) -> None:
        """Deliver the held events in lifecycle order: each whose predecessors have come, and,
        alone, each whose window closed by ``closed_by`` (loop time; ``inf``: all of them)
        with whatever goes before it. From the first still early with none of those
        behind it, they wait on, the timer set for the first window to close: each event
        waits ``reorder_window`` from when it came, however long another waited before it."""
        held, came = record.held, record.held_at or {}
        # Tones of the live call may wait for a number the window did not bring.
        gaps = why == "window_closed" and record.life.phase >= _LIVE and bool(record.waiting_tones)
        ordered = _in_lifecycle_order(held, _reached(record))
        record.held, record.waiting_tones = [], []
        window = self._window
        # Added as _arm adds it: the event the timer was set for is due, to the last bit.
        due = 0 if why is None else sum(1 for e in held if came[id(e)] + window <= closed_by)
        if why is not None:
            self.counts["released_alone"] += 1
            self._lines.info(
                "held_notification_released",
                call_id=record.call_id,
                kind=type(held[0]).__name__,
                state=clipped(_state(held[0])),
                reason=why,
            )
        sizes = record.held_sizes
        index = 0
        while index < len(ordered):
            event = ordered[index]
            if not record.closed and _early(event, record, self._window):
                if _pull_progress(ordered, index, record, self._window):
                    continue  # its transfer's progress, held behind it, goes first
                if not due:
                    record.held = ordered[index:]
                    # Numbered tones are in sequenceId order among what is held.
                    record.waiting_tones = [
                        e.sequence_id
                        for e in record.held
                        if type(e) is events.ToneReceived and e.sequence_id is not None
                    ]
                    break
                if (
                    gaps
                    and type(event) is events.ToneReceived
                    and tone_waits(event.sequence_id, record.tone_next)
                ):
                    # A number that never came within a window: the tones after it go on
                    # unordered (not tones held behind a transfer's failure, each in turn).
                    gaps = False
                    record.tone_next = TONES_UNORDERED
                    self._lines.info(
                        "tone_order_given_up", call_id=record.call_id, reason="number_skipped"
                    )
            index += 1
            record.held_bytes -= sizes.pop(id(event))
            if record.closed:
                self._drop(event, "after_end")
            else:
                self._admit(record, event, may_hold=False)
            # Judged as of when it came (:func:`_arrived`): then let go.
            if came.pop(id(event)) + window <= closed_by:
                due -= 1
        if record.held:
            self._arm(record)
        else:
            record.held_at = None  # kept until each was judged as of when it came
            if record.hold_timer is not None:
                record.hold_timer.cancel()
                record.hold_timer = None

    def _arm(self, record: CallRecord) -> None:
        """Set the call's timer for the first window of what it holds to close."""
        assert record.held_at
        deadline = min(record.held_at.values()) + self._window
        record.hold_timer = timer_at(
            record.hold_timer, deadline, self._release_on_timer, record, deadline
        )

    # -- delivery ---------------------------------------------------------------

    def _live_by_tone(self, record: CallRecord, tone: events.ToneReceived) -> None:
        """A call known by its tones alone (this process started after the call did: its
        first tone waited the window for a state in vain) is live, as the state they carry
        says (Graph sends tones with ``established``): its next tones wait for nothing, and
        it is kept alive, no longer pending once proven (:meth:`Lifecycle.live_by_tone`)."""
        state = tone.call.state if tone.call is not None else None
        if state is not None and phase_of_state(state) == _LIVE:
            self.lifecycle.live_by_tone(record.life)

    def _deliver(self, record: CallRecord, event: events.Event) -> None:
        state = _state(event)  # None for a roster: the event it becomes has none either
        # Whether this is the news of a transfer's failure: told to handlers, decided here only.
        failed = False
        if type(event) is events.ToneReceived:
            record.tone_next = tone_after(event.sequence_id, record.tone_next)
            if record.life.state is None:
                self._live_by_tone(record, event)
        elif type(event) is events.OperationUpdated and not self._moves_on(record, event):
            return
        elif state is not None and (
            state in _TRANSFER_GOING or record.transfers_told < record.life.transfers
        ):
            current = record.life.state
            told = record.transfers_told
            counts = _transfer_counts(
                state,
                _call_of(event),
                current,
                record.life.transfers,
                (told, record.transferring_told, record.transferring_at),
                self._window,
                _arrived(record, event),
            )
            if counts is None:
                # Left to go, it would put the call back (in a transfer's progress it is past,
                # or out of the transfer, read as its failure): a transfer only goes forward.
                self._drop(event, "stale", state=clipped(state), current_state=clipped(current))
                return
            failed = counts[0] > told
            _, record.transferring_told, record.transferring_at = counts
        elif type(event) is events.ParticipantsUpdated:
            diffed = self._diff_roster(record, event)
            if diffed is None:
                return
            event = diffed
        previous = record.snapshot
        snapshot_source = _call_of(event)
        arrived, written = self._arriving
        if arrived is not event.raw:
            # Delivered later than it arrived (it was held): its data counted again.
            written = json_size(event.raw.get("resourceData"))
        target: InvitationParticipantInfo | None = None
        if snapshot_source is not None:
            merged = _merge(previous, snapshot_source)
            # At least what the snapshot takes: measured only once it could be past its bound.
            bound = record.snapshot_bytes + written
            if bound > MAX_SNAPSHOT_BYTES:
                record.snapshot, record.snapshot_bytes = self._measured(record, merged)
            else:
                record.snapshot, record.snapshot_bytes = merged, bound
            if failed:
                # The first transfer asked that had none: one asked later still waits for its own.
                target = self.lifecycle.transfer_failed(record.life, record.transfers_told)
                record.transfers_told += 1
        if type(event) is events.IncomingCall:
            state = "incoming"
        if state is not None:
            info = event.result_info if type(event) is events.CallTerminated else None
            moved, previous_state = self.lifecycle.enter(record.life, state, info)
            if not moved:
                # The same state again only adds content: an update, not a transition.
                event = _as_update(event, state, previous, failed, target)
            elif _changes_state(event):
                changes: dict[str, Any] = {"previous_state": previous_state}
                if failed:
                    changes["transfer_failed"] = True
                    changes["transfer_target"] = target
                event = _copied(event, changes)
        snapshot, life_state = record.snapshot, record.life.state
        if snapshot is not None and life_state is not None and snapshot.state != life_state:
            # The lifecycle decides the call's state: a deletion naming no state (or an old
            # one), or a tone repeating "established", must not leave the snapshot behind.
            record.snapshot = snapshot.model_copy(update={"state": life_state})
            record.snapshot_bytes += len(life_state)
        self.counts["delivered"] += 1
        # The roster dict is replaced, never changed in place, so it can be shared.
        self._deliver_fn(
            Delivery(event, record.snapshot, record.roster, record.life, None, written)
        )
        if type(event) is events.CallTerminated:
            record.closed = True
            # Nothing reads an ended call's state but its last delivery, which has it: the
            # record lingers only to drop stragglers, and the collector need not walk the rest.
            record.snapshot, record.snapshot_bytes = None, 0
            record.roster, record.roster_sizes, record.roster_bytes = {}, {}, 0
            record.roster_changed = {}
            stranded, record.held, record.waiting_tones = record.held, [], []
            for straggler in stranded:
                record.held_bytes -= record.held_sizes.pop(id(straggler))
                if record.held_at:
                    record.held_at.pop(id(straggler), None)
                self._drop(straggler, "after_end")

    def _count_held(self, record: CallRecord, event: events.Event) -> None:
        """Count ``event``, held just now, in what the call holds: what it takes in bytes of
        JSON, as counted when it was digested (only an arriving event is ever held)."""
        arrived, written = self._arriving
        assert arrived is event.raw
        record.held_sizes[id(event)] = written
        record.held_bytes += written
        if record.held_at is None:
            record.held_at = {}
        record.held_at[id(event)] = asyncio.get_running_loop().time()

    def _measured(
        self, record: CallRecord, merged: CallResource
    ) -> tuple[CallResource | None, int]:
        """The snapshot the call keeps, and its size, once a notification merged into it
        could take it past :data:`MAX_SNAPSHOT_BYTES`: ``merged``, unless it is past it and
        larger than the snapshot before (then that one)."""
        size = _model_size(merged)
        if size <= MAX_SNAPSHOT_BYTES:
            return merged, size
        previous = record.snapshot
        before = 0 if previous is None else _model_size(previous)
        if size <= before:
            return merged, size  # past its bound already (kept by a release without one)
        self._not_kept(record, "snapshot", size, MAX_SNAPSHOT_BYTES)
        return previous, before

    def _not_kept(self, record: CallRecord, part: str, size: int, limit: int) -> None:
        """A delivered notification would take the call's ``part`` past ``limit`` bytes:
        counted each time, logged once per call."""
        self.counts["not_kept"] += 1
        if record.told_full:
            return
        record.told_full = True
        self._lines.warning(
            "call_record_full",
            call_id=record.call_id,
            part=part,
            size=size,
            limit=limit,
            detail=f"handlers get each notification as sent, but the call keeps its {part} as"
            " it was when a change would take it past the limit (logged once per call)",
        )

    def _moves_on(self, record: CallRecord, event: events.OperationUpdated) -> bool:
        """Whether ``event`` takes its operation further than what was delivered of it (else
        it is dropped as stale): its progress after its outcome, or its outcome again written
        otherwise (an exact copy is a duplicate already), is not news."""
        key = event.operation_key
        if key is None:
            return True  # an outcome naming no operation: nothing to order it by
        step = _operation_step(event.status)
        reached = record.operations.pop(key, None)
        if reached is not None and (step < reached or reached == _OPERATION_SETTLED):
            record.operations[key] = reached
            status = clipped(event.status)
            self._drop(event, "stale", operation_id=event.operation_id, status=status)
            return False
        record.operations[key] = step
        if len(record.operations) > SEEN_DIGESTS:
            # Bounded as the digests are: the call's oldest operation is let go.
            del record.operations[next(iter(record.operations))]
        return True

    def _diff_roster(
        self, record: CallRecord, event: events.ParticipantsUpdated
    ) -> events.ParticipantsUpdated | None:
        sequence = event.sequence_number
        options = record.snapshot.call_options if record.snapshot is not None else None
        delta = event.delta or bool(options is not None and options.is_delta_roster_enabled)
        late = sequence is not None and (
            record.roster_sequence is not None and sequence <= record.roster_sequence
        )
        floor, changed = record.roster_floor, record.roster_changed
        if late and (
            not delta
            or not changed  # nothing says who changed since (the previous release's record)
            or (sequence is not None and floor is not None and sequence <= floor)
        ):
            self._drop(event, "stale", roster_sequence=sequence)
            return None
        old, sizes = record.roster, record.roster_sizes
        participants = event.participants
        # Each participant's key, and where it is listed (the last place, if listed twice).
        incoming = {_participant_key(p, i): i for i, p in enumerate(participants)}
        if sequence is not None and delta and changed:
            # A delta names only who changed: a later one told nothing of the others.
            incoming = {
                k: i for k, i in incoming.items() if changed.get(k, sequence - 1) < sequence
            }
        removed = delta and event.change_type == "deleted"
        joined: list[Participant] = []
        joined_keys: list[str] = []
        left: list[Participant] = []
        updated: list[Participant] = []
        new, new_sizes = (dict(old), dict(sizes)) if delta else ({}, {})
        renamed: set[str] = set()
        entries: list[Any] | None = None
        for key, index in incoming.items():
            participant = participants[index]
            was = key if key in old else _known_without_id(old, incoming, participant)
            if was is not None and was != key:
                renamed.add(was)
                new.pop(was, None)
                new_sizes.pop(was, None)
            if removed or participant.removed_state is not None:
                # Only someone in the roster can leave it: a repeated removal is no news.
                if was is not None:
                    left.append(participant)
                new.pop(key, None)
                new_sizes.pop(key, None)
                continue
            new[key] = participant
            if was is None:
                joined.append(participant)
                joined_keys.append(key)
            elif was != key or old[was] != participant:
                updated.append(participant)
            elif was in sizes:
                new_sizes[key] = sizes[was]  # the same participant: the same size
                continue
            if entries is None:
                # As Graph sent them (a model may have left out what did not fit).
                entries = roster_entries(event.raw.get("resourceData")) or []
            if len(entries) == len(participants):
                new_sizes[key] = entry_size(key, entries[index])
            else:  # an event built otherwise than from Graph's item
                new_sizes[key] = len(key) + _model_size(participant)
        if late and not (joined or left or updated):
            self._drop(event, "stale", roster_sequence=sequence)
            return None
        if len(new) > self._max_roster and len(new) > len(old):
            # Deltas naming new ids each time would grow the call's record for ever: who joins
            # past the bound is left out, but who left or changed is news all the same.
            out = len(new) - max(self._max_roster, len(old))
            for key in joined_keys[len(joined_keys) - out :]:
                del new[key]
                new_sizes.pop(key, None)
                incoming.pop(key, None)
            del joined[len(joined) - out :]
            if not (joined or left or updated):
                self._drop(
                    event, "roster_full", participants=len(new) + out, limit=self._max_roster
                )
                return None
            self.counts["roster_full"] += 1
            self._lines.info(
                "roster_participants_left_out",
                call_id=self.lifecycle.named(event.call_id),
                reason="roster_full",
                left_out=out,
                limit=self._max_roster,
            )
        if not delta:
            left.extend(p for key, p in old.items() if key not in incoming and key not in renamed)
        if sequence is not None and not late:
            record.roster_sequence = sequence
            if not delta:
                # Everyone as of this number: what a delta numbered before it says is older.
                record.roster_floor, record.roster_changed = sequence, {}
        size = sum(new_sizes.values())
        if size > self._max_roster_bytes and size > record.roster_bytes:
            # Names or properties megabytes long in each delta would grow it for ever too.
            self._not_kept(record, "roster", size, self._max_roster_bytes)
        else:
            record.roster, record.roster_sizes, record.roster_bytes = new, new_sizes, size
            if delta and sequence is not None:
                _note_changed(changed, incoming, sequence, len(new))
        return _copied(event, {"joined": joined, "left": left, "updated": updated})

    def _drop(self, event: events.Event, reason: str, **details: Any) -> None:
        if self._on_drop is not None:
            self._on_drop(event)
        self.counts[reason] += 1
        self._lines.info(
            "notification_dropped",
            call_id=self.lifecycle.named(event.call_id),
            reason=reason,
            kind=type(event).__name__,
            **details,
        )


def _note_changed(
    changed: dict[str, int], keys: Iterable[str], sequence: int, members: int
) -> None:
    """Note that the delta numbered ``sequence`` changed the participants keyed ``keys``, in a
    roster now of ``members``: at most :data:`SEEN_DIGESTS` more are kept (who left, or
    changed longest ago, goes first), and no key longer than an id may be."""
    for key in keys:
        if len(key) <= MAX_ID_LENGTH:
            changed.pop(key, None)
            changed[key] = sequence
    while len(changed) > members + SEEN_DIGESTS:
        del changed[next(iter(changed))]


def _sent_again(resent: dict[bytes, int], digest: bytes) -> bool:
    """Whether ``digest`` is of a copy still to come of a notification kept of a request
    refused in part (:attr:`CallRecord.resent`): counted off if so."""
    left = resent.get(digest)
    if left is None:
        return False
    if left == 1:
        del resent[digest]
    else:
        resent[digest] = left - 1
    return True


def kept_of_refused(kept: Iterable[events.Event]) -> list[KeptOfRefused]:
    """What a store notes, per call, of the notifications ``kept`` of a request refused in
    part, Graph sending it again whole: those a copy of is otherwise news
    (:func:`digest_decides`). Worked out only when a request is refused: a rare path."""
    digests: dict[str, tuple[str, list[bytes]]] = {}
    for event in kept:
        if not digest_decides(event):
            key = event.call_key
            digests.setdefault(key, (event.call_id, []))[1].append(_digest_of(event, key)[0])
    return [KeptOfRefused(call_id, tuple(found)) for call_id, found in digests.values()]


def backlog_full(entries: int, size: int) -> bool:
    """Whether a call with ``entries`` notifications taking ``size`` bytes accepted and not
    yet done refuses the next one (the memory store's rule; the Redis store's ingest script
    applies the same bounds to the call's inbox)."""
    return entries >= MAX_BACKLOG_ENTRIES or size >= MAX_BACKLOG_BYTES


def refused_items(items: int, *, elsewhere: int, backlog: int) -> MalformedNotification:
    """The refusal of a request of ``items`` notifications of which ``elsewhere`` name a call
    of another tenant and ``backlog`` a call whose backlog is full (some were): every store
    keeps the request's other notifications. A full backlog wins (503: Graph sends the
    request again, and a call of another tenant is refused then)."""
    if backlog:
        return MalformedNotification(
            "call_backlog_full",
            f"{backlog} notification(s) name a call whose handlers have not caught up yet "
            f"(more than {MAX_BACKLOG_ENTRIES} notifications or {MAX_BACKLOG_BYTES} bytes "
            "waiting); send them again later",
            kept=items - backlog - elsewhere,
        )
    return tenant_mismatch(elsewhere, items)


def tenant_mismatch(refused: int, items: int) -> MalformedNotification:
    """The refusal (403) of a request of ``items`` notifications, ``refused`` of which name a
    call of another tenant; every store keeps the request's other notifications."""
    return MalformedNotification(
        "tenant_mismatch",
        f"{refused} notification(s) name a call of another tenant",
        kept=items - refused,
    )


def _as_update(
    event: events.Event,
    state: str,
    before: CallResource | None,
    failed: bool,
    target: InvitationParticipantInfo | None,
) -> events.CallUpdated:
    call = _call_of(event)
    assert call is not None  # every state-carrying event carries the call
    # Built from values validated already, without validating them again: validation would
    # copy ``raw``, and a shared store finds a delivery's attempt by the very item.
    return events.CallUpdated.model_construct(
        call_id=event.call_id,
        change_type=event.change_type,
        resource_url=event.resource_url,
        raw=event.raw,
        tenant_id=event.tenant_id,
        state=state,
        call=call,
        changed=_changed(before, call),
        result_info=call.result_info,
        transfer_failed=failed,
        transfer_target=target,
    )


def _changed(before: CallResource | None, call: CallResource) -> frozenset[str]:
    """The properties ``call`` carries whose value differs from the call as known before."""
    names = set(call.model_fields_set) - {"state", "odata_type"}
    if before is not None and before.my_participant_id is not None:
        names.discard("my_participant_id")  # kept as first named (see _merge)
    changed = {name for name in names if getattr(before, name, None) != getattr(call, name)}
    old_extra = (before.model_extra if before is not None else None) or {}
    changed.update(k for k, v in (call.model_extra or {}).items() if old_extra.get(k) != v)
    return frozenset(changed)


def _merge(old: CallResource | None, new: CallResource) -> CallResource:
    """The call as last known: fields a notification carries replace the old ones, but for
    the bot's own participant id, which stays as first named (Graph's answer to the request
    placing the call, or the incoming call): a later notification naming none or another
    does not take it away."""
    if old is None:
        return new
    carried = new.__dict__
    # The declared fields it carries (its unknown properties are set too: they are extra).
    named = new.__pydantic_fields_set__ & carried.keys()
    if old.my_participant_id is not None:
        named.discard("my_participant_id")
    values = old.__dict__.copy()
    for name in named:
        values[name] = carried[name]
    kept = old.__pydantic_extra__
    extra = new.__pydantic_extra__
    if extra:
        named |= extra.keys()
        if kept and len(kept) + len(extra) > _MAX_EXTRA_PROPERTIES:
            # Invented properties each time would grow the call's record for ever: past the
            # bound, only the latest notification's unknown properties are kept.
            kept = None
        extra = {**kept, **extra} if kept else extra.copy()
    else:
        extra = None if kept is None else kept.copy()
    return _built(old, values, extra, old.__pydantic_fields_set__ | named)
