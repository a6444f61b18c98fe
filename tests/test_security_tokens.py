"""Attacks with tokens on a bot served on 127.0.0.1: what a token proves, and how much it costs.

Each test posts to the running bot over a real socket and would pass a request
the old receiver let through (tenant not bound, tokens of any lifetime, a second
algorithm per key, a second Authorization header, padded base64url) or would
keep memory the old cache never gave back.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import math
import secrets
import time
import tracemalloc
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse
from multidict import CIMultiDict
from structlog.testing import capture_logs

from callbot import Call, CallBot, MalformedNotification, OperationFailed, events
from callbot._auth import MAX_KEY_WAITERS
from callbot._ids import id_key
from callbot._log import LINES_PER_SECOND
from callbot._sequencing import MAX_SNAPSHOT_BYTES, ROSTER_BYTES_PER_PARTICIPANT
from callbot.store._codec import encode_record
from callbot.testing import TEST_TENANT_ID, FakeGraph, TokenAuthority
from callbot.testing import builders as b

from .conftest import BotServer, Clock, make_bot, until

OTHER_TENANT = "0b1f4c5e-7a2d-4e3b-9c8d-112233445566"


def seeing_bot(authority: TokenAuthority, **options: Any) -> tuple[CallBot, list[events.Event]]:
    bot = make_bot(authority, **options)
    seen: list[events.Event] = []

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        seen.append(event)

    return bot, seen


async def refusal(response: ClientResponse) -> tuple[int, str]:
    body = await response.json()
    return response.status, str(body["error"])


async def metric(server: BotServer, outcome: str, reason: str) -> float:
    response = await server.client.get("/metrics")
    text = await response.text()
    wanted = f'callbot_notifications_total{{outcome="{outcome}",reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line[len(wanted) :])
    return 0.0


# -- 4. the tenant a handler sees is the token's --------------------------------------------


async def test_an_item_of_another_tenant_is_refused_and_counted(
    authority: TokenAuthority, serve: Any
) -> None:
    bot, seen = seeing_bot(authority)
    server: BotServer = await serve(bot)
    body = b.notifications(b.incoming_call("tenant-call", tenant_id=OTHER_TENANT))
    response = await server.post(body, token=server.token(tenant_id=TEST_TENANT_ID))
    assert await refusal(response) == (403, "tenant_mismatch")
    assert await metric(server, "auth_failed", "tenant_mismatch") == 1
    # The same body with a token of its own tenant goes through, and handlers see that tenant.
    response = await server.post(body, token=server.token(tenant_id=OTHER_TENANT))
    assert response.status == 202
    await until(lambda: len(seen) == 1)
    assert seen[0].tenant_id == OTHER_TENANT


async def test_a_call_names_no_other_tenant_however_the_body_spells_it(
    authority: TokenAuthority, serve: Any
) -> None:
    """The tenant check read ``tenantId`` of an object ``resourceData`` only: a call sent in
    a list, or with ``tenant_id`` (the models read either spelling), reached handlers
    with another tenant's id on ``event.call``."""
    bot, seen = seeing_bot(authority)
    server: BotServer = await serve(bot)
    token = server.token(tenant_id=TEST_TENANT_ID)
    listed = without_tenant(b.call_state("listed-call", "establishing"))
    listed["resourceData"] = [{**listed["resourceData"], "tenantId": OTHER_TENANT}]
    snake = without_tenant(b.call_state("snake-call", "establishing"))
    snake["resourceData"]["tenant_id"] = OTHER_TENANT
    for item in (listed, snake):
        response = await server.post(b.notifications(item), token=token)
        assert await refusal(response) == (403, "tenant_mismatch")
    # Naming the token's own tenant either way is accepted.
    snake["resourceData"]["tenant_id"] = TEST_TENANT_ID
    assert (await server.post(b.notifications(snake), token=token)).status == 202
    await until(lambda: len(seen) == 1)
    assert isinstance(seen[0], events.CallStateChanged)
    assert seen[0].call.tenant_id == TEST_TENANT_ID


async def test_an_item_naming_no_tenant_gets_the_tokens(
    authority: TokenAuthority, serve: Any
) -> None:
    bot, seen = seeing_bot(authority)
    server: BotServer = await serve(bot)
    body = b.notifications(b.call_state("no-tenant", "establishing"))
    for item in body["value"]:
        item.pop("tenantId", None)
        item["resourceData"].pop("tenantId", None)
    response = await server.post(body, token=server.token(tenant_id=OTHER_TENANT))
    assert response.status == 202
    await until(lambda: len(seen) == 1)
    assert seen[0].tenant_id == OTHER_TENANT


