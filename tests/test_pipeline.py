"""The receiving pipeline end to end: a real server on 127.0.0.1, signed tokens."""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import json
import random
import re
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, assert_type

import aiohttp
import pytest
import structlog
from structlog.testing import capture_logs

import callbot
from callbot import Call, CallBot, events
from callbot._ids import id_key
from callbot._parse import parse_payload
from callbot.testing import builders as b
from callbot.testing import run_with_simulator

from .conftest import (
    APP_ID,
    BotServer,
    load_notification_text,
    make_bot,
    normalized_json,
    notification_files,
    until,
)


class Recorder:
    """Records what handlers see, per call key, in order."""

    def __init__(self) -> None:
        self.seen: list[events.Event] = []
        self.by_call: dict[str, list[str]] = {}
        self.changed = asyncio.Event()

    def add(self, event: events.Event) -> None:
        self.seen.append(event)
        self.by_call.setdefault(event.call_key, []).append(label(event))
        self.changed.set()

    async def wait_for(self, count: int, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while len(self.seen) < count:
                self.changed.clear()
                await self.changed.wait()


def label(event: events.Event) -> str:
    if isinstance(event, events.ToneReceived):
        return f"tone:{event.tone}"
    if isinstance(event, events.CallStateChanged):
        return event.state
    return type(event).__name__


def recording_bot(authority: Any, **options: Any) -> tuple[CallBot, Recorder]:
    bot = make_bot(authority, **options)
    recorder = Recorder()

    @bot.on(events.Event)
    async def everything(call: Call, event: events.Event) -> None:
        recorder.add(event)

    return bot, recorder


def with_unique_calls(body: Any, suffix: str) -> Any:
    """The same body, its call ids made unique so files do not share calls."""
    body = copy.deepcopy(body)
    for item in body["value"]:
        for key in ("resourceUrl", "resource"):
            if key in item:
                item[key] = re.sub(r"(calls/)([^/]+)", rf"\g<1>\g<2>{suffix}", item[key])
    return body


@pytest.mark.parametrize("name", notification_files())
async def test_every_documented_notification_reaches_a_handler(
    authority: Any, serve: Any, name: str
) -> None:
    bot, recorder = recording_bot(authority, reorder_window=0.05)
    server: BotServer = await serve(bot)
    body = with_unique_calls(normalized_json(load_notification_text(name)), "-x")
    expected = [type(e) for e in parse_payload(body)]
    # The token must vouch for the tenant the documented body names.
    tenants = {e.tenant_id for e in parse_payload(body) if e.tenant_id}
    token = server.token(tenant_id=tenants.pop()) if tenants else None
    response = await server.post(body, token=token)
    assert response.status == 202
    await recorder.wait_for(len(expected))
    assert [type(e) for e in recorder.seen] == expected


async def test_documented_bodies_that_are_not_json_are_refused(authority: Any, serve: Any) -> None:
    bot, recorder = recording_bot(authority)
    server = await serve(bot)
    refused = 0
    for name in notification_files():
        text = load_notification_text(name)
        try:
            json.loads(text)
        except ValueError:
            response = await server.post(None, raw=text.encode())
            assert response.status == 400
            assert (await response.json())["error"] == "not_json"
            refused += 1
    assert refused == 7
    assert recorder.seen == []


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "reason"),
    [
        (b"not json", "application/json", 400, "not_json"),
        (b"[1, 2]", "application/json", 400, "bad_shape"),
        (b'{"value": {}}', "application/json", 400, "bad_shape"),
        (b'{"value": []}', "application/json", 400, "empty"),
        (
            b'{"value": [{"resourceUrl": "/communications/calls/a"}]}',
            "application/json",
            400,
            "bad_shape",
        ),
        (
            b'{"value": [{"changeType": "updated", "resourceUrl": "/users/a"}]}',
            "application/json",
            400,
            "bad_shape",
        ),
        (b"\xff\xfe{}", "application/json", 400, "not_json"),
        (b'{"value": ' + b"[" * 500 + b"]" * 500 + b"}", "application/json", 400, "too_deep"),
        (b"{}", "text/plain", 415, "bad_content_type"),
        (b'{"value": ["' + b"x" * 70_000 + b'"]}', "application/json", 413, "too_large"),
    ],
)
async def test_malformed_bodies_get_a_4xx_with_a_reason_and_one_log_line(
    authority: Any, serve: Any, raw: bytes, content_type: str, status: int, reason: str
) -> None:
    bot, recorder = recording_bot(authority, max_body_bytes=64_000)
    server = await serve(bot)
    with capture_logs() as logs:
        response = await server.post(None, raw=raw, headers={"Content-Type": content_type})
    assert response.status == status
    assert (await response.json())["error"] == reason
    refusals = [entry for entry in logs if entry["event"] == "callback_refused"]
    assert len(refusals) == 1
    assert refusals[0]["reason"] == reason
    assert recorder.seen == []
    assert bot.receiver.counts["malformed", reason] == 1


@pytest.mark.parametrize(
    ("encoding", "charset"),
    [
        ("cp1252", "Windows-1252"),  # as a captured Graph request was labelled
        ("utf-8", "Windows-1252"),  # labelled so, written in UTF-8 all the same
        ("latin-1", "ISO-8859-1"),
        ("utf-8", "utf-8"),
    ],
)
async def test_a_body_in_the_charset_its_content_type_names_reads_as_written(
    authority: Any, serve: Any, encoding: str, charset: str
) -> None:
    """A captured Graph callback was labelled ``application/json; charset=Windows-1252``:
    a caller's name outside ASCII reaches handlers as written, whether the bytes are in that
    charset or in UTF-8."""
    bot, recorder = recording_bot(authority)
    server = await serve(bot)
    body = json.dumps(
        b.notifications(b.incoming_call("accents", caller_name="José Müller")), ensure_ascii=False
    )
    response = await server.post(
        None,
        raw=body.encode().decode("utf-8").encode(encoding)
        if encoding != "utf-8"
        else body.encode(),
        headers={"Content-Type": f"application/json; charset={charset}"},
    )
    assert response.status == 202
    await until(lambda: len(recorder.seen) == 1)
    [event] = recorder.seen
    assert isinstance(event, events.IncomingCall)
    assert event.call.source is not None
    assert event.call.source.identity is not None
    assert event.call.source.identity.display_name == "José Müller"


