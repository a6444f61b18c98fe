"""App-only tokens: client secret, certificate assertions, custom credentials, caching."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import json
import re
import time
import warnings
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from callbot import ConfigurationError, GraphError, Settings
from callbot.graph import (
    AccessToken,
    CallServices,
    CertificateCredential,
    ClientSecretCredential,
    RetryPolicy,
    TokenCache,
)
from callbot.graph._credentials import graph_scope
from callbot.testing import FakeGraph

from .conftest import Clock, plain_server, until

APP_ID = "6c4a7c4e-2b1a-4d7e-9a53-7a1bfb4c0d11"
CALL_ID = "57dab8b1-894c-409a-b240-bd8beae78896"
FAST = RetryPolicy(total_time=1.0, base_delay=0.001, max_delay=0.01)
# With the loop's clock stopped, a retry's sleep would never end.
NO_RETRY = RetryPolicy(total_time=0.0)


@pytest.fixture
def graph(graph: FakeGraph) -> FakeGraph:
    """The FakeGraph of every test, offering the call these tests act on."""
    graph.add_call(CALL_ID, state="established")
    return graph


def self_signed(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "callbot test")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def write_pem(
    path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    return path


async def test_client_secret_flow(graph: FakeGraph) -> None:
    graph.register_client(APP_ID, secret="s3cret")
    svc = CallServices(graph.settings(app_secret="s3cret"), retry=FAST)
    await svc.start()
    try:
        await svc.call(CALL_ID).keep_alive()
        await svc.call(CALL_ID).keep_alive()
    finally:
        await svc.close()
    (request,) = graph.token_requests
    assert request.path == f"/authority/{graph.tenant_id}/oauth2/v2.0/token"
    assert request.form == {
        "client_id": APP_ID,
        "scope": "https://graph.microsoft.com/.default",
        "grant_type": "client_credentials",
        "client_secret": "s3cret",
    }


async def test_wrong_secret_is_a_graph_error(graph: FakeGraph) -> None:
    graph.register_client(APP_ID, secret="right")
    svc = CallServices(graph.settings(app_secret="wrong"), retry=FAST)
    try:
        with pytest.raises(GraphError) as failure:
            await svc.call(CALL_ID).keep_alive()
    finally:
        await svc.close()
    assert failure.value.status == 401
    assert failure.value.code == "invalid_client"
    assert "AADSTS7000215" in failure.value.message
    assert graph.requests_for("keepAlive") == []


@pytest.mark.parametrize("kind", ["rsa", "ec"])
async def test_certificate_flow(graph: FakeGraph, tmp_path: Path, kind: str) -> None:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    cert = self_signed(key)
    pem = write_pem(tmp_path / "bot.pem", key, cert)
    graph.register_client(APP_ID, certificate=cert.public_bytes(serialization.Encoding.PEM))
    settings = graph.settings(app_secret=None, certificate_path=str(pem))
    svc = CallServices(settings, retry=FAST)
    await svc.start()
    try:
        await svc.call(CALL_ID).keep_alive()
    finally:
        await svc.close()
    (request,) = graph.token_requests
    assert request.form["client_assertion_type"] == (
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    )
    assert "client_secret" not in request.form
    header = jwt.get_unverified_header(request.form["client_assertion"])
    assert header["alg"] == ("PS256" if kind == "rsa" else "ES256")
    assert "x5t#S256" in header
    assert "x5t" in header
    claims = jwt.decode(request.form["client_assertion"], options={"verify_signature": False})
    assert claims["aud"] == graph.token_url
    assert claims["iss"] == claims["sub"] == APP_ID
    assert claims["exp"] > time.time()


async def test_certificate_of_another_key_is_refused(graph: FakeGraph, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    registered = self_signed(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    graph.register_client(APP_ID, certificate=registered)
    pem = write_pem(tmp_path / "bot.pem", key, self_signed(key))
    svc = CallServices(graph.settings(app_secret=None, certificate_path=str(pem)), retry=FAST)
    try:
        with pytest.raises(GraphError) as failure:
            await svc.call(CALL_ID).keep_alive()
    finally:
        await svc.close()
    assert failure.value.code == "invalid_client"
    assert "another certificate" in failure.value.message


async def test_rs256_assertion_also_verifies(graph: FakeGraph, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = self_signed(key)
    graph.register_client(APP_ID, certificate=cert)
    credential = CertificateCredential(
        graph.tenant_id,
        APP_ID,
        write_pem(tmp_path / "bot.pem", key, cert),
        algorithm="RS256",
        authority_url=graph.authority_url,
    )
    try:
        token = await credential.get_token("https://graph.microsoft.com/.default")
    finally:
        await credential.close()
    assert token.token in graph.tokens
    assert token.expires_on > time.time() + 3000


def test_certificate_file_problems_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        CertificateCredential("t", APP_ID, tmp_path / "missing.pem")
    only_key = tmp_path / "key.pem"
    only_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigurationError, match="certificate"):
        CertificateCredential("t", APP_ID, only_key)
    with pytest.raises(ConfigurationError):
        ClientSecretCredential("", APP_ID, "s")


def test_the_client_secret_never_travels_over_plain_http_off_this_machine() -> None:
    # 127.0.0.2 stands for a host across a network: the form would be anyone's on the way.
    for authority in ("http://127.0.0.2:8080", "http://login.microsoftonline.com", "login"):
        with pytest.raises(ConfigurationError, match=r"authority_url .* not"):
            ClientSecretCredential("t", APP_ID, "secret", authority_url=authority)
    assert ClientSecretCredential("t", APP_ID, "s", authority_url="http://127.0.0.1:1").token_url


@dataclass
class _Token:
    token: str
    expires_on: int


class CountingCredential:
    """An azure-identity style credential: ``async get_token(*scopes)``."""

    def __init__(
        self, lifetime: int = 3600, delay: float = 0.0, gate: asyncio.Event | None = None
    ) -> None:
        self.lifetime = lifetime
        self.delay = delay
        self.gate = gate  # when given, each request waits for it: under way as long as a test needs
        self.calls: list[tuple[str, ...]] = []
        self.fail_next = False

    async def get_token(self, *scopes: str) -> _Token:
        self.calls.append(scopes)
        await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("identity platform unavailable")
        return _Token(f"custom-{len(self.calls)}", int(time.time()) + self.lifetime)


async def test_custom_credential_object(graph: FakeGraph) -> None:
    credential = CountingCredential()
    svc = CallServices(graph.settings(app_secret=None), credential=credential, retry=FAST)
    graph.tokens["custom-1"] = time.time() + 3600
    await svc.start()
    try:
        await svc.call(CALL_ID).keep_alive()
    finally:
        await svc.close()
    assert credential.calls == [("https://graph.microsoft.com/.default",)]
    assert graph.requests_for("keepAlive")[0].bearer == "custom-1"
    assert graph.token_requests == []


async def test_concurrent_callers_share_one_refresh() -> None:
    credential = CountingCredential(delay=0.01)
    cache = TokenCache(credential, "scope/.default")
    tokens = await asyncio.gather(*(cache.get() for _ in range(20)))
    assert set(tokens) == {"custom-1"}
    assert len(credential.calls) == 1
    assert cache.fetches == 1
    assert await cache.get() == "custom-1"
    assert len(credential.calls) == 1


async def test_token_refreshed_shortly_before_expiry() -> None:
    # a token inside its refresh margin is replaced; a fresh one is reused
    expiring = CountingCredential(lifetime=0)
    cache = TokenCache(expiring, "scope/.default")
    assert await cache.get() == "custom-1"
    assert await cache.get() == "custom-2"
    lasting = CountingCredential(lifetime=3600)
    cache = TokenCache(lasting, "scope/.default", refresh_margin=300)
    assert await cache.get() == await cache.get() == "custom-1"
    assert cache.cached


async def test_a_failure_is_answered_until_the_backoff_ends(clock: Clock) -> None:
    credential = CountingCredential()
    credential.fail_next = True
    cache = TokenCache(credential, "scope/.default")
    results = await asyncio.gather(cache.get(), cache.get(), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert len(credential.calls) == 1
    with pytest.raises(RuntimeError, match="identity platform unavailable"):
        await cache.get()  # backing off: the same failure, the credential not asked
    assert len(credential.calls) == 1
    await clock.advance(1.0)
    assert await cache.get() == "custom-2"
    cache.invalidate()
    assert not cache.cached
    assert await cache.get() == "custom-3"


async def test_a_cancelled_caller_does_not_cancel_the_refresh() -> None:
    gate = asyncio.Event()
    credential = CountingCredential(gate=gate)
    cache = TokenCache(credential, "scope/.default")
    first = asyncio.ensure_future(cache.get())
    second = asyncio.ensure_future(cache.get())
    await until(lambda: bool(credential.calls))  # the refresh is under way, and stays so
    first.cancel()
    await until(first.done)
    gate.set()
    assert await second == "custom-1"
    assert len(credential.calls) == 1


async def test_start_fetches_the_token_early(graph: FakeGraph) -> None:
    svc = CallServices(graph.settings(), retry=FAST)
    await svc.start()
    await until(lambda: len(graph.token_requests) == 1)  # fetched in the background
    await svc.call(CALL_ID).keep_alive()
    await svc.close()
    assert len(graph.token_requests) == 1


async def test_start_survives_a_token_failure(graph: FakeGraph, clock: Clock) -> None:
    graph.fail_next("token", 500, times=50)
    svc = CallServices(graph.settings(), retry=NO_RETRY)
    try:
        with capture_logs() as logs:
            await svc.start()
            with pytest.raises(GraphError):
                await svc.graph.token()  # joins the background fetch
            await clock.advance(0)
        # One line says why: the token cache's, not another from the fetch at start.
        said = [e["event"] for e in logs if e["event"].startswith("graph_")]
        assert said == ["graph_token_failed"], said
        # once the endpoint recovers, the first request after the backoff fetches the token
        graph.clear_faults()
        await clock.advance(1.0)
        await svc.call(CALL_ID).keep_alive()
    finally:
        await svc.close()
    assert len(graph.token_requests) == 2


async def test_no_credentials(graph: FakeGraph) -> None:
    svc = CallServices(graph.settings(app_secret=None))
    with capture_logs() as logs:
        await svc.start()
    warning = next(e for e in logs if e["event"] == "bot_cannot_act")
    assert warning["log_level"] == "warning"
    assert "CALLBOT_APP_SECRET or CALLBOT_CERTIFICATE_PATH" in warning["missing"]
    with pytest.raises(ConfigurationError, match="no Graph credentials"):
        await svc.call(CALL_ID).keep_alive()
    await svc.close()


def test_scope_follows_the_graph_cloud() -> None:
    assert graph_scope("https://graph.microsoft.com/v1.0") == "https://graph.microsoft.com/.default"
    assert graph_scope("https://graph.microsoft.us/v1.0") == "https://graph.microsoft.us/.default"
    assert graph_scope("https://dod-graph.microsoft.us/v1.0") == (
        "https://dod-graph.microsoft.us/.default"
    )
    assert graph_scope("http://127.0.0.1:8080/v1.0") == "https://graph.microsoft.com/.default"


def test_access_token_value() -> None:
    token = AccessToken("abc", 123)
    assert (token.token, token.expires_on) == ("abc", 123)


# -- a hostile or broken token endpoint -----------------------------------------------------


@asynccontextmanager
async def token_endpoint(
    answer: Callable[[dict[str, str]], web.Response],
) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A token endpoint on 127.0.0.1 answering each form with ``answer``: its base URL, forms."""
    forms: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        forms.append(form)
        return answer(form)

    async with plain_server(handler) as base:
        yield base, forms


