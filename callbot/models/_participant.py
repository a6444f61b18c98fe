"""A call's participants (the roster) and their media streams."""

from __future__ import annotations

from ._base import GraphModel
from ._common import (
    Identity,
    IdentitySet,
    MediaDirection,
    Modality,
    ParticipantInfo,
    RecordingStatus,
)

__all__ = [
    "MediaStream",
    "OnlineMeetingRestricted",
    "Participant",
    "RecordingInfo",
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
    recording_status: RecordingStatus | None = None


class RemovedState(GraphModel):
    """Why a participant was removed from a call."""

    reason: str | None = None


class OnlineMeetingRestricted(GraphModel):
    """Why video or content sharing is disabled for a participant."""

    content_sharing_disabled: str | None = None
    video_disabled: str | None = None


class Participant(GraphModel):
    """A participant in a call, as sent in roster notifications.

    ``id`` can be ``null`` in roster updates for a participant still being added.
    ``meeting_role`` (``attendee``, ``presenter``, ``organizer``, ...) is not in the
    v1.0 schema but is documented in rosters.
    """

    id: str | None = None
    info: ParticipantInfo | None = None
    media_streams: list[MediaStream] | None = None
    is_muted: bool | None = None
    is_in_lobby: bool | None = None
    metadata: str | None = None
    recording_info: RecordingInfo | None = None
    removed_state: RemovedState | None = None
    restricted_experience: OnlineMeetingRestricted | None = None
    roster_sequence_number: int | None = None
    meeting_role: str | None = None

    @property
    def display_name(self) -> str | None:
        """The first display name among the participant's identities (user, phone, ...)."""
        identities = self.info.identity if self.info is not None else None
        if identities is None:
            return None
        for name in type(identities).model_fields:
            identity = getattr(identities, name)
            if isinstance(identity, Identity) and identity.display_name:
                return identity.display_name
        return None