async def _posted_in_cp1252(server: Any, charset: str) -> tuple[Any, list[Any]]:
    """An incoming call from José posted in cp1252 (é as one byte: no UTF-8), labelled
    ``charset``: the response, and the log lines written meanwhile."""
    body = json.dumps(b.notifications(b.incoming_call("x", caller_name="José")), ensure_ascii=False)
    with capture_logs() as logs:
        response = await server.post(
            None,
            raw=body.encode("cp1252"),
            headers={"Content-Type": f"application/json; charset={charset}"},
        )
    return response, logs


@pytest.mark.parametrize("charset", ["x-no-such-charset", "idna"])
async def test_a_body_that_is_not_utf8_in_an_unknown_charset_is_refused(
    authority: Any, serve: Any, charset: str
) -> None:
    bot, recorder = recording_bot(authority)
    response, logs = await _posted_in_cp1252(await serve(bot), charset)
    assert response.status == 415
    assert (await response.json())["error"] == "bad_content_type"
    [refusal] = [entry for entry in logs if entry["event"] == "callback_refused"]
    assert charset in refusal["detail"]
    assert recorder.seen == []


@pytest.mark.parametrize("charset", ["utf-8", "UTF_8", "u8", "cp65001", "utf-8-sig"])
async def test_a_body_labelled_utf8_in_any_spelling_is_held_to_strict_utf8(
    authority: Any, serve: Any, charset: str
) -> None:
    """Only ``utf-8`` and ``utf8`` were read strictly: a body labelled ``UTF_8``, ``u8`` or
    ``cp65001`` (names Python gives UTF-8 too) that is not UTF-8 was decoded with its bad
    bytes replaced, and accepted, where the same body labelled ``utf-8`` is refused. UTF-8
    however the label spells it: refused as not JSON, one line, nothing accepted."""
    bot, recorder = recording_bot(authority)
    response, logs = await _posted_in_cp1252(await serve(bot), charset)
    assert (response.status, (await response.json())["error"]) == (400, "not_json")
    assert [entry["reason"] for entry in logs if entry["event"] == "callback_refused"] == [
        "not_json"
    ]
    assert recorder.seen == []


@pytest.mark.parametrize("charset", ["punycode", "PunyCode", "unicode_escape"])
async def test_a_codec_that_is_no_character_set_is_refused_before_it_decodes(
    authority: Any, serve: Any, charset: str
) -> None:
    """Python decodes punycode in time quadratic in its input: a 256 KiB body labelled
    ``charset=punycode`` (not UTF-8, so read in that charset) held the event loop 14 s, a
    4 MiB one about an hour. A codec for host names or string literals names no charset a
    body is written in: 415, as an unknown charset is, before anything is decoded."""
    bot, recorder = recording_bot(authority)
    server = await serve(bot)
    with capture_logs() as logs:
        response = await server.post(
            None,
            raw=b"\xff-" + b"a" * 65_536,  # each letter one insertion into the decoded text
            headers={"Content-Type": f"application/json; charset={charset}"},
        )
    assert response.status == 415
    assert (await response.json())["error"] == "bad_content_type"
    [refusal] = [entry for entry in logs if entry["event"] == "callback_refused"]
    assert charset in refusal["detail"]
    assert recorder.seen == []


async def test_a_body_read_in_its_charset_is_held_to_max_body_bytes_once_decoded(
    authority: Any, serve: Any
) -> None:
    """Read in the charset it names, a body grows: a Windows-1252 ``€`` (one byte) is three
    in UTF-8, as is each byte a charset cannot read (U+FFFD). Its size was checked before it
    was decoded only, so a 4 MiB body reached the parser as up to 12 MiB."""
    bot, recorder = recording_bot(authority, max_body_bytes=1024)
    server = await serve(bot)
    item = b.incoming_call("euros", caller_name="€" * 100)
    body = json.dumps(b.notifications(item), ensure_ascii=False).encode("cp1252")
    assert len(body) <= 1024 < len(body.decode("cp1252").encode())
    with capture_logs() as logs:
        response = await server.post(
            None, raw=body, headers={"Content-Type": "application/json; charset=windows-1252"}
        )
    assert response.status == 413
    assert (await response.json())["error"] == "too_large"
    [refusal] = [entry for entry in logs if entry["event"] == "callback_refused"]
    assert "windows-1252" in refusal["detail"]
    assert recorder.seen == []


async def test_charsets_no_codec_names_are_not_kept(authority: Any, serve: Any) -> None:
    """Each name a body's charset gave that no codec has was kept for good: the standard
    library remembers every name it failed to find (up to 8 KiB each, aiohttp's bound on a
    header line), so distinct names sent with any tenant's token grew the bot by 8 KiB or
    more a request. A name is looked up only when it is one of the codecs' own."""
    bot, recorder = recording_bot(authority)
    server = await serve(bot)
    url = server.client.make_url(bot.settings.callback_path)
    body = b'{"value": [], "name": "Jos\xe9"}'  # not UTF-8: read in the charset it names
    headers = {"Authorization": f"Bearer {server.token()}"}
    names = [f"x-{n}-" + "a" * 8000 for n in range(300)]
    # A plain session: the test client keeps every response alive.
    async with aiohttp.ClientSession() as session:

        async def refused(name: str) -> None:
            kind = f"application/json; charset={name}"
            async with session.post(url, data=body, headers={**headers, "Content-Type": kind}) as r:
                assert (r.status, (await r.json())["error"]) == (415, "bad_content_type")

        gc.collect()
        tracemalloc.start()
        try:
            # Not counted: what the first requests set up, and aiohttp's caches of the last
            # Content-Type headers it parsed (56 of each kind), full once these are through.
            for name in names[:100]:
                await refused(name)
            del names[:100]
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for name in names:
                await refused(name)
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    # Each name kept would be 8 KB: 1.6 MB for 200 of them.
    assert growth < sum(map(len, names)) // 8, growth
    assert recorder.seen == []


