"""Placing calls and joining meetings: every documented create-call shape, and join URLs."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from callbot import models
from callbot.graph import CallServices, Meeting, RetryPolicy, Target, media_info, parse_join_url
from callbot.testing import FakeGraph

OPERATIONS = Path(__file__).parent / "fixtures" / "operations"
CALLBACK = "https://bot.contoso.com/callback"
BEEP = media_info(
    "https://cdn.contoso.com/beep.wav", resource_id="f8971b04-b53e-418c-9222-c82ce681a582"
)
COOL = media_info(
    "https://cdn.contoso.com/cool.wav", resource_id="86dc814b-c172-4428-9112-60f8ecae1edb"
)
PREFETCHED = [
    {
        "uri": "https://cdn.contoso.com/beep.wav",
        "resourceId": "f8971b04-b53e-418c-9222-c82ce681a582",
    },
    {
        "uri": "https://cdn.contoso.com/cool.wav",
        "resourceId": "86dc814b-c172-4428-9112-60f8ecae1edb",
    },
]
# the join URL the call resource documentation uses as its example
DOCS_JOIN_URL = (
    "https://teams.microsoft.com/l/meetup-join/"
    "19%3ameeting_NTg0NmQ3NTctZDVkZC00YzRhLThmNmEtOGQ3M2E0ODdmZDZk%40thread.v2/0"
    "?context=%7b%22Tid%22%3a%2272f988bf-86f1-41af-91ab-2d7cd011db47%22%2c%22Oid%22%3a"
    "%224b444206-207c-42f8-92a6-e332b41c88a2%22%7d"
)


def documented_request(name: str) -> dict[str, Any]:
    data = json.loads((OPERATIONS / f"{name}.json").read_text(encoding="utf-8"))
    request: dict[str, Any] = data["request"]
    return request


@pytest.fixture
async def services(graph: FakeGraph) -> AsyncIterator[CallServices]:
    settings = graph.settings(public_url="https://bot.contoso.com", callback_path="/callback")
    svc = CallServices(settings, retry=RetryPolicy(total_time=1.0, base_delay=0.01))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


async def test_documented_peer_to_peer_call(graph: FakeGraph, services: CallServices) -> None:
    call = await services.create_call(
        Target.user("112f7296-5fa4-42ca-bae8-6a692b15d4b8", "John"),
        content_sharing_notifications=True,
    )
    sent = await graph.wait_for_request("createCall")
    assert sent.method == "POST"
    assert sent.path == "/communications/calls"
    assert sent.json == documented_request("create-call")
    assert graph.answer_to(sent).status == 201
    # the handle is the created call's, with its snapshot and its own scenario
    assert call.id == graph.answer_to(sent).body["id"]
    assert call.state == "establishing"
    assert call.snapshot is not None
    assert call.snapshot.direction == "outgoing"
    assert services.call(call.id.upper()) == call
    assert sent.scenario_id == call.scenario_id


SCHEDULED_TENANT = "86dc81db-c112-4228-9222-63f3esaa1edb"
SCHEDULED_MEETING = Meeting.thread(
    "19:meeting_Win6Ydo4wsMijFjZS00ZGVjLTk5MGUtOTRjNWY2NmNkYTFm@thread.v2",
    organizer=Target.user("5810cede-f3cc-42eb-b2c1-e9bd5d53ec96", "Bob", SCHEDULED_TENANT),
    tenant_id=SCHEDULED_TENANT,
    allow_conversation_without_host=True,
)
"""The documented scheduled meeting a bot joins."""


async def test_documented_scheduled_meeting_join(graph: FakeGraph, services: CallServices) -> None:
    await services.join_meeting(
        SCHEDULED_MEETING,
        prefetch=[BEEP, COOL],
    )
    sent = await graph.wait_for_request("createCall")
    assert sent.json == documented_request("create-call-join-scheduled-meeting")


async def test_pstn_call_from_an_application_instance(
    graph: FakeGraph, services: CallServices
) -> None:
    # application-post-calls, example 9 (nulls the example sends are left out)
    await services.create_call(
        Target.phone("+12345678901"),
        source=Target.application_instance("3d913abb-aec0-4964-8fa6-3c6850c4f278", "Calling Bot"),
        tenant_id="aa67bd4c-8475-432d-bd41-39f255720e0a",
    )
    sent = await graph.wait_for_request("createCall")
    assert sent.json == {
        "@odata.type": "#microsoft.graph.call",
        "callbackUri": CALLBACK,
        "source": {
            "@odata.type": "#microsoft.graph.participantInfo",
            "identity": {
                "@odata.type": "#microsoft.graph.identitySet",
                "applicationInstance": {
                    "@odata.type": "#microsoft.graph.identity",
                    "displayName": "Calling Bot",
                    "id": "3d913abb-aec0-4964-8fa6-3c6850c4f278",
                },
            },
        },
        "targets": [
            {
                "@odata.type": "#microsoft.graph.invitationParticipantInfo",
                "identity": {
                    "@odata.type": "#microsoft.graph.identitySet",
                    "phone": {"@odata.type": "#microsoft.graph.identity", "id": "+12345678901"},
                },
            }
        ],
        "requestedModalities": ["audio"],
        "mediaConfig": {"@odata.type": "#microsoft.graph.serviceHostedMediaConfig"},
        "tenantId": "aa67bd4c-8475-432d-bd41-39f255720e0a",
    }


async def test_group_call_with_app_hosted_media(graph: FakeGraph, services: CallServices) -> None:
    # application-post-calls, example 4 (example 3 differs only in the media type)
    await services.create_call(
        Target.user("98da8a1a-1b87-452c-a713-65d3f10b5555", "user1"),
        Target.user("bf5aae9a-d11d-47a8-93b1-782504c95555", "user2"),
        source=Target.application("dd3885da-f9ab-486b-bfae-85de3d445555", "TestBot"),
        subject="Create a group call with application hosted media",
        media_config={
            "@odata.type": "#microsoft.graph.appHostedMediaConfig",
            "removeFromDefaultAudioGroup": False,
        },
        extra={"direction": "outgoing"},
    )
    sent = await graph.wait_for_request("createCall")

    def user(user_id: str, name: str) -> dict[str, Any]:
        return {
            "@odata.type": "#microsoft.graph.invitationParticipantInfo",
            "identity": {
                "@odata.type": "#microsoft.graph.identitySet",
                "user": {
                    "@odata.type": "#microsoft.graph.identity",
                    "displayName": name,
                    "id": user_id,
                },
            },
        }

    assert sent.json == {
        "@odata.type": "#microsoft.graph.call",
        "direction": "outgoing",
        "subject": "Create a group call with application hosted media",
        "callbackUri": CALLBACK,
        "source": {
            "@odata.type": "#microsoft.graph.participantInfo",
            "identity": {
                "@odata.type": "#microsoft.graph.identitySet",
                "application": {
                    "@odata.type": "#microsoft.graph.identity",
                    "displayName": "TestBot",
                    "id": "dd3885da-f9ab-486b-bfae-85de3d445555",
                },
            },
        },
        "targets": [
            user("98da8a1a-1b87-452c-a713-65d3f10b5555", "user1"),
            user("bf5aae9a-d11d-47a8-93b1-782504c95555", "user2"),
        ],
        "requestedModalities": ["audio"],
        "mediaConfig": {
            "@odata.type": "#microsoft.graph.appHostedMediaConfig",
            "removeFromDefaultAudioGroup": False,
        },
    }


async def test_group_call_keyword_media_options(graph: FakeGraph, services: CallServices) -> None:
    await services.create_call(
        Target.user("u1"),
        Target.user("u2"),
        remove_from_default_audio_group=False,
        modalities=["audio", "video"],
        delta_roster=True,
        hide_bot_after_escalation=True,
    )
    sent = await graph.wait_for_request("createCall")
    assert sent.json["mediaConfig"] == {
        "@odata.type": "#microsoft.graph.serviceHostedMediaConfig",
        "removeFromDefaultAudioGroup": False,
    }
    assert sent.json["requestedModalities"] == ["audio", "video"]
    assert sent.json["callOptions"] == {
        "@odata.type": "#microsoft.graph.outgoingCallOptions",
        "isDeltaRosterEnabled": True,
        "hideBotAfterEscalation": True,
    }


async def test_peer_to_peer_app_hosted(graph: FakeGraph, services: CallServices) -> None:
    # application-post-calls, example 2
    await services.create_call(
        Target.user("112f7296-5fa4-42ca-bae8-6a692b15d4b8", "John"),
        source=Target.application("2891555a-92ff-42e6-80fa-6e1300c6b5c6", "Calling Bot"),
        app_hosted_media="<Media Session Configuration>",
    )
    sent = await graph.wait_for_request("createCall")
    assert sent.json["mediaConfig"] == {
        "@odata.type": "#microsoft.graph.appHostedMediaConfig",
        "blob": "<Media Session Configuration>",
    }
    assert sent.json["source"]["identity"]["application"]["id"] == (
        "2891555a-92ff-42e6-80fa-6e1300c6b5c6"
    )


async def test_a_media_config_takes_the_prefetch_given_with_it(
    graph: FakeGraph, services: CallServices
) -> None:
    """``prefetch=`` given with ``media_config=`` was dropped: the config went as given. A
    service-hosted config pre-fetches its own media, then those given: the documented join
    of a scheduled meeting, its media given so."""
    await services.join_meeting(
        SCHEDULED_MEETING,
        media_config=models.ServiceHostedMediaConfig(pre_fetch_media=[BEEP]),
        prefetch=[COOL],
    )
    sent = await graph.wait_for_request("createCall")
    assert sent.json == documented_request("create-call-join-scheduled-meeting")


async def test_remove_from_default_audio_group_is_set_over_a_media_config(
    graph: FakeGraph, services: CallServices
) -> None:
    """``remove_from_default_audio_group=`` given with ``media_config=`` was dropped. It is
    set over the config, whatever its type, as ``call_options``' flags are set over
    ``call_options``: over the config's own value too."""
    app_hosted = {
        "@odata.type": "#microsoft.graph.appHostedMediaConfig",
        "blob": "<Media Session Configuration>",
        "removeFromDefaultAudioGroup": False,
    }
    await services.create_call(
        Target.user("u1"), media_config=app_hosted, remove_from_default_audio_group=True
    )
    await services.create_call(
        Target.user("u1"),
        media_config=models.ServiceHostedMediaConfig(pre_fetch_media=[BEEP]),
        remove_from_default_audio_group=False,
    )
    sent = [json.loads(r.body)["mediaConfig"] for r in graph.requests_for("createCall")]
    assert sent == [
        {**app_hosted, "removeFromDefaultAudioGroup": True},
        {
            "@odata.type": "#microsoft.graph.serviceHostedMediaConfig",
            "preFetchMedia": PREFETCHED[:1],
            "removeFromDefaultAudioGroup": False,
        },
    ]
    assert app_hosted["removeFromDefaultAudioGroup"] is False  # the caller's dict is its own


