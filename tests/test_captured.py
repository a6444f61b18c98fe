"""Requests that live bots received from Graph, as people pasted them into GitHub issues.

``fixtures/captured/MANIFEST.md`` names the issue, who posted it and when. Each capture
is fed as it was pasted: a whole body through the real HTTP path with the headers it
came with, a header block with a recorded body of the same kind, and the tail of a body
(all an issue's text showed of it) through the models. Nothing a capture carries may be
refused, lost, or left untyped.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from structlog.testing import capture_logs

from callbot import Call, CallBot, events, models

from .conftest import FIXTURES, BotServer, make_bot, until
from .test_models_recorded import _extras

CAPTURED = FIXTURES / "captured"
RECORDED = FIXTURES / "recorded"

# Sent by the test itself: the token is minted here and the length is the body's own.
_NOT_REPLAYED = frozenset({"authorization", "content-length"})
# The SDK's request log labels the request line and the header block so; neither is a header.
_LOG_LABELS = frozenset({"request", "headers"})
_HEADER_LINE = re.compile(r"\s*([A-Za-z][A-Za-z0-9-]*):\s+(.*)")
_PROPERTY_NAME = re.compile(r'\s*"([^"]+)"\s*:\s*')
_SEPARATOR = re.compile(r"\s*,?")


def captured_headers(name: str) -> dict[str, str]:
    """A captured header block as pasted (``Name: value`` lines, indented or not; the
    request line and a log's ``headers:`` label are not headers), minus what is not
    replayed."""
    headers: dict[str, str] = {}
    for line in (CAPTURED / name).read_text(encoding="utf-8").splitlines():
        match = _HEADER_LINE.fullmatch(line)
        if match and match.group(1).lower() not in _NOT_REPLAYED | _LOG_LABELS:
            headers[match.group(1)] = match.group(2)
    return headers


def call_tail(name: str) -> dict[str, Any]:
    """The call properties a captured body's tail holds, read one by one as pasted up to the
    brace that closes the call."""
    text = (CAPTURED / name).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    properties: dict[str, Any] = {}
    position = 0
    while True:
        match = _PROPERTY_NAME.match(text, position)
        if match is None:
            break
        value, position = decoder.raw_decode(text, match.end())
        properties[match.group(1)] = value
        separator = _SEPARATOR.match(text, position)
        assert separator is not None  # it matches the empty string
        position = separator.end()
    assert text[position:].lstrip().startswith("}"), "the tail must end with the call"
    return properties


def watching_bot(authority: Any, **options: Any) -> tuple[CallBot, list[events.Event]]:
    bot = make_bot(authority, reorder_window=0.05, **options)
    seen: list[events.Event] = []

    @bot.on(events.Event)
    async def everything(call: Call, event: events.Event) -> None:
        seen.append(event)

    return bot, seen


async def delivered(seen: list[events.Event], count: int) -> None:
    await until(lambda: len(seen) >= count, within=10.0)


def manifest_files() -> set[str]:
    text = (CAPTURED / "MANIFEST.md").read_text(encoding="utf-8")
    return set(re.findall(r"`([\w.-]+\.(?:json|headers|txt))`", text))


# -- whole bodies, with the headers they came with --------------------------------------------


async def post_captured(server: BotServer, name: str) -> Any:
    """A captured body as pasted, with the headers captured with it."""
    body = (CAPTURED / f"{name}.json").read_bytes()
    return await server.post(None, raw=body, headers=captured_headers(f"{name}.headers"))


async def test_a_meeting_call_establishing_with_its_chat_and_organizer(
    authority: Any, serve: Any
) -> None:
    """comms-samples #95 (2019): the older path only (``/app/calls``), and the meeting's chat
    and organizer arriving with ``establishing``; the organizer's tenant was masked by the
    logger that printed it."""
    bot, seen = watching_bot(authority)
    server = await serve(bot)
    response = await post_captured(server, "gh-comms-samples-95-2019-establishing")
    assert response.status == 202
    await delivered(seen, 1)
    [event] = seen
    assert isinstance(event, events.CallStateChanged)
    assert event.state == "establishing"
    assert event.change_type == "updated"
    assert event.call_id == "441f1100-ccbf-4b11-8469-7ccb5b03d033"
    assert event.resource_url == "/communications/calls/441f1100-ccbf-4b11-8469-7ccb5b03d033"
    assert event.call.id == event.call_id
    assert event.call.chat_info is not None
    assert event.call.chat_info.thread_id == (
        "19:meeting_NDM3MjEwNTMtODg2Ni00MTc4LWE2ZTAtMDQ4YWFlOWE2Y2Iw@thread.v2"
    )
    assert event.call.chat_info.message_id == "0"
    meeting = event.call.meeting_info
    assert isinstance(meeting, models.OrganizerMeetingInfo)
    assert meeting.organizer is not None
    assert meeting.organizer.user is not None
    assert meeting.organizer.user.id == "3cbceccb-6bbe-4dc0-b4cb-b171df0161cf"
    assert meeting.organizer.user.tenant_id == "(Generic: E5hq0Qsx)"
    assert _extras(event.call, "call") == []


async def test_a_body_written_with_capitalised_enum_values(authority: Any, serve: Any) -> None:
    """comms-samples #632 (2023): ``changeType`` ``Updated`` and ``state`` ``Establishing``
    in one body, with a chain id and no call id in the data; labelled
    ``application/json`` without a charset."""
    bot, seen = watching_bot(authority)
    server = await serve(bot)
    response = await post_captured(server, "gh-comms-samples-632-2023-establishing")
    assert response.status == 202
    await delivered(seen, 1)
    [event] = seen
    assert isinstance(event, events.CallStateChanged)
    assert event.state == "establishing"
    assert event.change_type == "updated"
    assert event.resource_url == "/communications/calls/671f6600-14dc-4bb2-924e-24226a414f9d"
    assert event.call.id is None
    assert event.call.call_chain_id == "58b6e2d6-2bf9-4f64-aa1e-ab5e0ec8cfb4"
    assert event.call.chat_info is not None
    assert event.call.chat_info.thread_id == "(redactedMeetingThreadId)"
    assert isinstance(event.call.meeting_info, models.OrganizerMeetingInfo)
    assert _extras(event.call, "call") == []


async def test_the_captured_legacy_body_asks_for_a_resend(authority: Any, serve: Any) -> None:
    """graph-docs #8310 (2020): a bot registered for the calling format that predates Graph
    got this incoming call; it is answered 204 so the platform sends it again in Graph's
    format, and no handler sees it."""
    bot, seen = watching_bot(authority)
    server = await serve(bot)
    body = (CAPTURED / "gh-graph-docs-8310-2020-legacy-incoming.json").read_bytes()
    response = await server.post(None, raw=body)
    assert response.status == 204
    assert bot.receiver.counts["resend_requested", "legacy_format"] == 1
    assert seen == []


# -- header blocks ----------------------------------------------------------------------------

# Each header block with a recorded body of the kind its request carried.
HEADER_BLOCKS = {
    # A Microsoft engineer's capture of the tone notifications a bot received (2018).
    "gh-comms-samples-23-kanchm-2018-request.headers": (
        "sb04-p2p-simpletest-p2ptest1event4tonepress.json",
        events.ToneReceived,
    ),
    # A policy-recording bot's incoming calls (2020, 2023), behind a proxy.
    "gh-comms-samples-157-2020-request.headers": (
        "sb01-p2p-simpletest-p2ptest1event1callestablishing.json",
        events.CallStateChanged,
    ),
    "gh-comms-samples-664-2023-request.headers": (
        "sb01-p2p-simpletest-p2ptest1event1callestablishing.json",
        events.CallStateChanged,
    ),
    # A notification Graph sent again (X-Microsoft-Skype-Original-Message-ID), 2023.
    "gh-msteams-docs-9170-2023-notification.headers": (
        "sb06-p2p-simpletest-p2ptest1event6hangup.json",
        events.CallTerminated,
    ),
    "gh-comms-samples-95-2019-establishing.headers": (
        "sb02-p2p-simpletest-p2ptest1event2callestablished.json",
        events.CallStateChanged,
    ),
    "gh-comms-samples-632-2023-establishing.headers": (
        "sb02-p2p-simpletest-p2ptest1event2callestablished.json",
        events.CallStateChanged,
    ),
}


def test_every_header_block_is_replayed() -> None:
    assert set(HEADER_BLOCKS) == {p.name for p in CAPTURED.glob("*.headers")}


@pytest.mark.parametrize("behind_a_proxy", [False, True], ids=["direct", "trusted-proxy"])
@pytest.mark.parametrize("name", sorted(HEADER_BLOCKS))
async def test_a_captured_header_block_is_accepted(
    authority: Any, serve: Any, name: str, behind_a_proxy: bool
) -> None:
    """Every header a captured request carried, the charset its Content-Type named and the
    ``(redacted)`` forwarding headers of a logging proxy included: the body is accepted, its
    event delivered, and Graph's chain and message ids (and a resent one's first) reach the
    log line. Behind a
    trusted proxy, forwarding headers that name no address leave the peer as the client."""
    recorded, kind = HEADER_BLOCKS[name]
    headers = captured_headers(name)
    options = {"trusted_proxies": ("127.0.0.1/32",)} if behind_a_proxy else {}
    bot, seen = watching_bot(authority, **options)
    server = await serve(bot)
    body = (RECORDED / recorded).read_text(encoding="utf-8")
    charset = re.search(r"charset=([\w-]+)", headers["Content-Type"])
    with capture_logs() as logs:
        response = await server.post(
            None, raw=body.encode(charset.group(1) if charset else "utf-8"), headers=headers
        )
    assert response.status == 202
    await delivered(seen, 1)
    assert type(seen[0]) is kind
    [accepted] = [entry for entry in logs if entry["event"] == "callback_accepted"]
    for header, field in (
        ("X-Microsoft-Skype-Chain-ID", "chain_id"),
        ("X-Microsoft-Skype-Message-ID", "message_id"),
        ("X-Microsoft-Skype-Original-Message-ID", "original_message_id"),
    ):
        assert accepted.get(field) == headers.get(header)
    assert accepted["client"] == "127.0.0.1"


# -- the tails of bodies ----------------------------------------------------------------------

TAILS = [
    "gh-comms-samples-664-2023-call-tail.txt",
    "gh-msteams-docs-9170-2023-call-tail.txt",
]


def test_every_tail_is_read() -> None:
    assert set(TAILS) == {p.name for p in CAPTURED.glob("*.txt")}


@pytest.mark.parametrize("name", TAILS)
def test_no_property_of_a_captured_call_is_left_untyped(name: str) -> None:
    """Policy-recording calls (2023) carry properties in no schema, one of them in
    PascalCase (``MeetingUrl``); each is read into a typed field."""
    call = models.Call.model_validate(call_tail(name))
    assert _extras(call, "call") == []
    metadata = call.application_metadata
    assert metadata is not None
    assert metadata["botData"]["inviteReasons"] == ["ComplianceRecording"]


def test_the_meeting_url_teams_sends_in_pascal_case_is_read() -> None:
    call = models.Call.model_validate(call_tail("gh-comms-samples-664-2023-call-tail.txt"))
    assert call.meeting_url is not None
    assert call.meeting_url.startswith("https://teams.microsoft.com/l/meetup-join/19%3a")
    # Written back in Graph's camelCase, and read again from it.
    dumped = call.model_dump(by_alias=True, exclude_unset=True)
    assert dumped["meetingUrl"] == call.meeting_url
    assert models.Call.model_validate(dumped) == call


def test_the_region_hosting_a_recorded_calls_media_is_read() -> None:
    call = models.Call.model_validate(call_tail("gh-msteams-docs-9170-2023-call-tail.txt"))
    assert call.media_hosted_region == "JPEA"
    assert call.id == "471f5a00-4b90-4b1b-89be-4918359e9ab5"
    assert call.tenant_id == "ca7c802e-0077-43ad-bbb6-3258279978cc"
    # The logger that printed the capture masked it; kept as sent.
    assert call.termination_reason == "(Generic: BSkofoO1)"
    assert call.meeting_capability is not None


def _graph_models() -> list[type[models.GraphModel]]:
    found = []
    for name in models.__all__:
        value = getattr(models, name)
        if isinstance(value, type) and issubclass(value, models.GraphModel):
            found.append(value)
    return found


@pytest.mark.parametrize("model", _graph_models(), ids=lambda m: m.__name__)
def test_every_declared_property_is_read_from_its_pascal_case_name(
    model: type[models.GraphModel],
) -> None:
    """Teams has sent ``MeetingUrl``, ``TranscriptionInfo`` and ``ApplicationType`` with a
    capital letter: any declared property written so is read into its field, never left
    untyped."""
    for field, info in model.model_fields.items():
        wire = info.serialization_alias or info.alias or field
        if wire.startswith("@"):
            continue
        pascal = wire[0].upper() + wire[1:]
        parsed = model.model_validate({pascal: None})
        assert field in parsed.model_fields_set, (model.__name__, pascal)
        assert not parsed.model_extra, (model.__name__, pascal)


def test_pascal_case_names_keep_their_meaning() -> None:
    """What a camelCase name means, its PascalCase spelling means too: a result code sent as
    a name is kept as text, a meeting info without a type is told by its organizer."""
    result = models.ResultInfo.model_validate({"Code": "200", "SubCode": "transferring"})
    assert (result.code, result.subcode, result.subcode_text) == (200, None, "transferring")
    call = models.Call.model_validate(
        {"MeetingInfo": {"Organizer": {"User": {"Id": "organizer"}}}, "State": "Established"}
    )
    assert call.state == "established"
    assert isinstance(call.meeting_info, models.OrganizerMeetingInfo)
    assert call.meeting_info.organizer is not None
    assert call.meeting_info.organizer.user is not None
    assert call.meeting_info.organizer.user.id == "organizer"
    record = models.parse_operation(
        {"@odata.type": "#microsoft.graph.recordOperation", "RecordResourceLocation": "https://r"}
    )
    assert isinstance(record, models.RecordOperation)
    assert record.recording_location == "https://r"


def test_every_captured_file_is_described_in_the_manifest() -> None:
    files = {p.name for p in CAPTURED.iterdir() if p.name != "MANIFEST.md"}
    assert files == manifest_files()