async def test_bad_tokens_get_401_with_a_bearer_challenge(authority: Any, serve: Any) -> None:
    bot, recorder = recording_bot(authority)
    server = await serve(bot)
    body = b.notifications(b.incoming_call("c1"))
    cases = {
        "missing": {"Authorization": ""},
        "expired": {"Authorization": "Bearer " + server.token(expires_in=-600)},
        "bad_audience": {"Authorization": "Bearer " + authority.mint(audience="someone-else")},
    }
    for reason, headers in cases.items():
        if not headers["Authorization"]:
            response = await server.client.post(bot.settings.callback_path, json=body)
        else:
            response = await server.post(body, headers=headers)
        assert response.status == 401, reason
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["error"] == reason
    assert recorder.seen == []


async def test_ack_does_not_wait_for_a_blocked_handler(authority: Any, serve: Any) -> None:
    bot = make_bot(authority)
    release = asyncio.Event()
    started: list[str] = []
    other_calls: list[str] = []

    @bot.on_incoming_call
    async def slow(call: Call, event: events.IncomingCall) -> None:
        started.append(call.id)
        if call.id == "blocked":
            await release.wait()
        else:
            other_calls.append(call.id)

    server = await serve(bot)
    response = await server.post(b.notifications(b.incoming_call("blocked")))
    assert response.status == 202
    # The blocked call's next notification is still acknowledged at once.
    response = await server.post(b.notifications(b.call_state("blocked", "establishing")))
    assert response.status == 202
    for i in range(5):
        response = await server.post(b.notifications(b.incoming_call(f"other-{i}")))
        assert response.status == 202
    await until(lambda: len(other_calls) >= 5)
    assert "blocked" in started
    release.set()


async def test_out_of_order_and_duplicates_across_hundreds_of_calls(
    authority: Any, serve: Any
) -> None:
    # A call's `establishing` follows its `established` by more than 2 s on a loaded machine
    # (300 calls posting at once): the window must outlast that, or `establishing` is stale.
    bot, recorder = recording_bot(authority, reorder_window=60.0, max_concurrent_handlers=64)
    server = await serve(bot)
    calls = [f"call-{i:03d}" for i in range(300)]
    rng = random.Random(7)

    async def lifecycle(call_id: str) -> None:
        steps = [
            [b.incoming_call(call_id)],
            [b.call_state(call_id, "established"), b.call_state(call_id, "establishing")],
            [b.tone(call_id, "tone1", 1), b.tone(call_id, "tone2", 2)],
            [b.call_terminated(call_id)],
        ]
        for step in steps:
            for item in step:
                for _ in range(rng.choice((1, 2))):  # duplicated deliveries
                    response = await server.post(b.notifications(item))
                    assert response.status == 202

    await asyncio.gather(*(lifecycle(c) for c in calls))
    await recorder.wait_for(len(calls) * 6, within=120)  # a bound against a hang only
    expected = [
        "IncomingCall",
        "establishing",
        "established",
        "tone:tone1",
        "tone:tone2",
        "terminated",
    ]
    # Nothing left held or queued: a repeat delivered twice would be among what was seen.
    await until(lambda: all(bot._running().settled(id_key(c)) for c in calls), within=60)
    for call_id in calls:
        assert recorder.by_call[id_key(call_id)] == expected, call_id
    assert len(recorder.seen) == len(calls) * 6


async def test_a_batch_for_several_calls_is_split_per_call(authority: Any, serve: Any) -> None:
    bot, recorder = recording_bot(authority)
    server = await serve(bot)
    body = b.notifications(
        b.incoming_call("a"), b.incoming_call("b"), b.call_state("a", "establishing")
    )
    assert (await server.post(body)).status == 202
    await recorder.wait_for(3)
    assert recorder.by_call == {"a": ["IncomingCall", "establishing"], "b": ["IncomingCall"]}


async def test_handler_errors_go_to_on_error_and_affect_nothing_else(
    authority: Any, serve: Any
) -> None:
    bot = make_bot(authority)
    errors: list[tuple[str, str, str]] = []
    after: list[str] = []

    @bot.on_incoming_call
    async def broken(call: Call, event: events.IncomingCall) -> None:
        if call.id == "bad":
            raise RuntimeError("boom")

    @bot.on_incoming_call
    async def still_runs(call: Call, event: events.IncomingCall) -> None:
        after.append(call.id)

    @bot.on_error
    async def report(call: Call, event: events.Event, exc: BaseException) -> None:
        errors.append((call.id, type(event).__name__, str(exc)))

    server = await serve(bot)
    await server.post(b.notifications(b.incoming_call("bad"), b.incoming_call("good")))
    await until(lambda: len(after) >= 2)
    assert errors == [("bad", "IncomingCall", "boom")]
    assert sorted(after) == ["bad", "good"]


async def test_each_handler_run_has_its_own_call_id_bound_for_its_lines(
    authority: Any, serve: Any
) -> None:
    bot = make_bot(authority)
    seen: list[tuple[str, Any]] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        seen.append((call.id, structlog.contextvars.get_contextvars().get("call_id")))

    server = await serve(bot)
    await server.post(b.notifications(b.incoming_call("c-one"), b.incoming_call("C-Two")))
    await until(lambda: len(seen) >= 2)
    assert sorted(seen) == [("C-Two", "C-Two"), ("c-one", "c-one")]
    assert "call_id" not in structlog.contextvars.get_contextvars()  # the request's is untouched