REFUSED_WITH_A_MEDIA_CONFIG: dict[str, tuple[str, Callable[[CallServices], Awaitable[Any]]]] = {
    "prefetch with app-hosted media": (
        r"prefetch= is for service-hosted media: media_config= is "
        r"#microsoft\.graph\.appHostedMediaConfig",
        lambda s: s.create_call(
            Target.user("u1"),
            media_config=models.AppHostedMediaConfig(blob="<blob>"),
            prefetch=[BEEP],
        ),
    ),
    "prefetch with an untyped config": (
        r"prefetch= is for service-hosted media: media_config= is untyped",
        lambda s: s.join_meeting(DOCS_JOIN_URL, media_config={"blob": "<blob>"}, prefetch=[COOL]),
    ),
    "app_hosted_media with a config": (
        r"app_hosted_media= and media_config= are two media configs",
        lambda s: s.create_call(
            Target.user("u1"),
            app_hosted_media="<blob>",
            media_config=models.ServiceHostedMediaConfig(),
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_WITH_A_MEDIA_CONFIG))
async def test_a_media_argument_that_does_not_apply_to_the_media_config_is_refused(
    graph: FakeGraph, services: CallServices, case: str
) -> None:
    """``prefetch=`` with a config that is not service-hosted, or ``app_hosted_media=`` with
    any (two configs), would be dropped as the config goes: refused before Graph hears of
    it, naming both arguments."""
    message, act = REFUSED_WITH_A_MEDIA_CONFIG[case]
    with pytest.raises(ValueError, match=message):
        await act(services)
    assert graph.requests_for("createCall") == []


@pytest.mark.parametrize("passcode", ["psw123", None])
async def test_join_by_meeting_id(
    graph: FakeGraph, services: CallServices, passcode: str | None
) -> None:
    # application-post-calls, examples 7 and 8
    await services.join_meeting(
        Meeting.join_id("1234567", passcode, tenant_id="86dc81db-c112-4228-9222-63f3esaa1edb"),
        prefetch=[BEEP, COOL],
    )
    sent = await graph.wait_for_request("createCall")
    meeting_info: dict[str, Any] = {
        "@odata.type": "#microsoft.graph.joinMeetingIdMeetingInfo",
        "joinMeetingId": "1234567",
    }
    if passcode is not None:
        meeting_info["passcode"] = passcode
    assert sent.json == {
        "@odata.type": "#microsoft.graph.call",
        "callbackUri": CALLBACK,
        "requestedModalities": ["audio"],
        "mediaConfig": {
            "@odata.type": "#microsoft.graph.serviceHostedMediaConfig",
            "preFetchMedia": PREFETCHED,
        },
        "meetingInfo": meeting_info,
        "tenantId": "86dc81db-c112-4228-9222-63f3esaa1edb",
    }


async def test_join_channel_meeting_as_guest(graph: FakeGraph, services: CallServices) -> None:
    # beta application-post-calls, example 8 (channel meeting, guest identity)
    await services.join_meeting(
        Meeting.thread(
            "19:cbee7c1c860e465f8258e3cebf7bee0d@thread.skype",
            message_id="1533758867081",
            organizer=Target.user(
                "5810cede-f3cc-42eb-b2c1-e9bd5d53ec96",
                "Bob",
                "aa67bd4c-8475-432d-bd41-39f255720e0a",
            ),
            allow_conversation_without_host=True,
        ),
        source=Target.guest("d7a3b999-17ac-4bca-9e77-e6a730d2ec2e", "Guest User"),
        prefetch=[BEEP, COOL],
    )
    sent = await graph.wait_for_request("createCall")
    assert sent.json["source"] == {
        "@odata.type": "#microsoft.graph.participantInfo",
        "identity": {
            "@odata.type": "#microsoft.graph.identitySet",
            "guest": {
                "@odata.type": "#microsoft.graph.identity",
                "displayName": "Guest User",
                "id": "d7a3b999-17ac-4bca-9e77-e6a730d2ec2e",
            },
        },
    }
    assert sent.json["chatInfo"] == {
        "@odata.type": "#microsoft.graph.chatInfo",
        "threadId": "19:cbee7c1c860e465f8258e3cebf7bee0d@thread.skype",
        "messageId": "1533758867081",
    }
    assert "tenantId" not in sent.json


async def test_join_from_a_teams_url(graph: FakeGraph, services: CallServices) -> None:
    await services.join_meeting(DOCS_JOIN_URL)
    sent = await graph.wait_for_request("createCall")
    assert sent.json["chatInfo"] == {
        "@odata.type": "#microsoft.graph.chatInfo",
        "threadId": "19:meeting_NTg0NmQ3NTctZDVkZC00YzRhLThmNmEtOGQ3M2E0ODdmZDZk@thread.v2",
        "messageId": "0",
    }
    assert sent.json["meetingInfo"] == {
        "@odata.type": "#microsoft.graph.organizerMeetingInfo",
        "organizer": {
            "@odata.type": "#microsoft.graph.identitySet",
            "user": {
                "@odata.type": "#microsoft.graph.identity",
                "id": "4b444206-207c-42f8-92a6-e332b41c88a2",
                "tenantId": "72f988bf-86f1-41af-91ab-2d7cd011db47",
            },
        },
    }
    assert sent.json["tenantId"] == "72f988bf-86f1-41af-91ab-2d7cd011db47"


async def test_join_with_raw_chat_and_meeting_info(
    graph: FakeGraph, services: CallServices
) -> None:
    chat = {"threadId": "19:abc@thread.v2", "messageId": "0"}
    meeting = {"@odata.type": "#microsoft.graph.tokenMeetingInfo", "token": "t0k3n"}
    await services.join_meeting(chat_info=chat, meeting_info=meeting, tenant_id="t1")
    sent = await graph.wait_for_request("createCall")
    assert (sent.json["chatInfo"], sent.json["meetingInfo"]) == (chat, meeting)
    assert sent.json["tenantId"] == "t1"
    await services.join_meeting(Meeting.from_token("t0k3n"))
    sent = await graph.wait_for_request("createCall")
    assert sent.json["meetingInfo"] == meeting
    assert "chatInfo" not in sent.json


async def test_create_call_needs_someone(services: CallServices) -> None:
    with pytest.raises(ValueError, match="target or a meeting"):
        await services.create_call()
    with pytest.raises(ValueError, match="join URL"):
        await services.join_meeting()


def test_parse_documented_join_url() -> None:
    meeting = parse_join_url(DOCS_JOIN_URL)
    assert meeting.thread_id == (
        "19:meeting_NTg0NmQ3NTctZDVkZC00YzRhLThmNmEtOGQ3M2E0ODdmZDZk@thread.v2"
    )
    assert meeting.message_id == "0"
    assert meeting.reply_chain_message_id is None
    assert meeting.tenant_id == "72f988bf-86f1-41af-91ab-2d7cd011db47"
    assert meeting.organizer == Target.user(
        "4b444206-207c-42f8-92a6-e332b41c88a2", tenant_id="72f988bf-86f1-41af-91ab-2d7cd011db47"
    )
    assert Meeting.from_url(DOCS_JOIN_URL) == meeting


def test_parse_channel_meeting_url() -> None:
    context = json.dumps(
        {
            "Tid": "aa67bd4c-8475-432d-bd41-39f255720e0a",
            "Oid": "5810cede-f3cc-42eb-b2c1-e9bd5d53ec96",
            "MessageId": "1533758867081",
        },
        separators=(",", ":"),
    )
    url = (
        "https://teams.microsoft.com/l/meetup-join/"
        + quote("19:cbee7c1c860e465f8258e3cebf7bee0d@thread.skype", safe="")
        + "/1533758867081?context="
        + quote(context, safe="")
        + "&anon=true"
    )
    meeting = parse_join_url(url)
    assert meeting.thread_id == "19:cbee7c1c860e465f8258e3cebf7bee0d@thread.skype"
    assert meeting.message_id == "1533758867081"
    assert meeting.reply_chain_message_id == "1533758867081"
    assert meeting.chat_info_json() == {
        "@odata.type": "#microsoft.graph.chatInfo",
        "threadId": "19:cbee7c1c860e465f8258e3cebf7bee0d@thread.skype",
        "messageId": "1533758867081",
        "replyChainMessageId": "1533758867081",
    }


def test_parse_other_url_shapes() -> None:
    # upper-case escapes, as newer clients write them
    upper = DOCS_JOIN_URL.replace("%3a", "%3A").replace("%40", "%40").replace("%7b", "%7B")
    assert parse_join_url(upper).organizer is not None
    # Safe Links wrapping in e-mail
    wrapped = (
        "https://nam06.safelinks.protection.outlook.com/?url="
        + quote(DOCS_JOIN_URL, safe="")
        + "&data=05%7C01&reserved=0"
    )
    assert parse_join_url(wrapped) == parse_join_url(DOCS_JOIN_URL)
    # the short form with a meeting id and passcode
    short = parse_join_url("https://teams.microsoft.com/meet/2487612934?p=Xk3hQ9")
    assert (short.join_meeting_id, short.passcode) == ("2487612934", "Xk3hQ9")
    assert short.meeting_info_json() == {
        "@odata.type": "#microsoft.graph.joinMeetingIdMeetingInfo",
        "joinMeetingId": "2487612934",
        "passcode": "Xk3hQ9",
    }


def test_parse_the_addresses_the_teams_web_client_shows() -> None:
    # Opening a join link in a browser goes through the launcher page, whose ``url`` names the
    # web client's address of the link, which has it after the ``#`` (Microsoft's samples
    # take either).
    link = DOCS_JOIN_URL.removeprefix("https://teams.microsoft.com")
    web = "https://teams.microsoft.com/_#" + link + "&anon=true"
    launcher = (
        "https://teams.microsoft.com/dl/launcher/launcher.html?url="
        + quote("/_#" + link + "&anon=true", safe="")
        + "&type=meetup-join&deeplinkId=d1&directDl=true&msLaunch=true&enableMobilePage=true"
    )
    new_client = "https://teams.microsoft.com/v2/?meetingjoin=true#" + link
    for url in (web, launcher, new_client):
        assert parse_join_url(url) == parse_join_url(DOCS_JOIN_URL), url


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/not/a/meeting",
        "https://teams.microsoft.com/l/meetup-join/",
        "https://teams.microsoft.com/l/meetup-join/19%3ameeting_x%40thread.v2/0",
        "https://teams.microsoft.com/l/meetup-join/19%3ameeting_x%40thread.v2/0?context=nope",
        "https://teams.microsoft.com/l/meetup-join/19%3ameeting_x%40thread.v2/0"
        "?context=%7b%22Tid%22%3a%22t%22%7d",
    ],
)
def test_bad_join_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"join URL|Teams meeting"):
        parse_join_url(url)


