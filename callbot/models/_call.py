"""The ``call`` resource and the polymorphic types it carries (meeting, media, options)."""

from __future__ import annotations

from typing import Annotated, Any, TypeAlias

from pydantic import Discriminator, Tag

from ._base import GraphModel, odata_discriminator, odata_type_field
from ._common import (
    AutoAdmittedUsers,
    CallDirection,
    CallMediaState,
    CallRoute,
    CallState,
    CallTranscriptionInfo,
    ChatInfo,
    Identity,
    IdentitySet,
    IncomingContext,
    InvitationParticipantInfo,
    MediaInfo,
    Modality,
    ParticipantInfo,
    ResultInfo,
    RoutingMode,
    RoutingPolicy,
    ToneInfo,
    TranscriptionInfo,
)

__all__ = [
    "AnyCallOptions",
    "AnyMediaConfig",
    "AnyMeetingInfo",
    "AppHostedMediaConfig",
    "AudioRoutingGroup",
    "Call",
    "CallOptions",
    "ContentSharingSession",
    "IncomingCallOptions",
    "JoinMeetingIdMeetingInfo",
    "LiveCaptionOptions",
    "MediaConfig",
    "MeetingCapability",
    "MeetingInfo",
    "MeetingProperties",
    "OrganizerMeetingInfo",
    "OutgoingCallOptions",
    "ServiceHostedMediaConfig",
    "TokenMeetingInfo",
]


class MeetingInfo(GraphModel):
    """Base of the ways to name a meeting to join; also holds meeting info of unknown type.

    ``transcription_info`` is an older form Graph sent inside the meeting info (spelled
    ``TranscriptionInfo``); newer calls carry :attr:`Call.transcription`.
    """

    allow_conversation_without_host: bool | None = None
    transcription_info: TranscriptionInfo | None = None