async def test_handler_error_without_on_error_is_logged_with_call_id(
    authority: Any, serve: Any
) -> None:
    bot = make_bot(authority)
    done = asyncio.Event()

    @bot.on_incoming_call
    async def broken(call: Call, event: events.IncomingCall) -> None:
        done.set()
        raise ValueError("nope")

    server = await serve(bot)
    with capture_logs() as logs:
        await server.post(b.notifications(b.incoming_call("c-err")))
        await asyncio.wait_for(done.wait(), 5)
        await until(lambda: bot._running().settled(id_key("c-err")))
    failures = [e for e in logs if e["event"] == "handler_failed"]
    assert len(failures) == 1
    assert failures[0]["call_id"] == "c-err"
    assert "ValueError: nope" in failures[0]["traceback"]


async def test_specific_and_catch_all_handlers_run_in_registration_order(
    authority: Any, serve: Any
) -> None:
    bot = make_bot(authority)
    order: list[str] = []

    @bot.on(events.Event)
    async def first(call: Call, event: events.Event) -> None:
        order.append("catch-all")

    @bot.on_state("establishing", "established")
    async def second(call: Call, event: events.CallStateChanged) -> None:
        order.append(f"state:{event.state}:{event.previous_state}")

    @bot.on_tone
    async def third(call: Call, event: events.ToneReceived) -> None:
        order.append(f"tone:{event.tone}:{event.sequence_id}")

    server = await serve(bot)
    await server.post(b.notifications(b.call_state("c", "establishing")))
    await server.post(b.notifications(b.call_state("c", "established")))
    await server.post(b.notifications(b.tone("c", "star", 3)))
    await until(lambda: len(order) >= 6)
    assert order == [
        "catch-all",
        "state:establishing:None",
        "catch-all",
        "state:established:establishing",
        "catch-all",
        "tone:star:3",
    ]


async def test_roster_joined_and_left_are_computed(authority: Any, serve: Any) -> None:
    bot = make_bot(authority)
    seen: list[tuple[list[str], list[str], list[str]]] = []

    @bot.on_participants
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        seen.append(
            (
                [p.id or "" for p in event.joined],
                [p.id or "" for p in event.left],
                [p.id or "" for p in event.updated],
            )
        )

    server = await serve(bot)
    alice, bob = b.participant("alice"), b.participant("bob")
    bob_muted = b.participant("bob", muted=True)
    for people in ([alice], [alice, bob], [alice, bob_muted], [bob_muted]):
        await server.post(b.notifications(b.roster("meet", people)))
    await until(lambda: len(seen) >= 4)
    assert seen == [
        (["alice"], [], []),
        (["bob"], [], []),
        ([], [], ["bob"]),
        ([], ["alice"], []),
    ]


def test_registering_a_plain_function_fails_at_once(authority: Any) -> None:
    bot = make_bot(authority)

    def not_async(call: Call, event: events.Event) -> None:
        return None

    with pytest.raises(TypeError, match="async def"):
        bot.on_incoming_call(not_async)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="async def"):
        bot.on(events.Event)(not_async)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="unknown call state"):
        bot.on_state("establised")

    async def established(call: Call, event: events.CallStateChanged) -> None:
        return None

    with pytest.raises(TypeError, match=r"@bot.on_state\('established'\)"):
        bot.on_state(established)  # type: ignore[arg-type]  # written without its states
    with pytest.raises(TypeError, match=r"@bot.on\(events.CallUpdated\)"):
        bot.on(established)  # type: ignore[arg-type, type-var]  # written without its class

    class PlainCall:
        def __call__(self, call: Call, event: events.Event) -> None:
            return None

    with pytest.raises(TypeError, match=r"PlainCall' must be an 'async def' function, or an"):
        bot.on_incoming_call(PlainCall())  # type: ignore[type-var]
    # Written with parentheses, the decorator refuses the same, and so does mypy.
    with pytest.raises(TypeError, match="not_async' must be an 'async def' function"):
        bot.on_incoming_call()(not_async)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="not_async' must be an 'async def' function"):
        bot.on_transfer_failed(not_async)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="not_async' must be an 'async def' function"):
        bot.on_transfer_failed()(not_async)  # type: ignore[type-var]


def test_a_handler_that_cannot_take_its_arguments_fails_when_registered(
    authority: Any,
) -> None:
    bot = make_bot(authority)

    async def answer(call: Call) -> None:
        return None

    async def report(call: Call, exc: BaseException) -> None:
        return None

    with pytest.raises(TypeError, match=r"'.*answer' must take \(call, event\), not \(call: "):
        bot.on_incoming_call(answer)  # type: ignore[type-var]  # as mypy refuses it
    with pytest.raises(TypeError, match=r"must take \(call, event\)"):
        bot.on_state("established")(answer)  # type: ignore[type-var]
    with pytest.raises(TypeError, match=r"must take \(call, event\)"):
        bot.on_transfer_failed(answer)  # type: ignore[type-var]
    with pytest.raises(TypeError, match=r"must take \(call, event, exc\).*async def report"):
        bot.on_error(report)  # type: ignore[type-var]

    # Defaults, *args and keyword-only parameters with defaults are fine.
    async def flexible(call: Call, event: events.Event, extra: int = 0, *, k: int = 1) -> None:
        return None

    async def anything(*args: Any) -> None:
        return None

    bot.on_incoming_call(flexible)
    bot.on(events.Event)(anything)
    bot.on_error(anything)


async def on_key(call: Call, event: events.ToneReceived) -> None:
    return None