@pytest.mark.parametrize(
    ("secret", "spelled"),
    [
        ("s3cret~value.of_the-app", str),
        # An older secret with characters the form encodes, echoed as the form was sent.
        ("Xy7+Q/abc=def~ghi", lambda s: quote_plus(s, safe="")),
        ("Xy7+Q/abc=def~ghi", lambda s: re.sub("%..", lambda m: m[0].lower(), quote(s))),
        ('Xy7"Q\\abc', lambda s: json.dumps(s)[1:-1]),
    ],
)
async def test_a_token_error_echoing_the_secret_does_not_carry_it_on(
    graph: FakeGraph, secret: str, spelled: Callable[[str], str]
) -> None:
    def echo(form: dict[str, str]) -> web.Response:
        said = f"bad client_secret={spelled(form['client_secret'])}"
        return web.json_response({"error": "invalid_client", "error_description": said}, status=401)

    async with token_endpoint(echo) as (base, _):
        svc = CallServices(graph.settings(app_secret=secret, authority_url=base), retry=FAST)
        with capture_logs() as logs:
            await svc.start()
            with pytest.raises(GraphError) as failure:
                await svc.call(CALL_ID).keep_alive()
        await svc.close()
    assert failure.value.code == "invalid_client"
    assert "[redacted]" in failure.value.message
    said = [str(failure.value), *texts(failure.value.body), *texts(logs)]
    for spelling in (secret, spelled(secret)):
        assert not [text for text in said if spelling in text]


