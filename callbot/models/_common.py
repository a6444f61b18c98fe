"""Small complex types shared by calls, participants and operations, and the enum-like aliases.

Graph enums grow (``unknownFutureValue`` and later members), so every enum-like
field is a plain ``str``: an alias below names the known values, none is enforced.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Final, TypeAlias

from pydantic import AfterValidator, AliasChoices, Field

from ._base import GraphModel, odata_type_field

__all__ = [
    "CALL_LIFECYCLE",
    "CALL_STATES",
    "CallDirection",
    "CallMediaState",
    "CallRoute",
    "CallState",
    "CallTranscriptionInfo",
    "CallTranscriptionState",
    "ChangeType",
    "ChatInfo",
    "EndpointType",
    "Identity",
    "IdentitySet",
    "IncomingContext",
    "InvitationParticipantInfo",
    "MediaDirection",
    "MediaInfo",
    "MediaPrompt",
    "MediaState",
    "Modality",
    "OperationStatus",
    "ParticipantInfo",
    "Prompt",
    "RecordingStatus",
    "RejectReason",
    "ResultInfo",
    "RoutingType",
    "ScreenSharingRole",
    "SendDtmfCompletionReason",
    "Tone",
    "ToneInfo",
    "canonical_call_state",
]

CALL_LIFECYCLE: Final[tuple[tuple[str, ...], ...]] = (
    ("incoming",),
    ("establishing",),
    ("ringing",),
    # the states a live call moves between, in any order
    (
        "established",
        "hold",
        "transferring",
        "transferAccepted",
        "redirecting",
        "unknownFutureValue",
    ),
    ("terminating",),
    ("terminated",),
)
"""Every state of Graph's ``callState`` enum (beta and v1.0), grouped by lifecycle phase.

A call only moves forward through the groups; within a group it moves freely.
This is the one list of call states in callbot: the sequencer's order, the
states ``on_state`` accepts and the parser's spelling all come from it.
"""

CALL_STATES: Final[tuple[str, ...]] = tuple(state for phase in CALL_LIFECYCLE for state in phase)
"""The known call states, in lifecycle order."""

_CALL_STATE_SPELLING: Final[Mapping[str, str]] = {state.lower(): state for state in CALL_STATES}


def canonical_call_state(value: str) -> str:
    """A known state in Graph's spelling whatever its case (``Established`` -> ``established``).

    An unknown state (one Graph adds later) is returned as sent.
    """
    return _CALL_STATE_SPELLING.get(value.lower(), value)


def _canonical_state(value: Any) -> Any:
    return canonical_call_state(value) if isinstance(value, str) else value


CallState: TypeAlias = Annotated[str, AfterValidator(_canonical_state)]
"""One of :data:`CALL_STATES` in Graph's spelling, or a state Graph added later (as sent)."""

CallDirection: TypeAlias = str
"""``incoming``, ``outgoing``."""

ChangeType: TypeAlias = str
"""``created``, ``updated``, ``deleted``."""

Modality: TypeAlias = str
"""``audio``, ``video``, ``videoBasedScreenSharing``, ``data``, ``unknownFutureValue``."""

MediaDirection: TypeAlias = str
"""``inactive``, ``sendOnly``, ``receiveOnly``, ``sendReceive``."""

MediaState: TypeAlias = str
"""``active``, ``inactive``, ``unknownFutureValue``."""

EndpointType: TypeAlias = str
"""``default``, ``voicemail``, ``skypeForBusiness``, ``skypeForBusinessVoipPhone``,
``unknownFutureValue``."""

OperationStatus: TypeAlias = str
"""``notStarted``, ``running``, ``completed``, ``failed`` (Graph has also sent
``Running``: compare without case)."""

Tone: TypeAlias = str
"""``tone0`` ... ``tone9``, ``star``, ``pound``, ``a``, ``b``, ``c``, ``d``, ``flash``."""

RoutingType: TypeAlias = str
"""``forwarded``, ``lookup``, ``selfFork``, ``unknownFutureValue``."""

RecordingStatus: TypeAlias = str
"""``unknown``, ``notRecording``, ``recording``, ``failed``, ``unknownFutureValue``."""