def without_tenant(item: dict[str, Any]) -> dict[str, Any]:
    """``item`` naming no tenant: it gets its token's."""
    item = {key: value for key, value in item.items() if key != "tenantId"}
    data = item.get("resourceData")
    if isinstance(data, dict):
        item["resourceData"] = {key: value for key, value in data.items() if key != "tenantId"}
    return item


async def test_a_call_belongs_to_the_tenant_it_was_first_seen_with(
    authority: TokenAuthority, serve: Any
) -> None:
    bot, seen = seeing_bot(authority)
    server: BotServer = await serve(bot)
    theirs, mine = server.token(tenant_id=OTHER_TENANT), server.token(tenant_id=TEST_TENANT_ID)
    call_id = "7c1e2f90-5b4d-4a8e-9f3c-2d6b8a1e4f70"
    for state in ("establishing", "established"):
        item = without_tenant(b.call_state(call_id, state))
        assert (await server.post(b.notifications(item), token=theirs)).status == 202
    # Another tenant's valid token cannot end the call, nor type into it.
    for item in (b.call_terminated(call_id), b.tone(call_id, "tone9", 1)):
        response = await server.post(b.notifications(without_tenant(item)), token=mine)
        assert await refusal(response) == (403, "tenant_mismatch")
    assert await metric(server, "auth_failed", "tenant_mismatch") == 2
    # The call's own tenant goes on; had the refused ones been taken, they would come first.
    tone = without_tenant(b.tone(call_id, "tone2", 2))
    assert (await server.post(b.notifications(tone), token=theirs)).status == 202
    await until(lambda: len(seen) == 3, within=10)
    assert [type(e).__name__ for e in seen] == [
        "CallStateChanged",
        "CallStateChanged",
        "ToneReceived",
    ]
    assert {e.tenant_id for e in seen} == {OTHER_TENANT}
    assert [call.id for call in bot.active_calls()] == [call_id]


async def test_while_draining_another_tenant_cannot_end_a_call_either(
    authority: TokenAuthority, graph: FakeGraph, serve: Any
) -> None:
    """Refused with 503 while draining, a batch still resolves running handlers' waits:
    only for calls of its token's tenant."""
    bot = CallBot(
        graph.settings(openid_config_url=authority.openid_config_url, shutdown_timeout=60.0)
    )
    outcome: list[str] = []

    @bot.on_state("established")
    async def play(call: Call, event: events.CallStateChanged) -> None:
        prompt = await call.play_prompt("https://cdn.example.test/welcome.wav")
        try:
            await prompt.wait()
            outcome.append("completed")
        except OperationFailed:
            outcome.append("failed: the call ended")

    server: BotServer = await serve(bot)
    theirs, mine = server.token(tenant_id=OTHER_TENANT), server.token(tenant_id=TEST_TENANT_ID)
    call_id = "7c1e2f90-5b4d-4a8e-9f3c-2d6b8a1e4f70"
    graph.add_call(call_id)
    for state in ("establishing", "established"):
        item = without_tenant(b.call_state(call_id, state))
        assert (await server.post(b.notifications(item), token=theirs)).status == 202
    await graph.wait_for_request("playPrompt")
    draining = asyncio.create_task(bot.drain())
    await until(lambda: not bot.ready)
    for item in (b.call_terminated(call_id), b.tone(call_id, "tone9", 1)):
        response = await server.post(b.notifications(without_tenant(item)), token=mine)
        assert await refusal(response) == (503, "draining")
    assert [call.id for call in bot.active_calls()] == [call_id]
    assert outcome == []
    # The call's own tenant still ends it, and the waiting prompt learns so at once.
    ended = without_tenant(b.call_terminated(call_id))
    assert (await server.post(b.notifications(ended), token=theirs)).status == 503
    await draining
    assert outcome == ["failed: the call ended"]
    assert bot.active_calls() == []


# -- 8. token hygiene -----------------------------------------------------------------------


async def test_a_key_published_for_rs256_does_not_verify_rs384(
    authority: TokenAuthority, serve: Any
) -> None:
    bot, _ = seeing_bot(authority)
    server: BotServer = await serve(bot)
    body = b.notifications(b.incoming_call("alg-call"))
    response = await server.post(body, token=server.token(algorithm="RS384"))
    assert await refusal(response) == (401, "bad_algorithm")
    assert (await server.post(body, token=server.token(algorithm="RS256"))).status == 202


