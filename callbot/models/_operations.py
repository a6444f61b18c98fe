"""The ``commsOperation`` family: what call actions return and what their completions carry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from ._base import GraphModel, odata_type_field, type_name, wire_names
from ._common import (
    AnyPrompt,
    InvitationParticipantInfo,
    OperationStatus,
    PlayPromptCompletionReason,
    RecordCompletionReason,
    ResultInfo,
    SendDtmfCompletionReason,
    canonical_operation_status,
)

__all__ = [
    "AddLargeGalleryViewOperation",
    "AdmitAllFromLobbyOperation",
    "AdmitFromLobbyOperation",
    "CancelMediaProcessingOperation",
    "CommsOperation",
    "InviteParticipantsOperation",
    "MuteParticipantOperation",
    "MuteParticipantsOperation",
    "PlayPromptOperation",
    "RecordOperation",
    "RemoveFromLobbyOperation",
    "SendDtmfTonesOperation",
    "StartHoldMusicOperation",
    "StartRecordingOperation",
    "StartTranscriptionOperation",
    "StopHoldMusicOperation",
    "StopRecordingOperation",
    "StopTranscriptionOperation",
    "SubscribeToToneOperation",
    "UnmuteParticipantOperation",
    "UpdateRecordingStatusOperation",
    "parse_operation",
]

_TERMINAL = frozenset({"completed", "failed"})


def is_settled(status: str | None) -> bool:
    """Whether an operation ``status`` (in any case) is its outcome: ``completed`` or
    ``failed``. The one rule for it: the models, the operation registry and the testing
    kit ask here."""
    return status is not None and canonical_operation_status(status) in _TERMINAL


class CommsOperation(GraphModel):
    """A long-running call action (prompt, recording, ...); also any operation of unknown type.

    ``status`` is ``notStarted``/``running``/``completed``/``failed`` in that
    spelling whatever case Graph sent (it has written ``Running``); ``id`` may be
    absent or ``null`` in notifications, where the operation id is in the resource
    path instead.
    """

    id: str | None = None
    client_context: str | None = None
    status: OperationStatus | None = None
    result_info: ResultInfo | None = None

    @property
    def is_terminal(self) -> bool:
        """Whether the operation has ended (``completed`` or ``failed``)."""
        return is_settled(self.status)

    @property
    def is_failed(self) -> bool:
        """Whether the operation ended with status ``failed``."""
        return self.status == "failed"


class AdmitAllFromLobbyOperation(CommsOperation):
    """Returned by admitting everyone waiting in a meeting's lobby (beta)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.admitAllFromLobbyOperation")


class AdmitFromLobbyOperation(CommsOperation):
    """Returned by admitting participants waiting in a meeting's lobby (beta)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.admitFromLobbyOperation")


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


class MuteParticipantsOperation(CommsOperation):
    """Returned by muting all participants of a meeting (beta); lists who was muted."""

    odata_type: str | None = odata_type_field("#microsoft.graph.muteParticipantsOperation")
    participants: list[str] | None = None


class PlayPromptOperation(CommsOperation):
    """Returned by ``playPrompt``; its completion repeats the ``prompts`` played.

    ``completion_reason`` is in the beta schema only.
    """

    odata_type: str | None = odata_type_field("#microsoft.graph.playPromptOperation")
    prompts: list[AnyPrompt] | None = None
    completion_reason: PlayPromptCompletionReason | None = None


class RecordOperation(CommsOperation):
    """Returned by ``recordResponse``; its completion carries where to fetch the recording.

    The recording at ``recording_location`` is short-lived and is fetched with
    ``Authorization: Bearer <recording_access_token>``; both are also read from
    their older names ``recordResourceLocation`` / ``recordResourceAccessToken``.
    ``completion_reason`` (``operationCanceled``, ``stopToneDetected``,
    ``maxRecordDurationReached``, ...) is in the beta schema only.
    """

    odata_type: str | None = odata_type_field("#microsoft.graph.recordOperation")
    recording_location: str | None = Field(
        default=None,
        validation_alias=wire_names("recordingLocation", "recordResourceLocation"),
        serialization_alias="recordingLocation",
    )
    recording_access_token: str | None = Field(
        default=None,
        validation_alias=wire_names("recordingAccessToken", "recordResourceAccessToken"),
        serialization_alias="recordingAccessToken",
    )
    completion_reason: RecordCompletionReason | None = None


class RemoveFromLobbyOperation(CommsOperation):
    """Returned by removing participants from a meeting's lobby (beta)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.removeFromLobbyOperation")


class SendDtmfTonesOperation(CommsOperation):
    """Returned by ``sendDtmfTones``."""

    odata_type: str | None = odata_type_field("#microsoft.graph.sendDtmfTonesOperation")
    completion_reason: SendDtmfCompletionReason | None = None


class StartHoldMusicOperation(CommsOperation):
    """Returned by a participant's ``startHoldMusic``."""

    odata_type: str | None = odata_type_field("#microsoft.graph.startHoldMusicOperation")


class StartRecordingOperation(CommsOperation):
    """Returned by starting a call's recording (beta)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.startRecordingOperation")


class StartTranscriptionOperation(CommsOperation):
    """Returned by starting a call's transcription (beta)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.startTranscriptionOperation")


class StopHoldMusicOperation(CommsOperation):
    """Returned by a participant's ``stopHoldMusic``."""

    odata_type: str | None = odata_type_field("#microsoft.graph.stopHoldMusicOperation")


class StopRecordingOperation(CommsOperation):
    """Returned by stopping a call's recording (beta)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.stopRecordingOperation")


class StopTranscriptionOperation(CommsOperation):
    """Returned by stopping a call's transcription (beta)."""

    odata_type: str | None = odata_type_field("#microsoft.graph.stopTranscriptionOperation")


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
        AdmitAllFromLobbyOperation,
        AdmitFromLobbyOperation,
        CancelMediaProcessingOperation,
        InviteParticipantsOperation,
        MuteParticipantOperation,
        MuteParticipantsOperation,
        PlayPromptOperation,
        RecordOperation,
        RemoveFromLobbyOperation,
        SendDtmfTonesOperation,
        StartHoldMusicOperation,
        StartRecordingOperation,
        StartTranscriptionOperation,
        StopHoldMusicOperation,
        StopRecordingOperation,
        StopTranscriptionOperation,
        SubscribeToToneOperation,
        UnmuteParticipantOperation,
        UpdateRecordingStatusOperation,
    )
}


def parse_operation(data: Mapping[str, Any]) -> CommsOperation:
    """Validate an operation body into the class its ``@odata.type`` names.

    The type is read with or without its ``#``. Unknown types (the older
    ``configureMixerOperation``, plain ``commsOperation``, or no type at all)
    become a :class:`CommsOperation` whose undeclared properties stay in
    ``model_extra``. Raises ``pydantic.ValidationError`` when a declared
    property has the wrong shape.
    """
    cls = _OPERATION_TYPES.get(type_name(data) or "", CommsOperation)
    return cls.model_validate(dict(data))
