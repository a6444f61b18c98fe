"""What a bot receives: one typed event per notification Graph posts to the callback.

Every event is a frozen pydantic model derived from :class:`Event`::

    Event
    ├── IncomingCall            a call to the bot is ringing (answer, reject or redirect it)
    ├── CallStateChanged        the call moved to another state (establishing, established, ...)
    │   └── CallTerminated      the call ended (state ``terminated`` or the call was deleted)
    ├── CallUpdated             the call changed but kept its state (media, chat, meeting info, ...)
    ├── ToneReceived            a DTMF tone arrived (after ``subscribeToTone``)
    ├── ParticipantsUpdated     the roster changed
    ├── OperationUpdated        a long-running action (prompt, recording, ...) progressed or ended
    ├── ContentSharingUpdated   screen sharing started, changed or ended
    └── UnknownNotification     anything else about a call, kept verbatim

``raw`` is always the notification item exactly as received, so events can be
deduplicated, recorded and replayed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from . import models
from ._dtmf import digit_of
from ._ids import id_key

__all__ = [
    "CallStateChanged",
    "CallTerminated",
    "CallUpdated",
    "ContentSharingUpdated",
    "Event",
    "IncomingCall",
    "OperationUpdated",
    "ParticipantsUpdated",
    "ToneReceived",
    "UnknownNotification",
]


class Event(BaseModel):
    """Base of every event: which call, what changed, and the notification as received.

    ``call_id`` is the id as written in the resource path (its case and dashes
    vary between notifications and responses: compare :attr:`call_key`).
    ``resource_url`` is normalized to ``/communications/calls/...``, whichever
    dialect (``resourceUrl`` or the older ``resource`` ``/app/calls/...``) Graph used.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    call_id: str
    change_type: str
    resource_url: str
    raw: dict[str, Any]
    tenant_id: str | None = None
    """The tenant the callback's token proves (an item naming another is refused)."""

    @property
    def call_key(self) -> str:
        """The call id in the form ids are compared in (lower case, no dashes)."""
        return id_key(self.call_id)


class IncomingCall(Event):
    """A call to the bot was created and is ringing; ``call`` has its source and targets.

    It is the call's move into its first state, and reads as a :class:`CallStateChanged`
    does (``state`` ``"incoming"``, ``previous_state`` ``None``, ``result_info`` the
    call's, ``transfer_failed`` false, ``transfer_target`` ``None``), so
    ``on_state("incoming")`` handlers run with it too.
    """

    call: models.Call

    @property
    def state(self) -> str:
        """``"incoming"``: the state this event moves the call into."""
        return "incoming"

    @property
    def previous_state(self) -> None:
        """``None``: a call has no state before it comes in."""
        return None

    @property
    def result_info(self) -> models.ResultInfo | None:
        """The call's ``resultInfo``, as on a state change (Graph sends none with a new call)."""
        return self.call.result_info

    @property
    def transfer_failed(self) -> bool:
        """``False``: a call coming in is no transfer's failure."""
        return False

    @property
    def transfer_target(self) -> None:
        """``None``: no transfer failed (see :attr:`transfer_failed`)."""
        return None


class CallStateChanged(Event):
    """The call moved to another state (one of :data:`callbot.models.CALL_STATES`, or
    a state Graph added later).

    This is a *transition*: ``state`` differs from ``previous_state``, which callbot
    fills in from the call's history. A notification that repeats the state the call
    is already in becomes a :class:`CallUpdated` instead. ``result_info`` explains the
    change when Graph gives a reason (for example a failed transfer: ``state`` back
    to ``established`` from ``transferring`` with code 500, and ``transfer_failed``).
    """

    state: str
    previous_state: str | None = None
    call: models.Call
    result_info: models.ResultInfo | None = None
    transfer_failed: bool = False
    """Whether this is the news that a transfer the bot asked for (``call.transfer``)
    failed, set by callbot once per such transfer, whichever way Graph told it
    (``on_transfer_failed`` handlers run with it); ``result_info`` then says why.
    Never set on a :class:`CallTerminated`: a call that ends has ended."""
    transfer_target: models.InvitationParticipantInfo | None = None
    """The target of the transfer that failed, as the bot asked it (the ``transferTarget``
    ``call.transfer`` sent), when ``transfer_failed`` is set; ``None`` otherwise. Transfers
    asked one after another fail first asked first, each naming its own target."""


class CallTerminated(CallStateChanged):
    """The call ended; ``state`` is ``terminated`` and ``result_info`` says why, when known."""


