"""Inbound token verification, against a real local token authority."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from callbot import _auth
from callbot._auth import MAX_KEY_WAITERS, Authenticator
from callbot._errors import AuthenticationError, KeysUnavailable
from callbot.testing import TEST_TENANT_ID, TokenAuthority

from .conftest import plain_server

APP_ID = "2c9d7e31-58a4-4f0b-b6e2-7a1c3d5f9e08"
OTHER_TENANT = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"

MakeAuth = Callable[..., Awaitable[Authenticator]]


@pytest.fixture
async def authority() -> AsyncIterator[TokenAuthority]:
    async with TokenAuthority() as running:
        yield running


@pytest.fixture
async def make_auth(authority: TokenAuthority) -> AsyncIterator[MakeAuth]:
    made: list[Authenticator] = []

    async def make(**kwargs: Any) -> Authenticator:
        kwargs.setdefault("app_id", APP_ID)
        kwargs.setdefault("openid_config_url", authority.openid_config_url)
        authenticator = Authenticator(**kwargs)
        made.append(authenticator)
        await authenticator.start()
        return authenticator

    yield make
    for authenticator in made:
        await authenticator.close()


@pytest.fixture
async def auth(make_auth: MakeAuth) -> Authenticator:
    return await make_auth()


async def reason_of(auth: Authenticator, authorization: str | None) -> str:
    with pytest.raises(AuthenticationError) as info:
        await auth.verify(authorization)
    return info.value.reason


def bearer(token: str) -> str:
    return f"Bearer {token}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64url(json.dumps(value).encode())


def valid_claims() -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": "https://api.botframework.com",
        "aud": APP_ID,
        "tid": TEST_TENANT_ID,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- accepted tokens ------------------------------------------------------


async def test_valid_token(auth: Authenticator, authority: TokenAuthority) -> None:
    verified = await auth.verify(bearer(authority.mint(audience=APP_ID)))
    assert verified.tenant_id == TEST_TENANT_ID
    assert verified.audience == APP_ID
    assert verified.issuer == "https://api.botframework.com"
    assert verified.expires_at > time.time()
    assert verified.claims["tid"] == TEST_TENANT_ID
    assert auth.ready


async def test_scheme_is_case_insensitive(auth: Authenticator, authority: TokenAuthority) -> None:
    await auth.verify("bearer " + authority.mint(audience=APP_ID))


async def test_graph_issuer_accepted(auth: Authenticator, authority: TokenAuthority) -> None:
    token = authority.mint(audience=APP_ID, issuer="https://graph.microsoft.com")
    assert (await auth.verify(bearer(token))).issuer == "https://graph.microsoft.com"


async def test_issuer_from_openid_configuration_accepted(make_auth: MakeAuth) -> None:
    async with TokenAuthority(issuer="https://issuer.example.test") as own:
        auth = await make_auth(openid_config_url=own.openid_config_url)
        verified = await auth.verify(bearer(own.mint(audience=APP_ID)))
        assert verified.issuer == "https://issuer.example.test"
        await auth.close()


async def test_extra_issuer_accepted(make_auth: MakeAuth, authority: TokenAuthority) -> None:
    auth = await make_auth(extra_issuers=["https://extra.example.test"])
    await auth.verify(bearer(authority.mint(audience=APP_ID, issuer="https://extra.example.test")))


async def test_tenant_in_allow_list_case_insensitive(
    make_auth: MakeAuth, authority: TokenAuthority
) -> None:
    auth = await make_auth(allowed_tenants=frozenset({TEST_TENANT_ID.upper()}))
    assert (await auth.verify(bearer(authority.mint(audience=APP_ID)))).tenant_id == TEST_TENANT_ID


# -- refused tokens -------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "   "])
async def test_missing(auth: Authenticator, header: str | None) -> None:
    assert await reason_of(auth, header) == "missing"


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "abc.def.ghi"])
async def test_bad_scheme(auth: Authenticator, header: str) -> None:
    assert await reason_of(auth, header) == "bad_scheme"


@pytest.mark.parametrize("token", ["garbage", "not.a.jwt", "a.b", "x" * 20_000])
async def test_malformed(auth: Authenticator, token: str) -> None:
    assert await reason_of(auth, bearer(token)) == "malformed"


async def test_expired(auth: Authenticator, authority: TokenAuthority) -> None:
    token = authority.mint(audience=APP_ID, expires_in=-600)
    assert await reason_of(auth, bearer(token)) == "expired"


async def test_expired_within_leeway_accepted(
    auth: Authenticator, authority: TokenAuthority
) -> None:
    await auth.verify(bearer(authority.mint(audience=APP_ID, expires_in=-30)))


async def test_not_yet_valid(auth: Authenticator, authority: TokenAuthority) -> None:
    token = authority.mint(audience=APP_ID, not_before=time.time() + 600)
    assert await reason_of(auth, bearer(token)) == "not_yet_valid"


async def test_issued_in_the_future(auth: Authenticator, authority: TokenAuthority) -> None:
    token = authority.mint(audience=APP_ID, issued_at=time.time() + 600)
    assert await reason_of(auth, bearer(token)) == "not_yet_valid"


async def test_wrong_audience(auth: Authenticator, authority: TokenAuthority) -> None:
    token = authority.mint(audience="someone-else")
    assert await reason_of(auth, bearer(token)) == "bad_audience"


async def test_wrong_issuer(auth: Authenticator, authority: TokenAuthority) -> None:
    token = authority.mint(audience=APP_ID, issuer="https://evil.example.test")
    assert await reason_of(auth, bearer(token)) == "bad_issuer"


@pytest.mark.parametrize(
    "issuer", [["https://api.botframework.com"], {"https://api.botframework.com": 1}, 7, None]
)
async def test_an_issuer_that_is_not_one_string_is_refused(
    auth: Authenticator, authority: TokenAuthority, issuer: Any
) -> None:
    """An accepted issuer inside a list or an object is no issuer; neither is a number or null."""
    # Signed by hand: PyJWT itself refuses to write an ``iss`` that is not a string.
    head = b64json({"alg": "RS256", "typ": "JWT", "kid": authority.kid})
    body = b64json({**valid_claims(), "iss": issuer})
    signature = authority.private_key.sign(
        f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    token = f"{head}.{body}.{b64url(signature)}"
    assert await reason_of(auth, bearer(token)) == "bad_issuer"


async def test_no_exp(auth: Authenticator, authority: TokenAuthority) -> None:
    token = authority.mint(audience=APP_ID, expires_in=None)
    assert await reason_of(auth, bearer(token)) == "missing_exp"


async def test_no_tid(auth: Authenticator, authority: TokenAuthority) -> None:
    token = authority.mint(audience=APP_ID, tenant_id=None)
    assert await reason_of(auth, bearer(token)) == "missing_tenant"


async def test_tenant_not_in_allow_list(make_auth: MakeAuth, authority: TokenAuthority) -> None:
    auth = await make_auth(allowed_tenants=frozenset({OTHER_TENANT}))
    token = authority.mint(audience=APP_ID)
    assert await reason_of(auth, bearer(token)) == "tenant_not_allowed"


async def test_an_unknown_kid_is_cut_short_in_the_refusal(
    auth: Authenticator, authority: TokenAuthority
) -> None:
    """The kid of a token is the sender's to choose, unauthenticated: the refusal, which is
    logged and answered, names at most its first 64 characters."""
    token = authority.mint(audience=APP_ID, kid="k" * 3_000)
    with pytest.raises(AuthenticationError) as info:
        await auth.verify(bearer(token))
    assert info.value.reason == "unknown_key"
    assert len(str(info.value)) < 200


async def test_unknown_key(auth: Authenticator, authority: TokenAuthority) -> None:
    token = authority.mint(audience=APP_ID, kid="no-such-kid")
    assert await reason_of(auth, bearer(token)) == "unknown_key"


async def test_right_kid_wrong_key(auth: Authenticator, authority: TokenAuthority) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = authority.mint(audience=APP_ID, signing_key=stranger)
    assert await reason_of(auth, bearer(token)) == "bad_signature"


async def test_tampered_payload(auth: Authenticator, authority: TokenAuthority) -> None:
    header, _, signature = authority.mint(audience=APP_ID).split(".")
    claims = valid_claims() | {"tid": OTHER_TENANT}
    assert await reason_of(auth, bearer(f"{header}.{b64json(claims)}.{signature}")) == (
        "bad_signature"
    )


async def test_alg_none(auth: Authenticator, authority: TokenAuthority) -> None:
    token = f"{b64json({'alg': 'none', 'kid': authority.kid})}.{b64json(valid_claims())}."
    assert await reason_of(auth, bearer(token)) == "bad_algorithm"


async def test_hs256_signed_with_public_key(auth: Authenticator, authority: TokenAuthority) -> None:
    pem = authority.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "kid": authority.kid, "typ": "JWT"}
    signing_input = f"{b64json(header)}.{b64json(valid_claims())}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert await reason_of(auth, bearer(f"{signing_input}.{b64url(mac)}")) == "bad_algorithm"


async def test_es256(auth: Authenticator, authority: TokenAuthority) -> None:
    token = authority.mint(
        audience=APP_ID, algorithm="ES256", signing_key=ec.generate_private_key(ec.SECP256R1())
    )
    assert await reason_of(auth, bearer(token)) == "bad_algorithm"


# -- keys -----------------------------------------------------------------


async def test_rotated_key_accepted_on_first_use(
    auth: Authenticator, authority: TokenAuthority
) -> None:
    fetches, served = auth.key_fetches, authority.jwks_fetches
    new_kid = authority.rotate_key()
    verified = await auth.verify(bearer(authority.mint(audience=APP_ID)))
    assert verified.tenant_id == TEST_TENANT_ID
    assert new_kid == authority.kid
    assert auth.key_fetches == fetches + 1
    assert authority.jwks_fetches == served + 1


async def test_a_key_rotated_in_while_the_keys_cannot_be_fetched_is_asked_for_again(
    make_auth: MakeAuth, authority: TokenAuthority
) -> None:
    """A call lasting hours outlives Graph's signing key. Met while the key endpoint does not
    answer, tokens of the new key were refused as invalid (``unknown_key``, a 401), and the
    call's notifications with them; now they get ``keys_unavailable`` (a 503 asking Graph to
    send them again), and are taken once the keys can be fetched."""
    auth = await make_auth(refetch_cooldown=0.0)
    authority.rotate_key()
    authority.available = False
    token = bearer(authority.mint(audience=APP_ID))
    assert await reason_of(auth, token) == "keys_unavailable"
    authority.available = True
    assert (await auth.verify(token)).tenant_id == TEST_TENANT_ID


async def test_withdrawn_key_refused(auth: Authenticator, authority: TokenAuthority) -> None:
    old_token = authority.mint(audience=APP_ID)
    await auth.verify(bearer(old_token))
    authority.rotate_key(keep_old=False)
    await auth.verify(bearer(authority.mint(audience=APP_ID)))
    # The cached verdict went away with the key.
    assert await reason_of(auth, bearer(old_token)) == "unknown_key"


async def test_a_withdrawn_key_refuses_the_token_last_accepted_from_the_cache(
    auth: Authenticator, authority: TokenAuthority
) -> None:
    """The header of the last cache hit is answered without a lookup: that shortcut goes with
    the verdict it points to, so the very header accepted last is judged again."""
    old_token = authority.mint(audience=APP_ID)
    header = bearer(old_token)
    await auth.verify(header)
    await auth.verify(header)  # from the cache: now the last hit
    authority.rotate_key(keep_old=False)
    await auth.verify(bearer(authority.mint(audience=APP_ID)))
    assert await reason_of(auth, header) == "unknown_key"


async def test_a_key_replaced_under_its_kid_withdraws_the_tokens_it_verified(
    auth: Authenticator, authority: TokenAuthority
) -> None:
    """A cached verdict was dropped only when its kid left the key set: a key published
    again under the same kid with other numbers (a compromised key replaced) still let
    every token it had verified through, for as long as they lived (up to 24 h)."""
    old_token = authority.mint(audience=APP_ID)
    await auth.verify(bearer(old_token))
    authority.rotate_key(kid=authority.kid, keep_old=False)
    fetches = auth.key_fetches
    # A kid nobody publishes makes the verifier fetch the keys again at once.
    assert await reason_of(auth, bearer(authority.mint(audience=APP_ID, kid="none"))) == (
        "unknown_key"
    )
    assert auth.key_fetches == fetches + 1
    assert await reason_of(auth, bearer(old_token)) == "bad_signature"
    # The new key under that kid verifies its own tokens.
    await auth.verify(bearer(authority.mint(audience=APP_ID)))


async def test_an_issuer_no_longer_accepted_withdraws_the_tokens_it_issued(
    make_auth: MakeAuth, authority: TokenAuthority
) -> None:
    """The configuration's issuer changed: its old issuer's tokens, verified before, stayed
    accepted from the cache while the same token, unseen, was refused."""
    authority.issuer = "https://sts.example.test/first/"
    auth = await make_auth()
    token = authority.mint(audience=APP_ID)
    await auth.verify(bearer(token))
    authority.issuer = "https://sts.example.test/second/"
    assert await reason_of(auth, bearer(authority.mint(audience=APP_ID, kid="none"))) == (
        "unknown_key"
    )
    assert await reason_of(auth, bearer(token)) == "bad_issuer"
    await auth.verify(bearer(authority.mint(audience=APP_ID)))


async def test_unknown_kid_flood_is_coalesced(
    auth: Authenticator, authority: TokenAuthority
) -> None:
    fetches, served = auth.key_fetches, authority.jwks_fetches
    tokens = [authority.mint(audience=APP_ID, kid=secrets.token_hex(8)) for _ in range(100)]
    results = await asyncio.gather(
        *(auth.verify(bearer(token)) for token in tokens), return_exceptions=True
    )
    assert all(isinstance(r, AuthenticationError) for r in results)
    reasons = Counter(r.reason for r in results if isinstance(r, AuthenticationError))
    # The first MAX_KEY_WAITERS wait for the one fetch; the others are answered at once.
    assert reasons == {"unknown_key": MAX_KEY_WAITERS, "keys_unavailable": 100 - MAX_KEY_WAITERS}
    assert 1 <= auth.key_fetches - fetches <= 2
    assert 1 <= authority.jwks_fetches - served <= 2


async def test_a_request_arriving_as_a_refetch_ends_does_not_start_another(
    auth: Authenticator, authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the end of a refetch and the wake-up of the request that started it, an
    unknown kid found no fetch under way and no cooldown yet: it fetched again at once,
    and with a slow key endpoint the cooldown never held."""
    fetches, served = auth.key_fetches, authority.jwks_fetches
    fetch = auth._fetch
    late: list[asyncio.Task[Any]] = []

    def verify_late() -> None:
        token = authority.mint(audience=APP_ID, kid=secrets.token_hex(8))
        late.append(asyncio.ensure_future(auth.verify(bearer(token))))

    async def fetch_then_a_request_arrives() -> None:
        await fetch()
        # Runs before the starter's wake-up, after the fetch is no longer under way.
        asyncio.get_running_loop().call_soon(verify_late)

    monkeypatch.setattr(auth, "_fetch", fetch_then_a_request_arrives)
    first = authority.mint(audience=APP_ID, kid=secrets.token_hex(8))
    assert await reason_of(auth, bearer(first)) == "unknown_key"
    await wait_until(lambda: bool(late) and late[0].done())
    with pytest.raises(AuthenticationError):
        late[0].result()
    assert auth.key_fetches == fetches + 1
    assert authority.jwks_fetches == served + 1


