"""Every documented call action, sent through the Pythonic API to FakeGraph.

Each request is compared with the documented one in tests/fixtures/operations:
method, path, and body. Documented values are passed in, so bodies compare
exactly; the only difference tolerated is an ``@odata.type`` annotation that
callbot sends and a documented example left out (Graph accepts both).
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import zip_longest
from pathlib import Path
from typing import Any, get_args
from xml.etree import ElementTree

import pytest

from callbot import GraphError, events, models
from callbot._ids import id_key
from callbot._journal import Attempt, _current
from callbot._parse import parse_body
from callbot._sequencing import OwnFact, Placed, TransferAsked, TransferRefused
from callbot.graph import (
    Call,
    CallServices,
    EndpointType,
    Meeting,
    Modality,
    RecordingStatus,
    RejectReason,
    RetryPolicy,
    RoutingMode,
    RoutingPolicy,
    ScreenSharingRole,
    Target,
    ToneName,
    media_info,
    media_prompt,
)
from callbot.graph._credentials import AccessToken
from callbot.graph._values import dump
from callbot.testing import FakeGraph

from .test_digits import _Inbox

OPERATIONS = Path(__file__).parent / "fixtures" / "operations"
CALL_ID = "57dab8b1-894c-409a-b240-bd8beae78896"
PARTICIPANT_ID = "2765eb15-01f8-47c6-b12b-c32111a4a86f"


def documented(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((OPERATIONS / f"{name}.json").read_text(encoding="utf-8"))
    return data


def conform(produced: Any, documented: Any) -> Any:
    """``produced`` without the ``@odata.type`` keys the documented body leaves out."""
    if isinstance(produced, dict) and isinstance(documented, dict):
        return {
            key: conform(value, documented.get(key))
            for key, value in produced.items()
            if key != "@odata.type" or key in documented
        }
    if isinstance(produced, list) and isinstance(documented, list):
        return [conform(p, d) for p, d in zip_longest(produced, documented)]
    return produced


@pytest.fixture
async def services(graph: FakeGraph) -> AsyncIterator[CallServices]:
    graph.add_call(CALL_ID, state="established")  # the call the tests act on, offered
    settings = graph.settings(public_url="https://bot.contoso.com", callback_path="/api/calls")
    svc = CallServices(settings, retry=RetryPolicy(total_time=2.0, base_delay=0.01))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


Action = Callable[[Call], Awaitable[Any]]


DOCUMENTED_PREFETCH = [
    media_info(
        "https://cdn.contoso.com/beep.wav", resource_id="1D6DE2D4-CD51-4309-8DAA-70768651088E"
    ),
    media_info(
        "https://cdn.contoso.com/cool.wav", resource_id="1D6DE2D4-CD51-4309-8DAA-70768651088F"
    ),
]
"""The media the documented answer with service-hosted media pre-fetches."""

CASES: list[tuple[str, Action]] = [
    (
        "answer",
        lambda c: c.answer(
            callback_uri="callbackUri-value",
            app_hosted_media="<Media Session Configuration Blob>",
            content_sharing_notifications=True,
            participant_capacity=200,
        ),
    ),
    (
        "answer-service-hosted-media",
        lambda c: c.answer(prefetch=DOCUMENTED_PREFETCH),
    ),
    (
        "answer-app-hosted-media",
        lambda c: c.answer(app_hosted_media="<Media Session Configuration Blob>"),
    ),
    ("reject", lambda c: c.reject("busy")),
    ("reject-none-reason", lambda c: c.reject()),
    (
        "redirect",
        lambda c: c.redirect(
            Target.application("22bfd41f-550e-477d-8789-f6f7bd2a5e8b", "test bot 2"),
            callback_uri="https://bot.contoso.com/api/calls/24701998-1a73-4d42-8085-bf46ed0ae039",
        ),
    ),
    (
        "redirect-simultaneous-ring",
        lambda c: c.redirect(
            Target.user("98da8a1a-1b87-452c-a713-65d3f10b1253", "test user"),
            Target.user("bf5aae9a-d11d-47a8-93b1-782504c9c3f3", "test user 2"),
            routing_policies=["disableForwarding"],
            callback_uri="https://bot.contoso.com/api/calls/24701998-1a73-4d42-8085-bf46ed0ae039",
        ),
    ),
    (
        "redirect-pstn",
        lambda c: c.redirect(
            Target.phone("+12345678901"),
            callback_uri="https://bot.contoso.com/api/calls/24701998-1a73-4d42-8085-bf46ed0ae039",
        ),
    ),
    (
        "transfer",
        lambda c: c.transfer(
            Target.user(
                "550fae72-d251-43ec-868c-373732c2704f", "Heidi Steen", endpoint_type="default"
            )
        ),
    ),
    (
        "transfer-consultative",
        lambda c: c.transfer(
            Target.user(
                "550fae72-d251-43ec-868c-373732c2704f", "Heidi Steen", endpoint_type="default"
            ),
            replaces_call_id="e5d39592-99bd-4db8-bca8-30fb894ec51d",
        ),
    ),
    (
        "transfer-pstn",
        lambda c: c.transfer(
            Target.phone(
                "+12345678901",
                endpoint_type="default",
                language_id="languageId-value",
                region="region-value",
            ),
            client_context="9e90d1c1-f61e-43e7-9f75-d420159aae08",
        ),
    ),
    (
        "transfer-consultative-pstn",
        lambda c: c.transfer(
            Target.phone(
                "+12345678901", endpoint_type="default", language_id="en-us", region="amer"
            ),
            replaces_call_id="e5d39592-99bd-4db8-bca8-30fb894ec51d",
            client_context="9e90d1c1-f61e-43e7-9f75-d420159aae08",
        ),
    ),
    (
        "playPrompt",
        lambda c: c.play_prompt(
            media_prompt(
                "https://cdn.contoso.com/beep.wav",
                resource_id="1D6DE2D4-CD51-4309-8DAA-70768651088E",
            ),
            client_context="d45324c1-fcb5-430a-902c-f20af696537c",
        ),
    ),
    (
        "recordResponse",
        lambda c: c.record_response(
            prompts=[
                media_prompt(
                    "https://cdn.contoso.com/beep.wav",
                    resource_id="1D6DE2D4-CD51-4309-8DAA-70768651088E",
                )
            ],
            barge_in_allowed=True,
            max_record_duration=10,
            initial_silence_timeout=5,
            max_silence_timeout=2,
            play_beep=True,
            stop_tones=["#", "1", "*"],
            client_context="d45324c1-fcb5-430a-902c-f20af696537c",
        ),
    ),
    (
        "subscribeToTone",
        lambda c: c.subscribe_to_tone(client_context="fd1c7836-4d84-4e24-b6aa-23188688cc54"),
    ),
    (
        "sendDtmfTones",
        lambda c: c.send_dtmf_tones(
            "1234567890*#",
            delay_between_tones_ms=1000,
            client_context="e0be71f1-a14f-4cec-b65a-e7aba5db7c53",
        ),
    ),
    (
        "cancelMediaProcessing",
        lambda c: c.cancel_media_processing(client_context="clientContext-value"),
    ),
    ("mute", lambda c: c.mute(client_context="clientContext-value")),
    ("unmute", lambda c: c.unmute(client_context="clientContext-value")),
    (
        "participant-mute",
        lambda c: c.participants.mute(
            PARTICIPANT_ID, client_context="d45324c1-fcb5-430a-902c-f20af696537c"
        ),
    ),
    (
        "invite-participants",
        lambda c: c.participants.invite(
            Target.user(
                "278405a3-f568-4b3e-b684-009193463064",
                "string",
                replaces_call_id="a7ebfb2d-871e-419c-87af-27290b22e8db",
            ),
            client_context="f2fa86af-3c51-4bc2-8fc0-475452d9764f",
        ),
    ),
    (
        "invite-participants-multiple",
        lambda c: c.participants.invite(
            Target.user("7e1b4346-85a6-4bdd-abe3-d11c5d420efe", "string"),
            Target.user("1e126418-44a0-4a94-a6f8-0efe1ad71acb", "string"),
            replaces_call_id="a7ebfb2d-871e-419c-87af-27290b22e8db",
            client_context="f2fa86af-3c51-4bc2-8fc0-475452d9764f",
        ),
    ),
    (
        "invite-participants-replace-p2p-call",
        lambda c: c.participants.invite(
            Target.user("7e1b4346-85a6-4bdd-abe3-d11c5d420efe", "string"),
            replaces_call_id="a7ebfb2d-871e-419c-87af-27290b22e8db",
            client_context="f2fa86af-3c51-4bc2-8fc0-475452d9764f",
        ),
    ),
    (
        "invite-participants-pstn",
        lambda c: c.participants.invite(
            Target.phone("+12345678901"),
            client_context="f2fa86af-3c51-4bc2-8fc0-475452d9764f",
        ),
    ),
    (
        "invite-participants-move-from-other-meeting",
        lambda c: c.participants.invite(
            Target.user(
                "682b6c37-0729-4fab-ace6-d730d5d9137e",
                identity_provider="AAD",
                replaces_call_id="a7ebfb2d-871e-419c-87af-27290b22e8db",
                participant_id="7d501bf1-5ee4-4605-ba92-0ae4513c611c",
            ),
            client_context="f2fa86af-3c51-4bc2-8fc0-475452d9764f",
        ),
    ),
    (
        "updateRecordingStatus",
        lambda c: c.update_recording_status("recording", client_context="clientContext-value"),
    ),
    ("keepAlive", lambda c: c.keep_alive()),
    ("changeScreenSharingRole", lambda c: c.change_screen_sharing_role("viewer")),
    ("delete-call", lambda c: c.hangup()),
    ("delete-participant", lambda c: c.participants.remove(PARTICIPANT_ID)),
    (
        "startHoldMusic",
        lambda c: c.participants.start_hold_music(
            PARTICIPANT_ID,
            prompt=media_prompt("https://bot.contoso.com/onHold.wav"),
            client_context="d45324c1-fcb5-430a-902c-f20af696537c",
        ),
    ),
    (
        "stopHoldMusic",
        lambda c: c.participants.stop_hold_music(
            PARTICIPANT_ID, client_context="d45324c1-fcb5-430a-902c-f20af696537c"
        ),
    ),
    (
        "addLargeGalleryView",
        lambda c: c.add_large_gallery_view(client_context="785f4929-92ca-497b-863f-c778c77c9758"),
    ),
]


# A documented body that lists the choices where a value goes ("notRecording | recording |
# failed"): the case sends one of them, and that one is compared.
CHOSEN: dict[str, dict[str, Any]] = {"updateRecordingStatus": {"status": "recording"}}


@pytest.mark.parametrize(("name", "action"), CASES, ids=[name for name, _ in CASES])
async def test_documented_request(
    graph: FakeGraph, services: CallServices, name: str, action: Action
) -> None:
    doc = documented(name)
    call = services.call(CALL_ID)
    if name in ("delete-participant", "participant-mute", "startHoldMusic", "stopHoldMusic"):
        graph.add_participant(CALL_ID, {"id": PARTICIPANT_ID})  # Graph acts on who is there
    result = await action(call)

    sent = graph.requests[-1]
    assert sent.method == doc["method"]
    expected_path = doc["path"].replace("{id}", CALL_ID, 1).replace("{id}", PARTICIPANT_ID, 1)
    assert sent.path == expected_path
    if doc["request"] is None:
        assert sent.body == b""
        assert "Content-Type" not in sent.headers  # documented with no headers
    else:
        request = {**doc["request"], **CHOSEN.get(name, {})}
        assert conform(sent.json, request) == request
        assert sent.headers["Content-Type"].startswith("application/json")
    # FakeGraph answers with the documented status, and so callbot accepts it
    answer = graph.answer_to(sent)
    assert answer.status == doc["response_status"]
    # and names the operation in a Location where Graph does (not for an invitation)
    documented_location = any(h.startswith("Location:") for h in doc["response_headers"])
    assert ("Location" in answer.headers) == documented_location

    assert sent.bearer in graph.tokens
    assert uuid.UUID(sent.client_request_id or "").version == 4
    assert sent.scenario_id == call.scenario_id
    if doc["response"] is not None and "@odata.type" in doc["response"]:
        # actions documented with an operation body return an Operation of that type
        expected_type = models.parse_operation(doc["response"]).__class__
        assert isinstance(result.result, expected_type)
        assert result.client_context == sent.json["clientContext"]
    else:
        assert result is None


async def test_transfer_from_group_call_names_the_transferee(
    graph: FakeGraph, services: CallServices
) -> None:
    # the documented body is malformed (unbalanced braces); this is the shape it intends
    call = services.call(CALL_ID)
    await call.transfer(
        Target.user("550fae72-d251-43ec-868c-373732c2704f", "Heidi Steen", endpoint_type="default"),
        transferee=Target.user(
            "751f6800-3180-414d-bd94-333364659951",
            tenant_id="72f988bf-86f1-41af-91ab-2d7cd011db47",
            participant_id="909c6581-5130-43e9-88f3-fcb3582cde37",
        ),
    )
    sent = await graph.wait_for_request("transfer")
    intended = {
        "transferTarget": {
            "endpointType": "default",
            "identity": {
                "user": {
                    "id": "550fae72-d251-43ec-868c-373732c2704f",
                    "displayName": "Heidi Steen",
                }
            },
        },
        "transferee": {
            "identity": {
                "user": {
                    "id": "751f6800-3180-414d-bd94-333364659951",
                    "tenantId": "72f988bf-86f1-41af-91ab-2d7cd011db47",
                }
            },
            "participantId": "909c6581-5130-43e9-88f3-fcb3582cde37",
        },
    }
    assert conform(sent.json, intended) == intended
    assert "Heidi Steen" in documented("transfer-from-group-call")["request_raw"]


# -- participant models as targets and sources ------------------------------------------

NOTIFICATIONS = Path(__file__).parent / "fixtures" / "notifications"
SCHEMA = Path(__file__).parent / "fixtures" / "schema" / "communications-v1.0.csdl.xml"
INVITATION = "#microsoft.graph.invitationParticipantInfo"
PARTICIPANT_INFO = "#microsoft.graph.participantInfo"


def schema_properties(type_name: str) -> set[str]:
    """The properties Graph's v1.0 schema gives the complex type ``type_name``."""
    edm = "{http://docs.oasis-open.org/odata/ns/edm}"
    root = ElementTree.parse(SCHEMA).getroot()
    (complex_type,) = [t for t in root.iter(f"{edm}ComplexType") if t.attrib["Name"] == type_name]
    return {p.attrib["Name"] for p in complex_type.iter(f"{edm}Property")}