def texts(value: Any) -> list[str]:
    """Every string in ``value`` (keys too), however deep, as it is (not escaped)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for pair in value.items() for item in pair for text in texts(item)]
    if isinstance(value, list | tuple):
        return [text for item in value for text in texts(item)]
    return [str(value)]


async def test_a_token_response_echoing_the_assertion_does_not_carry_it_on(
    tmp_path: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = write_pem(tmp_path / "app.pem", key, self_signed(key))

    def echo(form: dict[str, str]) -> web.Response:
        return web.json_response({"token_type": "Bearer", "echo": [form["client_assertion"]]})

    async with token_endpoint(echo) as (base, forms):
        credential = CertificateCredential("tenant", APP_ID, pem, authority_url=base, retry=FAST)
        with pytest.raises(GraphError) as failure:
            await credential.get_token("scope/.default")
        await credential.close()
    assert failure.value.code == "invalid_response"
    assert failure.value.body == {"token_type": "Bearer", "echo": ["[redacted]"]}
    assert forms[0]["client_assertion"] not in str(failure.value)


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [
        (-100, 3600),
        (0, 3600),
        ("soon", 3600),
        (None, 3600),
        (1e400, 3600),
        (10**12, 24 * 3600),
        ("1800", 1800),
    ],
)
async def test_an_unusable_expires_in_gets_a_bounded_lifetime(
    expires_in: object, lifetime: int
) -> None:
    def issue(form: dict[str, str]) -> web.Response:
        body = json.dumps({"access_token": "tok", "expires_in": expires_in})
        return web.Response(text=body, content_type="application/json")

    async with token_endpoint(issue) as (base, forms):
        credential = ClientSecretCredential("tenant", APP_ID, "secret", authority_url=base)
        before = time.time()
        token = await credential.get_token("scope/.default")
        cache = TokenCache(credential, "scope/.default")
        for _ in range(3):
            await cache.get()
        await credential.close()
    assert int(before) + lifetime <= token.expires_on <= time.time() + lifetime
    # zero or negative would have every request fetch a token of its own
    assert len(forms) == 2


async def test_a_504_from_the_token_endpoint_is_retried() -> None:
    answers = iter([web.Response(status=504), web.json_response({"access_token": "tok"})])
    async with token_endpoint(lambda form: next(answers)) as (base, forms):
        credential = ClientSecretCredential(
            "tenant", APP_ID, "secret", authority_url=base, retry=FAST
        )
        assert (await credential.get_token("scope/.default")).token == "tok"
        await credential.close()
    assert len(forms) == 2


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_token_endpoint_redirect_is_not_followed(status: int) -> None:
    # Following it would post the client secret to wherever Location points.
    async with token_endpoint(lambda form: web.json_response({"access_token": "x"})) as (
        elsewhere,
        stolen,
    ):
        location = {"Location": elsewhere + "/steal"}
        async with token_endpoint(lambda form: web.Response(status=status, headers=location)) as (
            base,
            _,
        ):
            credential = ClientSecretCredential("t", APP_ID, "secret", authority_url=base)
            with pytest.raises(GraphError) as failure:
                await credential.get_token("scope/.default")
            await credential.close()
    assert failure.value.status == status
    assert stolen == []


async def test_a_late_401_leaves_the_token_fetched_since_alone() -> None:
    """Requests in flight when a token is revoked each get 401: the first fetches a new
    token; the refusals that come after it must not throw the new one away (a fetch per
    call in progress, a burst the token endpoint may throttle)."""
    valid = {"custom-1"}
    release_second = asyncio.Event()
    seen: list[tuple[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        which = request.path.rsplit("/", 2)[-2]  # the call id: a, b or c
        seen.append((which, bearer))
        if which == "b" and bearer == "custom-1":
            await release_second.wait()
        if bearer not in valid:
            error = {"error": {"code": "InvalidAuthenticationToken"}}
            return web.json_response(error, status=401)
        return web.Response(status=200)

    credential = CountingCredential()
    async with plain_server(handler) as base:
        settings = Settings(app_id="app", tenant_id="t", graph_url=base + "/v1.0")
        svc = CallServices(settings, credential=credential, retry=RetryPolicy(total_time=5.0))
        await svc.start()  # custom-1 cached
        try:
            valid.clear()
            valid.update({"custom-2", "custom-3"})  # custom-1 revoked
            second = asyncio.create_task(svc.call("b").keep_alive())
            await until(lambda: ("b", "custom-1") in seen)
            await svc.call("a").keep_alive()  # 401, fetches custom-2, succeeds
            assert len(credential.calls) == 2
            release_second.set()
            await second  # 401 for custom-1, then custom-2
            await svc.call("c").keep_alive()
        finally:
            await svc.close()
    assert len(credential.calls) == 2, seen


# -- a token endpoint that keeps failing ----------------------------------------------------


def events_named(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_a_refused_secret_is_asked_once_per_backoff_and_logged_once(
    graph: FakeGraph, clock: Clock
) -> None:
    """With the secret refused, every Graph request of every call asked the token
    endpoint again and logged nothing: a storm against the identity platform."""
    graph.register_client(APP_ID, secret="right")
    svc = CallServices(graph.settings(app_secret="wrong"), retry=NO_RETRY)
    try:
        with capture_logs() as logs:
            results = await asyncio.gather(
                *(svc.call(f"call-{n}").keep_alive() for n in range(100)),
                return_exceptions=True,
            )
            assert len(graph.token_requests) == 1  # one fetch for every call at once
            first = results[0]
            assert isinstance(first, GraphError)
            assert (first.status, first.code) == (401, "invalid_client")
            assert "AADSTS7000215" in first.message
            assert all(isinstance(r, GraphError) and str(r) == str(first) for r in results)
            for n in range(100):
                with pytest.raises(GraphError) as again:
                    await svc.call(f"later-{n}").keep_alive()
                assert str(again.value) == str(first)
            assert len(graph.token_requests) == 1
            (refused,) = events_named(logs, "graph_token_refused")
            assert refused["log_level"] == "error"
            assert (refused["status"], refused["code"], refused["retry_in"]) == (
                401,
                "invalid_client",
                1.0,
            )
            assert "AADSTS7000215" in refused["error"]

            await clock.advance(1.0)  # asked again, refused again: the backoff doubles
            with pytest.raises(GraphError):
                await svc.call(CALL_ID).keep_alive()
            await clock.advance(1.5)
            with pytest.raises(GraphError):
                await svc.call(CALL_ID).keep_alive()
            assert len(graph.token_requests) == 2
            await clock.advance(0.5)
            with pytest.raises(GraphError):
                await svc.call(CALL_ID).keep_alive()
            assert len(graph.token_requests) == 3
            retries = [e["retry_in"] for e in events_named(logs, "graph_token_refused")]
            assert retries == [1.0, 2.0, 4.0]

            graph.register_client(APP_ID, secret="wrong")  # the new secret has reached it
            await clock.advance(4.0)
            await svc.call(CALL_ID).keep_alive()
        assert len(graph.token_requests) == 4
        assert len(graph.requests_for("keepAlive")) == 1
        assert events_named(logs, "graph_token_failed") == []
    finally:
        await svc.close()


# What the identity platform answers for a tenant id it does not know, and a scope no
# resource of it has: the request is refused as it stands.
NO_SUCH_TENANT = {
    "error": "invalid_request",
    "error_description": "AADSTS90002: Tenant 'contoso.onmicrosft.com' not found. Check to"
    " make sure you have the correct tenant ID and are signing into the correct cloud.\r\n"
    "Trace ID: 2b0bcb5e-2d4c-4b9e-8d9c-8b2f5f1f7a00\r\nCorrelation ID:"
    " 1b0bcb5e-2d4c-4b9e-8d9c-8b2f5f1f7a00\r\nTimestamp: 2024-01-01 12:00:00Z",
    "error_codes": [90002],
    "timestamp": "2024-01-01 12:00:00Z",
    "trace_id": "2b0bcb5e-2d4c-4b9e-8d9c-8b2f5f1f7a00",
    "correlation_id": "1b0bcb5e-2d4c-4b9e-8d9c-8b2f5f1f7a00",
    "error_uri": "https://login.microsoftonline.com/error?code=90002",
}
NO_SUCH_SCOPE = {
    "error": "invalid_resource",
    "error_description": "AADSTS500011: The resource principal named https://graph.example"
    " was not found in the tenant named Contoso.",
    "error_codes": [500011],
}


@pytest.mark.parametrize("body", [NO_SUCH_TENANT, NO_SUCH_SCOPE], ids=["tenant", "scope"])
async def test_a_token_request_refused_for_its_tenant_or_scope_is_logged_as_refused(
    graph: FakeGraph, body: dict[str, Any]
) -> None:
    """A tenant id the identity platform does not know (400 invalid_request, AADSTS90002)
    was logged as graph_token_failed, a warning like an outage, not as the configuration
    error graph_token_refused says, with what to check."""
    graph.fail_next("token", 400, body=body)
    svc = CallServices(graph.settings(), retry=NO_RETRY)
    try:
        with capture_logs() as logs, pytest.raises(GraphError) as failure:
            await svc.call(CALL_ID).keep_alive()
    finally:
        await svc.close()
    error = failure.value
    code = str(body["error_codes"][0])
    assert (error.status, error.code) == (400, body["error"])
    assert error.message.startswith(f"AADSTS{code}: ")
    assert events_named(logs, "graph_token_failed") == []
    (refused,) = events_named(logs, "graph_token_refused")
    assert refused["log_level"] == "error"
    assert (refused["status"], refused["code"]) == (400, body["error"])
    assert f"AADSTS{code}" in refused["error"]
    assert "tenant_id" in refused["detail"]
    assert graph.requests_for("keepAlive") == []


@pytest.mark.parametrize("failure", ["unavailable", "unreachable"])
async def test_a_token_endpoint_down_is_asked_once_per_backoff(
    graph: FakeGraph, clock: Clock, failure: str
) -> None:
    settings = graph.settings()
    if failure == "unavailable":
        graph.fail_next("token", 500, times=1000)
    else:
        async with token_endpoint(lambda form: web.Response(status=500)) as (closed, _):
            pass  # nothing listens there any more
        settings = graph.settings(authority_url=closed)
    svc = CallServices(settings, retry=NO_RETRY)
    try:
        with capture_logs() as logs:
            for n in range(50):
                with pytest.raises(GraphError) as raised:
                    await svc.call(f"call-{n}").keep_alive()
                assert raised.value.url.endswith("/oauth2/v2.0/token")
                if failure == "unavailable":
                    assert raised.value.status == 500
                else:
                    assert (raised.value.status, raised.value.code) == (0, "connectionFailed")
        assert svc.graph.tokens.fetches == 1
        (logged,) = events_named(logs, "graph_token_failed")
        assert logged["log_level"] == "warning"
        assert logged["status"] == raised.value.status
        assert events_named(logs, "graph_token_refused") == []
        if failure == "unavailable":
            graph.clear_faults()
            await clock.advance(1.0)
            await svc.call(CALL_ID).keep_alive()  # it answers again: the next request gets on
            assert len(graph.token_requests) == 2
    finally:
        await svc.close()


async def waited_for_a_fetch(
    cache: TokenCache, clock: Clock, forms: list[dict[str, str]], most: float
) -> float:
    """How long after the last failure ``cache`` asked the token endpoint again (in halves
    of a second of the loop's clock)."""
    waited = 0.0
    asked = len(forms)
    while len(forms) == asked:
        assert waited <= most, "the credential was not asked again"
        with contextlib.suppress(GraphError):
            await cache.get()
        if len(forms) == asked:
            waited += 0.5
            await clock.advance(0.5)
    return waited


async def test_the_backoff_doubles_up_to_a_cap_and_a_success_resets_it(clock: Clock) -> None:
    up = False

    def answer(form: dict[str, str]) -> web.Response:
        if up:
            return web.json_response({"access_token": "tok", "expires_in": 3600})
        return web.json_response({"error": "temporarily_unavailable"}, status=500)

    async with token_endpoint(answer) as (base, forms):
        credential = ClientSecretCredential(
            "tenant", APP_ID, "secret", authority_url=base, retry=NO_RETRY
        )
        cache = TokenCache(credential, "scope/.default", backoff=1.0, max_backoff=10.0)
        try:
            with contextlib.suppress(GraphError):
                await cache.get()
            waits = [await waited_for_a_fetch(cache, clock, forms, most=20.0) for _ in range(6)]
            assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
            up = True
            await clock.advance(10.0)
            assert await cache.get() == "tok"
            up = False
            cache.invalidate()
            with pytest.raises(GraphError):
                await cache.get()  # a failure after a success waits the shortest backoff again
            assert await waited_for_a_fetch(cache, clock, forms, most=20.0) == 1.0
        finally:
            await credential.close()


@pytest.mark.parametrize("status", [429, 503])
async def test_a_retry_after_from_the_token_endpoint_is_waited_up_to_max_backoff(
    clock: Clock, status: int
) -> None:
    """A throttled token request was asked again after the backoff's 1, 2, 4 seconds,
    whatever Retry-After the identity platform had sent: throttled again and again."""
    named = ["20", "3600", "soon"]  # what each failure's Retry-After says

    def answer(form: dict[str, str]) -> web.Response:
        if not named:
            return web.json_response({"access_token": "tok", "expires_in": 3600})
        body = {"error": "temporarily_unavailable"}
        return web.json_response(body, status=status, headers={"Retry-After": named.pop(0)})

    async with token_endpoint(answer) as (base, forms):
        credential = ClientSecretCredential(
            "tenant", APP_ID, "secret", authority_url=base, retry=NO_RETRY
        )
        cache = TokenCache(credential, "scope/.default", backoff=1.0, max_backoff=30.0)
        try:
            with capture_logs() as logs:
                with pytest.raises(GraphError) as failure:
                    await cache.get()
                assert failure.value.retry_after == 20.0
                waits = [await waited_for_a_fetch(cache, clock, forms, most=60.0) for _ in range(3)]
        finally:
            await credential.close()
    # 20 s as asked; 3600 bounded by max_backoff; unreadable: the third backoff, 4 s
    assert waits == [20.0, 30.0, 4.0]
    assert await cache.get() == "tok"
    failed = events_named(logs, "graph_token_failed")
    assert [(e["retry_after"], e["retry_in"]) for e in failed] == [
        (20.0, 20.0),
        (3600.0, 30.0),
        (None, 4.0),
    ]


async def test_a_token_due_for_refresh_is_used_while_its_refresh_fails(clock: Clock) -> None:
    wall = [1_000_000.0]
    issued: list[str] = []
    failing = [False]

    class Credential:
        async def get_token(self, *scopes: str) -> _Token:
            if failing[0]:
                raise RuntimeError("identity platform unavailable")
            issued.append(f"t{len(issued) + 1}")
            return _Token(issued[-1], int(wall[0]) + 3600)

    cache = TokenCache(Credential(), "scope/.default", wall_clock=lambda: wall[0])
    assert await cache.get() == "t1"
    failing[0] = True
    wall[0] += 3600 - 200  # inside the 300-s refresh margin, 200 s before expiry
    assert not cache.cached
    assert await cache.get() == "t1"  # the refresh failed: the token still valid is sent
    assert await cache.get() == "t1"  # backing off: the same, the credential not asked
    wall[0] += 150  # 50 s before expiry: Graph could see it expired
    with pytest.raises(RuntimeError, match="identity platform unavailable"):
        await cache.get()
    failing[0] = False
    await clock.advance(30.0)
    assert await cache.get() == "t2"
    assert cache.cached


async def test_nobody_waits_for_the_refresh_of_a_token_still_valid() -> None:
    wall = [1_000_000.0]
    answering = asyncio.Event()
    issued: list[str] = []

    class SlowCredential:
        async def get_token(self, *scopes: str) -> _Token:
            if issued:
                await answering.wait()  # the identity platform is slow to answer a refresh
            issued.append(f"t{len(issued) + 1}")
            return _Token(issued[-1], int(wall[0]) + 3600)

    cache = TokenCache(SlowCredential(), "scope/.default", wall_clock=lambda: wall[0])
    assert await cache.get() == "t1"
    wall[0] += 3600 - 200  # due for refresh, 200 s before expiry
    # The refresh started; these requests do not wait for it (bounded: a wait would hang).
    assert await asyncio.wait_for(cache.get(), 10) == "t1"
    assert await asyncio.wait_for(cache.get(), 10) == "t1"
    answering.set()
    await until(lambda: cache.cached)
    assert await cache.get() == "t2"
    assert cache.fetches == 2


async def test_services_started_again_after_close_leave_no_session_open(graph: FakeGraph) -> None:
    """The credential built from the settings sends through the client's session; close()
    closed that session and left the credential without one, so its next token request
    (a CallServices started again) made a session of its own that nothing closed."""
    services = CallServices(graph.settings(), retry=FAST)
    for _ in range(2):
        await services.start()
        graph.revoke_tokens()  # each round's request fetches a token, as a restart's may
        await services.call(CALL_ID).keep_alive()
        await services.close()
    assert len(graph.token_requests) >= 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del services
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