async def test_requests_waiting_for_a_key_fetch_are_bounded(
    auth: Authenticator, authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens naming invented kids (no valid token needed) each waited for the key fetch
    they asked for, holding their connections for as long as the key endpoint took: with
    MAX_KEY_WAITERS waiting, the next is answered at once (keys_unavailable, a 503)."""
    fetch, release = auth._fetch, asyncio.Event()

    async def slow_fetch() -> None:
        await release.wait()
        await fetch()

    monkeypatch.setattr(auth, "_fetch", slow_fetch)

    def invented() -> str:
        return bearer(authority.mint(audience=APP_ID, kid=secrets.token_hex(8)))

    waiting = [asyncio.ensure_future(auth.verify(invented())) for _ in range(MAX_KEY_WAITERS)]
    await wait_until(lambda: auth._key_waiters == MAX_KEY_WAITERS)
    with pytest.raises(KeysUnavailable):
        await asyncio.wait_for(auth.verify(invented()), 10)
    release.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert {getattr(r, "reason", r) for r in results} == {"unknown_key"}
    assert auth._key_waiters == 0
    assert (await auth.verify(bearer(authority.mint(audience=APP_ID)))).tenant_id


async def test_key_endpoint_down_after_start_keeps_cached_keys(
    make_auth: MakeAuth, authority: TokenAuthority
) -> None:
    auth = await make_auth(refresh_interval=0.05)
    authority.available = False
    fetches = auth.key_fetches
    await wait_until(lambda: auth.key_fetches >= fetches + 2)
    assert auth.ready
    verified = await auth.verify(bearer(authority.mint(audience=APP_ID)))
    assert verified.tenant_id == TEST_TENANT_ID


async def test_key_endpoint_down_at_start_then_recovers(
    make_auth: MakeAuth, authority: TokenAuthority
) -> None:
    authority.available = False
    auth = await make_auth(refresh_interval=0.1, refetch_cooldown=0.05)
    assert not auth.ready
    assert not await auth.wait_ready(0.01)
    with pytest.raises(KeysUnavailable) as info:
        await auth.verify(bearer(authority.mint(audience=APP_ID)))
    assert info.value.reason == "keys_unavailable"

    authority.available = True
    assert await auth.wait_ready(5.0)
    await auth.verify(bearer(authority.mint(audience=APP_ID)))


async def test_slow_key_endpoint_does_not_hold_start(
    make_auth: MakeAuth, authority: TokenAuthority
) -> None:
    authority.delay = 1.0
    auth = await make_auth(fetch_timeout=0.1, refresh_interval=0.1)
    assert not auth.ready
    authority.delay = 0.0
    assert await auth.wait_ready(5.0)


# -- cache ----------------------------------------------------------------


@pytest.fixture
def check_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = _auth._check_token

    def counting(token: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(_auth, "_check_token", counting)
    return calls


async def test_reused_token_checked_once(
    auth: Authenticator, authority: TokenAuthority, check_calls: list[str]
) -> None:
    token = authority.mint(audience=APP_ID)
    first = await auth.verify(bearer(token))
    second = await auth.verify(bearer(token))
    assert first == second
    assert len(check_calls) == 1


async def test_a_cached_token_is_found_without_reading_its_header_again(
    auth: Authenticator, authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every request of a call carries the same kilobyte-long header: split on white space
    # once, when its token is first verified.
    read: list[str | None] = []
    real = Authenticator._bearer_token

    def reading(authorization: str | None) -> str:
        read.append(authorization)
        return real(authorization)

    monkeypatch.setattr(Authenticator, "_bearer_token", staticmethod(reading))
    header = bearer(authority.mint(audience=APP_ID))
    first = await auth.verify(header)
    assert await auth.verify(header) == first
    assert await auth.verify(header) == first
    assert read == [header]


@pytest.mark.parametrize(
    ("spelling", "refused"),
    [
        ("bearer {}", None),
        ("BEARER {}", None),
        ("Bearer  {}", None),
        ("Bearer\t{}", None),
        (" Bearer {} ", None),
        ("Bearer {} ", None),
        ("Bearer {}\u00a0", None),
        ("Bearer {} x", "bad_scheme"),
        ("Bearer {}\u00a0x", "bad_scheme"),
        ("Bearer x {}", "bad_scheme"),
        ("Bearer {}{}", "malformed"),
    ],
)
async def test_a_cached_token_in_another_spelling_of_the_header_reads_as_it_did(
    auth: Authenticator, authority: TokenAuthority, spelling: str, refused: str | None
) -> None:
    token = authority.mint(audience=APP_ID)
    verified = await auth.verify(bearer(token))
    header = spelling.format(token, token)
    if refused is None:
        assert await auth.verify(header) == verified
    else:
        assert await reason_of(auth, header) == refused


async def test_refused_token_not_cached(
    auth: Authenticator, authority: TokenAuthority, check_calls: list[str]
) -> None:
    token = authority.mint(audience="someone-else")
    assert await reason_of(auth, bearer(token)) == "bad_audience"
    assert await reason_of(auth, bearer(token)) == "bad_audience"
    assert len(check_calls) == 2


async def test_cached_token_past_exp_is_expired(
    auth: Authenticator,
    authority: TokenAuthority,
    check_calls: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = authority.mint(audience=APP_ID, expires_in=120)
    await auth.verify(bearer(token))
    later = types.SimpleNamespace(time=lambda: time.time() + 3600, monotonic=time.monotonic)
    monkeypatch.setattr(_auth, "time", later)
    assert await reason_of(auth, bearer(token)) == "expired"
    assert len(check_calls) == 1


async def test_keys_are_taken_over_https_or_from_this_machine_only(
    make_auth: MakeAuth, authority: TokenAuthority
) -> None:
    # 127.0.0.2 stands for a host across a network: what it answers over plain http,
    # anyone on the way could have answered, and it decides which tokens are believed.
    remote = TokenAuthority()
    await remote.start(host="127.0.0.2")
    remote_keys = remote.base_url + "/v1/keys"

    async def naming_remote_keys(request: web.Request) -> web.Response:
        return web.json_response({"issuer": remote.issuer, "jwks_uri": remote_keys})

    async def redirected(request: web.Request) -> web.Response:
        if request.path.endswith("config"):  # keys on this machine, at first sight
            return web.json_response({"jwks_uri": f"{request.url.origin()}{request.path}-keys"})
        if request.path.startswith("/local"):
            raise web.HTTPFound(authority.base_url + "/v1/keys")
        raise web.HTTPFound(remote_keys)

    try:
        async with plain_server(naming_remote_keys) as naming, plain_server(redirected) as hops:
            for url in (remote.openid_config_url, naming + "/config", hops + "/config"):
                # Refused before asking it, but for the redirect (its answer not believed).
                assert remote.jwks_fetches == 0
                auth = await make_auth(openid_config_url=url)
                assert not auth.ready, url
                with pytest.raises(KeysUnavailable):
                    await auth.verify(bearer(remote.mint(audience=APP_ID)))
                await auth.close()
            # A redirect that stays on https, or on this machine, is followed.
            auth = await make_auth(openid_config_url=hops + "/local-config")
            assert (await auth.verify(bearer(authority.mint(audience=APP_ID)))).tenant_id
    finally:
        await remote.close()
