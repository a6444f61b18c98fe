"""Every enum alias in callbot.models knows the members of Graph's schema (beta and v1.0)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any, get_args

import pytest
from pydantic import TypeAdapter

from callbot import models

from .conftest import FIXTURES

SCHEMA = FIXTURES / "schema"
_EDM = "{http://docs.oasis-open.org/odata/ns/edm}"

# Graph's enum type -> the alias the models use for it.
ALIASES: dict[str, Any] = {
    "autoAdmittedUsersType": models.AutoAdmittedUsers,
    "callDirection": models.CallDirection,
    "callState": models.CallState,
    "callTranscriptionState": models.CallTranscriptionState,
    "changeType": models.ChangeType,
    "endpointType": models.EndpointType,
    "mediaDirection": models.MediaDirection,
    "mediaState": models.MediaState,
    "modality": models.Modality,
    "onlineMeetingContentSharingDisabledReason": models.ContentSharingDisabledReason,
    "onlineMeetingRole": models.MeetingRole,
    "onlineMeetingVideoDisabledReason": models.VideoDisabledReason,
    "operationStatus": models.OperationStatus,
    "playPromptCompletionReason": models.PlayPromptCompletionReason,
    "recordCompletionReason": models.RecordCompletionReason,
    "recordingStatus": models.RecordingStatus,
    "rejectReason": models.RejectReason,
    "routingMode": models.RoutingMode,
    "routingPolicy": models.RoutingPolicy,
    "routingType": models.RoutingType,
    "screenSharingRole": models.ScreenSharingRole,
    "sendDtmfCompletionReason": models.SendDtmfCompletionReason,
    "tone": models.Tone,
}


def _v1_enums() -> dict[str, list[str]]:
    root = ET.parse(SCHEMA / "communications-v1.0.csdl.xml").getroot()
    return {
        enum.attrib["Name"]: [member.attrib["Name"] for member in enum.iter(f"{_EDM}Member")]
        for enum in root.iter(f"{_EDM}EnumType")
    }


def _beta_enums() -> dict[str, list[str]]:
    members: dict[str, list[str]] = json.loads(
        (SCHEMA / "beta-enum-members.json").read_text(encoding="utf-8")
    )
    return members


V1 = _v1_enums()
BETA = _beta_enums()


def test_every_schema_enum_the_models_meet_has_an_alias() -> None:
    # phoneType is only used by onlineMeetingInfo, which no notification carries
    assert set(V1) - {"phoneType"} <= set(ALIASES)
    assert set(BETA) == set(ALIASES)


@pytest.mark.parametrize("enum", sorted(ALIASES))
def test_alias_knows_every_schema_member(enum: str) -> None:
    known = models.enum_members(ALIASES[enum])
    schema = V1.get(enum, []) + BETA[enum]
    if enum == "operationStatus":
        # the schema spells NotStarted/Running/...; the wire and callbot use camelCase
        assert {m.lower() for m in known} == {m.lower() for m in schema}
        assert all(m[0].islower() for m in known)
    else:
        assert set(schema) <= set(known), set(schema) - set(known)
        # and lists nothing the schema does not, but what Graph was seen sending
        assert set(known) <= set(schema) | set(SENT_BEYOND_THE_SCHEMA.get(enum, {}))


# Members Graph sends that its schema lacks, with a fixture that carries each.
SENT_BEYOND_THE_SCHEMA = {
    "onlineMeetingRole": {
        "none": "recorded/sb12-p2p-callupdates-p2ptest2event6userjoin.json",
        "organizer": "notifications/46-concept-identifylargegalleryview-roster.json",
    },
}


@pytest.mark.parametrize(
    ("enum", "member", "fixture"),
    [
        (enum, member, fixture)
        for enum, members in SENT_BEYOND_THE_SCHEMA.items()
        for member, fixture in members.items()
    ],
)
def test_a_member_beyond_the_schema_is_one_graph_sends(
    enum: str, member: str, fixture: str
) -> None:
    """Such a member is read in any case and compared in Graph's spelling, as a schema one is:
    it must be one a recorded or documented notification carries."""
    assert member not in V1.get(enum, []) + BETA[enum]
    assert member in models.enum_members(ALIASES[enum])
    assert f'"{member}"' in (FIXTURES / fixture).read_text(encoding="utf-8")


@pytest.mark.parametrize("enum", sorted(ALIASES))
def test_alias_reads_any_case_of_a_member_in_its_spelling(enum: str) -> None:
    alias = ALIASES[enum]
    adapter: TypeAdapter[str] = TypeAdapter(alias)
    for member in models.enum_members(alias):
        assert adapter.validate_python(member.upper()) == member
        assert adapter.validate_python(member) == member
    assert adapter.validate_python("somethingGraphAddsLater") == "somethingGraphAddsLater"


# The enums a request sends (models.graph_value checks them), and the action argument each is.
SENT = {
    "endpointType": "Target(endpoint_type=)",
    "modality": "answer / create_call / join_meeting (modalities=)",
    "recordingStatus": "update_recording_status(status)",
    "rejectReason": "reject(reason)",
    "routingMode": "audio_routing_groups.create / update (routing_mode=)",
    "routingPolicy": "redirect(routing_policies=)",
    "screenSharingRole": "change_screen_sharing_role(role)",
    "tone": "send_dtmf_tones(tones)",
}


@pytest.mark.parametrize("enum", sorted(SENT))
def test_a_sent_enum_marks_the_members_only_beta_has(enum: str) -> None:
    """Marked members are refused on v1.0 and sent on beta. routingPolicy is in no v1.0
    schema, but v1.0's documented redirect sends it: none of its members is marked."""
    marks = next(m for m in get_args(ALIASES[enum]) if isinstance(m, models.GraphEnum)).beta
    assert marks == set(BETA[enum]) - set(V1.get(enum, BETA[enum]))
    check = models.graph_value
    for member in marks:
        with pytest.raises(ValueError, match="beta's only"):
            check(ALIASES[enum], member, SENT[enum], beta=False)
        assert check(ALIASES[enum], member, SENT[enum], beta=True) == member
