"""Small complex types shared by calls, participants and operations, and the enum aliases.

Every property whose Graph type is an enum is a ``str`` read through
:class:`GraphEnum`: a known member arrives in Graph's spelling whatever case was
sent, and a member Graph adds later is kept as sent. The members listed are those
of Graph's schema, beta and v1.0 together; those only beta has are marked ``beta``
where a request may send them (:func:`graph_value` refuses them on v1.0).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, TypeAlias

from pydantic import Discriminator, Field, Tag, model_validator

from ._base import GraphEnum, GraphModel, odata_discriminator, odata_type_field, wire_names

__all__ = [
    "CALL_LIFECYCLE",
    "CALL_STATES",
    "AnyPrompt",
    "AutoAdmittedUsers",
    "CallDirection",
    "CallMediaState",
    "CallRoute",
    "CallState",
    "CallTranscriptionInfo",
    "CallTranscriptionState",
    "ChangeType",
    "ChatInfo",
    "ContentSharingDisabledReason",
    "EndpointType",
    "Identity",
    "IdentitySet",
    "IncomingContext",
    "InvitationParticipantInfo",
    "MediaDirection",
    "MediaInfo",
    "MediaPrompt",
    "MediaState",
    "MeetingRole",
    "Modality",
    "OperationStatus",
    "ParticipantInfo",
    "PlayPromptCompletionReason",
    "Prompt",
    "RecordCompletionReason",
    "RecordingStatus",
    "RejectReason",
    "ResultInfo",
    "RoutingMode",
    "RoutingPolicy",
    "RoutingType",
    "ScreenSharingRole",
    "SendDtmfCompletionReason",
    "Tone",
    "ToneInfo",
    "TranscriptionInfo",
    "VideoDisabledReason",
    "canonical_call_state",
]

CALL_LIFECYCLE: Final[tuple[tuple[str, ...], ...]] = (
    # an incoming call the bot redirects never goes further for the bot: not a live call
    ("incoming", "redirecting"),
    ("establishing",),
    ("ringing",),
    # the states a live call moves between, in any order
    (
        "established",
        "hold",
        "transferring",
        "transferAccepted",
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

_CALL_STATE: Final = GraphEnum(*CALL_STATES)


def canonical_call_state(value: str) -> str:
    """A known state in Graph's spelling whatever its case (``Established`` -> ``established``).

    An unknown state (one Graph adds later) is returned as sent.
    """
    return _CALL_STATE.canonical(value)


def known_call_state(value: str) -> str:
    """``value`` in Graph's spelling, when it is one of :data:`CALL_STATES` (in any case);
    any other raises ``ValueError``: a state asked for by name is misspelt, not new."""
    state = canonical_call_state(value)
    if state not in CALL_STATES:
        raise ValueError(f"unknown call state {value!r}; known: {list(CALL_STATES)}")
    return state


CallState: TypeAlias = Annotated[str, _CALL_STATE]
"""One of :data:`CALL_STATES` in Graph's spelling, or a state Graph added later (as sent)."""

CallDirection: TypeAlias = Annotated[str, GraphEnum("incoming", "outgoing")]
"""Graph's ``callDirection``."""

ChangeType: TypeAlias = Annotated[str, GraphEnum("created", "updated", "deleted")]
"""Graph's ``changeType``: what a notification says happened to its resource."""

Modality: TypeAlias = Annotated[
    str,
    GraphEnum(
        "audio", "video", "videoBasedScreenSharing", "data", "unknownFutureValue", beta=("unknown",)
    ),
]
"""Graph's ``modality``."""

MediaDirection: TypeAlias = Annotated[
    str, GraphEnum("inactive", "sendOnly", "receiveOnly", "sendReceive")
]
"""Graph's ``mediaDirection``."""

MediaState: TypeAlias = Annotated[str, GraphEnum("active", "inactive", "unknownFutureValue")]
"""Graph's ``mediaState``."""

EndpointType: TypeAlias = Annotated[
    str,
    GraphEnum(
        "default",
        "voicemail",
        "skypeForBusiness",
        "skypeForBusinessVoipPhone",
        "unknownFutureValue",
    ),
]
"""Graph's ``endpointType``."""

# The schema spells these NotStarted/Running/...; notifications and responses use
# camelCase, so that is the spelling callbot gives them.
_OPERATION_STATUS: Final = GraphEnum("notStarted", "running", "completed", "failed")

OperationStatus: TypeAlias = Annotated[str, _OPERATION_STATUS]
"""Graph's ``operationStatus``."""


def canonical_operation_status(value: str) -> str:
    """A known operation status in its documented spelling whatever its case
    (``Running`` -> ``running``); an unknown one as sent."""
    return _OPERATION_STATUS.canonical(value)


