"""The models against every notification in the fixtures: recorded Teams traffic,
older published shapes and the documented bodies.

Each ``resourceData`` is validated into the model its resource path names, and
nothing may be left in ``model_extra`` anywhere in the validated tree: every
property real traffic carries is declared, typed, on the models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from callbot import OperationFailed, models

from .conftest import FIXTURES, normalized_json

RECORDED = FIXTURES / "recorded"
DOCUMENTED = FIXTURES / "notifications"

# Properties deliberately left undeclared, as (model class name, wire key) -> reason.
# Empty: every property seen in the fixtures is typed.
LEFT_OPEN: dict[tuple[str, str], str] = {}


def _fixture_files() -> list[Path]:
    recorded = [p for p in RECORDED.iterdir() if p.suffix in (".json", ".txt")]
    return sorted(recorded) + sorted(DOCUMENTED.glob("*.json"))


def _items(path: Path) -> list[dict[str, Any]]:
    """The notification items of a fixture, made strict JSON where the text is not."""
    text = path.read_text(encoding="utf-8")
    try:
        items: list[dict[str, Any]] = normalized_json(text)["value"]
        return items
    except ValueError:
        pass
    # teamsdocs01 lists the item's properties without braces: read them one by one.
    decoder = json.JSONDecoder()
    item: dict[str, Any] = {}
    for match in re.finditer(r'"(\w+)"\s*:\s*', text):
        if match.group(1) in ("value", "@odata.type") or match.start() < text.find("["):
            continue
        if item.get("resourceData") is not None:
            break
        value, _ = decoder.raw_decode(text, match.end())
        item[match.group(1)] = value
    return [item]


def _path_after_call(item: dict[str, Any]) -> list[str]:
    path = str(item.get("resourceUrl") or item.get("resource"))
    segments = [s for s in path.split("/") if s]
    return [s.lower() for s in segments[3:]]


def _validate(item: dict[str, Any]) -> list[models.GraphModel]:
    """The resource data as the models read it, chosen by the resource path."""
    data = item.get("resourceData")
    entries = data if isinstance(data, list) else [] if data is None else [data]
    rest = _path_after_call(item)
    kind = rest[0] if rest else "call"
    result: list[models.GraphModel] = []
    for entry in entries:
        if kind == "call":
            result.append(models.Call.model_validate(entry))
        elif kind == "participants" or models.type_name(entry) == "participant":
            result.append(models.Participant.model_validate(entry))
        elif kind == "operations":
            result.append(models.parse_operation(entry))
        elif kind == "contentsharingsessions":
            result.append(models.ContentSharingSession.model_validate(entry))
        else:
            raise AssertionError(f"unexpected resource path {rest}")
    return result


def _extras(model: Any, where: str) -> list[str]:
    """Every undeclared key in the model tree, as ``where.key``."""
    found: list[str] = []
    if isinstance(model, BaseModel):
        for key in model.model_extra or {}:
            if (type(model).__name__, key) not in LEFT_OPEN:
                found.append(f"{where}.{key}")
        for name in type(model).model_fields:
            found += _extras(getattr(model, name), f"{where}.{name}")
    elif isinstance(model, list):
        for index, entry in enumerate(model):
            found += _extras(entry, f"{where}[{index}]")
    return found


FILES = _fixture_files()


def test_every_fixture_is_covered() -> None:
    assert len([p for p in FILES if p.parent == RECORDED]) == 57
    assert len([p for p in FILES if p.parent == DOCUMENTED]) == 74


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_no_property_is_left_untyped(path: Path) -> None:
    items = _items(path)
    assert items
    for item in items:
        envelope = models.CommsNotification.model_validate(item)
        assert _extras(envelope, "item") == []
        for index, model in enumerate(_validate(item)):
            assert _extras(model, f"{type(model).__name__}[{index}]") == []


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_models_survive_a_round_trip(path: Path) -> None:
    # the store keeps models as by-alias JSON of what was set, and reads them back
    for item in _items(path):
        for model in _validate(item):
            text = model.model_dump_json(by_alias=True, exclude_unset=True)
            assert type(model).model_validate_json(text) == model


def _recorded(name: str) -> list[dict[str, Any]]:
    return _items(next(RECORDED.glob(f"{name}-*")))


def _only(name: str) -> models.GraphModel:
    (item,) = _recorded(name)
    (model,) = _validate(item)
    return model


# -- enum properties, read in Graph's spelling -----------------------------------------------


def test_an_enum_value_in_another_case_is_read_in_graphs_spelling() -> None:
    call = _only("teamsdocs01")
    assert isinstance(call, models.Call)
    assert call.state == "established"  # sent as "Established"

    data = {
        "state": "TRANSFERACCEPTED",
        "direction": "Incoming",
        "requestedModalities": ["Audio", "VIDEOBASEDSCREENSHARING"],
        "toneInfo": {"tone": "Tone1", "sequenceId": 1},
        "mediaState": {"audio": "Active"},
        "source": {"endpointType": "SkypeForBusiness"},
        "callRoutes": [{"routingType": "SelfFork"}],
        "transcription": {"state": "NotStarted"},
        "routingPolicies": ["NoMissedCall"],
    }
    call = models.Call.model_validate(data)
    assert call.state == "transferAccepted"
    assert call.direction == "incoming"
    assert call.requested_modalities == ["audio", "videoBasedScreenSharing"]
    assert call.tone_info is not None
    assert call.tone_info.tone == "tone1"
    assert call.media_state is not None
    assert call.media_state.audio == "active"
    assert call.source is not None
    assert call.source.endpoint_type == "skypeForBusiness"
    assert call.call_routes is not None
    assert call.call_routes[0].routing_type == "selfFork"
    assert call.transcription is not None
    assert call.transcription.state == "notStarted"
    assert call.routing_policies == ["noMissedCall"]


def test_operation_status_and_completion_reasons_are_read_in_graphs_spelling() -> None:
    operation = models.parse_operation(
        {"@odata.type": "#microsoft.graph.recordOperation", "status": "Running"}
    )
    assert operation.status == "running"
    assert not operation.is_terminal
    done = models.parse_operation(
        {
            "@odata.type": "#microsoft.graph.playPromptOperation",
            "status": "Completed",
            "completionReason": "CompletedSuccessfully",
        }
    )
    assert isinstance(done, models.PlayPromptOperation)
    assert done.status == "completed"
    assert done.is_terminal
    assert not done.is_failed
    assert done.completion_reason == "completedSuccessfully"
    record = models.parse_operation(
        {
            "@odata.type": "#microsoft.graph.recordOperation",
            "status": "FAILED",
            "completionReason": "StopToneDetected",
        }
    )
    assert isinstance(record, models.RecordOperation)
    assert record.is_failed
    assert record.completion_reason == "stopToneDetected"


def test_roster_enum_values_are_read_in_graphs_spelling() -> None:
    participant = models.Participant.model_validate(
        {
            "meetingRole": "Presenter",
            "mediaStreams": [{"mediaType": "Audio", "direction": "SendReceive"}],
            "recordingInfo": {"recordingStatus": "NotRecording"},
            "restrictedExperience": {"videoDisabled": "WatermarkProtection"},
        }
    )
    assert participant.meeting_role == "presenter"
    assert participant.media_streams is not None
    assert participant.media_streams[0].media_type == "audio"
    assert participant.media_streams[0].direction == "sendReceive"
    assert participant.recording_info is not None
    assert participant.recording_info.recording_status == "notRecording"
    assert participant.restricted_experience is not None
    assert participant.restricted_experience.video_disabled == "watermarkProtection"


def test_unknown_enum_values_pass_through_unchanged() -> None:
    call = models.Call.model_validate(
        {"state": "Parked", "direction": "Sideways", "requestedModalities": ["Hologram"]}
    )
    assert call.state == "Parked"
    assert call.direction == "Sideways"
    assert call.requested_modalities == ["Hologram"]
    # Teams sends meetingRole "none", which is in no schema
    roster = _validate(_recorded("sb12")[0])
    assert [p.meeting_role for p in roster if isinstance(p, models.Participant)] == [
        "none",
        "none",
    ]


def test_only_enum_properties_are_normalised() -> None:
    # terminationReason is a string in Graph's schema, not an enum: kept as sent
    (item,) = _recorded("gdh16")
    (call,) = _validate(item)
    assert isinstance(call, models.Call)
    assert call.termination_reason == "AppInitiated"
    assert call.state == "terminated"


def test_enum_members_lists_the_known_members() -> None:
    assert models.enum_members(models.CallState) == models.CALL_STATES
    assert "tone1" in models.enum_members(models.Tone)
    assert models.enum_members(models.Call) == ()
    assert models.canonical_call_state("ESTABLISHED") == "established"
    assert models.canonical_call_state("parked") == "parked"


# -- older shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "text"),
    [("gdh01", "running", "transferring"), ("gdh02", "completed", "transferAccepted")],
)
def test_a_named_subcode_keeps_the_operation_valid(name: str, status: str, text: str) -> None:
    operation = _only(name)
    assert type(operation) is models.CommsOperation
    assert operation.status == status
    assert operation.result_info is not None
    assert operation.result_info.code == 200  # sent as the string "200"
    assert operation.result_info.subcode is None
    assert operation.result_info.subcode_text == text
    assert operation.result_info.code_text is None
    assert f"200/{text}" in str(OperationFailed(operation, operation.result_info))


def test_numeric_codes_stay_numbers() -> None:
    info = models.ResultInfo.model_validate({"code": "400", "subCode": "8508", "message": "x"})
    assert (info.code, info.subcode, info.code_text, info.subcode_text) == (400, 8508, None, None)
    named = models.ResultInfo.model_validate({"code": "ok", "subcode": 5})
    assert (named.code, named.code_text, named.subcode) == (None, "ok", 5)


def test_a_result_info_prints_as_its_codes_and_message() -> None:
    # What `print("ended:", event.result_info)` in the README's bot shows.
    ended = models.ResultInfo.model_validate(
        {
            "@odata.type": "#microsoft.graph.resultInfo",
            "code": 200,
            "subcode": 5001,
            "message": "The conversation has ended.",
        }
    )
    assert str(ended) == "200/5001 The conversation has ended."
    assert f"{models.ResultInfo.model_validate({'code': 0, 'subCode': 7015})}" == "0/7015"
    # What is not there is left out, not printed as None.
    assert str(models.ResultInfo.model_validate({"code": 408, "message": "late"})) == "408 late"
    assert str(models.ResultInfo.model_validate({"message": "gone"})) == "gone"
    assert str(models.ResultInfo()) == ""
    operation = _only("gdh01")
    assert isinstance(operation, models.CommsOperation)
    assert str(operation.result_info) == "200/transferring"  # a named subcode


def test_older_recording_property_names_fill_the_recording_fields() -> None:
    operation = _only("gdh22")
    assert isinstance(operation, models.RecordOperation)
    assert (
        operation.recording_location == "https://file.location/17e3b46c-f61d-4f4d-9635-c626ef18e6ad"
    )
    assert operation.recording_access_token == "<access-token>"
    assert operation.completion_reason == "stopToneDetected"
    dumped = operation.model_dump(by_alias=True, exclude_none=True)
    assert dumped["recordingLocation"] == operation.recording_location
    assert "recordResourceLocation" not in dumped


def test_odata_type_without_hash_is_read_like_with_it() -> None:
    call = _only("gdh23")
    assert isinstance(call, models.Call)
    assert call.odata_type == "microsoft.graph.call"
    assert call.odata_id is not None
    assert models.type_name(call) == "call"
    operation = models.parse_operation(
        {"@odata.type": "microsoft.graph.recordOperation", "recordingLocation": "https://x"}
    )
    assert isinstance(operation, models.RecordOperation)
    call = models.Call.model_validate(
        {
            "meetingInfo": {"@odata.type": "microsoft.graph.tokenMeetingInfo", "token": "t"},
            "mediaConfig": {"@odata.type": "microsoft.graph.appHostedMediaConfig"},
            "callOptions": {"@odata.type": "microsoft.graph.outgoingCallOptions"},
        }
    )
    assert isinstance(call.meeting_info, models.TokenMeetingInfo)
    assert isinstance(call.media_config, models.AppHostedMediaConfig)
    assert isinstance(call.call_options, models.OutgoingCallOptions)


def test_older_transcription_info_inside_the_meeting_info() -> None:
    (item,) = _recorded("gdh34")
    (call,) = _validate(item)
    assert isinstance(call, models.Call)
    assert isinstance(call.meeting_info, models.OrganizerMeetingInfo)
    assert call.meeting_info.allow_conversation_without_host is True
    info = call.meeting_info.transcription_info
    assert info is not None
    assert info.state == "inactive"
    assert info.state_updated_time is not None
    assert item["callbackUri"] == models.CommsNotification.model_validate(item).callback_uri


# -- what real Teams traffic carries -----------------------------------------------------------


def test_recorded_call_updates_carry_meeting_details() -> None:
    (item,) = _recorded("sb11")
    (call,) = _validate(item)
    assert isinstance(call, models.Call)
    assert call.meeting_capability is not None
    assert call.meeting_capability.auto_admitted_users is None
    assert call.meeting_properties is not None
    assert call.meeting_properties.meeting_label == "00000000-0000-0000-0000-000000000000"
    assert call.co_organizers == []
    assert isinstance(call.meeting_info, models.TokenMeetingInfo)
    assert call.chat_info is not None
    assert call.chat_info.thread_id == "19:e7339480-8cef-4b7e-936f-05ea012ba657"
    assert call.replaces_context is not None


def test_recorded_roster_carries_client_details() -> None:
    roster = _validate(_recorded("sb12")[0])
    user, bot = roster
    assert isinstance(user, models.Participant)
    assert isinstance(bot, models.Participant)
    assert user.display_name == "Sam"
    assert user.is_identity_anonymized is False
    assert user.published_states == []
    assert user.replacement_link is not None
    assert user.replacement_link.startswith("https://")
    assert user.info is not None
    assert user.info.endpoint_id == "a885185e-6dc4-4f23-b858-6d3d697934bc"
    assert user.info.client_version is not None
    assert user.info.client_version.startswith("SkypeSpaces/")
    assert user.info.replacement_link == user.replacement_link
    assert user.info.identity is not None
    assert user.info.identity.primary is user.info.identity.user
    assert bot.info is not None
    assert bot.info.identity is not None
    assert bot.info.identity.primary is bot.info.identity.application
    assert bot.display_name == "28:d2a35726-10be-4092-8ea0-d70e7fd87cca"


def test_recorded_play_prompt_completion_lists_its_prompts() -> None:
    operation = _only("sb05")
    assert isinstance(operation, models.PlayPromptOperation)
    assert operation.completion_reason == "completedSuccessfully"
    assert operation.prompts is not None
    (prompt,) = operation.prompts
    assert isinstance(prompt, models.MediaPrompt)
    assert prompt.media_info is not None
    assert prompt.media_info.resource_id == "59962c96-0bdc-4587-83b1-8afc9703d1fb"
    assert operation.result_info is not None
    assert (operation.result_info.code, operation.result_info.subcode) == (200, 0)


def test_display_name_prefers_the_preferred_name() -> None:
    participant = models.Participant.model_validate(
        {
            "preferredDisplayName": "Front desk",
            "info": {"identity": {"user": {"id": "u", "displayName": "Alex"}}},
        }
    )
    assert participant.display_name == "Front desk"
    nobody = models.Participant.model_validate({"info": {"identity": {}}})
    assert nobody.display_name is None
    assert models.Participant().display_name is None
    phone = models.IdentitySet.model_validate(
        {"phone": {"id": "+15551234"}, "user": None, "guest": {"displayName": "Guest"}}
    )
    assert phone.primary is phone.phone
    assert phone.display_name == "Guest"
    assert models.IdentitySet().primary is None


# -- beta operations and policy-recording notifications ----------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        models.StartRecordingOperation,
        models.StopRecordingOperation,
        models.StartTranscriptionOperation,
        models.StopTranscriptionOperation,
        models.MuteParticipantsOperation,
        models.AdmitFromLobbyOperation,
        models.AdmitAllFromLobbyOperation,
        models.RemoveFromLobbyOperation,
    ],
)
def test_beta_operations_are_chosen_by_type(cls: type[models.CommsOperation]) -> None:
    name = cls.__name__[0].lower() + cls.__name__[1:]
    operation = models.parse_operation(
        {"@odata.type": f"#microsoft.graph.{name}", "id": "op", "status": "completed"}
    )
    assert type(operation) is cls
    assert operation.is_terminal


def test_mute_participants_operation_lists_who_was_muted() -> None:
    operation = models.parse_operation(
        {
            "@odata.type": "#microsoft.graph.muteParticipantsOperation",
            "participants": ["a", "b"],
            "status": "running",
        }
    )
    assert isinstance(operation, models.MuteParticipantsOperation)
    assert operation.participants == ["a", "b"]


def test_participant_joining_and_left_notifications() -> None:
    joining = models.ParticipantJoiningNotification.model_validate(
        {
            "@odata.type": "#microsoft.graph.participantJoiningNotification",
            "call": {"@odata.type": "#microsoft.graph.call", "id": "c1", "state": "Incoming"},
        }
    )
    assert joining.call is not None
    assert joining.call.state == "incoming"
    left = models.ParticipantLeftNotification.model_validate(
        {"participantId": "p1", "call": {"id": "c1"}}
    )
    assert left.participant_id == "p1"
    assert left.call is not None
    assert left.call.id == "c1"
    reject = models.RejectJoinResponse(reason="busy")
    assert reject.model_dump(by_alias=True, exclude_none=True) == {
        "@odata.type": "#microsoft.graph.rejectJoinResponse",
        "reason": "busy",
    }
    invite = models.InviteNewBotResponse(invite_uri="https://bot2.example/callback")
    assert invite.model_dump(by_alias=True, exclude_none=True)["inviteUri"].startswith("https")
    assert isinstance(models.AcceptJoinResponse(), models.ParticipantJoiningResponse)


def test_the_models_package_exports_are_sorted_and_resolve() -> None:
    assert list(models.__all__) == sorted(models.__all__, key=lambda n: (not n.isupper(), n))
    for name in models.__all__:
        assert getattr(models, name) is not None