async def on_move(call: Call, event: events.CallStateChanged) -> None:
    return None


async def swapped(event: events.ToneReceived, call: Call) -> None:
    return None


async def on_news(call: Call, event: events.CallStateChanged | events.CallUpdated) -> None:
    return None


def test_a_handler_annotated_for_other_events_fails_when_registered(authority: Any) -> None:
    """What mypy refuses, for a bot not checked with it: a handler whose ``event`` is
    annotated with a class its registration never gives ran, and failed on the first
    attribute it read (or, its arguments swapped, on the call's)."""
    bot = make_bot(authority)

    with pytest.raises(
        TypeError,
        match=r"'on_key' takes an event of ToneReceived, and is registered for "
        r"CallStateChanged: annotate event: events.CallStateChanged \(or a base class\)",
    ):
        bot.on_state("established")(on_key)  # type: ignore[type-var]
    with pytest.raises(TypeError, match=r"'swapped' takes an event of Call, and is registered"):
        bot.on_tone(swapped)  # type: ignore[type-var]
    with pytest.raises(
        TypeError,
        match=r"'on_move' takes an event of CallStateChanged, and is registered for CallUpdated",
    ):
        bot.on_transfer_failed(on_move)  # type: ignore[type-var]  # also a CallUpdated
    with pytest.raises(
        TypeError, match=r"'on_key' takes an event of ToneReceived, and is registered for Event"
    ):
        bot.on(events.Event)(on_key)  # type: ignore[type-var]

    # Base classes, unions and unreadable annotations are fine, as for mypy.
    bot.on_terminated(on_move)
    bot.on_transfer_failed(on_news)
    bot.on_state("incoming", "established")(on_move)  # the IncomingCall reads the same
    bot.on(events.ToneReceived)(functools.partial(on_key))

    async def later(call: Call, event: NotYetDefined) -> None:  # type: ignore[name-defined]  # noqa: F821
        return None

    bot.on_tone(later)

    async def unannotated(call, event):  # type: ignore[no-untyped-def]
        return None

    bot.on_tone(unannotated)

    class HasTone(Protocol):
        tone: str

    async def structural(call: Call, event: HasTone) -> None:
        return None

    bot.on(events.ToneReceived)(structural)

    # Any takes every event, as for mypy (a class since Python 3.11, and subclassed by none).
    async def untyped(call: Call, event: Any) -> None:
        return None

    async def some_or_any(call: Call, event: events.ToneReceived | Any) -> None:
        return None

    bot.on_state("established")(untyped)
    bot.on(events.Event)(some_or_any)


def test_an_event_class_of_the_bot_s_own_is_refused_as_never_delivered(authority: Any) -> None:
    """callbot delivers only its own event classes: a handler of a subclass a bot defined
    was registered, and never ran."""
    bot = make_bot(authority)

    class Pressed(events.ToneReceived):
        pass

    async def on_pressed(call: Call, event: Pressed) -> None:
        return None

    with pytest.raises(TypeError, match=r"'Pressed' is no event callbot delivers: .*ToneReceived"):
        bot.on(Pressed)(on_pressed)  # type: ignore[misc, type-var]  # as mypy refuses it
    with pytest.raises(TypeError, match=r"'Pressed' is no event callbot delivers"):
        bot.on(Pressed, matches=lambda event: True)


def test_a_method_registered_in_its_class_body_is_told_to_register_its_objects(
    authority: Any,
) -> None:
    """A decorator in the class body gets the function, which takes ``self`` first: the
    error said to write ``async def on_key(call, event)``, dropping ``self``, where the
    method of an object is what to register."""
    bot = make_bot(authority)

    with pytest.raises(
        TypeError,
        match=r"'.*Menu.on_key' is a method: register the method of an object of its class, "
        r"once made \(Menu\(\).on_key\), not the function in the class's body",
    ):

        class Menu:
            @bot.on_tone  # type: ignore[type-var]  # as mypy refuses it
            async def on_key(self, call: Call, event: events.ToneReceived) -> None:
                return None


def test_a_handler_class_registered_for_its_object_is_told_to_make_one(authority: Any) -> None:
    """The class of a handler object, not an object of it: the error said it must define
    ``async def __call__``, which it does."""
    bot = make_bot(authority)

    class KeyCounter:
        async def __call__(self, call: Call, event: events.ToneReceived) -> None:
            return None

    with pytest.raises(
        TypeError, match=r"'.*KeyCounter' is a class: register an object of it \(KeyCounter\(\)\)"
    ):
        bot.on_tone(KeyCounter)  # type: ignore[type-var]  # as mypy refuses it
    bot.on_tone(KeyCounter())


def test_a_matches_filter_that_cannot_decide_fails_when_registered(authority: Any) -> None:
    """A filter is called inside the run with the event alone and must answer at once: an
    ``async def`` one answered with a coroutine, which is true, so its handler ran for every
    event; one that is not callable, or takes other arguments, failed with each event."""
    bot = make_bot(authority)

    async def on_key(call: Call, event: events.ToneReceived) -> None:
        return None

    async def is_one(event: events.ToneReceived) -> bool:
        return event.tone == "tone1"

    def is_one_of_the_call(call: Call, event: events.ToneReceived) -> bool:
        return event.tone == "tone1"

    with pytest.raises(TypeError, match=r"matches: '.*is_one' must be a plain 'def' function"):
        bot.on(events.ToneReceived, matches=is_one)(on_key)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"matches: 'tone1' must be a plain 'def' function"):
        bot.on(events.ToneReceived, matches="tone1")(on_key)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"'.*is_one_of_the_call' must take \(event\), not \(call: .*: "
        r"def is_one_of_the_call\(event\) -> bool",
    ):
        bot.on(events.ToneReceived, matches=is_one_of_the_call)(on_key)  # type: ignore[arg-type]
    bot.on(events.ToneReceived, matches=lambda event: event.tone == "tone1")(on_key)


