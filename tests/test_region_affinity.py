"""Region affinity: a new call sent to another deployment with a 302, on real servers.

Graph posts a call's first notification to whichever deployment GeoDNS resolves; a bot
that should run the call elsewhere answers ``302 Found`` with that deployment's callback
URL as ``Location`` (msteams-docs, call-notifications.md, "Redirects for region
affinity"). ``CallBot.choose_deployment`` decides; nothing of a redirected call is kept.
"""

from __future__ import annotations

import functools
import json
from collections.abc import MutableMapping
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from callbot import Call, CallBot, events
from callbot._affinity import DeploymentChooser, location_problem
from callbot.testing import TEST_TENANT_ID, Simulator, TokenAuthority, run_with_simulator
from callbot.testing import builders as b

from .conftest import APP_ID, BotServer, make_bot, plain_server, until

EU = "https://bot-eu.example.test/api/calls"
OTHER_TENANT = "0b1f4c5e-7a2d-4e3b-9c8d-112233445566"


class Deployment:
    """A bot whose chooser sends every new call to ``self.elsewhere`` (``None``: here), and
    that records what its handlers see and whom its chooser was asked about."""

    def __init__(self, bot: CallBot) -> None:
        self.bot = bot
        self.elsewhere: Any = EU
        self.asked: list[str] = []
        self.seen: list[events.Event] = []

        @bot.choose_deployment
        def choose(event: events.IncomingCall) -> str | None:
            self.asked.append(event.call_id)
            if isinstance(self.elsewhere, Exception):
                raise self.elsewhere
            return self.elsewhere  # type: ignore[no-any-return]  # a test's wrong values too

        @bot.on(events.Event)
        async def record(call: Call, event: events.Event) -> None:
            self.seen.append(event)


def deployment(authority: TokenAuthority, **options: Any) -> Deployment:
    return Deployment(make_bot(authority, **options))


def incoming(call_id: str, **options: Any) -> dict[str, Any]:
    return b.notifications(b.incoming_call(call_id, **options))


async def metrics_text(server: BotServer) -> str:
    return await (await server.client.get("/metrics")).text()