class CallUpdated(Event):
    """The call changed without changing state: Graph repeats ``established`` (or
    another state) to add media state, chat or meeting info, transcription, ...

    ``call`` is the call as Graph sent it in this notification; ``changed`` names
    the properties (snake_case, as on :class:`callbot.models.Call`) whose value
    differs from what callbot knew of the call before this notification.
    ``result_info`` is set when Graph gives a reason (a transfer that failed
    without the call leaving ``established``: ``transfer_failed`` says so).
    """

    state: str
    call: models.Call
    changed: frozenset[str] = frozenset()
    result_info: models.ResultInfo | None = None
    transfer_failed: bool = False
    """Whether this is the news that a transfer the bot asked for (``call.transfer``)
    failed, told by this update alone (no ``transferring`` came first), set by callbot
    once per such transfer (``on_transfer_failed`` handlers run with it)."""
    transfer_target: models.InvitationParticipantInfo | None = None
    """The target of the transfer that failed, as the bot asked it (the ``transferTarget``
    ``call.transfer`` sent), when ``transfer_failed`` is set; ``None`` otherwise."""


class ToneReceived(Event):
    """A DTMF tone was received (``tone1``, ``star``, ``pound``, ...).

    Graph sends it as a call update that also repeats ``state: established``; it
    is a tone, not a state change.
    """

    tone: str
    sequence_id: int | None = None
    call: models.Call

    @property
    def digit(self) -> str:
        """The key pressed: ``"1"`` for ``tone1``, ``"#"`` for ``pound``, ``"*"`` for ``star``."""
        return digit_of(self.tone)


class ParticipantsUpdated(Event):
    """The roster changed; ``participants`` is what Graph sent.

    With delta rosters (``isDeltaRosterEnabled``) Graph sends only the
    participants that changed, ordered by ``sequence_number``; ``delta`` says so.
    ``joined``, ``left`` and ``updated`` are computed by callbot against the
    roster it knew before this event, for full and delta rosters alike.
    """

    participants: list[models.Participant]
    joined: list[models.Participant] = Field(default_factory=list)
    left: list[models.Participant] = Field(default_factory=list)
    updated: list[models.Participant] = Field(default_factory=list)
    sequence_number: int | None = None
    """The notification's ``sequenceNumber`` (the item's, else the ``deltaParticipants``
    one): a roster numbered at or below the last one of its call is dropped as stale, but
    for a delta naming someone no later delta changed, numbered after the latest whole
    roster (``joined``, ``left`` and ``updated`` then name only them). ``None`` when Graph
    sent none; participants' ``roster_sequence_number`` never counts, as it only says when
    that participant last changed."""
    delta: bool = False
    """Whether Graph sent only the participants that changed (a delta roster)."""


class OperationUpdated(Event):
    """A long-running action progressed or ended (``status`` ``completed``/``failed``).

    ``operation`` is typed by its ``@odata.type`` (a :class:`callbot.models.RecordOperation`
    carries ``recording_location``, ...). ``operation_id`` is the body's ``id`` when
    present, else the id in the resource path; the two forms differ in case and
    dashes, so compare :attr:`operation_key` (lower case, no dashes) instead. It is
    ``None`` when Graph names no operation: the outcome of an invitation of several
    participants comes on ``operations/participants`` with ``"id": null``, and only its
    ``client_context`` says which action it ends.
    """

    operation: models.CommsOperation
    operation_id: str | None
    status: str
    result_info: models.ResultInfo | None = None
    client_context: str | None = None

    @property
    def operation_key(self) -> str | None:
        """The operation id in the form ids are compared in (lower case, no dashes)."""
        return id_key(self.operation_id) if self.operation_id is not None else None


class ContentSharingUpdated(Event):
    """Screen sharing started (created), changed (updated) or ended (deleted).

    ``session_id`` comes from the resource path when it names one session, else
    from the only session sent; Graph sometimes sends no session data at all. Each
    session's ``id`` is held to the rule of the path's ids, as a participant's is.
    """

    sessions: list[models.ContentSharingSession] = Field(default_factory=list)
    session_id: str | None = None


class UnknownNotification(Event):
    """A notification about a call that callbot does not model, or whose data does not
    validate even with the properties that do not fit left out (a call update naming no
    state once they are, an operation naming no status).

    ``resource_data`` is the item's ``resourceData`` as received (``None`` when absent).
    """

    resource_data: Any = None