def test_a_deployment_chooser_that_cannot_take_the_event_fails_when_registered(
    authority: Any,
) -> None:
    bot = make_bot(authority)

    def by_tenant(tenant_id: str, event: events.IncomingCall) -> str | None:
        return None

    with pytest.raises(
        TypeError,
        match=r"'.*by_tenant' must take \(event\), not \(tenant_id: .*: "
        r"def by_tenant\(event\) -> str \| None",
    ):
        bot.choose_deployment(by_tenant)  # type: ignore[type-var]


def test_a_handler_object_or_partial_is_judged_by_the_parameters_it_is_called_with(
    authority: Any,
) -> None:
    """An object is called through its class's ``__call__`` (less ``self``), a partial with
    the parameters it leaves open: each must still take what callbot passes."""
    bot = make_bot(authority)

    class Forgetful:
        async def __call__(self, call: Call) -> None:
            return None

    class Reporter:
        async def __call__(self, call: Call, event: events.Event, exc: BaseException) -> None:
            return None

    async def greet(greeting: str, call: Call, event: events.Event) -> None:
        return None

    async def greet_last(call: Call, event: events.Event, greeting: str) -> None:
        return None

    with pytest.raises(
        TypeError,
        match=r"Forgetful' must take \(call, event\), not \(call: .*: "
        r"async def __call__\(self, call, event\) -> None",
    ):
        bot.on_incoming_call(Forgetful())  # type: ignore[type-var]  # as mypy refuses it
    with pytest.raises(TypeError, match=r"'.*greet' must take \(call, event\), not \(greeting: "):
        bot.on_tone(functools.partial(greet))
    with pytest.raises(TypeError, match=r"'.*Reporter' must take \(call, event\)"):
        bot.on_terminated(Reporter())  # type: ignore[type-var]

    bot.on_tone(functools.partial(greet, "welcome"))
    bot.on_tone(functools.partial(greet_last, greeting="welcome"))
    bot.on_error(Reporter())