def lines(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


async def test_a_call_for_another_deployment_gets_302_to_it_and_nothing_is_kept_here(
    authority: TokenAuthority, serve: Any
) -> None:
    here = deployment(authority)
    server: BotServer = await serve(here.bot)
    with capture_logs() as logs:
        response = await server.post(incoming("eu-call"))
    assert response.status == 302
    assert response.headers["Location"] == EU
    assert here.asked == ["eu-call"]
    runtime = here.bot._running()
    # Not accepted: no record, no pending call, nothing queued, not counted as accepted.
    assert runtime.lifecycle.get("eu-call") is None
    assert len(runtime.lifecycle) == 0
    assert runtime.store.known("eucall") is None
    assert runtime.dispatcher.queued == 0
    assert here.bot.active_calls() == []
    assert here.bot.receiver.counts["accepted", ""] == 0
    redirected = lines(logs, "callback_redirected")
    assert [(r["call_id"], r["location"]) for r in redirected] == [("eu-call", EU)]
    assert 'callbot_redirects_total{outcome="redirected"} 1.0' in await metrics_text(server)
    # A call the chooser keeps here is run here, and only it reaches a handler.
    here.elsewhere = None
    assert (await server.post(incoming("home-call"))).status == 202
    await until(lambda: len(here.seen) == 1)
    assert [event.call_id for event in here.seen] == ["home-call"]


async def test_only_a_new_call_s_incoming_call_alone_is_redirected(
    authority: TokenAuthority, serve: Any
) -> None:
    """A later notification of a call, a request mixing the incoming call with anything
    else, and a copy of an incoming call this deployment already took are run here."""
    here = deployment(authority)
    server: BotServer = await serve(here.bot)
    # The same incoming call twice in one request is still that call alone.
    twice = b.notifications(b.incoming_call("twice"), b.incoming_call("TWICE"))
    assert (await server.post(twice)).status == 302
    later = b.notifications(b.call_state("twice", "establishing"))
    mixed = b.notifications(b.incoming_call("mixed"), b.call_state("other", "establishing"))
    two_calls = b.notifications(b.incoming_call("first"), b.incoming_call("second"))
    for body in (later, mixed, two_calls):
        response = await server.post(body)
        assert response.status == 202, body
        assert "Location" not in response.headers
    assert here.asked == ["twice"]
    await until(lambda: len(here.seen) == 5)
    assert sorted(event.call_id for event in here.seen) == [
        "first",
        "mixed",
        "other",
        "second",
        "twice",
    ]
    # A copy of an incoming call this deployment runs stays here, whatever the chooser says.
    resent = await server.post(incoming("first"))
    assert resent.status == 202
    assert here.asked == ["twice"]


@pytest.mark.parametrize(
    ("location", "problem"),
    [
        ("http://bot-eu.example.test/api/calls", "not https"),
        ("/api/calls", "not an absolute URL"),
        ("bot-eu.example.test/api/calls", "not an absolute URL"),
        (EU + "\r\nSet-Cookie: session=stolen", "control character"),
        (EU + "\n", "control character"),
        ("https://bot-eu.example.test/api calls", "a space"),
        ("https://bot-eu.exämple.test/api/calls", "outside ASCII"),
        ("https://user:secret@bot-eu.example.test/api/calls", "credentials"),
        ("https://bot-eu.example.test:99999/api/calls", "port"),
        ("https://bot-eu.example.test/api/calls#eu", "fragment"),
        ("ftp://bot-eu.example.test/api/calls", "not https"),
        ("", "empty"),
        ("https://bot-eu.example.test/" + "x" * 2100, "longer than"),
        (42, "not a string"),
        (b"https://bot-eu.example.test/api/calls", "not a string"),
    ],
)
async def test_a_bad_location_is_one_log_line_and_the_call_runs_here(
    authority: TokenAuthority, serve: Any, location: object, problem: str
) -> None:
    here = deployment(authority)
    here.elsewhere = location
    server: BotServer = await serve(here.bot)
    with capture_logs() as logs:
        response = await server.post(incoming("bad-location"))
    assert response.status == 202
    assert "Location" not in response.headers
    await until(lambda: len(here.seen) == 1)
    assert isinstance(here.seen[0], events.IncomingCall)
    [failed] = lines(logs, "deployment_choice_failed")
    assert failed["reason"] == "bad_location"
    assert problem in failed["detail"]
    assert failed["call_id"] == "bad-location"
    assert failed["log_level"] == "error"
    assert lines(logs, "callback_redirected") == []
    assert 'callbot_redirects_total{outcome="bad_location"} 1.0' in await metrics_text(server)


async def test_a_chooser_that_raises_is_one_log_line_and_the_call_runs_here(
    authority: TokenAuthority, serve: Any
) -> None:
    here = deployment(authority)
    here.elsewhere = KeyError("no region for this tenant")
    server: BotServer = await serve(here.bot)
    with capture_logs() as logs:
        response = await server.post(incoming("raising"))
    assert response.status == 202
    await until(lambda: len(here.seen) == 1)
    [failed] = lines(logs, "deployment_choice_failed")
    assert failed["reason"] == "chooser_failed"
    assert "no region for this tenant" in failed["detail"]
    assert failed["chooser"].endswith("choose")
    text = await metrics_text(server)
    assert 'callbot_redirects_total{outcome="chooser_failed"} 1.0' in text
    assert 'callbot_redirects_total{outcome="redirected"} 0.0' in text


class RegionTable:
    """A chooser that is an object: the regions it knows, by tenant."""

    def __init__(self, regions: dict[str, str]) -> None:
        self.regions = regions

    def __call__(self, event: events.IncomingCall) -> str | None:
        return self.regions[event.tenant_id or ""]


def by_tenant(regions: dict[str, str], event: events.IncomingCall) -> str | None:
    return regions[event.tenant_id or ""]


@pytest.mark.parametrize(
    ("chooser", "named"),
    [
        (RegionTable({OTHER_TENANT: EU}), "RegionTable"),
        (functools.partial(by_tenant, {OTHER_TENANT: EU}), "by_tenant"),
    ],
)
async def test_a_chooser_object_or_partial_that_fails_is_logged_by_its_name(
    authority: TokenAuthority, serve: Any, chooser: DeploymentChooser, named: str
) -> None:
    """Its log line named it by its repr: an object's memory address, or a partial's every
    argument (the whole table of tenants), different in each process."""
    bot = make_bot(authority)
    bot.choose_deployment(chooser)
    server: BotServer = await serve(bot)
    with capture_logs() as logs:
        assert (await server.post(incoming("unknown-tenant"))).status == 202
    [failed] = lines(logs, "deployment_choice_failed")
    assert (failed["reason"], failed["chooser"]) == ("chooser_failed", named)


async def test_a_coroutine_returned_by_a_chooser_is_a_bad_location_closed_unawaited(
    authority: TokenAuthority, serve: Any
) -> None:
    here = deployment(authority)

    async def look_up_region() -> str:
        return EU

    here.elsewhere = look_up_region()  # a plain def that hands back a coroutine
    server: BotServer = await serve(here.bot)
    with capture_logs() as logs:
        assert (await server.post(incoming("awaited"))).status == 202
    [failed] = lines(logs, "deployment_choice_failed")
    assert failed["detail"] == "not a string but coroutine"
    assert here.elsewhere.cr_frame is None  # closed: no "never awaited" warning later


async def test_a_bot_without_a_public_url_sends_calls_elsewhere_too(
    authority: TokenAuthority, serve: Any
) -> None:
    here = deployment(authority, public_url=None)
    server: BotServer = await serve(here.bot)
    response = await server.post(incoming("no-public-url"))
    assert (response.status, response.headers["Location"]) == (302, EU)


@pytest.mark.parametrize(
    "location",
    ["http://127.0.0.1:8081/api/calls", "http://localhost:8081/api/calls?region=eu", EU],
)
async def test_https_anywhere_and_plain_http_on_this_machine_are_redirected_to(
    authority: TokenAuthority, serve: Any, location: str
) -> None:
    here = deployment(authority)
    here.elsewhere = location
    server: BotServer = await serve(here.bot)
    response = await server.post(incoming("sent"))
    assert (response.status, response.headers["Location"]) == (302, location)


async def test_the_bot_s_own_callback_url_means_here(authority: TokenAuthority, serve: Any) -> None:
    here = deployment(authority)
    here.elsewhere = "HTTPS://Bot.Example.Test:443/api/calls"  # make_bot's, written otherwise
    server: BotServer = await serve(here.bot)
    with capture_logs() as logs:
        response = await server.post(incoming("mine"))
    assert response.status == 202
    await until(lambda: len(here.seen) == 1)
    assert lines(logs, "deployment_choice_failed") == []
    assert 'callbot_redirects_total{outcome="redirected"} 0.0' in await metrics_text(server)


async def test_a_request_not_authenticated_gets_401_and_never_a_location(
    authority: TokenAuthority, serve: Any
) -> None:
    here = deployment(authority)
    server: BotServer = await serve(here.bot)
    tokens = {
        "expired": server.token(expires_in=-600),
        "bad_audience": authority.mint(audience="someone-else"),
        "malformed": "garbage",
    }
    for reason, token in tokens.items():
        response = await server.post(incoming("stranger"), token=token)
        assert response.status == 401, reason
        assert "Location" not in response.headers
        assert EU not in await response.text()
    missing = await server.client.post(
        here.bot.settings.callback_path, json=incoming("stranger"), allow_redirects=False
    )
    assert missing.status == 401
    assert "Location" not in missing.headers
    assert here.asked == []


async def test_tenant_checks_come_before_a_redirect(authority: TokenAuthority, serve: Any) -> None:
    here = deployment(authority)
    server: BotServer = await serve(here.bot)
    # An item naming another tenant than its token's is refused, not sent on.
    response = await server.post(
        incoming("other-tenant", tenant_id=OTHER_TENANT),
        token=server.token(tenant_id=TEST_TENANT_ID),
    )
    assert (response.status, (await response.json())["error"]) == (403, "tenant_mismatch")
    # A call this deployment runs for one tenant is still refused to another tenant's token.
    here.elsewhere = None
    ours = server.token(tenant_id=TEST_TENANT_ID)
    assert (await server.post(incoming("bound"), token=ours)).status == 202
    here.elsewhere = EU
    theirs = server.token(tenant_id=OTHER_TENANT)
    response = await server.post(incoming("bound", tenant_id=OTHER_TENANT), token=theirs)
    assert (response.status, (await response.json())["error"]) == (403, "tenant_mismatch")
    assert here.asked == ["bound"]


def test_a_chooser_is_a_plain_function_and_a_bot_has_one(authority: TokenAuthority) -> None:
    bot = make_bot(authority)

    async def looks_up(event: events.IncomingCall) -> str | None:
        return None

    with pytest.raises(TypeError, match="plain 'def' function"):
        bot.choose_deployment(looks_up)  # type: ignore[type-var]

    class LooksUp:
        async def __call__(self, event: events.IncomingCall) -> str | None:
            return None

    # An object whose call is a coroutine would answer every call with one.
    with pytest.raises(TypeError, match="LooksUp' must be a plain 'def' function"):
        bot.choose_deployment(LooksUp())  # type: ignore[type-var]

    def by_tenant(event: events.IncomingCall) -> str | None:
        return None

    assert bot.choose_deployment(by_tenant) is by_tenant
    with pytest.raises(ValueError, match="already has a deployment chooser"):
        bot.choose_deployment(by_tenant)


# -- the simulator follows a 302 as Graph does ------------------------------------------------


async def test_the_simulator_posts_a_redirected_notification_and_the_call_s_next_ones_there(
    bare_simulator: Simulator,
) -> None:
    sim = bare_simulator
    at_home: list[str] = []
    in_eu: list[tuple[str, str, Any]] = []

    async def eu_deployment(request: web.Request) -> web.Response:
        in_eu.append((request.method, request.path_qs, await request.json()))
        return web.Response(status=202)

    async with plain_server(eu_deployment) as eu:
        target = f"{eu}/api/calls?region=eu"

        async def home_deployment(request: web.Request) -> web.Response:
            at_home.append(request.path_qs)
            return web.Response(status=302, headers={"Location": target})

        async with plain_server(home_deployment) as home:
            sim.callback_url = f"{home}/api/calls"
            body = incoming("moved", tenant_id=sim.tenant_id)
            assert await sim.post(body, call_id="moved") == 202
            later = b.notifications(b.call_state("moved", "establishing"))
            assert await sim.post(later, call_id="moved") == 202
    assert at_home == ["/api/calls"]
    assert [(method, path) for method, path, _ in in_eu] == [
        ("POST", "/api/calls?region=eu"),
        ("POST", "/api/calls?region=eu"),
    ]
    assert in_eu[0][2] == body
    assert sim.callback_url_for("moved") == target
    hops = [t for t in sim.traffic if t.kind == "notification"]
    assert [(t.status, t.url, t.redirected_to) for t in hops] == [
        (302, f"{home}/api/calls", target),
        (202, target, None),
        (202, target, None),
    ]
    assert sim.failed_deliveries == []


async def test_a_relative_location_is_resolved_against_the_url_that_answered(
    bare_simulator: Simulator,
) -> None:
    sim = bare_simulator
    paths: list[str] = []

    async def deployment_server(request: web.Request) -> web.Response:
        paths.append(request.path_qs)
        if request.path == "/api/calls":
            return web.Response(status=302, headers={"Location": "/eu/api/calls"})
        return web.Response(status=202)

    async with plain_server(deployment_server) as base:
        sim.callback_url = f"{base}/api/calls"
        assert await sim.post(incoming("relative", tenant_id=sim.tenant_id)) == 202
        assert sim.callback_url_for("relative") == f"{base}/eu/api/calls"
    assert paths == ["/api/calls", "/eu/api/calls"]


async def test_a_redirect_loop_ends_as_a_refusal_that_says_so(bare_simulator: Simulator) -> None:
    sim = bare_simulator
    answered: list[str] = []

    async def loop(request: web.Request) -> web.Response:
        answered.append(request.method)
        return web.Response(status=302, headers={"Location": str(request.url)})

    async with plain_server(loop) as base:
        sim.callback_url = f"{base}/api/calls"
        assert await sim.post(incoming("looping", tenant_id=sim.tenant_id)) == 302
    assert answered == ["POST"] * 6  # the first post, then five redirects followed
    last = [t for t in sim.traffic if t.kind == "notification"][-1]
    assert last.redirected_to is None
    assert "a loop?" in last.refusal()


async def test_a_second_deployment_runs_the_call_the_first_sends_it() -> None:
    """Two bots of one app on 127.0.0.1: Graph announces the call at the first, which sends
    it on with a 302; the second answers it and is told the rest of the call."""
    first, second = CallBot(app_id=APP_ID), CallBot(app_id=APP_ID)
    seen_first: list[events.Event] = []
    seen_second: list[events.Event] = []
    where: dict[str, str] = {}

    @first.choose_deployment
    def to_the_second(event: events.IncomingCall) -> str | None:
        return where["second"]

    @first.on(events.Event)
    async def first_sees(call: Call, event: events.Event) -> None:
        seen_first.append(event)

    @second.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @second.on(events.Event)
    async def second_sees(call: Call, event: events.Event) -> None:
        seen_second.append(event)

    async with run_with_simulator(first) as sim, sim.serve(second) as second_url:
        where["second"] = second_url
        call = await sim.incoming_call(from_user="Adele Vance")
        await call.wait_for_state("established")
        assert await call.wait_for_answer() == "answer"
        await call.hangup()
        await call.wait_until_ended()
        await call.settled()
        assert call.callback_url == second_url
        assert sim.failed_deliveries == []
        notifications = [t for t in sim.traffic if t.kind == "notification"]
        announced = notifications[0]
        assert (announced.url, announced.status) == (sim.callback_url, 302)
        assert announced.redirected_to == second_url
        assert {t.url for t in notifications[1:]} == {second_url}
        assert first._running().receiver.counts["accepted", ""] == 0
        assert len(first._running().lifecycle) == 0
    assert seen_first == []
    assert [type(e).__name__ for e in seen_second][:1] == ["IncomingCall"]
    assert call.states == ["incoming", "establishing", "established", "terminated"]
    handlers = [t.summary for t in sim.traffic if t.kind == "handler"]
    assert "answer ran on IncomingCall" in handlers


@pytest.fixture
async def bare_simulator() -> Any:
    async with Simulator() as sim:
        yield sim


def test_a_location_carries_nothing_but_the_url() -> None:
    """The checks that keep a header from being split, whatever the chooser returned."""
    assert location_problem(EU) is None
    assert location_problem("http://127.0.0.1/api/calls") is None
    assert location_problem("http://[::1]:8080/api/calls") is None  # this machine too
    for control in ("\r", "\n", "\0", "\t", "\x7f", " "):
        assert location_problem(EU + control + "x") is not None, repr(control)
    assert location_problem(json.dumps(EU)) is not None  # quotes: not a URL