RejectReason: TypeAlias = str
"""``none``, ``busy``, ``forbidden``, ``unknownFutureValue``."""

ScreenSharingRole: TypeAlias = str
"""``viewer``, ``sharer``."""

SendDtmfCompletionReason: TypeAlias = str
"""``unknown``, ``completedSuccessfully``, ``mediaOperationCanceled``,
``unknownFutureValue``."""

CallTranscriptionState: TypeAlias = str
"""``notStarted``, ``active``, ``inactive``, ``unknownFutureValue``."""


class Identity(GraphModel):
    """One identity (user, application, phone number, ...) inside an :class:`IdentitySet`."""

    id: str | None = None
    display_name: str | None = None
    tenant_id: str | None = None
    identity_provider: str | None = None
    application_type: str | None = None
    hidden: bool | None = None


class IdentitySet(GraphModel):
    """Who a participant is: usually exactly one of the identity properties is set."""

    user: Identity | None = None
    application: Identity | None = None
    device: Identity | None = None
    phone: Identity | None = None
    guest: Identity | None = None
    application_instance: Identity | None = None
    encrypted: Identity | None = None
    on_premises: Identity | None = None
    asserted_identity: Identity | None = None
    azure_communication_services_user: Identity | None = None
    acs_user: Identity | None = None
    endpoint_type: EndpointType | None = None


class ParticipantInfo(GraphModel):
    """A call's source or a participant's description (``participantInfo``)."""

    identity: IdentitySet | None = None
    endpoint_type: EndpointType | None = None
    region: str | None = None
    language_id: str | None = None
    country_code: str | None = None
    participant_id: str | None = None


class InvitationParticipantInfo(GraphModel):
    """A call target, or someone invited into / transferred to a call."""

    identity: IdentitySet | None = None
    endpoint_type: EndpointType | None = None
    hidden: bool | None = None
    participant_id: str | None = None
    replaces_call_id: str | None = None
    remove_from_default_audio_routing_group: bool | None = None
    region: str | None = None
    language_id: str | None = None


class ResultInfo(GraphModel):
    """The outcome Graph attaches to a call or an operation (``code``/``subcode``/``message``).

    ``code`` and ``subcode`` are read from numbers or numeric strings; ``subcode``
    is read from ``subcode`` or ``subCode`` (Graph writes both) and written as
    ``subcode``.
    """

    code: int | None = None
    subcode: int | None = Field(
        None,
        validation_alias=AliasChoices("subcode", "subCode"),
        serialization_alias="subcode",
    )
    message: str | None = None


class ToneInfo(GraphModel):
    """One DTMF tone received after ``subscribeToTone``."""

    sequence_id: int | None = None
    tone: Tone | None = None


class ChatInfo(GraphModel):
    """The Teams chat thread of a meeting call."""

    thread_id: str | None = None
    message_id: str | None = None
    reply_chain_message_id: str | None = None


class MediaInfo(GraphModel):
    """A media file Graph fetches: its ``uri`` and a ``resourceId`` used as a cache key."""

    uri: str | None = None
    resource_id: str | None = None


class Prompt(GraphModel):
    """Base of the prompts ``playPrompt``/``recordResponse`` play (abstract in Graph)."""


class MediaPrompt(Prompt):
    """A prompt that plays one media file."""

    odata_type: str | None = odata_type_field("#microsoft.graph.mediaPrompt")
    media_info: MediaInfo | None = None


class CallRoute(GraphModel):
    """How an incoming call was routed (forwarded, looked up, ...) before reaching the bot."""

    routing_type: RoutingType | None = None
    original: IdentitySet | None = None
    final: IdentitySet | None = None


class IncomingContext(GraphModel):
    """Who an incoming call is really from / on behalf of (policy recording, transfers)."""

    source_participant_id: str | None = None
    observed_participant_id: str | None = None
    on_behalf_of: IdentitySet | None = None
    transferor: IdentitySet | None = None


class CallMediaState(GraphModel):
    """The state of a call's media (``audio``: active/inactive)."""

    audio: MediaState | None = None


class CallTranscriptionInfo(GraphModel):
    """Whether a call is being transcribed."""

    state: CallTranscriptionState | None = None
    last_modified_date_time: datetime | None = None