Tone: TypeAlias = Annotated[
    str,
    GraphEnum(
        *(f"tone{digit}" for digit in range(10)),
        "star",
        "pound",
        "a",
        "b",
        "c",
        "d",
        "flash",
    ),
]
"""Graph's ``tone``: a DTMF key (``tone0`` ... ``tone9``, ``star``, ``pound``, ...)."""

RoutingType: TypeAlias = Annotated[
    str, GraphEnum("forwarded", "lookup", "selfFork", "unknownFutureValue")
]
"""Graph's ``routingType``: how an incoming call reached the bot."""

RoutingMode: TypeAlias = Annotated[str, GraphEnum("oneToOne", "multicast", "unknownFutureValue")]
"""Graph's ``routingMode`` of an audio routing group."""

RoutingPolicy: TypeAlias = Annotated[
    str,
    GraphEnum(
        "none",
        "noMissedCall",
        "disableForwardingExceptPhone",
        "disableForwarding",
        "preferSkypeForBusiness",
        "unknownFutureValue",
    ),
]
"""Graph's ``routingPolicy`` (beta)."""

RecordingStatus: TypeAlias = Annotated[
    str, GraphEnum("unknown", "notRecording", "recording", "failed", "unknownFutureValue")
]
"""Graph's ``recordingStatus``."""

RejectReason: TypeAlias = Annotated[
    str, GraphEnum("none", "busy", "forbidden", "unknownFutureValue")
]
"""Graph's ``rejectReason``."""

ScreenSharingRole: TypeAlias = Annotated[str, GraphEnum("viewer", "sharer")]
"""Graph's ``screenSharingRole``."""

SendDtmfCompletionReason: TypeAlias = Annotated[
    str,
    GraphEnum("unknown", "completedSuccessfully", "mediaOperationCanceled", "unknownFutureValue"),
]
"""Graph's ``sendDtmfCompletionReason``."""

PlayPromptCompletionReason: TypeAlias = Annotated[
    str,
    GraphEnum("unknown", "completedSuccessfully", "mediaOperationCanceled", "unknownFutureValue"),
]
"""Graph's ``playPromptCompletionReason`` (beta)."""

RecordCompletionReason: TypeAlias = Annotated[
    str,
    GraphEnum(
        "operationCanceled",
        "stopToneDetected",
        "maxRecordDurationReached",
        "initialSilenceTimeout",
        "maxSilenceTimeout",
        "playPromptFailed",
        "playBeepFailed",
        "mediaReceiveTimeout",
        "unspecifiedError",
    ),
]
"""Graph's ``recordCompletionReason`` (beta): why a ``recordResponse`` ended."""

CallTranscriptionState: TypeAlias = Annotated[
    str, GraphEnum("notStarted", "active", "inactive", "unknownFutureValue")
]
"""Graph's ``callTranscriptionState``."""

MeetingRole: TypeAlias = Annotated[
    str,
    GraphEnum(
        "attendee",
        "presenter",
        "producer",
        "coorganizer",
        "unknownFutureValue",
        # Sent by Teams though in no schema: "none" for a bot or a 1:1 caller, "organizer".
        "none",
        "organizer",
    ),
]
"""Graph's ``onlineMeetingRole``, with ``none`` and ``organizer``, which Teams sends."""

AutoAdmittedUsers: TypeAlias = Annotated[str, GraphEnum("everyoneInCompany", "everyone")]
"""Graph's ``autoAdmittedUsersType`` (beta): who joins a meeting without the lobby."""

ContentSharingDisabledReason: TypeAlias = Annotated[
    str, GraphEnum("watermarkProtection", "unknownFutureValue")
]
"""Graph's ``onlineMeetingContentSharingDisabledReason``."""

VideoDisabledReason: TypeAlias = Annotated[
    str, GraphEnum("watermarkProtection", "unknownFutureValue")
]
"""Graph's ``onlineMeetingVideoDisabledReason``."""


class Identity(GraphModel):
    """One identity (user, application, phone number, ...) inside an :class:`IdentitySet`."""

    id: str | None = None
    display_name: str | None = None
    tenant_id: str | None = None
    identity_provider: str | None = None
    application_type: str | None = None
    hidden: bool | None = None
    email: str | None = None
    azure_communication_services_resource_id: str | None = None


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

    def identities(self) -> list[Identity]:
        """The identities that are set, the most telling first (user, bot, phone, guest, ...)."""
        ordered = (
            self.user,
            self.application_instance,
            self.application,
            self.phone,
            self.guest,
            self.azure_communication_services_user,
            self.acs_user,
            self.on_premises,
            self.device,
            self.encrypted,
            self.asserted_identity,
        )
        return [identity for identity in ordered if identity is not None]

    @property
    def primary(self) -> Identity | None:
        """The identity that is set (the first of :meth:`identities`), or ``None``."""
        identities = self.identities()
        return identities[0] if identities else None

    @property
    def display_name(self) -> str | None:
        """The first display name among :meth:`identities`, or ``None``."""
        return next((i.display_name for i in self.identities() if i.display_name), None)