def test_meeting_needs_a_name() -> None:
    with pytest.raises(ValueError, match="organizer"):
        Meeting().meeting_info_json()
    assert Meeting.thread("19:x@thread.v2", organizer="o1", tenant_id="t1").organizer == (
        Target.user("o1", tenant_id="t1")
    )


@pytest.mark.parametrize(
    "url",
    [
        DOCS_JOIN_URL.replace("teams.microsoft.com", "teams.evil.example"),
        DOCS_JOIN_URL.replace("teams.microsoft.com", "teams.microsoft.com.evil.example"),
        DOCS_JOIN_URL.replace("teams.microsoft.com", "teams.microsoft.com@evil.example"),
        DOCS_JOIN_URL.replace("https://", "http://"),
        "https://evil.example/meet/2487612934?p=Xk3hQ9",
        "https://nam06.safelinks.protection.outlook.com/?url="
        + quote("https://evil.example/meet/2487612934", safe=""),
        "teams.microsoft.com/meet/2487612934",
    ],
)
def test_a_join_url_off_teams_is_refused_naming_its_host(url: str) -> None:
    # A join URL pasted into a chat names its meeting by the path: another host is no Teams link.
    with pytest.raises(ValueError, match=r"not a Teams join URL: (host|scheme) "):
        parse_join_url(url)
    with pytest.raises(ValueError, match="not a Teams join URL"):
        Meeting.from_url(url)


