"""A call's participants (the roster), their media streams, and policy-recording join/leave."""

from __future__ import annotations

from typing import Any

from pydantic import model_validator

from ._base import GraphModel, odata_type_field
from ._call import Call
from ._common import (
    ContentSharingDisabledReason,
    IdentitySet,
    MediaDirection,
    MeetingRole,
    Modality,
    ParticipantInfo,
    RecordingStatus,
    RejectReason,
    VideoDisabledReason,
)

__all__ = [
    "AcceptJoinResponse",
    "InviteNewBotResponse",
    "MediaStream",
    "OnlineMeetingRestricted",
    "Participant",
    "ParticipantJoiningNotification",
    "ParticipantJoiningResponse",
    "ParticipantLeftNotification",
    "RecordingInfo",
    "RejectJoinResponse",
    "RemovedState",
]


class MediaStream(GraphModel):
    """One media stream of a participant (audio, video, screen sharing, data)."""

    media_type: Modality | None = None
    direction: MediaDirection | None = None
    label: str | None = None
    source_id: str | None = None
    server_muted: bool | None = None


class RecordingInfo(GraphModel):
    """Whether a participant records the call, and who started it."""

    initiator: IdentitySet | None = None
    initiated_by: ParticipantInfo | None = None
    recording_status: RecordingStatus | None = None


class RemovedState(GraphModel):
    """Why a participant was removed from a call."""

    reason: str | None = None


class OnlineMeetingRestricted(GraphModel):
    """Why video or content sharing is disabled for a participant."""

    content_sharing_disabled: ContentSharingDisabledReason | None = None
    video_disabled: VideoDisabledReason | None = None


class Participant(GraphModel):
    """A participant in a call, as sent in roster notifications.

    ``id`` can be ``null`` in roster updates for a participant still being added. A
    participant Graph names only by its ``@odata.id`` (``/app/calls/{call}/participants/{id}``,
    its 2018 rosters) has the id ending that path.
    ``meeting_role``, ``replacement_link`` and ``published_states`` are sent by
    Teams though in no schema (``published_states`` has only been seen empty, so
    its entries are kept as sent); ``is_identity_anonymized`` and
    ``preferred_display_name`` are beta.
    """

    id: str | None = None
    info: ParticipantInfo | None = None
    media_streams: list[MediaStream] | None = None
    is_muted: bool | None = None
    is_in_lobby: bool | None = None
    is_identity_anonymized: bool | None = None
    metadata: str | None = None
    preferred_display_name: str | None = None
    recording_info: RecordingInfo | None = None
    removed_state: RemovedState | None = None
    restricted_experience: OnlineMeetingRestricted | None = None
    roster_sequence_number: int | None = None
    meeting_role: MeetingRole | None = None
    replacement_link: str | None = None
    published_states: list[Any] | None = None

    @model_validator(mode="after")
    def _id_from_path(self) -> Participant:
        # Graph's 2018 rosters name participants by their path only: the id is that path's.
        if not self.id and self.odata_id:
            named = _id_in_path(self.odata_id)
            if named:
                self.id = named
        return self

    @property
    def display_name(self) -> str | None:
        """The name to show: ``preferred_display_name``, else the identity's display name."""
        if self.preferred_display_name:
            return self.preferred_display_name
        identity = self.info.identity if self.info is not None else None
        return identity.display_name if identity is not None else None


def _id_in_path(odata_id: str) -> str | None:
    """The id ending ``/app/calls/{call}/participants/{id}`` (or ``/communications/...``),
    or ``None`` when ``odata_id`` names no participant."""
    head, _, last = odata_id.rstrip("/").rpartition("/")
    return last if head.rpartition("/")[2].lower() == "participants" else None


class ParticipantJoiningNotification(GraphModel):
    """Sent to a policy-recording bot before a participant under the policy joins a call.

    The bot answers with a :class:`ParticipantJoiningResponse` (accept, reject or
    invite another bot).
    """

    odata_type: str | None = odata_type_field("#microsoft.graph.participantJoiningNotification")
    id: str | None = None
    call: Call | None = None


class ParticipantLeftNotification(GraphModel):
    """Sent to a policy-recording bot when a participant under the policy left the meeting."""

    odata_type: str | None = odata_type_field("#microsoft.graph.participantLeftNotification")
    id: str | None = None
    participant_id: str | None = None
    call: Call | None = None


class ParticipantJoiningResponse(GraphModel):
    """Base of a bot's answer to a :class:`ParticipantJoiningNotification` (abstract in Graph)."""


class AcceptJoinResponse(ParticipantJoiningResponse):
    """Let the participant join, recorded by this bot."""

    odata_type: str | None = odata_type_field("#microsoft.graph.acceptJoinResponse")


class RejectJoinResponse(ParticipantJoiningResponse):
    """Refuse the participant's join, with a reason."""

    odata_type: str | None = odata_type_field("#microsoft.graph.rejectJoinResponse")
    reason: RejectReason | None = None


class InviteNewBotResponse(ParticipantJoiningResponse):
    """Hand the participant to another bot instance at ``invite_uri``."""

    odata_type: str | None = odata_type_field("#microsoft.graph.inviteNewBotResponse")
    invite_uri: str | None = None