class ParticipantInfo(GraphModel):
    """A call's source or a participant's description (``participantInfo``).

    ``endpoint_id``, ``client_version`` and ``replacement_link`` are not in Graph's
    schema but Teams sends them in rosters; ``id`` appears in policy-recording calls.
    """

    id: str | None = None
    identity: IdentitySet | None = None
    non_anonymized_identity: IdentitySet | None = None
    endpoint_type: EndpointType | None = None
    endpoint_id: str | None = None
    client_version: str | None = None
    platform_id: str | None = None
    region: str | None = None
    language_id: str | None = None
    country_code: str | None = None
    participant_id: str | None = None
    replacement_link: str | None = None


class InvitationParticipantInfo(GraphModel):
    """A call target, or someone invited into / transferred to a call."""

    id: str | None = None
    identity: IdentitySet | None = None
    endpoint_type: EndpointType | None = None
    hidden: bool | None = None
    participant_id: str | None = None
    replaces_call_id: str | None = None
    remove_from_default_audio_routing_group: bool | None = None
    region: str | None = None
    language_id: str | None = None


_SUBCODE_NAMES = ("subcode", "subCode")


class ResultInfo(GraphModel):
    """The outcome Graph attaches to a call or an operation (``code``/``subcode``/``message``).

    ``code`` and ``subcode`` are numbers (read from numbers or numeric strings);
    ``subcode`` is read from ``subcode`` or ``subCode`` (Graph writes both) and
    written as ``subcode``. Older notifications sent a name instead of a number
    (``"subCode": "transferring"``): such a value is kept in ``code_text`` /
    ``subcode_text`` and the number is then ``None``.
    """

    code: int | None = None
    subcode: int | None = Field(
        default=None,
        validation_alias=wire_names(*_SUBCODE_NAMES),
        serialization_alias="subcode",
    )
    message: str | None = None
    code_text: str | None = None
    subcode_text: str | None = None

    def __str__(self) -> str:
        """``200/5001 The conversation has ended.``: what a bot prints or logs of it."""
        # pydantic's own str lists every field, the Nones of the OData envelope included.
        code = self.code if self.code is not None else self.code_text
        subcode = self.subcode if self.subcode is not None else self.subcode_text
        codes = "/".join(str(part) for part in (code, subcode) if part is not None)
        return f"{codes} {self.message or ''}".strip()

    @model_validator(mode="before")
    @classmethod
    def _keep_names_as_text(cls, data: Any) -> Any:
        # a name where a number belongs ("transferring") must not fail the whole resource
        if not isinstance(data, dict):
            return data
        moved = dict(data)
        for key, text_key in _TEXT_KEYS:
            value = moved.get(key)
            if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
                moved[text_key] = moved.pop(key)
        return moved


# Where a code or subcode may be written, and where it goes when it is a name, not a number.
_TEXT_KEYS: Final = tuple(
    (key, text_key)
    for names, text_key in ((("code",), "codeText"), (_SUBCODE_NAMES, "subcodeText"))
    for key in wire_names(*names).choices
    if isinstance(key, str)
)


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
    """A prompt that plays one media file (``loop`` times, beta)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.mediaPrompt")
    media_info: MediaInfo | None = None
    loop: int | None = None


AnyPrompt: TypeAlias = Annotated[
    Annotated[MediaPrompt, Tag("mediaprompt")] | Annotated[Prompt, Tag("prompt")],
    Discriminator(
        odata_discriminator(
            {"mediaprompt": MediaPrompt, "prompt": Prompt},
            fallback="prompt",
            hints={"mediaInfo": "mediaprompt"},
        )
    ),
]
"""A :class:`Prompt` chosen by ``@odata.type``; unknown types stay :class:`Prompt`."""


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
    """Whether a call is being transcribed (the call's ``transcription``)."""

    state: CallTranscriptionState | None = None
    last_modified_date_time: datetime | None = None


class TranscriptionInfo(GraphModel):
    """An older form of :class:`CallTranscriptionInfo`, once sent inside the meeting info."""

    state: CallTranscriptionState | None = None
    state_updated_time: datetime | None = None