@pytest.mark.parametrize(
    "host",
    [
        "teams.microsoft.com",
        "TEAMS.Microsoft.com.",
        "teams.cloud.microsoft",
        "teams.live.com",
        "gov.teams.microsoft.us",
        "dod.teams.microsoft.us",
        "teams.microsoftonline.cn",
    ],
)
def test_join_urls_of_every_teams_cloud_are_read(host: str) -> None:
    url = DOCS_JOIN_URL.replace("teams.microsoft.com", host)
    assert parse_join_url(url) == parse_join_url(DOCS_JOIN_URL)
    short = parse_join_url(f"https://{host}/meet/2487612934?p=Xk3hQ9")
    assert (short.join_meeting_id, short.passcode) == ("2487612934", "Xk3hQ9")


def test_a_join_url_of_another_host_is_read_when_its_host_is_listed() -> None:
    url = DOCS_JOIN_URL.replace("teams.microsoft.com", "teams.contoso.example")
    with pytest.raises(ValueError, match=re.escape("'teams.contoso.example'")):
        parse_join_url(url)
    for hosts in ({"teams.contoso.example"}, {"*.contoso.example"}):
        assert parse_join_url(url, hosts=hosts) == parse_join_url(DOCS_JOIN_URL)
        assert Meeting.from_url(url, hosts=hosts) == parse_join_url(DOCS_JOIN_URL)
    # The list replaces Teams' own hosts; "*." matches subdomains, not the domain itself.
    with pytest.raises(ValueError, match=re.escape("'teams.microsoft.com'")):
        parse_join_url(DOCS_JOIN_URL, hosts={"teams.contoso.example"})
    with pytest.raises(ValueError, match=re.escape("'contoso.example'")):
        parse_join_url(url.replace("teams.contoso", "contoso"), hosts={"*.contoso.example"})