def incoming(name: str) -> models.Call:
    """The call of a documented incoming call notification, as handlers get it."""
    (event,) = parse_body((NOTIFICATIONS / name).read_bytes())
    assert isinstance(event, events.IncomingCall)
    return event.call


def as_held(invitation: dict[str, Any]) -> models.ParticipantInfo:
    """Whom a documented invitation names, as a handler holds them: a participant's ``info``
    in a roster (document 46: its participant id, Teams' endpointId), with the endpoint type,
    language and region of the leg it was read from (document 12's source)."""
    return models.ParticipantInfo.model_validate(
        {
            "@odata.type": PARTICIPANT_INFO,
            "identity": invitation["identity"],
            "participantId": invitation.get(
                "participantId", "23aeb644-6227-4f4a-b5c9-4d61c1f196d3"
            ),
            "endpointType": "default",
            "endpointId": "40213cfb-0934-4dce-9b3a-57c09adf6967",
            "languageId": "en-US",
            "region": "westus",
            "countryCode": "US",
        }
    )


HeldAction = Callable[[CallServices, models.ParticipantInfo], Awaitable[Any]]

# Each documented request whose invitation the case gives as a participant's info instead.
HELD_CASES: dict[str, tuple[str, HeldAction]] = {
    "create-call": (
        "createCall",
        lambda s, held: s.create_call(
            held,
            content_sharing_notifications=True,
            callback_uri="https://bot.contoso.com/callback",
        ),
    ),
    "invite-participants-pstn": (
        "invite",
        lambda s, held: s.call(CALL_ID).participants.invite(
            held, client_context="f2fa86af-3c51-4bc2-8fc0-475452d9764f"
        ),
    ),
    "invite-participants-move-from-other-meeting": (
        "invite",
        lambda s, held: s.call(CALL_ID).participants.invite(
            held,
            replaces_call_id="a7ebfb2d-871e-419c-87af-27290b22e8db",
            client_context="f2fa86af-3c51-4bc2-8fc0-475452d9764f",
        ),
    ),
    "redirect": (
        "redirect",
        lambda s, held: s.call(CALL_ID).redirect(
            held,
            callback_uri="https://bot.contoso.com/api/calls/24701998-1a73-4d42-8085-bf46ed0ae039",
        ),
    ),
    "redirect-pstn": (
        "redirect",
        lambda s, held: s.call(CALL_ID).redirect(
            held,
            callback_uri="https://bot.contoso.com/api/calls/24701998-1a73-4d42-8085-bf46ed0ae039",
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(HELD_CASES))
async def test_a_participant_info_goes_as_the_invitation_graph_documents(
    graph: FakeGraph, services: CallServices, name: str
) -> None:
    """A participant's ``info`` (a participantInfo) given where Graph takes an
    invitationParticipantInfo went as itself: typed participantInfo, an unrelated type, with
    the leg's endpoint type, language, region and Teams' own properties. It goes as the
    documented invitation: its identity, and its participantId only where the invitation
    replaces a call (moving that participant out of it: document 55's request)."""
    action, act = HELD_CASES[name]
    doc = documented(name)["request"]
    (invitation,) = doc.get("targets") or doc["participants"]
    await act(services, as_held(invitation))
    sent = await graph.wait_for_request(action)
    assert sent.json == doc


async def test_a_caller_is_called_invited_redirected_and_transferred_to_as_an_invitation(
    graph: FakeGraph, services: CallServices
) -> None:
    """An incoming call's ``source`` (document 12: typed participantInfo, with the caller's
    region and language) is whom a bot calls back, invites or transfers to: each request
    names them in an invitationParticipantInfo, with no property that type lacks."""
    caller = incoming("12-call-answer-ex2-incoming-call-created-typed.json").source
    assert caller is not None
    assert caller.odata_type == PARTICIPANT_INFO
    await services.create_call(caller)
    call = services.call(CALL_ID)
    await call.participants.invite(caller)
    await call.redirect(caller)
    await call.transfer(caller)
    await call.transfer(caller, replaces_call_id="e5d39592-99bd-4db8-bca8-30fb894ec51d")
    sent = [
        (await graph.wait_for_request("createCall")).json["targets"][0],
        (await graph.wait_for_request("invite")).json["participants"][0],
        (await graph.wait_for_request("redirect")).json["targets"][0],
        *(json.loads(r.body)["transferTarget"] for r in graph.requests_for("transfer")),
    ]
    named = {
        "@odata.type": INVITATION,
        "identity": {
            "user": {"displayName": "Test User", "id": "8A34A46B-3D17-4ADC-8DCE-DC4E7D572698"}
        },
    }
    assert sent == [named] * 4 + [
        {**named, "replacesCallId": "e5d39592-99bd-4db8-bca8-30fb894ec51d"}
    ]
    invitation = schema_properties("invitationParticipantInfo")
    assert all(set(field) - {"@odata.type"} <= invitation for field in sent)


async def test_the_bots_own_identity_is_a_calls_source_as_a_participant_info(
    graph: FakeGraph, services: CallServices
) -> None:
    """The bot's own identity in an incoming call (``targets[0]``, document 12: typed
    invitationParticipantInfo) went as itself as a call's ``source``, where Graph takes a
    participantInfo (application-post-calls example 9). It goes as one, with its identity."""
    (me,) = incoming("12-call-answer-ex2-incoming-call-created-typed.json").targets or []
    assert me.odata_type == INVITATION
    await services.create_call(Target.phone("+12345678901"), source=me)
    sent = (await graph.wait_for_request("createCall")).json
    assert sent["source"] == {
        "@odata.type": PARTICIPANT_INFO,
        "identity": {
            "application": {"displayName": "Test BOT", "id": "8A34A46B-3D17-4ADC-8DCE-DC4E7D572698"}
        },
    }


async def test_a_transferee_goes_as_a_participant_info_with_only_its_properties(
    graph: FakeGraph, services: CallServices
) -> None:
    """From a group call the transferee is a participantInfo (call-transfer example 5): an
    invitationParticipantInfo given as one goes so, its invitation's own asks
    (``replacesCallId``, ``hidden``, ...) left out; a participant's ``info`` from a roster
    goes without what Teams adds to it (``endpointId``, ``clientVersion``), which
    participantInfo, no open type, has not."""
    target = Target.user(
        "550fae72-d251-43ec-868c-373732c2704f", "Heidi Steen", endpoint_type="default"
    )
    identity = {
        "user": {
            "id": "751f6800-3180-414d-bd94-333364659951",
            "tenantId": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        }
    }
    intended = {  # the documented body's transferee (its braces unbalanced in the docs)
        "identity": identity,
        "participantId": "909c6581-5130-43e9-88f3-fcb3582cde37",
    }
    invited = models.InvitationParticipantInfo.model_validate(
        {
            **intended,
            "@odata.type": INVITATION,
            "replacesCallId": "e5d39592-99bd-4db8-bca8-30fb894ec51d",
            "hidden": True,
            "removeFromDefaultAudioRoutingGroup": True,
        }
    )
    in_roster = models.ParticipantInfo.model_validate(
        {
            **intended,
            "endpointId": "40213cfb-0934-4dce-9b3a-57c09adf6967",
            "clientVersion": "Teams/1.0",
            "nonAnonymizedIdentity": identity,
        }
    )
    call = services.call(CALL_ID)
    await call.transfer(target, transferee=invited)
    await call.transfer(target, transferee=in_roster)
    sent = [json.loads(r.body)["transferee"] for r in graph.requests_for("transfer")]
    assert sent == [{"@odata.type": PARTICIPANT_INFO, **intended}] * 2
    assert (
        "909c6581-5130-43e9-88f3-fcb3582cde37"
        in documented("transfer-from-group-call")["request_raw"]
    )


async def test_a_model_read_from_graph_goes_back_without_unknown_future_value(
    graph: FakeGraph, services: CallServices
) -> None:
    """Graph writes ``unknownFutureValue`` for an enum member the reader's schema lacks, and
    takes it in no request. A model a handler holds went back as it was read: the bot's own
    identity in an incoming call as a call's ``source``, an invitee or a transferee sent
    ``"endpointType": "unknownFutureValue"``. Wherever a model sent holds it, the property is
    left out (and the value left out of a list); a dict goes as its author wrote it."""
    body = json.loads(
        (NOTIFICATIONS / "12-call-answer-ex2-incoming-call-created-typed.json").read_text()
    )
    read = body["value"][0]["resourceData"]
    read["targets"][0]["endpointType"] = "unknownFutureValue"
    read["source"]["endpointType"] = "unknownFutureValue"
    (event,) = parse_body(json.dumps(body).encode())
    assert isinstance(event, events.IncomingCall)
    (me,) = event.call.targets or []
    caller = event.call.source
    assert caller is not None
    assert (me.endpoint_type, caller.endpoint_type) == ("unknownFutureValue",) * 2
    voicemail = me.model_copy(update={"endpoint_type": "voicemail"})

    await services.create_call(Target.phone("+12345678901"), source=me)
    call = services.call(CALL_ID)
    await call.participants.invite(me, voicemail)
    await call.transfer(Target.user(PARTICIPANT_ID), transferee=caller)
    raw = {"@odata.type": INVITATION, "identity": read["targets"][0]["identity"]}
    await call.redirect({**raw, "endpointType": "unknownFutureValue"})

    source = (await graph.wait_for_request("createCall")).json["source"]
    invited = (await graph.wait_for_request("invite")).json["participants"]
    (transferee,) = [json.loads(r.body)["transferee"] for r in graph.requests_for("transfer")]
    (redirected,) = (await graph.wait_for_request("redirect")).json["targets"]
    assert "endpointType" not in source
    assert [i.get("endpointType") for i in invited] == [None, "voicemail"]
    assert "endpointType" not in transferee
    assert redirected["endpointType"] == "unknownFutureValue"  # the author's own dict
    assert source["identity"] == invited[0]["identity"] == raw["identity"]
    # In a list of enum values, the value alone is left out.
    modalities = models.Call(requested_modalities=["audio", "unknownFutureValue", "video"])
    assert dump(modalities) == {"requestedModalities": ["audio", "video"]}


async def test_a_roster_participant_is_no_target_and_says_what_is(
    graph: FakeGraph, services: CallServices
) -> None:
    """Any model but the two participant types went as itself: a roster's participant as a
    participant resource (media streams and all) where Graph takes an invitation. It is
    refused before Graph hears of it, naming the participant's ``info``."""
    participant = models.Participant.model_validate(
        {"id": PARTICIPANT_ID, "info": {"identity": {"user": {"id": "u1"}}}}
    )
    with pytest.raises(TypeError, match=r"a participant's is its \.info\), not Participant"):
        await services.call(CALL_ID).transfer(participant)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not IdentitySet"):
        await services.call(CALL_ID).participants.invite(participant.info.identity)  # type: ignore[arg-type, union-attr]
    assert [r.action for r in graph.requests if r.action != "token"] == []


async def test_generated_client_context_is_a_uuid4(
    graph: FakeGraph, services: CallServices
) -> None:
    op = await services.call(CALL_ID).play_prompt("https://cdn.contoso.com/beep.wav")
    sent = await graph.wait_for_request("playPrompt")
    assert sent.json["clientContext"] == op.client_context
    assert uuid.UUID(op.client_context).version == 4
    assert sent.json["prompts"] == [
        {
            "@odata.type": "#microsoft.graph.mediaPrompt",
            "mediaInfo": {
                "@odata.type": "#microsoft.graph.mediaInfo",
                "uri": "https://cdn.contoso.com/beep.wav",
            },
        }
    ]


async def test_a_looping_prompt_needs_graph_beta(graph: FakeGraph, services: CallServices) -> None:
    """Graph v1.0's playPrompt has no ``loop`` (its schema: prompts and clientContext); sent
    there, the prompt plays once. Only beta loops."""
    call = services.call(CALL_ID)
    with pytest.raises(ValueError, match="beta"):
        await call.play_prompt("https://cdn.contoso.com/hold.wav", loop=True)
    await call.play_prompt("https://cdn.contoso.com/once.wav", loop=False)
    assert "loop" not in (await graph.wait_for_request("playPrompt")).json
    assert len(graph.requests_for("playPrompt")) == 1
    beta = CallServices(
        dataclasses.replace(services.settings, graph_url=graph.beta_url),
        retry=RetryPolicy(total_time=0.5, base_delay=0.01),
    )
    await beta.start()
    try:
        await beta.call(CALL_ID).play_prompt("https://cdn.contoso.com/hold.wav", loop=True)
    finally:
        await beta.close()
    sent = await graph.wait_for_request("playPrompt")
    assert sent.version == "beta"
    assert sent.json["loop"] is True


ONE_STRING_FOR_A_LIST: dict[str, tuple[str, Callable[[CallServices], Awaitable[Any]]]] = {
    "answer": ("modalities", lambda s: s.call(CALL_ID).answer(modalities="audio")),  # type: ignore[arg-type]
    "create_call": (
        "modalities",
        lambda s: s.create_call(Target.user(PARTICIPANT_ID), modalities="audio"),  # type: ignore[arg-type]
    ),
    "redirect": (
        "routing_policies",
        lambda s: s.call(CALL_ID).redirect(
            Target.user(PARTICIPANT_ID),
            routing_policies="disableForwarding",  # type: ignore[arg-type]
        ),
    ),
    "audio_routing_groups.create": (
        "sources",
        lambda s: s.call(CALL_ID).audio_routing_groups.create(
            sources=PARTICIPANT_ID, receivers=[PARTICIPANT_ID]
        ),
    ),
    "audio_routing_groups.update": (
        "receivers",
        lambda s: s.call(CALL_ID).audio_routing_groups.update("g1", receivers=PARTICIPANT_ID),
    ),
}


@pytest.mark.parametrize("action", sorted(ONE_STRING_FOR_A_LIST))
async def test_one_string_where_a_list_is_wanted_is_refused_before_graph(
    graph: FakeGraph, services: CallServices, action: str
) -> None:
    """A string is a sequence of strings to Python and to mypy: ``modalities="audio"`` was
    sent as ``["a", "u", "d", "i", "o"]``, and the simulator took it."""
    name, act = ONE_STRING_FOR_A_LIST[action]
    with pytest.raises(TypeError, match=rf"{name} takes a list of strings, not one: {name}=\["):
        await act(services)
    assert [r.action for r in graph.requests if r.action != "token"] == []


async def test_raw_dicts_are_accepted_everywhere(graph: FakeGraph, services: CallServices) -> None:
    call = services.call(CALL_ID)
    raw_target = {"identity": {"user": {"id": "u1"}}, "endpointType": "default"}
    await call.redirect(raw_target, callback_uri="https://bot.contoso.com/cb")
    assert (await graph.wait_for_request("redirect")).json["targets"] == [raw_target]

    raw_prompt = {"@odata.type": "#microsoft.graph.mediaPrompt", "mediaInfo": {"uri": "u"}}
    await call.play_prompt([raw_prompt, "https://cdn.contoso.com/two.wav"])
    sent = await graph.wait_for_request("playPrompt")
    assert sent.json["prompts"][0] == raw_prompt
    assert sent.json["prompts"][1]["mediaInfo"]["uri"] == "https://cdn.contoso.com/two.wav"

    model_target = models.InvitationParticipantInfo(
        identity=models.IdentitySet(phone=models.Identity(id="+15550100"))
    )
    await call.participants.invite(model_target)
    sent = await graph.wait_for_request("invite")
    assert sent.json["participants"] == [  # a model goes typed as Graph declares it there
        {
            "@odata.type": "#microsoft.graph.invitationParticipantInfo",
            "identity": {"phone": {"id": "+15550100"}},
        }
    ]

    await call.answer(
        media_config={"@odata.type": "#microsoft.graph.appHostedMediaConfig", "blob": "b"},
        call_options={"isDeltaRosterEnabled": True},
        modalities=["audio", "video"],
    )
    sent = await graph.wait_for_request("answer")
    assert sent.json["mediaConfig"] == {
        "@odata.type": "#microsoft.graph.appHostedMediaConfig",
        "blob": "b",
    }
    assert sent.json["callOptions"] == {
        "@odata.type": "#microsoft.graph.incomingCallOptions",
        "isDeltaRosterEnabled": True,
    }
    assert sent.json["acceptedModalities"] == ["audio", "video"]


async def test_answer_defaults_to_service_hosted_audio(
    graph: FakeGraph, services: CallServices
) -> None:
    await services.call(CALL_ID).answer()
    sent = await graph.wait_for_request("answer")
    assert sent.json == {
        "callbackUri": "https://bot.contoso.com/api/calls",
        "acceptedModalities": ["audio"],
        "mediaConfig": {"@odata.type": "#microsoft.graph.serviceHostedMediaConfig"},
    }


async def test_answer_adds_the_prefetch_given_with_a_media_config_to_it(
    graph: FakeGraph, services: CallServices
) -> None:
    """``prefetch=`` given with ``media_config=`` was dropped: the documented answer with
    service-hosted media, its config given as a model and its media as ``prefetch``."""
    await services.call(CALL_ID).answer(
        media_config=models.ServiceHostedMediaConfig(),
        prefetch=DOCUMENTED_PREFETCH,
    )
    sent = await graph.wait_for_request("answer")
    assert sent.json == documented("answer-service-hosted-media")["request"]


async def test_dtmf_keys_and_tone_names(graph: FakeGraph, services: CallServices) -> None:
    call = services.call(CALL_ID)
    await call.send_dtmf_tones(["tone1", "flash"])
    assert (await graph.wait_for_request("sendDtmfTones")).json["tones"] == ["tone1", "flash"]
    with pytest.raises(ValueError, match="DTMF"):
        await call.send_dtmf_tones("12x")


async def test_record_response_stop_tones_are_keys(
    graph: FakeGraph, services: CallServices
) -> None:
    """Graph names the keys that end a recording as keys (``["#", "1"]``), not as tone
    names: a string of keys or a list of keys is sent as a list of keys, anything else is
    refused before Graph hears of it."""
    call = services.call(CALL_ID)
    await call.record_response(stop_tones="#a")
    assert (await graph.wait_for_request("recordResponse")).json["stopTones"] == ["#", "A"]
    await call.record_response(stop_tones=["*", "1"])
    assert (await graph.wait_for_request("recordResponse")).json["stopTones"] == ["*", "1"]
    for wrong in (["pound"], ["#1"], [""], "12x"):
        with pytest.raises(ValueError, match=r"^stop_tones: "):
            await call.record_response(stop_tones=wrong)
    assert len(graph.requests_for("recordResponse")) == 2


async def test_participants_list_get_and_refresh(graph: FakeGraph, services: CallServices) -> None:
    graph.add_call(CALL_ID, state="established", myParticipantId="p-bot")
    added = graph.add_participant(
        CALL_ID,
        {
            "info": {"identity": {"user": {"id": "u1", "displayName": "John"}}},
            "isMuted": True,
            "isInLobby": False,
        },
    )
    call = services.call(CALL_ID)
    participants = await call.participants.list()
    assert [p.id for p in participants] == [added["id"]]
    assert participants[0].is_muted is True
    one = await call.participants.get(added["id"])
    assert one.info is not None
    assert one.info.identity is not None
    assert one.info.identity.user is not None
    assert one.info.identity.user.display_name == "John"

    snapshot = await call.refresh()
    assert snapshot.state == "established"
    assert call.snapshot is snapshot
    assert call.state == "established"
    assert snapshot.my_participant_id == "p-bot"


async def test_audio_routing_groups(graph: FakeGraph, services: CallServices) -> None:
    groups = services.call(CALL_ID).audio_routing_groups
    created = await groups.create(
        id="oneToOne",
        routing_mode="oneToOne",
        sources=["632899f8-2ea1-4604-8413-27bd2892079f"],
        receivers=["550fae72-d251-43ec-868c-373732c2704f"],
    )
    sent = await graph.wait_for_request("createAudioRoutingGroup")
    # the documented create request (call-post-audioroutinggroups, example 1)
    assert sent.json == {
        "id": "oneToOne",
        "routingMode": "oneToOne",
        "sources": ["632899f8-2ea1-4604-8413-27bd2892079f"],
        "receivers": ["550fae72-d251-43ec-868c-373732c2704f"],
    }
    assert created.id == "oneToOne"
    assert created.routing_mode == "oneToOne"
    assert [g.id for g in await groups.list()] == ["oneToOne"]
    updated = await groups.update("oneToOne", receivers=["a", "b"])
    assert updated.receivers == ["a", "b"]
    assert (await graph.wait_for_request("updateAudioRoutingGroup")).method == "PATCH"
    assert (await groups.get("oneToOne")).receivers == ["a", "b"]
    await groups.delete("oneToOne")
    assert await groups.list() == []


async def test_log_device_quality(graph: FakeGraph, services: CallServices) -> None:
    await services.log_device_quality(
        call_chain_id="0622673d-9f69-49b2-9d4f-5ec64a5f8ac7",
        participant_id="ea078c2c-da60-4d5c-bd9a-33d9a8f2e8c8",
        media_leg_id="bd9ee398-4b9d-42c7-8b8d-4e8efad9435f",
        device_name="Jackson's Device",
        device_description="Jackson's Teleconference Device",
        media_quality_list=[{"@odata.type": "#microsoft.graph.teleconferenceDeviceAudioQuality"}],
        cloudServiceName="Contoso Cloud",
    )
    sent = await graph.wait_for_request("logTeleconferenceDeviceQuality")
    assert sent.path == "/communications/calls/logTeleconferenceDeviceQuality"
    assert sent.json == {
        "quality": {
            "callChainId": "0622673d-9f69-49b2-9d4f-5ec64a5f8ac7",
            "participantId": "ea078c2c-da60-4d5c-bd9a-33d9a8f2e8c8",
            "mediaLegId": "bd9ee398-4b9d-42c7-8b8d-4e8efad9435f",
            "deviceName": "Jackson's Device",
            "deviceDescription": "Jackson's Teleconference Device",
            "mediaQualityList": [
                {"@odata.type": "#microsoft.graph.teleconferenceDeviceAudioQuality"}
            ],
            "cloudServiceName": "Contoso Cloud",
        }
    }


async def test_download_recording(graph: FakeGraph, services: CallServices, tmp_path: Path) -> None:
    location, token = graph.add_recording(b"RIFF....WAVEfmt ")
    record = models.RecordOperation(
        id="op", status="completed", recording_location=location, recording_access_token=token
    )
    call = services.call(CALL_ID)
    target = tmp_path / "answer.wav"
    assert await call.download_recording(record) == b"RIFF....WAVEfmt "
    assert await call.download_recording(record, target) == len(b"RIFF....WAVEfmt ")
    assert target.read_bytes() == b"RIFF....WAVEfmt "
    sent = await graph.wait_for_request("recording")
    assert sent.bearer == token
    assert len(graph.requests_for("recording")) == 2
    with pytest.raises(ValueError, match="no recording"):
        await call.download_recording(models.RecordOperation(id="x", status="failed"))
    # Asked for before its outcome came, a recording says what to do.
    running = await call.record_response()
    with pytest.raises(ValueError, match=r"the record operation is \w+; await op.wait\(\) first"):
        await call.download_recording(running)


async def test_the_fake_graph_finds_an_item_by_its_id_in_any_form(
    graph: FakeGraph, services: CallServices
) -> None:
    # callbot compares ids without case or dashes (id_key), and so does Graph's resolver.
    call = services.call(CALL_ID)
    op = await call.play_prompt("https://cdn.contoso.com/beep.wav")
    assert op.id is not None
    found = await call.get_operation(op.id.replace("-", "").upper())
    assert found.id == op.id
    added = graph.add_participant(CALL_ID, {"isMuted": False})
    participant = await call.participants.get(str(added["id"]).replace("-", "").upper())
    assert participant.id == added["id"]


@pytest.mark.parametrize(
    "act",
    [
        lambda c, who: c.participants.mute(who),
        lambda c, who: c.participants.start_hold_music(who),
        lambda c, who: c.participants.stop_hold_music(who),
        lambda c, who: c.participants.get(who),
        lambda c, who: c.participants.remove(who),
    ],
    ids=["mute", "startHoldMusic", "stopHoldMusic", "get", "remove"],
)
async def test_the_fake_graph_acts_only_on_someone_in_the_call(
    graph: FakeGraph, services: CallServices, act: Callable[[Call, str], Awaitable[Any]]
) -> None:
    """A request naming a participant who is not in the call gets Graph's 404, as one about
    a call it does not have does; it used to be answered 2xx, so a test passed that would
    fail against Graph."""
    call = services.call(CALL_ID)
    graph.add_participant(CALL_ID, {"id": PARTICIPANT_ID})
    with pytest.raises(GraphError) as refused:
        await act(call, str(uuid.uuid4()))
    assert refused.value.status == 404
    assert refused.value.code == "NotFound"
    await act(call, PARTICIPANT_ID.upper())  # someone in the call, in any form of the id


def as_noted(noted: list[OwnFact]) -> list[OwnFact]:
    """The facts noted, less what names each ask, once checked: each ask is named apart, and
    a refusal names the ask before it."""
    asks: list[str | None] = []
    for fact in noted:
        if isinstance(fact, TransferAsked):
            assert fact.ask is not None
            assert fact.ask not in asks
            asks.append(fact.ask)
        elif isinstance(fact, TransferRefused):
            assert asks
            assert fact.ask == asks[-1]
    return [
        dataclasses.replace(fact, ask=None)
        if isinstance(fact, TransferAsked | TransferRefused)
        else fact
        for fact in noted
    ]


def asked_to(target: Target) -> TransferAsked:
    """The fact a transfer to ``target`` is noted as: its target as sent."""
    return TransferAsked(
        CALL_ID, models.InvitationParticipantInfo.model_validate(target.invitation_json())
    )


async def test_a_transfer_is_noted_with_its_target_as_sent(
    graph: FakeGraph, services: CallServices
) -> None:
    """The fact a transfer is noted as names its target as the request sent it (the
    ``transferTarget``, with ``replacesCallId`` for a consultative one): its failure names
    it to handlers."""
    noted: list[OwnFact] = []

    async def note(fact: OwnFact) -> None:
        noted.append(fact)

    services.note_with(note)
    await services.call(CALL_ID).transfer(Target.phone("+15551234567"))
    await services.call(CALL_ID).transfer(Target.user("agent-id"), replaces_call_id="other-call")
    sent = [
        json.loads(request.body)["transferTarget"] for request in graph.requests_for("transfer")
    ]
    named = [
        fact.target.model_dump(mode="json", by_alias=True, exclude_unset=True)
        for fact in noted
        if isinstance(fact, TransferAsked) and fact.target is not None
    ]
    assert len(noted) == 2
    assert named == sent
    assert sent[1]["replacesCallId"] == "other-call"


async def test_a_transfer_is_counted_only_when_it_is_sent(
    graph: FakeGraph, services: CallServices
) -> None:
    """A handler run again after a takeover asks its transfer again: the journal answers
    from the first run, which sent and counted it. The re-run counted it a second time, so
    a copy of that transfer's failure reached handlers as news. A transfer is counted only
    when it goes to Graph; one Graph refuses (a 4xx) is settled, so nothing waits for it."""
    noted: list[OwnFact] = []

    async def note(fact: OwnFact) -> None:
        noted.append(fact)

    services.note_with(note)
    journal = _Inbox([])  # a shared store's journal: what the first run recorded
    agent = Target.user("agent-id", "Agent")
    for redelivered in (False, True):
        token = _current.set(Attempt("c", "1-0", 1, redelivered, journal=journal))
        try:
            await services.call(CALL_ID).transfer(agent)
        finally:
            _current.reset(token)
    assert len(graph.requests_for("transfer")) == 1  # the re-run is answered from the journal
    assert as_noted(noted) == [asked_to(agent)]

    graph.fail_next("transfer", 400)
    with pytest.raises(GraphError):
        await services.call(CALL_ID).transfer(agent)
    assert as_noted(noted)[1:] == [asked_to(agent), TransferRefused(CALL_ID)]


async def test_a_transfer_graph_did_not_act_on_is_settled(
    graph: FakeGraph, services: CallServices
) -> None:
    """A transfer answered 503 until the retry budget ran out, or sent nowhere (Graph could
    not be reached), was never carried out: callbot retries a transfer on 503 because Graph
    does not act on it. It stayed counted as asked, so a copy Graph sent again of the next
    transfer's failure was taken for that transfer's news and reached handlers twice. One
    Graph may have carried out (504, a connection lost once sent) stays counted."""
    noted: list[OwnFact] = []

    async def note(fact: OwnFact) -> None:
        noted.append(fact)

    agent = Target.user("agent-id", "Agent")
    services.note_with(note)
    graph.fail_next("transfer", 503, headers={"Retry-After": "120"})  # past the budget
    with pytest.raises(GraphError) as unavailable:
        await services.call(CALL_ID).transfer(agent)
    assert unavailable.value.status == 503
    assert unavailable.value.may_have_acted is False
    assert as_noted(noted) == [asked_to(agent), TransferRefused(CALL_ID)]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nowhere = CallServices(
        dataclasses.replace(services.settings, graph_url=f"http://127.0.0.1:{port}/v1.0"),
        retry=RetryPolicy(total_time=0.05, base_delay=0.01, max_delay=0.02),
    )
    nowhere.note_with(note)
    try:
        with pytest.raises(GraphError) as unreachable:
            await nowhere.call(CALL_ID).transfer(agent)
    finally:
        await nowhere.close()
    assert (unreachable.value.status, unreachable.value.may_have_acted) == (0, False)
    assert as_noted(noted)[2:] == [asked_to(agent), TransferRefused(CALL_ID)]

    graph.fail_next("transfer", 504)
    with pytest.raises(GraphError) as timed_out:
        await services.call(CALL_ID).transfer(agent)
    graph.drop_next("transfer")
    with pytest.raises(GraphError) as cut_off:
        await services.call(CALL_ID).transfer(agent)
    assert timed_out.value.may_have_acted is True
    assert (cut_off.value.status, cut_off.value.may_have_acted) == (0, True)
    assert as_noted(noted)[4:] == [asked_to(agent), asked_to(agent)]
    assert len(graph.requests_for("transfer")) == 3  # none of them sent twice


class _OwnCredential:
    """A credential given in code: its tenant is its own (callbot cannot know it)."""

    def __init__(self, graph: FakeGraph) -> None:
        self._graph = graph

    async def get_token(self, *scopes: str) -> AccessToken:
        token = "own-" + uuid.uuid4().hex
        self._graph.tokens[token] = time.time() + 3600  # FakeGraph checks the wall clock
        return AccessToken(token, int(self._graph.tokens[token]))


async def test_a_placed_call_is_bound_to_the_tenant_its_token_acts_in_when_that_is_known(
    graph: FakeGraph,
) -> None:
    """Graph places a call in the tenant of the token that asked: the settings' tenant_id
    when callbot builds the credential. A credential given in code acts in a tenant of its
    own; binding its calls to tenant_id would refuse their own notifications (403)."""
    settings = graph.settings(public_url="https://bot.contoso.com", callback_path="/api/calls")
    placed: list[str | None] = []

    async def note(fact: OwnFact) -> None:
        assert isinstance(fact, Placed)
        placed.append(fact.tenant_id)

    for credential in (None, _OwnCredential(graph)):
        svc = CallServices(settings, credential=credential)
        svc.note_with(note)
        await svc.start()
        try:
            await svc.create_call(Target.user("callee-id"))
        finally:
            await svc.close()
    assert placed == [settings.tenant_id, None]


async def test_a_transfer_whose_token_could_not_be_had_is_settled(
    graph: FakeGraph, services: CallServices
) -> None:
    """A transfer whose app token the token endpoint would not give never left for Graph,
    yet its GraphError (the token endpoint's 500) said Graph may have acted on it: the
    transfer stayed counted as asked, waiting for news that cannot come."""
    noted: list[OwnFact] = []

    async def note(fact: OwnFact) -> None:
        noted.append(fact)

    services.note_with(note)
    graph.revoke_tokens()  # the token is fetched for this request
    graph.fail_next("token", 500)
    agent = Target.user("agent-id", "Agent")
    with pytest.raises(GraphError) as no_token:
        await services.call(CALL_ID).transfer(agent)
    assert no_token.value.status == 500
    assert no_token.value.may_have_acted is False
    assert graph.requests_for("transfer") == []
    assert as_noted(noted) == [asked_to(agent), TransferRefused(CALL_ID)]


@dataclasses.dataclass(frozen=True)
class EnumArgument:
    """An action argument whose Graph type is an enum: how to send a value, and where the
    request carries it."""

    kind: Any  # the callbot.models alias reading Graph's enum
    takes: Any  # the Literal the action is typed with
    act: Callable[[CallServices, Any], Awaitable[Any]]
    action: str
    sent: Callable[[Any], Any]


ENUM_ARGUMENTS: dict[str, EnumArgument] = {
    "answer(modalities)": EnumArgument(
        models.Modality,
        Modality,
        lambda s, v: s.call(CALL_ID).answer(modalities=[v]),
        "answer",
        lambda body: body["acceptedModalities"][0],
    ),
    "create_call(modalities)": EnumArgument(
        models.Modality,
        Modality,
        lambda s, v: s.create_call(Target.user(PARTICIPANT_ID), modalities=[v]),
        "createCall",
        lambda body: body["requestedModalities"][0],
    ),
    "join_meeting(modalities)": EnumArgument(
        models.Modality,
        Modality,
        lambda s, v: s.join_meeting(Meeting.join_id("1234567890", "pass"), modalities=[v]),
        "createCall",
        lambda body: body["requestedModalities"][0],
    ),
    "reject(reason)": EnumArgument(
        models.RejectReason,
        RejectReason,
        lambda s, v: s.call(CALL_ID).reject(v),
        "reject",
        lambda body: body["reason"],
    ),
    "redirect(routing_policies)": EnumArgument(
        models.RoutingPolicy,
        RoutingPolicy,
        lambda s, v: s.call(CALL_ID).redirect(Target.user(PARTICIPANT_ID), routing_policies=[v]),
        "redirect",
        lambda body: body["routingPolicies"][0],
    ),
    "Target(endpoint_type)": EnumArgument(
        models.EndpointType,
        EndpointType,
        lambda s, v: s.call(CALL_ID).redirect(Target.user(PARTICIPANT_ID, endpoint_type=v)),
        "redirect",
        lambda body: body["targets"][0]["endpointType"],
    ),
    "send_dtmf_tones(tones)": EnumArgument(
        models.Tone,
        ToneName,
        lambda s, v: s.call(CALL_ID).send_dtmf_tones([v]),
        "sendDtmfTones",
        lambda body: body["tones"][0],
    ),
    "change_screen_sharing_role(role)": EnumArgument(
        models.ScreenSharingRole,
        ScreenSharingRole,
        lambda s, v: s.call(CALL_ID).change_screen_sharing_role(v),
        "changeScreenSharingRole",
        lambda body: body["role"],
    ),
    "update_recording_status(status)": EnumArgument(
        models.RecordingStatus,
        RecordingStatus,
        lambda s, v: s.call(CALL_ID).update_recording_status(v),
        "updateRecordingStatus",
        lambda body: body["status"],
    ),
    "audio_routing_groups.create(routing_mode)": EnumArgument(
        models.RoutingMode,
        RoutingMode,
        lambda s, v: s.call(CALL_ID).audio_routing_groups.create(
            sources=[PARTICIPANT_ID], receivers=[PARTICIPANT_ID], routing_mode=v
        ),
        "createAudioRoutingGroup",
        lambda body: body["routingMode"],
    ),
    "audio_routing_groups.update(routing_mode)": EnumArgument(
        models.RoutingMode,
        RoutingMode,
        lambda s, v: s.call(CALL_ID).audio_routing_groups.update("g1", routing_mode=v),
        "updateAudioRoutingGroup",
        lambda body: body["routingMode"],
    ),
}


def _members(kind: Any, *, beta: bool) -> tuple[str, ...]:
    enum = next(meta for meta in get_args(kind) if isinstance(meta, models.GraphEnum))
    return enum.sendable(beta=beta)


def _documented_statuses() -> set[str]:
    """The statuses the documented ``updateRecordingStatus`` takes (``a | b | c``)."""
    return {s.strip() for s in documented("updateRecordingStatus")["request"]["status"].split("|")}


# The requests documenting fewer members than their enum has: the enum is read from
# notifications too (a participant's recordingStatus may be ``unknown``).
FEWER: dict[str, set[str]] = {"updateRecordingStatus": _documented_statuses()}


def _taken(arg: EnumArgument, *, beta: bool) -> tuple[str, ...]:
    """The members of its enum an argument's request takes."""
    documented = FEWER.get(arg.action)
    members = _members(arg.kind, beta=beta)
    return members if documented is None else tuple(m for m in members if m in documented)


async def _sent_as(
    graph: FakeGraph, services: CallServices, argument: EnumArgument, value: str
) -> Any:
    graph.calls[id_key(CALL_ID)].audio_routing_groups["g1"] = {"id": "g1"}
    await argument.act(services, value)
    return argument.sent((await graph.wait_for_request(argument.action)).json)


def _refused_before_graph(graph: FakeGraph, argument: str, value: str) -> str:
    """What a refusal of ``value`` must say: the argument's name and the value; and nothing
    was sent."""
    assert [r.action for r in graph.requests if r.action != "token"] == []
    name = argument.split("(")[1].rstrip(")")
    return rf"^{name}={value!r}"


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        (argument, value)
        for argument, arg in ENUM_ARGUMENTS.items()
        for value in (
            *_members(arg.kind, beta=False),
            "unknownFutureValue",
            _members(arg.kind, beta=False)[0] + "x",
            _members(arg.kind, beta=False)[-1].upper(),
        )
    ],
)
async def test_every_enum_argument_goes_out_as_graph_spells_it_or_is_refused_before_graph(
    graph: FakeGraph, services: CallServices, argument: str, value: str
) -> None:
    """A misspelt member (``reject("declined")``) was sent as given: Graph answers 400, or
    reads it as another. One in any case goes out in Graph's spelling, as callbot reads them."""
    arg = ENUM_ARGUMENTS[argument]
    members = _taken(arg, beta=False)
    spelt = next((m for m in members if m.lower() == value.lower()), None)
    if spelt is None:
        with pytest.raises(ValueError, match=r" is not one of ") as refused:
            await arg.act(services, value)
        assert re.search(_refused_before_graph(graph, argument, value), str(refused.value))
        assert all(repr(member) in str(refused.value) for member in members)
        return
    assert await _sent_as(graph, services, arg, value) == spelt