class OrganizerMeetingInfo(MeetingInfo):
    """A meeting named by its organizer (with ``chatInfo`` on the call)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.organizerMeetingInfo")
    organizer: IdentitySet | None = None


class JoinMeetingIdMeetingInfo(MeetingInfo):
    """A meeting named by its join meeting id and passcode."""

    odata_type: str | None = odata_type_field("#microsoft.graph.joinMeetingIdMeetingInfo")
    join_meeting_id: str | None = None
    passcode: str | None = None


class TokenMeetingInfo(MeetingInfo):
    """A meeting named by a token: a policy-based recording call's, and the one Teams
    makes of a group call (recorded at a group call's end, and once a P2P call grew)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.tokenMeetingInfo")
    token: str | None = None


AnyMeetingInfo: TypeAlias = Annotated[
    Annotated[OrganizerMeetingInfo, Tag("organizermeetinginfo")]
    | Annotated[JoinMeetingIdMeetingInfo, Tag("joinmeetingidmeetinginfo")]
    | Annotated[TokenMeetingInfo, Tag("tokenmeetinginfo")]
    | Annotated[MeetingInfo, Tag("meetinginfo")],
    Discriminator(
        odata_discriminator(
            {
                "organizermeetinginfo": OrganizerMeetingInfo,
                "joinmeetingidmeetinginfo": JoinMeetingIdMeetingInfo,
                "tokenmeetinginfo": TokenMeetingInfo,
                "meetinginfo": MeetingInfo,
            },
            fallback="meetinginfo",
            hints={
                "organizer": "organizermeetinginfo",
                "joinMeetingId": "joinmeetingidmeetinginfo",
                "token": "tokenmeetinginfo",
            },
        )
    ),
]
"""A :class:`MeetingInfo` chosen by ``@odata.type``; unknown types stay :class:`MeetingInfo`."""


class MediaConfig(GraphModel):
    """Base of the media configurations; also holds a configuration of unknown type."""

    remove_from_default_audio_group: bool | None = None


class LiveCaptionOptions(GraphModel):
    """Where Graph streams live captions of a service-hosted call (beta)."""

    stream_url: str | None = None


class ServiceHostedMediaConfig(MediaConfig):
    """Graph hosts the media; ``pre_fetch_media`` lists prompts to cache in advance."""

    odata_type: str | None = odata_type_field("#microsoft.graph.serviceHostedMediaConfig")
    pre_fetch_media: list[MediaInfo] | None = None
    live_caption_options: LiveCaptionOptions | None = None


class AppHostedMediaConfig(MediaConfig):
    """The bot hosts the media itself; ``blob`` is the media platform's session config."""

    odata_type: str | None = odata_type_field("#microsoft.graph.appHostedMediaConfig")
    blob: str | None = None


AnyMediaConfig: TypeAlias = Annotated[
    Annotated[ServiceHostedMediaConfig, Tag("servicehostedmediaconfig")]
    | Annotated[AppHostedMediaConfig, Tag("apphostedmediaconfig")]
    | Annotated[MediaConfig, Tag("mediaconfig")],
    Discriminator(
        odata_discriminator(
            {
                "servicehostedmediaconfig": ServiceHostedMediaConfig,
                "apphostedmediaconfig": AppHostedMediaConfig,
                "mediaconfig": MediaConfig,
            },
            fallback="mediaconfig",
            hints={"blob": "apphostedmediaconfig", "preFetchMedia": "servicehostedmediaconfig"},
        )
    ),
]
"""A :class:`MediaConfig` chosen by ``@odata.type``; unknown types stay :class:`MediaConfig`."""


class CallOptions(GraphModel):
    """Options of a call (abstract in Graph); also holds options of unknown type."""

    hide_bot_after_escalation: bool | None = None
    is_content_sharing_notification_enabled: bool | None = None
    is_delta_roster_enabled: bool | None = None
    is_interactive_roster_enabled: bool | None = None


class OutgoingCallOptions(CallOptions):
    """Options of a call the bot places."""

    odata_type: str | None = odata_type_field("#microsoft.graph.outgoingCallOptions")


class IncomingCallOptions(CallOptions):
    """Options of a call the bot answers."""

    odata_type: str | None = odata_type_field("#microsoft.graph.incomingCallOptions")


AnyCallOptions: TypeAlias = Annotated[
    Annotated[OutgoingCallOptions, Tag("outgoingcalloptions")]
    | Annotated[IncomingCallOptions, Tag("incomingcalloptions")]
    | Annotated[CallOptions, Tag("calloptions")],
    Discriminator(
        odata_discriminator(
            {
                "outgoingcalloptions": OutgoingCallOptions,
                "incomingcalloptions": IncomingCallOptions,
                "calloptions": CallOptions,
            },
            fallback="calloptions",
        )
    ),
]
"""A :class:`CallOptions` chosen by ``@odata.type``; unknown types stay :class:`CallOptions`."""


class AudioRoutingGroup(GraphModel):
    """Which participants hear which: ``routing_mode`` ``oneToOne`` or ``multicast``."""

    id: str | None = None
    routing_mode: RoutingMode | None = None
    sources: list[str] | None = None
    receivers: list[str] | None = None


class ContentSharingSession(GraphModel):
    """A screen-sharing session in a call, and who presents it (beta)."""

    id: str | None = None
    presenter_participant_id: str | None = None


class MeetingCapability(GraphModel):
    """What a meeting allows anonymous users to do, and who bypasses the lobby (beta)."""

    allow_anonymous_users_to_dial_out: bool | None = None
    allow_anonymous_users_to_start_meeting: bool | None = None
    auto_admitted_users: AutoAdmittedUsers | None = None


class MeetingProperties(GraphModel):
    """Properties of the meeting a call belongs to, as Teams sends them (not in the schema)."""

    meeting_label: str | None = None


class Call(GraphModel):
    """The ``call`` resource, as sent in notifications and returned by ``POST /calls``.

    Every property is optional because notifications carry only what changed
    (often just ``state``). ``termination_reason``, ``ringing_timeout_in_seconds``,
    ``answered_by``, ``active_modalities``, ``meeting_capability`` and
    ``routing_policies`` are in the beta schema; ``replaces_context``,
    ``co_organizers``, ``meeting_properties``, and for policy recording
    ``application_metadata`` (the free-form ``botData``), ``meeting_url`` (sent as
    ``MeetingUrl``) and ``media_hosted_region`` are sent by Teams though in no schema.
    """

    id: str | None = None
    state: CallState | None = None
    direction: CallDirection | None = None
    subject: str | None = None
    callback_uri: str | None = None
    source: ParticipantInfo | None = None
    targets: list[InvitationParticipantInfo] | None = None
    requested_modalities: list[Modality] | None = None
    active_modalities: list[Modality] | None = None
    media_config: AnyMediaConfig | None = None
    media_state: CallMediaState | None = None
    chat_info: ChatInfo | None = None
    meeting_info: AnyMeetingInfo | None = None
    my_participant_id: str | None = None
    result_info: ResultInfo | None = None
    tone_info: ToneInfo | None = None
    tenant_id: str | None = None
    call_chain_id: str | None = None
    call_routes: list[CallRoute] | None = None
    incoming_context: IncomingContext | None = None
    call_options: AnyCallOptions | None = None
    transcription: CallTranscriptionInfo | None = None
    answered_by: ParticipantInfo | None = None
    termination_reason: str | None = None
    replaces_context: str | None = None
    ringing_timeout_in_seconds: int | None = None
    meeting_capability: MeetingCapability | None = None
    meeting_properties: MeetingProperties | None = None
    co_organizers: list[Identity] | None = None
    routing_policies: list[RoutingPolicy] | None = None
    application_metadata: dict[str, Any] | None = None
    meeting_url: str | None = None
    media_hosted_region: str | None = None