async def test_join_meeting_refuses_a_join_url_off_teams_before_sending(
    graph: FakeGraph, services: CallServices
) -> None:
    with pytest.raises(ValueError, match=re.escape("'teams.evil.example'")):
        await services.join_meeting(
            DOCS_JOIN_URL.replace("teams.microsoft.com", "teams.evil.example")
        )
    assert graph.requests_for("createCall") == []


def test_a_browser_s_address_of_a_join_link_is_held_to_teams_hosts() -> None:
    """The launcher page and the web client name the meeting in their query or fragment:
    the page's own host is what is checked, and a launcher sending elsewhere is refused."""
    page = "https://teams.evil.example/dl/launcher/launcher.html?url=" + quote(
        "/_#/l/meetup-join/19%3ameeting_x%40thread.v2/0", safe=""
    )
    with pytest.raises(ValueError, match=re.escape("'teams.evil.example'")):
        parse_join_url(page)
    away = "https://teams.microsoft.com/dl/launcher/launcher.html?url=" + quote(
        DOCS_JOIN_URL.replace("teams.microsoft.com", "teams.evil.example"), safe=""
    )
    with pytest.raises(ValueError, match=re.escape("'teams.evil.example'")):
        parse_join_url(away)


def test_a_join_url_wrapped_in_safe_links_again_and_again_is_refused() -> None:
    wrapped = DOCS_JOIN_URL
    for _ in range(4):  # as many as are unwrapped
        wrapped = "https://nam06.safelinks.protection.outlook.com/?url=" + quote(wrapped, safe="")
    assert parse_join_url(wrapped) == parse_join_url(DOCS_JOIN_URL)
    wrapped = "https://nam06.safelinks.protection.outlook.com/?url=" + quote(wrapped, safe="")
    with pytest.raises(ValueError, match="wrapped more than 4 times"):
        parse_join_url(wrapped)
    # 1,000 wrappings left unescaped fit in 48 KB: unwrapped one call deeper each, the
    # stack ran out (RecursionError, not the ValueError a caller catches).
    unescaped = "https://teams.microsoft.com/meet/2487612934"
    for _ in range(1000):
        unescaped = "https://a.safelinks.protection.outlook.com/?url=" + unescaped
    with pytest.raises(ValueError, match="wrapped more than 4 times"):
        parse_join_url(unescaped)