@pytest.mark.parametrize("argument", sorted(ENUM_ARGUMENTS))
async def test_a_member_only_beta_has_is_sent_on_beta_and_refused_on_v1(
    graph: FakeGraph, services: CallServices, argument: str
) -> None:
    arg = ENUM_ARGUMENTS[argument]
    # what the action is typed to take is what Graph's beta takes
    assert set(get_args(arg.takes)) == set(_taken(arg, beta=True))
    beta_only = sorted(set(_taken(arg, beta=True)) - set(_taken(arg, beta=False)))
    for value in beta_only:
        with pytest.raises(ValueError, match=r"is Graph beta's only") as refused:
            await arg.act(services, value)
        assert re.search(_refused_before_graph(graph, argument, value), str(refused.value))
        beta = CallServices(
            dataclasses.replace(services.settings, graph_url=graph.beta_url),
            retry=RetryPolicy(total_time=0.5, base_delay=0.01),
        )
        await beta.start()
        try:
            assert await _sent_as(graph, beta, arg, value) == value
        finally:
            await beta.close()


@pytest.mark.parametrize("beta", [False, True])
async def test_update_recording_status_takes_only_the_statuses_its_request_documents(
    graph: FakeGraph, services: CallServices, beta: bool
) -> None:
    """``updateRecordingStatus`` documents ``notRecording | recording | failed``, yet the whole
    ``recordingStatus`` enum was taken: ``update_recording_status("unknown")`` went to Graph.
    It is refused before anything is sent, on v1.0 and beta alike, as a misspelt status is."""
    assert _documented_statuses() == {"notRecording", "recording", "failed"}
    if beta:
        services = CallServices(
            dataclasses.replace(services.settings, graph_url=graph.beta_url),
            retry=RetryPolicy(total_time=0.5, base_delay=0.01),
        )
        await services.start()
    try:
        for value in ("unknown", "Unknown", "unknownFutureValue"):
            with pytest.raises(ValueError, match=r"^status=") as refused:
                await services.call(CALL_ID).update_recording_status(value)  # type: ignore[arg-type]
            taken = str(refused.value).partition(" is not one of ")[2]
            assert taken == "'notRecording', 'recording', 'failed'"
        assert [r.action for r in graph.requests if r.action != "token"] == []
        for status in sorted(_documented_statuses()):
            await services.call(CALL_ID).update_recording_status(status)  # type: ignore[arg-type]
            request = await graph.wait_for_request("updateRecordingStatus")
            assert request.json["status"] == status
    finally:
        if beta:
            await services.close()
    assert set(get_args(RecordingStatus)) == _documented_statuses()  # what mypy checks