def test_a_handler_is_judged_by_what_is_called_not_what_it_wraps(authority: Any) -> None:
    """A decorator that hands the handler something more (a connection, settings) takes
    (call, event) itself; functools.wraps gives it the handler's name and its __wrapped__,
    and registration read the wrapped handler's parameters, refusing a working handler."""
    bot = make_bot(authority)

    def with_greeting(
        handler: Callable[[Call, events.Event, str], Awaitable[None]],
    ) -> Callable[[Call, events.Event], Awaitable[None]]:
        @functools.wraps(handler)
        async def run(call: Call, event: events.Event) -> None:
            await handler(call, event, "welcome")

        return run

    @bot.on_incoming_call
    @with_greeting
    async def answer(call: Call, event: events.Event, greeting: str) -> None:
        return None

    # What is called is still checked.
    def forgetting(handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        @functools.wraps(handler)
        async def run(call: Call) -> None:
            await handler(call, None)

        return run

    with pytest.raises(TypeError, match=r"must take \(call, event\), not \(call: "):
        bot.on_incoming_call(forgetting(answer))


class CallCounter:
    """A handler with state of its own: answers each call and keeps its id."""

    def __init__(self) -> None:
        self.answered: list[str] = []

    async def __call__(self, call: Call, event: events.IncomingCall) -> None:
        await call.answer()
        self.answered.append(call.id)


class Menu:
    """Handlers that are methods of one object sharing its state."""

    def __init__(self) -> None:
        self.pressed: list[str] = []

    async def start(self, call: Call, event: events.CallStateChanged) -> None:
        await call.subscribe_to_tone()

    async def on_tone(self, call: Call, event: events.ToneReceived) -> None:
        self.pressed.append(event.tone)
        if event.digit == "9":
            raise LookupError("no option 9")


class ErrorLog:
    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    async def __call__(self, call: Call, event: events.Event, exc: BaseException) -> None:
        self.errors.append(exc)


async def test_a_handler_may_be_an_object_a_method_or_a_partial_and_is_awaited() -> None:
    """An object whose class defines ``async def __call__`` (a handler keeping state) was
    refused as not being an ``async def`` function; it is registered, run and awaited like
    one, as are bound methods and ``functools.partial`` of an ``async def`` function, and
    each is named by what it runs (no object's address in logs, metrics or diagrams)."""
    bot = CallBot(app_id=APP_ID)
    counter, menu, error_log = CallCounter(), Menu(), ErrorLog()
    ended: list[str] = []

    async def note_the_end(into: list[str], call: Call, event: events.CallTerminated) -> None:
        into.append(call.id)

    assert bot.on_incoming_call(counter) is counter
    bot.on_state("established")(menu.start)
    bot.on_tone(menu.on_tone)
    bot.on_terminated(functools.partial(note_the_end, ended))
    bot.on_error(error_log)
    ran: list[tuple[str, str]] = []
    bot.watch_handlers(lambda name, event, outcome: ran.append((name, outcome)))

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await call.press("19")
        await until(lambda: len(error_log.errors) == 1)
        await call.hangup()
        await until(lambda: ended == [call.id])
    assert counter.answered == [call.id]
    assert menu.pressed == ["tone1", "tone9"]
    assert [str(e) for e in error_log.errors] == ["no option 9"]
    assert ran == [
        ("CallCounter", "ok"),
        ("Menu.start", "ok"),
        ("Menu.on_tone", "ok"),
        ("Menu.on_tone", "error"),
        (note_the_end.__qualname__, "ok"),
    ]


class counted:
    """A decorator written as a class, as ``functools.update_wrapper`` makes one: its objects
    take the handler's ``__qualname__`` and are called through ``async def __call__``."""

    def __init__(self, handler: Callable[[Call, Any], Awaitable[None]]) -> None:
        functools.update_wrapper(self, handler)
        self.handler = handler
        self.runs = 0

    async def __call__(self, call: Call, event: events.Event) -> None:
        self.runs += 1
        await self.handler(call, event)


def test_an_error_handler_is_handed_back_typed_as_it_was() -> None:
    """``on_error`` typed what it handed back as any error handler, so an object's own
    attributes (``error_log.errors``) were a mypy error; either spelling keeps its type."""
    bot, error_log, other_log = CallBot(app_id=APP_ID), ErrorLog(), ErrorLog()
    assert assert_type(bot.on_error(error_log), ErrorLog).errors == []
    assert assert_type(bot.on_error()(other_log), ErrorLog) is other_log
    assert bot._registry.error_handlers == [error_log, other_log]


async def test_a_handler_wrapped_by_a_class_decorator_is_registered_and_run() -> None:
    """An object of a decorator class was refused as "not an object whose class defines
    'async def __call__'" when the class copied the handler's ``__qualname__`` onto it."""
    bot = CallBot(app_id=APP_ID)

    @bot.on_incoming_call
    @counted
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    ran: list[tuple[str, str]] = []
    bot.watch_handlers(lambda name, event, outcome: ran.append((name, outcome)))
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
    assert answer.runs == 1
    assert ran[0] == (answer.handler.__qualname__, "ok")


async def test_a_decorator_of_the_handler_alone_may_be_written_with_parentheses() -> None:
    """``@bot.on_incoming_call()`` raised Python's "missing 1 required positional argument";
    each decorator that takes nothing but the handler registers it either way."""
    bot = CallBot(app_id=APP_ID)
    seen: list[str] = []
    asked: list[str] = []

    @bot.choose_deployment()
    def here(event: events.IncomingCall) -> str | None:
        asked.append(event.call_id)
        return None

    @bot.on_incoming_call()
    async def answer(call: Call, event: events.IncomingCall) -> None:
        seen.append("incoming")
        await call.answer()

    @bot.on_state("established")
    async def start(call: Call, event: events.CallStateChanged) -> None:
        await call.subscribe_to_tone()
        await call.play_prompt("https://cdn.contoso.com/welcome.wav")

    @bot.on_call_updated()
    async def updated(call: Call, event: events.CallUpdated) -> None:
        seen.append("updated")

    @bot.on_participants()
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        seen.append("participants")

    @bot.on_operation()
    async def operation(call: Call, event: events.OperationUpdated) -> None:
        seen.append("operation")

    @bot.on_tone()
    async def tone(call: Call, event: events.ToneReceived) -> None:
        seen.append("tone")
        raise LookupError(event.tone)

    @bot.on_error()
    async def report(call: Call, event: events.Event, exc: BaseException) -> None:
        seen.append(f"error {exc}")

    @bot.on_terminated()
    async def ended(call: Call, event: events.CallTerminated) -> None:
        seen.append("terminated")

    # Either spelling hands back what it was given, typed as it was (mypy checks it).
    other, counter = CallBot(app_id=APP_ID), CallCounter()
    assert assert_type(other.on_incoming_call()(counter), CallCounter) is counter
    assert assert_type(other.on_incoming_call(counter), CallCounter) is counter
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("playPrompt")
        await call.press("1")
        await until(lambda: {"updated", "participants", "operation", "error tone1"} <= set(seen))
        await call.hangup()
        await until(lambda: "terminated" in seen)
    assert asked == [call.id]
    assert seen[0] == "incoming"
    assert seen.index("tone") < seen.index("error tone1")
    assert seen[-1] == "terminated"


async def test_health_readiness_and_metrics(authority: Any, serve: Any) -> None:
    bot, recorder = recording_bot(authority)
    server = await serve(bot)
    assert (await server.client.get("/healthz")).status == 200
    ready = await server.client.get("/readyz")
    assert ready.status == 200
    await server.post(b.notifications(b.incoming_call("m1")))
    await server.post(b.notifications(b.incoming_call("m1")))  # exact repeat
    await server.post(None, raw=b"nope")
    await server.post(b.notifications(b.incoming_call("m2")), token="garbage")
    await recorder.wait_for(1)
    text = await (await server.client.get("/metrics")).text()
    assert 'callbot_notifications_total{outcome="accepted",reason=""} 2.0' in text
    assert 'callbot_notifications_total{outcome="dropped",reason="duplicate"} 1.0' in text
    assert 'callbot_notifications_total{outcome="malformed",reason="not_json"} 1.0' in text
    assert 'callbot_notifications_total{outcome="auth_failed",reason="malformed"} 1.0' in text
    await bot.drain()
    assert (await server.client.get("/readyz")).status == 503
    refused = await server.post(b.notifications(b.incoming_call("m3")))
    assert refused.status == 503


async def test_a_handler_raising_cancelled_error_does_not_strand_its_call(
    authority: Any, serve: Any
) -> None:
    bot = make_bot(authority)
    seen: list[str] = []
    errors: list[str] = []

    @bot.on_state("establishing", "established")
    async def state(call: Call, event: events.CallStateChanged) -> None:
        seen.append(event.state)
        if event.state == "establishing":
            raise asyncio.CancelledError

    @bot.on_error
    async def report(call: Call, event: events.Event, exc: BaseException) -> None:
        errors.append(type(exc).__name__)

    server = await serve(bot)
    await server.post(b.notifications(b.call_state("c", "establishing")))
    await server.post(b.notifications(b.call_state("c", "established")))
    await until(lambda: seen == ["establishing", "established"])
    assert errors == ["CancelledError"]


async def test_a_handler_returning_an_action_it_did_not_await_is_an_error(
    authority: Any,
) -> None:
    """``return call.play_prompt(...)``, the ``await`` forgotten: the prompt was never sent,
    and nothing but a RuntimeWarning at garbage collection said so."""
    bot = make_bot(authority)
    errors: list[BaseException] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def welcome(call: Call, event: events.CallStateChanged) -> Any:
        return call.play_prompt("https://cdn.contoso.com/welcome.wav")

    @bot.on_error
    async def report(call: Call, event: events.Event, exc: BaseException) -> None:
        errors.append(exc)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await until(lambda: len(errors) == 1)
        await call.hangup()
    [error] = errors
    assert isinstance(error, TypeError)
    assert re.search(r"welcome' returned <coroutine object Call.play_prompt .*> witho", str(error))
    assert "await it in the handler" in str(error)


async def test_an_error_handler_returning_an_action_it_did_not_await_fails(
    authority: Any,
) -> None:
    """``return call.play_prompt(SORRY)`` in an on_error handler: the apology was never
    played, and nothing but a RuntimeWarning at garbage collection said so."""
    bot = make_bot(authority)

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        raise LookupError("no route")

    @bot.on_error
    async def apologise(call: Call, event: events.Event, exc: BaseException) -> Any:
        return call.play_prompt("https://cdn.contoso.com/sorry.wav")

    with capture_logs() as logs:
        async with run_with_simulator(bot) as sim:
            call = await sim.incoming_call()
            counts = bot._running().dispatcher.counts
            await until(lambda: counts["unhandled_errors"] == 1)
            await call.hangup()
    [failure] = [e for e in logs if e["event"] == "error_handler_failed"]
    assert "returned <coroutine object Call.play_prompt" in failure["error_handler_error"]


async def test_an_error_handler_stopped_by_the_call_s_end_stops_quietly(authority: Any) -> None:
    """An on_error handler apologising to a caller who has hung up got CallEnded, which a
    handler may let escape: it was logged as error_handler_failed and counted unhandled
    (a strict test failed), where any other handler stops quietly."""
    bot = make_bot(authority)
    reported: list[str] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_terminated
    async def bill(call: Call, event: events.CallTerminated) -> None:
        raise LookupError("no tariff")

    @bot.on_error
    async def apologise(call: Call, event: events.Event, exc: BaseException) -> None:
        reported.append(str(exc))
        await call.play_prompt("https://cdn.contoso.com/sorry.wav")

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await call.hangup()
        await call.settled()
        counts = bot._running().dispatcher.counts
    assert reported == ["no tariff"]
    assert (counts["handler_errors"], counts["unhandled_errors"]) == (1, 0)
    assert counts["call_ended"] == 1


class Hangup(BaseException):
    """What a bot might raise to leave a handler at once (a ``BaseException``, as
    ``asyncio.CancelledError`` is, so that ``except Exception`` lets it through)."""


async def test_a_handler_raising_a_base_exception_of_its_own_does_not_strand_its_call(
    authority: Any, serve: Any
) -> None:
    """A handler (or its ``matches``, or an on_error handler) letting a BaseException other
    than KeyboardInterrupt or SystemExit escape killed its call's worker: the delivery stayed
    first in the call's queue, ran again with each later notification, and no later handler
    of the call ever ran."""
    bot = make_bot(authority)
    seen: list[str] = []
    errors: list[str] = []

    def picky(event: events.CallStateChanged) -> bool:
        if event.state == "establishing":
            raise Hangup("from a filter")
        return False

    @bot.on(events.CallStateChanged, matches=picky)
    async def never(call: Call, event: events.CallStateChanged) -> None:
        return None

    @bot.on_state("establishing", "established")
    async def state(call: Call, event: events.CallStateChanged) -> None:
        seen.append(event.state)
        if event.state == "establishing":
            raise Hangup("from a handler")

    @bot.on_error
    async def report(call: Call, event: events.Event, exc: BaseException) -> None:
        errors.append(str(exc))
        raise Hangup("from an error handler")

    server = await serve(bot)
    await server.post(b.notifications(b.call_state("c", "establishing")))
    await server.post(b.notifications(b.call_state("c", "established")))
    await until(lambda: seen == ["establishing", "established"])
    assert errors == ["from a filter", "from a handler"]
    counts = bot._running().dispatcher.counts
    assert (counts["handler_errors"], counts["unhandled_errors"]) == (2, 2)


async def test_odd_but_valid_json_values_never_give_a_5xx(authority: Any, serve: Any) -> None:
    bot, recorder = recording_bot(authority)
    server = await serve(bot)
    lone_surrogate = b.incoming_call("s1", caller_name="\ud83d")
    raw = json.dumps(b.notifications(lone_surrogate)).encode()
    assert (await server.post(None, raw=raw)).status == 202
    odd_roster = b.roster("s2", [b.participant("p")])
    odd_roster["sequenceNumber"] = "--5"
    assert (await server.post(b.notifications(odd_roster))).status == 202
    await recorder.wait_for(2)
    assert [label(e) for e in recorder.seen] == ["IncomingCall", "ParticipantsUpdated"]


async def test_a_handler_of_the_memory_store_reads_its_run_as_a_first_one() -> None:
    """``callbot.current_attempt()`` is a run inside every handler, as its documentation
    says, not only with a shared store: with the in-memory store a first run (epoch 0, not
    redelivered), so ``current_attempt().redelivered`` reads in every bot; ``None`` outside
    handlers."""
    bot = CallBot(app_id=APP_ID)
    seen: list[callbot.Attempt | None] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        seen.append(callbot.current_attempt())
        await call.answer()

    @bot.on_state("established")
    async def established(call: Call, event: events.CallStateChanged) -> None:
        seen.append(callbot.current_attempt())

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await until(lambda: len(seen) == 2)
    assert callbot.current_attempt() is None
    key = call.id.replace("-", "").lower()
    assert seen == [callbot.Attempt(key, "", 0, False)] * 2
