"""The ``commsOperation`` family: what call actions return and what their completions carry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._base import GraphModel, odata_type_field, type_name
from ._common import (
    InvitationParticipantInfo,
    OperationStatus,
    ResultInfo,
    SendDtmfCompletionReason,
)

__all__ = [
    "AddLargeGalleryViewOperation",
    "CancelMediaProcessingOperation",
    "CommsOperation",
    "InviteParticipantsOperation",
    "MuteParticipantOperation",
    "PlayPromptOperation",
    "RecordOperation",
    "SendDtmfTonesOperation",
    "StartHoldMusicOperation",
    "StopHoldMusicOperation",
    "SubscribeToToneOperation",
    "UnmuteParticipantOperation",
    "UpdateRecordingStatusOperation",
    "parse_operation",
]

_TERMINAL = frozenset({"completed", "failed"})


class CommsOperation(GraphModel):
    """A long-running call action (prompt, recording, ...); also any operation of unknown type.

    ``status`` is ``notStarted``/``running``/``completed``/``failed`` as sent (Graph
    has also written ``Running``); ``id`` may be absent or ``null`` in notifications,
    where the operation id is in the resource path instead.
    """

    id: str | None = None
    client_context: str | None = None
    status: OperationStatus | None = None
    result_info: ResultInfo | None = None

    @property
    def is_terminal(self) -> bool:
        """Whether the operation has ended (``completed`` or ``failed``, any case)."""
        return (self.status or "").lower() in _TERMINAL

    @property
    def is_failed(self) -> bool:
        """Whether the operation ended with status ``failed`` (any case)."""
        return (self.status or "").lower() == "failed"


class AddLargeGalleryViewOperation(CommsOperation):
    """Returned by ``addLargeGalleryView``; ``role_id`` is the gallery participant's role."""

    odata_type: str | None = odata_type_field("#microsoft.graph.addLargeGalleryViewOperation")
    role_id: str | None = None


class CancelMediaProcessingOperation(CommsOperation):
    """Returned by ``cancelMediaProcessing``."""

    odata_type: str | None = odata_type_field("#microsoft.graph.cancelMediaProcessingOperation")


class InviteParticipantsOperation(CommsOperation):
    """Returned by ``participants/invite``; lists who was invited."""

    odata_type: str | None = odata_type_field("#microsoft.graph.inviteParticipantsOperation")
    participants: list[InvitationParticipantInfo] | None = None


class MuteParticipantOperation(CommsOperation):
    """Returned by ``mute`` (often already ``completed``)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.muteParticipantOperation")


class PlayPromptOperation(CommsOperation):
    """Returned by ``playPrompt``; ``completion_reason`` is documented in beta only."""

    odata_type: str | None = odata_type_field("#microsoft.graph.playPromptOperation")
    completion_reason: str | None = None


class RecordOperation(CommsOperation):
    """Returned by ``recordResponse``; its completion carries where to fetch the recording.

    The recording at ``recording_location`` is short-lived and is fetched with
    ``Authorization: Bearer <recording_access_token>``. ``completion_reason``
    (``operationCanceled``, ``stopToneDetected``, ``maxRecordDurationReached``,
    ``initialSilenceTimeout``, ``maxSilenceTimeout``, ...) is sent though not in the
    v1.0 schema.
    """

    odata_type: str | None = odata_type_field("#microsoft.graph.recordOperation")
    recording_location: str | None = None
    recording_access_token: str | None = None
    completion_reason: str | None = None


class SendDtmfTonesOperation(CommsOperation):
    """Returned by ``sendDtmfTones``."""

    odata_type: str | None = odata_type_field("#microsoft.graph.sendDtmfTonesOperation")
    completion_reason: SendDtmfCompletionReason | None = None


class StartHoldMusicOperation(CommsOperation):
    """Returned by a participant's ``startHoldMusic``."""

    odata_type: str | None = odata_type_field("#microsoft.graph.startHoldMusicOperation")


class StopHoldMusicOperation(CommsOperation):
    """Returned by a participant's ``stopHoldMusic``."""

    odata_type: str | None = odata_type_field("#microsoft.graph.stopHoldMusicOperation")


class SubscribeToToneOperation(CommsOperation):
    """Returned by ``subscribeToTone`` (often already ``completed``)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.subscribeToToneOperation")


class UnmuteParticipantOperation(CommsOperation):
    """Returned by ``unmute`` (often already ``completed``)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.unmuteParticipantOperation")


class UpdateRecordingStatusOperation(CommsOperation):
    """Returned by ``updateRecordingStatus``."""

    odata_type: str | None = odata_type_field("#microsoft.graph.updateRecordingStatusOperation")


_OPERATION_TYPES: dict[str, type[CommsOperation]] = {
    cls.__name__.lower(): cls
    for cls in (
        AddLargeGalleryViewOperation,
        CancelMediaProcessingOperation,
        InviteParticipantsOperation,
        MuteParticipantOperation,
        PlayPromptOperation,
        RecordOperation,
        SendDtmfTonesOperation,
        StartHoldMusicOperation,
        StopHoldMusicOperation,
        SubscribeToToneOperation,
        UnmuteParticipantOperation,
        UpdateRecordingStatusOperation,
    )
}


def parse_operation(data: Mapping[str, Any]) -> CommsOperation:
    """Validate an operation body into the class its ``@odata.type`` names.

    Unknown types (beta ``configureMixerOperation``, plain ``commsOperation``, or
    no type at all) become a :class:`CommsOperation` whose undeclared properties
    stay in ``model_extra``. Raises ``pydantic.ValidationError`` when a declared
    property has the wrong shape.
    """
    cls = _OPERATION_TYPES.get(type_name(data) or "", CommsOperation)
    return cls.model_validate(dict(data))