async def test_tokens_living_too_long_are_refused(authority: TokenAuthority, serve: Any) -> None:
    bot, _ = seeing_bot(authority, max_token_lifetime=3600.0)
    server: BotServer = await serve(bot)
    body = b.notifications(b.incoming_call("lifetime-call"))
    year_3000 = server.token(expires_in=32_503_680_000 - time.time())
    assert await refusal(await server.post(body, token=year_3000)) == (401, "lifetime_too_long")
    # Not expired yet, but issued two days before it expires.
    long_lived = server.token(issued_at=time.time() - 2 * 86400, expires_in=300)
    assert await refusal(await server.post(body, token=long_lived)) == (401, "lifetime_too_long")
    # An expiry past any float, signed by a key holder: a 500 before (OverflowError).
    beyond = server.token(extra_claims={"exp": 10**400})
    assert await refusal(await server.post(body, token=beyond)) == (401, "lifetime_too_long")
    assert await metric(server, "auth_failed", "lifetime_too_long") == 3
    assert (await server.post(body, token=server.token(expires_in=3000))).status == 202


async def test_a_request_past_the_key_fetch_waiters_is_one_log_line(
    authority: TokenAuthority, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_KEY_WAITERS requests waiting for a key fetch, each further token naming an
    invented kid (no valid token needed) wrote two lines, ``key_fetch_waiters_full`` and its
    refusal: a stranger doubled the log per request. The refusal alone says why."""
    bot, seen = seeing_bot(authority)
    server: BotServer = await serve(bot)
    auth = bot.authenticator
    fetch, release = auth._fetch, asyncio.Event()

    async def slow_fetch() -> None:
        await release.wait()
        await fetch()

    monkeypatch.setattr(auth, "_fetch", slow_fetch)
    body = b.notifications(b.incoming_call("kid-call"))

    async def invented_kid() -> ClientResponse:
        return await server.post(body, token=server.token(kid=secrets.token_hex(8)))

    waiting = [asyncio.ensure_future(invented_kid()) for _ in range(MAX_KEY_WAITERS)]
    await until(lambda: auth._key_waiters == MAX_KEY_WAITERS)
    with capture_logs() as logs:
        response = await invented_kid()
    assert response.status == 503
    assert response.headers["Retry-After"]
    assert (await response.json())["error"] == "keys_unavailable"
    [line] = logs
    assert (line["event"], line["reason"]) == ("callback_refused", "keys_unavailable")
    assert "wait for the signing keys" in line["detail"]
    release.set()
    for answered in await asyncio.gather(*waiting):
        assert await refusal(answered) == (401, "unknown_key")
    assert seen == []


async def test_two_authorization_headers_are_refused(authority: TokenAuthority, serve: Any) -> None:
    bot, seen = seeing_bot(authority)
    server: BotServer = await serve(bot)
    headers: CIMultiDict[str] = CIMultiDict()
    headers.add("Content-Type", "application/json")
    headers.add("Authorization", f"Bearer {server.token()}")
    headers.add("Authorization", "Bearer not-a-token")
    body = json.dumps(b.notifications(b.incoming_call("two-headers"))).encode()
    response = await server.client.post(bot.settings.callback_path, data=body, headers=headers)
    assert await refusal(response) == (401, "duplicate_header")
    assert seen == []


async def test_padded_or_non_canonical_base64url_is_refused(
    authority: TokenAuthority, serve: Any
) -> None:
    bot, _ = seeing_bot(authority)
    server: BotServer = await serve(bot)
    body = b.notifications(b.incoming_call("padding-call"))
    token = server.token()
    header, payload, signature = token.split(".")
    padded = f"{header}.{payload}.{signature}" + "=" * (-len(signature) % 4 or 4)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # 342 characters carry 256 bytes and 4 spare bits: set one, the bytes stay the same.
    last = alphabet[alphabet.index(signature[-1]) | 1]
    stray_bits = f"{header}.{payload}.{signature[:-1]}{last}"
    assert stray_bits != token
    for variant in (padded, stray_bits):
        assert await refusal(await server.post(body, token=variant)) == (401, "malformed")
    assert (await server.post(body, token=token)).status == 202


async def test_times_that_are_not_json_numbers_are_refused(
    authority: TokenAuthority, serve: Any
) -> None:
    bot, seen = seeing_bot(authority)
    server: BotServer = await serve(bot)
    body = b.notifications(b.incoming_call("numeric-date-call"))
    now = int(time.time())
    for claims in (
        {"exp": str(now + 300)},
        {"exp": True},
        {"nbf": str(now)},
        {"nbf": False},
        {"iat": str(now)},
    ):
        token = server.token(extra_claims=claims)
        assert await refusal(await server.post(body, token=token)) == (401, "malformed"), claims
    assert await metric(server, "auth_failed", "malformed") == 5
    assert seen == []
    assert (
        await server.post(body, token=server.token(extra_claims={"exp": now + 300.5}))
    ).status == 202


async def test_a_token_pyjwt_cannot_read_is_refused_not_a_500(
    authority: TokenAuthority, serve: Any
) -> None:
    """PyJWT before 2.14 (the floor is 2.8) let a RecursionError out of its JSON reader for
    a header nested deep enough, before any key is chosen, and before 2.15 for such a
    payload; before 2.14 an OverflowError for a time of Infinity: each a 500 and a traceback,
    the first for anyone. Each is a 401 ``malformed`` now, whatever PyJWT is installed."""
    bot, seen = seeing_bot(authority)
    server: BotServer = await serve(bot)
    body = b.notifications(b.incoming_call("nested-token-call"))
    header, payload, signature = server.token().split(".")

    def segment(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    # As deep as a header line aiohttp reads (8 KiB) can hold.
    nested = b"[" * 5000
    claims = segment(b'{"x":' + nested)
    tokens = [
        f"{segment(nested)}.{payload}.{signature}",
        f"{header}.{claims}.{signature}",
        *(
            server.token(extra_claims={name: value})
            for name, value in (("exp", math.inf), ("iat", math.inf), ("nbf", -math.inf))
        ),
    ]
    with capture_logs() as logs:
        for token in tokens:
            assert await refusal(await server.post(body, token=token)) == (401, "malformed")
    assert [line["log_level"] for line in logs] == ["warning"] * len(tokens)
    assert await metric(server, "auth_failed", "malformed") == len(tokens)
    assert seen == []
    assert (await server.post(body)).status == 202


async def test_what_a_token_header_chooses_is_cut_short_in_refusals(
    authority: TokenAuthority, serve: Any
) -> None:
    """An ``alg`` (or a ``crit`` entry PyJWT quotes) as long as a header line holds, no valid
    token needed, was written whole into the refusal's log line and its 401 body: 5 KB of
    log and answer per request. The ``kid`` was cut short already; so is the rest now."""
    bot, seen = seeing_bot(authority)
    server: BotServer = await serve(bot)
    body = b.notifications(b.incoming_call("chosen-header-call"))
    _, payload, signature = server.token().split(".")

    def with_header(header: dict[str, Any]) -> str:
        raw = json.dumps(header).encode()
        return f"{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}.{payload}.{signature}"

    long = "A" * 5000
    headers: list[tuple[dict[str, Any], str]] = [
        ({"alg": long, "kid": authority.kid}, "bad_algorithm"),
        ({"alg": [long], "kid": authority.kid}, "bad_algorithm"),
        ({"alg": "RS256", "kid": authority.kid, "crit": [long]}, "malformed"),
    ]
    for header, reason in headers:
        with capture_logs() as logs:
            response = await server.post(body, token=with_header(header))
        assert await refusal(response) == (401, reason)
        [line] = [entry for entry in logs if entry["event"] == "callback_refused"]
        assert len(line["detail"]) < 200, line["detail"][:100]
        assert len(await response.text()) < 300
    assert seen == []


# -- 7. memory and work one token holder can cause ------------------------------------------


async def test_graph_s_tracing_headers_are_cut_short_in_log_lines(
    authority: TokenAuthority, serve: Any
) -> None:
    """Anyone, token or not, can send Graph's chain and message id headers, up to 8 KiB
    each: a refusal line carried all three in full, 24 KiB of log for one request."""
    bot, seen = seeing_bot(authority)
    server: BotServer = await serve(bot)
    long = "7" * 8000
    headers = {
        "X-Microsoft-Skype-Chain-ID": long,
        "X-Microsoft-Skype-Message-ID": long,
        "X-Microsoft-Skype-Original-Message-ID": long,
    }
    body = b.notifications(b.incoming_call("traced-call"))
    with capture_logs() as logs:
        assert (await server.post(body, token="garbage", headers=headers)).status == 401
    [line] = [entry for entry in logs if entry["event"] == "callback_refused"]
    for field in ("chain_id", "message_id", "original_message_id"):
        assert line[field] == long[:128]
    assert seen == []


async def test_one_request_writes_a_bounded_number_of_lines_of_each_kind(
    authority: TokenAuthority, serve: Any, clock: Clock
) -> None:
    """A line per item: one valid token's request of 200 items wrote 200 lines of a kind
    (an ended call's tones dropped; invented ringing calls let go past max_pending_calls; a
    property that does not fit the models, each dropped too): 790 lines for 600 items."""
    bot = make_bot(authority, max_pending_calls=10)
    server: BotServer = await serve(bot)
    for item in (b.incoming_call("ended-call"), b.call_terminated("ended-call")):
        assert (await server.post(b.notifications(item))).status == 202
    unfit = []
    for n in range(200):
        state = b.call_state("ended-call", "established")
        state["resourceData"]["direction"] = {"not a direction": n}
        unfit.append(state)
    flood = [
        [b.tone("ended-call", "tone1", n) for n in range(200)],
        [b.incoming_call(f"invented-{n}") for n in range(200)],
        unfit,
    ]
    with capture_logs() as logs:
        for items in flood:
            assert (await server.post(b.notifications(*items))).status == 202
        written = Counter(entry["event"] for entry in logs)
        # The second ends: the last line left out of each kind says how many others were.
        await clock.advance(1.0)
    occurrences = {
        "notification_dropped": 400,
        "call_forgotten": 190,
        "notification_properties_left_out": 200,
    }
    for event, occurred in occurrences.items():
        assert written[event] == LINES_PER_SECOND
        lines = [entry for entry in logs if entry["event"] == event]
        assert len(lines) == LINES_PER_SECOND + 1
        assert sum(1 + entry.get("suppressed", 0) for entry in lines) == occurred
    # Every drop is counted in the metrics too.
    assert await metric(server, "dropped", "after_end") == 400


async def test_the_verified_token_cache_stays_within_its_byte_budget(
    authority: TokenAuthority, serve: Any
) -> None:
    budget = 256 * 1024
    bot, _ = seeing_bot(authority, token_cache_bytes=budget)
    server: BotServer = await serve(bot)
    # Each token is about 7 KB: 400 of them are 2.8 MB of token text alone.
    tokens = [server.token(extra_claims={"pad": "x" * 5000, "n": i}) for i in range(400)]
    body = json.dumps(b.notifications(b.call_state("cache-call", "establishing"))).encode()
    url = server.client.make_url(bot.settings.callback_path)
    # A plain session: the test client keeps every response (and its token) alive.
    async with aiohttp.ClientSession() as session:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for token in tokens:
                headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
                async with session.post(url, data=body, headers=headers) as response:
                    assert response.status == 202
            del token, headers
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert bot.authenticator.cache_bytes <= budget
    # The old cache kept every token (several MB); the budget plus request noise stays small.
    assert growth < 2 * 1024 * 1024, growth


async def test_a_request_with_too_many_items_is_refused_before_parsing(
    authority: TokenAuthority, serve: Any
) -> None:
    bot, seen = seeing_bot(authority, max_items_per_request=200)
    server: BotServer = await serve(bot)
    # Small items, so that 10,000 of them fit in a 1 MiB body.
    items = [
        {"changeType": "updated", "resourceUrl": f"/communications/calls/many-{i}"}
        for i in range(10_000)
    ]
    response = await server.client.post(
        bot.settings.callback_path,
        data=io.BytesIO(json.dumps({"value": items}).encode()),
        headers={"Authorization": f"Bearer {server.token()}", "Content-Type": "application/json"},
    )
    assert await refusal(response) == (413, "too_many_items")
    assert seen == []
    # The health check and a normal request still answer.
    assert (await server.client.get("/healthz")).status == 200
    assert (await server.post({"value": items[:200]})).status == 202
    await until(lambda: len(seen) == 200)


async def test_invented_call_ids_are_bounded_and_let_go(
    authority: TokenAuthority, serve: Any
) -> None:
    # One valid token, 2,000 call ids nobody placed: calls that ring, and calls with no state.
    bot, seen = seeing_bot(authority, max_pending_calls=300)
    server: BotServer = await serve(bot)
    for batch in range(40):
        items = []
        for n in range(50):
            call_id = f"invented-{batch:02d}-{n:02d}"
            if n % 2:
                items.append(b.incoming_call(call_id))
            else:
                items.append(b.unknown(call_id, "/someFutureResource"))
        assert (await server.post(b.notifications(*items))).status == 202
    await until(lambda: len(seen) == 2000, within=30)
    metrics = await (await server.client.get("/metrics")).text()
    known = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("callbot_known_calls ")
    )
    assert known <= 300
    assert len(bot.active_calls()) <= 300
    # (A call the bot answered is never counted against the bound: see the next test.)


async def known_calls(server: BotServer) -> float:
    metrics = await (await server.client.get("/metrics")).text()
    return next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("callbot_known_calls ")
    )


async def test_invented_established_calls_are_bounded_as_pending_ones(
    graph: FakeGraph, authority: TokenAuthority, serve: Any
) -> None:
    """A call first seen past ringing is kept as a live call only once Graph accepted the
    bot's own request on it (its answer here): ids a token holder invents straight into
    ``established`` stay pending, bounded and let go as ringing ones are."""
    bot = CallBot(
        graph.settings(
            openid_config_url=authority.openid_config_url, max_pending_calls=50, reorder_window=0.2
        )
    )
    seen: list[events.Event] = []

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        if isinstance(event, events.IncomingCall):
            await call.answer()
        seen.append(event)

    server: BotServer = await serve(bot)
    graph.add_call("real-call")
    assert (await server.post(b.notifications(b.incoming_call("real-call")))).status == 202
    await graph.wait_for_request("answer")
    for state in ("establishing", "established"):
        item = b.call_state("real-call", state)
        assert (await server.post(b.notifications(item))).status == 202
    await until(lambda: len(seen) == 3, within=10)
    with capture_logs() as logs:
        for batch in range(12):
            states = ("established", "establishing", "ringing", "hold")  # each its first
            items = [
                b.call_state(f"invented-{batch:02d}-{n:02d}", states[n % 4]) for n in range(50)
            ]
            assert (await server.post(b.notifications(*items))).status == 202
            # Each batch delivered (past its reorder window) before the next comes.
            await until(lambda: len(seen) == 3 + 50 * (batch + 1), within=10)  # noqa: B023
    assert await known_calls(server) <= 50 + 1
    assert len(bot.active_calls()) <= 50 + 1
    assert any(call.id == "real-call" for call in bot.active_calls())
    forgotten = [e for e in logs if e["event"] == "call_forgotten"]
    assert forgotten
    assert {e["reason"] for e in forgotten} == {"too_many_pending_calls"}


async def test_another_tenant_s_invented_calls_push_out_only_its_own(
    authority: TokenAuthority, serve: Any
) -> None:
    """Past ``max_pending_calls`` the tenant with the most pending calls lets its oldest go: a
    flood from another tenant's token neither forgets this tenant's ringing call (whose
    repeat stays a repeat) nor loses the state held for its other call."""
    bot, seen = seeing_bot(authority, max_pending_calls=50, reorder_window=300.0)
    server: BotServer = await serve(bot)
    for item in (
        b.incoming_call("ours-ringing"),
        b.incoming_call("ours-held"),
        b.call_state("ours-held", "established"),  # held: its predecessor is missing
    ):
        assert (await server.post(b.notifications(item))).status == 202
    theirs = server.token(tenant_id=OTHER_TENANT)
    for batch in range(4):
        flood = [without_tenant(b.incoming_call(f"theirs-{batch}-{n}")) for n in range(50)]
        assert (await server.post(b.notifications(*flood), token=theirs)).status == 202
    for item in (b.incoming_call("ours-ringing"), b.call_state("ours-held", "establishing")):
        assert (await server.post(b.notifications(item))).status == 202
    await until(lambda: len(seen) == 2 + 200 + 2)

    def of(call_id: str) -> list[str]:
        return [getattr(e, "state", type(e).__name__) for e in seen if e.call_id == call_id]

    assert of("ours-ringing") == ["incoming"]
    assert of("ours-held") == ["incoming", "establishing", "established"]
    counts = bot._running().store.counts
    assert counts["duplicate"] == 1
    assert counts["call_forgotten"] == 0


async def test_a_state_held_when_its_call_is_let_go_is_said_dropped(
    authority: TokenAuthority, serve: Any
) -> None:
    bot, _seen = seeing_bot(authority, max_pending_calls=2, reorder_window=300.0)
    server: BotServer = await serve(bot)
    with capture_logs() as logs:
        held = b.call_state("first", "established")  # held: its predecessor is missing
        assert (await server.post(b.notifications(held))).status == 202
        more = [b.incoming_call(f"later-{n}") for n in range(2)]
        assert (await server.post(b.notifications(*more))).status == 202
    dropped = [e for e in logs if e["event"] == "notification_dropped"]
    assert [(e["call_id"], e["reason"], e["why"]) for e in dropped] == [
        ("first", "call_forgotten", "too_many_pending_calls")
    ]
    assert bot._running().store.counts["call_forgotten"] == 1


def test_a_large_batch_is_built_in_parts_and_refused_whole() -> None:
    from callbot._parse import parse_body, parse_body_in_parts

    items = [b.tone(f"call-{n}", "tone1", n) for n in range(200)]
    body = json.dumps(b.notifications(*items)).encode()
    parts = list(parse_body_in_parts(body, max_items=200, part_size=32))
    # The receiver lets the event loop run between parts (health checks, other calls).
    assert [len(part) for part in parts] == [32] * 6 + [8]
    assert [e.raw for part in parts for e in part] == [e.raw for e in parse_body(body)]
    # A bad item late in the batch refuses it before its last part is handed over.
    items[150] = {"changeType": "updated", "resourceUrl": "/communications/calls/../x"}
    body = json.dumps(b.notifications(*items)).encode()
    handed: list[int] = []

    def hand_over() -> None:
        for part in parse_body_in_parts(body, max_items=200, part_size=32):
            handed.append(len(part))

    with pytest.raises(MalformedNotification, match="not a usable id"):
        hand_over()
    assert handed == [32] * 4
    # Parts are cut by the participants they build too: 12 rosters of 300 are not one part.
    rosters = [
        b.roster(f"call-{n}", [b.participant(f"p-{n}-{i}") for i in range(300)]) for n in range(12)
    ]
    body = json.dumps(b.notifications(*rosters)).encode()
    sizes = [len(part) for part in parse_body_in_parts(body, max_items=200, part_size=32)]
    assert sizes == [2] * 6


# -- what one call keeps stays bounded --------------------------------------------------------


async def test_a_call_s_roster_and_snapshot_stay_bounded(
    authority: TokenAuthority, serve: Any
) -> None:
    """Deltas naming new participants each time, and states inventing new properties each
    time, grew one call's record (14 MiB per 1 MiB request) for as long as the call lived."""
    bot = make_bot(authority, max_roster_size=50)
    rosters: list[int] = []
    extras: list[int] = []

    @bot.on(events.ParticipantsUpdated)
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        rosters.append(len(call.roster))

    @bot.on(events.CallUpdated)
    async def updated(call: Call, event: events.CallUpdated) -> None:
        assert call.snapshot is not None
        extras.append(len(call.snapshot.model_extra or {}))

    server: BotServer = await serve(bot)
    call_id = "bounded-call"
    for state in ("establishing", "established"):
        assert (await server.post(b.notifications(b.call_state(call_id, state)))).status == 202

    def joining(sequence: int, count: int) -> dict[str, Any]:
        people = [b.participant(f"p-{sequence}-{n}") for n in range(count)]
        return b.delta_roster(call_id, people, sequence_number=sequence, change_type="created")

    # More participants than a roster may hold, in one notification: refused before parsing.
    response = await server.post(b.notifications(joining(1, 51)))
    assert await refusal(response) == (413, "too_many_participants")
    # Each delta fits; the sixth would take the roster past its bound and is dropped.
    for sequence in range(1, 7):
        assert (await server.post(b.notifications(joining(sequence, 10)))).status == 202
    await until(lambda: len(rosters) == 5)
    assert rosters == [10, 20, 30, 40, 50]
    assert await metric(server, "dropped", "roster_full") == 1
    # Who leaves still leaves, and then there is room again.
    leaving = b.delta_roster(
        call_id, [b.participant("p-1-0")], sequence_number=7, change_type="deleted"
    )
    assert (await server.post(b.notifications(leaving))).status == 202
    assert (await server.post(b.notifications(joining(8, 1)))).status == 202
    await until(lambda: rosters[-2:] == [49, 50])

    for n in range(6):
        item = b.call_state(call_id, "established")
        item["resourceData"].update({f"invented{n}x{i}": i for i in range(100)})
        assert (await server.post(b.notifications(item))).status == 202
    await until(lambda: len(extras) == 6)
    assert max(extras) <= 256
    assert extras[:2] == [100, 200]


FLOOD_TEXT = 64 * 1024
FLOOD_ROUNDS = 16
# A record's head: its phase, state, digests and operations besides its roster and snapshot.
RECORD_HEAD = 64 * 1024


def flooding(call_id: str, round_: int) -> list[dict[str, Any]]:
    """A delta naming a new participant whose name is ``FLOOD_TEXT`` long, and a state
    update with a message and an invented property as long."""
    person = b.participant(f"p-{round_}", display_name=f"{round_ % 10}" * FLOOD_TEXT)
    joining = b.delta_roster(call_id, [person], sequence_number=round_, change_type="created")
    update = b.call_state(call_id, "established")
    update["resourceData"]["resultInfo"] = {
        "@odata.type": "#microsoft.graph.resultInfo",
        "code": 500,
        "subcode": round_,
        "message": "m" * FLOOD_TEXT,
    }
    update["resourceData"][f"invented{round_}"] = "x" * FLOOD_TEXT
    return [joining, update]


def record_bound(max_roster_size: int) -> int:
    """What a call's record may take at most, as documented: its roster's bytes, its
    snapshot's, and its head."""
    return max_roster_size * ROSTER_BYTES_PER_PARTICIPANT + MAX_SNAPSHOT_BYTES + RECORD_HEAD


async def test_a_call_flooded_with_long_names_and_messages_keeps_a_bounded_record(
    authority: TokenAuthority, serve: Any
) -> None:
    """Each body is bounded, but a call kept what each brought: deltas naming a participant
    with a name 64 KiB long, states with a message and an invented property as long, grew
    one call's record by 128 KiB a round (2.2 MB after 16; with 4 MiB bodies, 4 MiB a
    request) for as long as the call lived. Handlers still get each notification as sent;
    the record stops growing at its bytes, with one line for the call."""
    bot = make_bot(authority, max_roster_size=100)
    names: list[int] = []
    messages: list[int] = []
    rosters: list[list[str]] = []

    @bot.on(events.ParticipantsUpdated)
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        for person in event.joined:
            assert person.info is not None
            assert person.info.identity is not None
            assert person.info.identity.user is not None
            names.append(len(person.info.identity.user.display_name or ""))
        rosters.append(sorted(call.roster))

    @bot.on(events.CallUpdated)
    async def updated(call: Call, event: events.CallUpdated) -> None:
        assert event.result_info is not None
        messages.append(len(event.result_info.message or ""))

    server: BotServer = await serve(bot)
    call_id = "flooded-call"
    for state in ("establishing", "established"):
        assert (await server.post(b.notifications(b.call_state(call_id, state)))).status == 202
    with capture_logs() as logs:
        for round_ in range(1, FLOOD_ROUNDS + 1):
            for item in flooding(call_id, round_):
                assert (await server.post(b.notifications(item))).status == 202
        await until(lambda: len(names) == len(messages) == FLOOD_ROUNDS)
    # Every handler got its notification's text whole.
    assert names == messages == [FLOOD_TEXT] * FLOOD_ROUNDS
    record = bot._running().store.known(id_key(call_id))
    assert record is not None
    assert len(encode_record(record).encode()) < record_bound(100)
    # The roster kept the participants that fit (six of these), then stopped growing.
    kept = len(record.roster)
    assert 0 < kept < FLOOD_ROUNDS
    assert [len(people) for people in rosters] == [
        *range(1, kept + 1),
        *[kept] * (FLOOD_ROUNDS - kept),
    ]
    full = [line for line in logs if line["event"] == "call_record_full"]
    assert [(line["call_id"], line["log_level"]) for line in full] == [(call_id, "warning")]
    # A roster of the usual size is kept again: the call goes on.
    usual = b.roster(call_id, [b.participant("usual", display_name="Usual Name")])
    assert (await server.post(b.notifications(usual))).status == 202
    await until(lambda: rosters[-1] == ["usual"])


async def test_a_request_holds_at_most_a_full_roster_s_worth_of_objects(
    authority: TokenAuthority, serve: Any
) -> None:
    """Only participants were counted before building: one call item whose ``targets``
    listed a million empty objects (4 MiB) was built in one part (5.6 s of event loop) and
    kept as the call's snapshot (933 MiB). A request may hold no more JSON objects and arrays
    than a full roster of Teams participants (7-10 each, recorded) would."""
    bot, seen = seeing_bot(authority, max_roster_size=100)
    server: BotServer = await serve(bot)
    item = b.call_state("fat-call", "establishing")
    item["resourceData"]["targets"] = [{}] * 2_000
    with capture_logs() as logs:
        assert await refusal(await server.post(b.notifications(item))) == (
            413,
            "too_many_values",
        )
    assert [line["event"] for line in logs] == ["callback_refused"]
    assert await metric(server, "malformed", "too_many_values") == 1
    # Items each under the bound, more than a full roster's worth together.
    items = []
    for n in range(3):
        other = b.call_state(f"fat-call-{n}", "establishing")
        other["resourceData"]["targets"] = [{}] * 990
        items.append(other)
    assert await refusal(await server.post(b.notifications(*items))) == (413, "too_many_values")
    # Participants written into a call item buy no room for anything else it holds.
    invented = b.call_state("fat-call", "establishing")
    invented["resourceData"]["participants"] = [{}] * 100
    invented["resourceData"]["targets"] = [{}] * 2_400
    assert await refusal(await server.post(b.notifications(invented))) == (413, "too_many_values")
    # Braces inside strings are no objects: a prompt's text may hold any.
    item["resourceData"]["targets"] = [{"note": "{[" * 1_000}]
    assert (await server.post(b.notifications(item))).status == 202
    await until(lambda: len(seen) == 1)


async def test_a_request_lists_at_most_a_roster_of_participants_in_all(
    authority: TokenAuthority, serve: Any
) -> None:
    """Items of empty participants (``{}``, 3 bytes each) under the per-item limit built a
    million participants from one body (seconds of ingest, hundreds of MiB): a request may
    list no more participants in all than one roster may hold."""
    bot, seen = seeing_bot(authority, max_roster_size=100)
    server: BotServer = await serve(bot)

    def rosters(count: int, size: int) -> dict[str, Any]:
        items = [
            {
                "changeType": "updated",
                "resourceUrl": f"/communications/calls/roster-{n}/participants",
                "resourceData": [{}] * size,
            }
            for n in range(count)
        ]
        return {"value": items}

    assert await refusal(await server.post(rosters(3, 40))) == (413, "too_many_participants")
    assert await metric(server, "malformed", "too_many_participants") == 1
    assert (await server.post(rosters(2, 50))).status == 202
    await until(lambda: len(seen) == 2)
    assert sorted(e.call_id for e in seen) == ["roster-0", "roster-1"]
