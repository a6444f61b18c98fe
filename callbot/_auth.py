"""Verification of the bearer tokens Graph signs its callbacks with.

A callback carries ``Authorization: Bearer <JWT>``. The token is signed with one
of the keys listed by the calling platform's OpenID configuration (its
``jwks_uri``); :class:`Authenticator` keeps those keys fresh in the background,
refetches them at once when a token names a key it does not know (key
rotation), and checks algorithm, signature, issuer, audience, lifetime and
tenant. Every refusal raises :class:`~callbot.AuthenticationError` with a
stable ``reason`` word.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import random
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import aiohttp
import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from jwt.algorithms import RSAAlgorithm

from ._clock import loop_time
from ._config import https_problem
from ._errors import AuthenticationError, KeysUnavailable
from ._ids import quoted, tenant_key

__all__ = [
    "ALLOWED_ALGORITHMS",
    "DEFAULT_ISSUERS",
    "Authenticator",
    "VerifiedToken",
]

log = structlog.get_logger("callbot.auth")

ALLOWED_ALGORITHMS: frozenset[str] = frozenset({"RS256", "RS384", "RS512"})
"""The only signature algorithms accepted on a callback token."""

DEFAULT_ISSUERS: tuple[str, ...] = ("https://api.botframework.com", "https://graph.microsoft.com")
"""Issuers always accepted, besides the OpenID configuration's own ``issuer``."""

# Far larger than any real callback token; refuses absurd headers before parsing them.
_MAX_TOKEN_LENGTH = 16 * 1024
# How Graph writes the header; any other spelling of the scheme is read by _bearer_token.
_BEARER = "Bearer "
_CACHE_SIZE = 10_000
# What one cached token costs beyond its characters: the entry, its claims dict, the key.
_ENTRY_OVERHEAD = 1024
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_MIN_KEY_BITS = 2048
_MAX_BACKOFF = 300.0
_MAX_KEY_DOCUMENT = 1 << 20
"""The largest OpenID configuration or key set read (bytes): they are a few KB."""
MAX_KEY_WAITERS = 32
"""Requests that may wait at once for a key fetch they asked for (an unknown ``kid``, no
keys yet): more are answered 503 at once, or tokens naming invented kids, no valid token
needed, would hold every connection for as long as the key endpoint takes."""


@dataclass(frozen=True)
class VerifiedToken:
    """What a verified callback token said."""

    tenant_id: str
    """The ``tid`` claim: the tenant the call belongs to."""
    issuer: str
    """The ``iss`` claim."""
    audience: str
    """The ``aud`` claim; always the bot's app id."""
    expires_at: float
    """The ``exp`` claim, in seconds since the epoch."""
    claims: Mapping[str, Any]
    """Every claim of the token (read-only)."""


@dataclass(frozen=True)
class _CacheEntry:
    token: VerifiedToken
    kid: str
    size: int


@dataclass(frozen=True)
class _Key:
    public: RSAPublicKey
    algorithm: str | None
    """The JWK's ``alg`` when published: then the only algorithm the key verifies."""

    def same_as(self, other: _Key | None) -> bool:
        """Whether ``other`` verifies exactly what this key verifies (same numbers, same
        ``alg``): a key published again under its kid with other numbers is another key."""
        return (
            other is not None
            and other.algorithm == self.algorithm
            and other.public.public_numbers() == self.public.public_numbers()
        )


def _check_token(
    token: str,
    key: RSAPublicKey,
    *,
    algorithm: str,
    audience: str,
    issuers: frozenset[str],
    leeway: float,
) -> dict[str, Any]:
    """Check signature and standard claims of one token; the one costly step."""
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except RecursionError:
        # PyJWT before 2.15 lets it out of its JSON reader: a 500 for anyone naming a known kid.
        raise jwt.DecodeError("Invalid payload string: nested too deeply") from None
    # Before PyJWT reads them: it takes "exp": "1234" and true as times (RFC 7519: a number),
    # and before 2.14 an OverflowError escapes it for Infinity, which is no JSON number.
    for name in ("exp", "nbf", "iat"):
        value = unverified.get(name)
        if name in unverified and not _json_number(value):
            raise jwt.DecodeError(f"the {name} claim is not a number")
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=[algorithm],
        audience=audience,
        leeway=leeway,
        options={"require": ["exp", "iss"], "strict_aud": True},
    )
    # Checked here, not by PyJWT: before 2.10 it compares a set of issuers with ``==``.
    issuer = claims["iss"]
    if not isinstance(issuer, str) or issuer not in issuers:
        raise jwt.InvalidIssuerError("Invalid issuer")
    return claims


def _json_number(value: Any) -> bool:
    """Whether a decoded claim is a JSON number (Python's reader also takes NaN, Infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not isinstance(value, float) or math.isfinite(value)


def _reason_for(exc: jwt.PyJWTError) -> tuple[str, str]:
    """Map a PyJWT refusal to a stable reason word and a short explanation."""
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad_signature", "signature verification failed"
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "expired", "token has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "not_yet_valid", str(exc)
    if isinstance(exc, jwt.InvalidAudienceError):
        return "bad_audience", "audience is not this bot's app id"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "bad_issuer", "issuer is not accepted"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        by_claim = {"exp": "missing_exp", "aud": "bad_audience", "iss": "bad_issuer"}
        return by_claim.get(exc.claim, "malformed"), str(exc)
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "bad_algorithm", str(exc)
    return "malformed", str(exc)


def _parse_jwks(document: Any) -> dict[str, _Key]:
    """The usable RSA signing keys of a JWKS document, by kid."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("JWKS document has no 'keys' list")
    keys: dict[str, _Key] = {}
    for entry in document["keys"]:
        if not isinstance(entry, Mapping):
            log.warning("jwks_key_skipped", why="not an object")
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            log.warning("jwks_key_skipped", why="no kid")
            continue
        if entry.get("kty") != "RSA":
            log.warning("jwks_key_skipped", kid=kid, why=f"kty {entry.get('kty')!r} is not RSA")
            continue
        if entry.get("use") not in (None, "sig"):
            log.warning("jwks_key_skipped", kid=kid, why=f"use {entry.get('use')!r}")
            continue
        alg = entry.get("alg")
        if alg is not None and alg not in ALLOWED_ALGORITHMS:
            log.warning("jwks_key_skipped", kid=kid, why=f"alg {alg!r} is not allowed")
            continue
        try:
            parsed = RSAAlgorithm.from_jwk(dict(entry))
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            log.warning("jwks_key_skipped", kid=kid, why=f"unparsable: {exc}")
            continue
        # A published private key still verifies through its public half.
        public = parsed.public_key() if isinstance(parsed, RSAPrivateKey) else parsed
        if public.key_size < _MIN_KEY_BITS:
            log.warning("jwks_key_skipped", kid=kid, why=f"{public.key_size}-bit key is too short")
            continue
        if kid in keys:
            log.warning("jwks_duplicate_kid", kid=kid)
        keys[kid] = _Key(public, alg)
    return keys


class Authenticator:
    """Verifies the bearer tokens on inbound callbacks.

    Call :meth:`start` once (it loads the signing keys and keeps them fresh),
    :meth:`verify` per request, and :meth:`close` on shutdown.

    ``app_id`` is the required audience; ``openid_config_url`` points at the
    calling platform's OpenID configuration; a non-empty ``allowed_tenants``
    limits which ``tid`` values are accepted (compared case-insensitively);
    ``leeway`` is the tolerated clock skew in seconds; a token may live at most
    ``max_lifetime`` seconds (``exp - iat``, and ``exp`` - now). Verified tokens
    are cached within about ``cache_bytes`` of memory. Keys are refreshed every
    ``refresh_interval`` seconds, and refetched at once for an unknown ``kid``
    at most once per ``refetch_cooldown`` seconds. ``extra_issuers`` are
    accepted besides :data:`DEFAULT_ISSUERS` and the configuration's own
    ``issuer``. ``fetch_timeout`` bounds each HTTP request, including the first
    key load in :meth:`start`.
    """

    key_fetches: int
    """How many times the keys were (re)fetched, successfully or not."""

    def __init__(
        self,
        *,
        app_id: str,
        openid_config_url: str,
        allowed_tenants: frozenset[str] = frozenset(),
        leeway: float = 60.0,
        max_lifetime: float = 24 * 3600.0,
        cache_bytes: int = 16 * 1024 * 1024,
        refresh_interval: float = 3600.0,
        refetch_cooldown: float = 5.0,
        extra_issuers: Iterable[str] = (),
        fetch_timeout: float = 10.0,
    ) -> None:
        if not app_id:
            raise ValueError("app_id is required")
        if refresh_interval <= 0:
            raise ValueError("refresh_interval must be positive")
        self._app_id = app_id
        self._openid_config_url = openid_config_url
        self._allowed_tenants = frozenset(tenant_key(t) for t in allowed_tenants)
        self._leeway = leeway
        self._max_lifetime = max_lifetime
        self._cache_budget = cache_bytes
        self._cache_bytes = 0
        self._refresh_interval = refresh_interval
        self._refetch_cooldown = refetch_cooldown
        self._fetch_timeout = fetch_timeout
        self._static_issuers = frozenset(DEFAULT_ISSUERS) | frozenset(extra_issuers)
        self._issuers = self._static_issuers
        self._keys: dict[str, _Key] = {}
        self._loaded = asyncio.Event()
        self._cache: dict[str, _CacheEntry] = {}
        # The header, token and entry of the last hit of the cache; forgotten with any entry.
        self._last_hit: tuple[str, str, _CacheEntry] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._key_waiters = 0
        self._last_refetch = float("-inf")
        self._last_ok = False
        self.key_fetches = 0

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Load the keys once (bounded by ``fetch_timeout``) and start refreshing them.

        Does not raise when the keys cannot be loaded: the background task keeps
        retrying, and :meth:`verify` raises :class:`~callbot.KeysUnavailable`
        meanwhile.
        """
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._fetch_timeout)
        )
        await self._refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name="callbot-auth-keys")

    async def close(self) -> None:
        """Stop refreshing keys and release the HTTP session."""
        for task in (self._task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None
        self._inflight = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def ready(self) -> bool:
        """True once signing keys have been loaded at least once."""
        return self._loaded.is_set()

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the keys; return :attr:`ready`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._loaded.wait(), timeout)
        return self.ready

    # -- verification ----------------------------------------------------

    async def verify(self, authorization: str | None) -> VerifiedToken:
        """Verify an ``Authorization`` header value and return what the token says.

        Raises :class:`~callbot.AuthenticationError` (see its ``reason``) when the
        token is refused, or :class:`~callbot.KeysUnavailable` when no signing
        key could be loaded yet.
        """
        cached = None
        last = self._last_hit
        if last is not None and authorization == last[0]:
            # The header of the last cached hit again (a sender's token serves it for an
            # hour): compared, where a lookup would copy and hash a kilobyte of token. (A
            # mismatch's timing tells at most a block of a header it did not match, whose
            # secret part is the signature's random bytes: nothing to guess a byte at a time.)
            token, cached = last[1], last[2]
        elif authorization is not None and authorization.startswith(_BEARER):
            # The usual header: its token looked up as written, without splitting a kilobyte
            # on white space. Only tokens _bearer_token split out are cached, so a hit is one.
            token = authorization[len(_BEARER) :]
            cached = self._cache.get(token)
            if cached is not None:
                self._last_hit = (authorization, token, cached)
        if cached is None:
            token = self._bearer_token(authorization)
            cached = self._cache.get(token)
        if cached is not None:
            # Same rule as an uncached check: valid until exp plus leeway.
            if time.time() < cached.token.expires_at + self._leeway:
                return cached.token
            self._forget(token)
            raise AuthenticationError("expired", "token has expired")

        algorithm, kid = self._read_header(token)

        if not self.ready:
            await self._refetch_on_demand()
            if not self.ready:
                raise KeysUnavailable()
        key = self._keys.get(kid)
        if key is None:
            await self._refetch_on_demand()
            key = self._keys.get(kid)
            if key is None and not self._last_ok:
                # A key rotated in while the keys cannot be fetched: asked again later (503).
                raise KeysUnavailable(
                    f"no signing key with kid {quoted(kid)}, and the keys could not be fetched"
                )
            if key is None:
                # Cut short: an unauthenticated request chooses it, up to the token's length.
                raise AuthenticationError("unknown_key", f"no signing key with kid {quoted(kid)}")

        if key.algorithm is not None and key.algorithm != algorithm:
            # A key published for one algorithm verifies that one only.
            raise AuthenticationError(
                "bad_algorithm", f"key {kid!r} is for {key.algorithm}, not {algorithm}"
            )
        # One RSA verification takes microseconds, so it runs inline on the loop.
        try:
            claims = _check_token(
                token,
                key.public,
                algorithm=algorithm,
                audience=self._app_id,
                issuers=self._issuers,
                leeway=self._leeway,
            )
        except jwt.PyJWTError as exc:
            reason, detail = _reason_for(exc)
            raise AuthenticationError(reason, detail) from None

        tenant = claims.get("tid")
        if not isinstance(tenant, str) or not tenant:
            raise AuthenticationError("missing_tenant", "token has no tid claim")
        if self._allowed_tenants and tenant_key(tenant) not in self._allowed_tenants:
            raise AuthenticationError("tenant_not_allowed", f"tenant {tenant} is not allowed")

        self._check_lifetime(claims)
        verified = VerifiedToken(
            tenant_id=tenant,
            issuer=str(claims["iss"]),
            audience=str(claims["aud"]),
            expires_at=float(claims["exp"]),
            claims=MappingProxyType(claims),
        )
        self._remember(token, _CacheEntry(verified, kid, _ENTRY_OVERHEAD + 2 * len(token)))
        return verified

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        """Refuse tokens living longer than ``max_lifetime``: a stolen one would work for ever."""
        issued = claims.get("iat")
        try:
            expires = float(claims["exp"])
            issued_at = float(issued) if isinstance(issued, int | float) else None
        except OverflowError:
            # An integer past any float (10**400): signed by a key holder, yet no date.
            raise AuthenticationError("lifetime_too_long", "token times beyond any date") from None
        if issued_at is not None and expires - issued_at > self._max_lifetime:
            raise AuthenticationError(
                "lifetime_too_long", f"token lifetime exceeds {self._max_lifetime:.0f} s"
            )
        if expires - time.time() > self._max_lifetime + self._leeway:
            raise AuthenticationError(
                "lifetime_too_long", f"token expires more than {self._max_lifetime:.0f} s from now"
            )

    @property
    def cache_bytes(self) -> int:
        """Estimated memory held by the verified-token cache."""
        return self._cache_bytes

    @staticmethod
    def _bearer_token(authorization: str | None) -> str:
        if authorization is None or not authorization.strip():
            raise AuthenticationError("missing", "no Authorization header")
        parts = authorization.split()
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise AuthenticationError("bad_scheme", "expected 'Bearer <token>'")
        return parts[1]

    @staticmethod
    def _read_header(token: str) -> tuple[str, str]:
        """The allowed algorithm and the kid of a token, from its unverified header."""
        if len(token) > _MAX_TOKEN_LENGTH:
            raise AuthenticationError("malformed", "token is too long")
        segments = token.split(".")
        if len(segments) != 3 or not all(_canonical_base64url(s) for s in segments):
            # One token has one spelling: padding or stray bits would make copies to cache.
            raise AuthenticationError("malformed", "not a JWT in unpadded canonical base64url")
        # What the header says is the sender's choice, up to the token's length: no valid
        # token is needed to have it in a refusal, so a refusal shows it cut short.
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, RecursionError) as exc:
            # PyJWT before 2.14 lets a RecursionError out for a header nested deep enough;
            # its messages quote the header ("Unsupported critical extension: ...").
            raise AuthenticationError("malformed", f"not a JWT: {quoted(str(exc))}") from None
        if "crit" in header:
            # Extensions a recipient must understand (RFC 7515): callbot understands none, and
            # refuses them itself, whichever PyJWT release checks them.
            raise AuthenticationError("malformed", "the token header names critical extensions")
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise AuthenticationError("bad_algorithm", "the token header names no algorithm")
        if algorithm not in ALLOWED_ALGORITHMS:
            raise AuthenticationError(
                "bad_algorithm", f"algorithm {quoted(algorithm)} is not allowed"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError("unknown_key", "token header has no kid")
        return algorithm, kid

    def _remember(self, token: str, entry: _CacheEntry) -> None:
        if entry.size > self._cache_budget:
            return
        full = len(self._cache) >= _CACHE_SIZE
        if full or self._cache_bytes + entry.size > self._cache_budget:
            now = time.time()
            for stale in [
                t for t, e in self._cache.items() if e.token.expires_at + self._leeway <= now
            ]:
                self._forget(stale)
            while self._cache and (
                len(self._cache) >= _CACHE_SIZE
                or self._cache_bytes + entry.size > self._cache_budget
            ):
                # dicts keep insertion order, so the first entry is the oldest.
                self._forget(next(iter(self._cache)))
        self._cache[token] = entry
        self._cache_bytes += entry.size

    def _forget(self, token: str) -> None:
        self._last_hit = None  # the one way out of the cache: the shortcut never outlives it
        entry = self._cache.pop(token, None)
        if entry is not None:
            self._cache_bytes -= entry.size

    # -- keys ------------------------------------------------------------

    async def _refetch_on_demand(self) -> None:
        """Refetch keys for an unknown kid: shared by concurrent callers, then cooled down.
        Raises :class:`~callbot.KeysUnavailable` when ``MAX_KEY_WAITERS`` wait already."""
        if self._inflight is None:
            if loop_time() - self._last_refetch < self._refetch_cooldown:
                return
            # Marked as it starts too: a request arriving between the fetch's end and this
            # caller's wake-up would otherwise start another one at once.
            self._last_refetch = loop_time()
        elif self._key_waiters >= MAX_KEY_WAITERS:
            # No line of its own: the refusal's says why, one per request a stranger sends.
            raise KeysUnavailable(
                f"{self._key_waiters} requests wait for the signing keys to be fetched already"
            )
        self._key_waiters += 1
        try:
            await self._refresh()
        finally:
            self._key_waiters -= 1
            self._last_refetch = loop_time()

    async def _refresh(self) -> bool:
        """Fetch configuration and keys, joining a fetch already under way."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch_guarded(), name="callbot-auth-fetch")
        # Shielded so that a cancelled request does not cancel the fetch others wait on.
        return await asyncio.shield(self._inflight)

    async def _fetch_guarded(self) -> bool:
        self.key_fetches += 1
        try:
            await self._fetch()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "jwks_fetch_failed",
                url=self._openid_config_url,
                error=f"{type(exc).__name__}: {exc}",
                keys_cached=len(self._keys),
            )
            self._last_ok = False
            return False
        else:
            self._last_ok = True
            return True
        finally:
            self._inflight = None

    async def _fetch(self) -> None:
        session = self._session
        if session is None:
            raise RuntimeError("Authenticator.start() was not called")
        config = await self._get_json(session, self._openid_config_url)
        if not isinstance(config, Mapping):
            raise ValueError("OpenID configuration is not an object")
        jwks_uri = config.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise ValueError("OpenID configuration has no jwks_uri")
        keys = _parse_jwks(await self._get_json(session, jwks_uri))
        if not keys:
            raise ValueError("JWKS document has no usable RSA signing key")

        issuer = config.get("issuer")
        issuers = self._static_issuers
        if isinstance(issuer, str) and issuer:
            issuers = issuers | {issuer}
        # Withdrawn: gone from the set, or published again under its kid as another key (other
        # numbers, another alg). A cached verdict rests on the key and issuer it was made with.
        withdrawn = {kid for kid, key in self._keys.items() if not key.same_as(keys.get(kid))}
        issuer_dropped = not self._issuers <= issuers
        self._keys = keys
        self._issuers = issuers
        if withdrawn or issuer_dropped:
            for token in [
                t
                for t, e in self._cache.items()
                if e.kid in withdrawn or e.token.issuer not in issuers
            ]:
                self._forget(token)
        if not self._loaded.is_set():
            log.info("jwks_loaded", keys=len(keys), kids=sorted(keys))
        self._loaded.set()

    @staticmethod
    async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
        # Keys over plain http are whoever's on the way: so is the jwks_uri a document names,
        # and each redirect followed to the answer.
        problem = https_problem(url)
        if problem is not None:
            raise ValueError(f"{url} {problem}")
        async with session.get(url, headers={"Accept": "application/json"}) as response:
            for hop in (*response.history, response):
                problem = https_problem(str(hop.url))
                if problem is not None:
                    raise ValueError(f"{url} was redirected to {hop.url}, which {problem}")
            response.raise_for_status()
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_chunked(65536):
                size += len(chunk)
                if size > _MAX_KEY_DOCUMENT:
                    # The platform's documents are a few KB: a misbehaving endpoint's end here.
                    raise ValueError(f"{url} sent more than {_MAX_KEY_DOCUMENT} bytes")
                chunks.append(chunk)
        return json.loads(b"".join(chunks))

    async def _refresh_loop(self) -> None:
        retry_base = min(1.0, self._refresh_interval)
        failures = 0
        while True:
            if self._last_ok:
                failures = 0
                delay = self._refresh_interval
            else:
                # Retry sooner while the endpoint is down; cached keys keep working.
                cap = min(self._refresh_interval, _MAX_BACKOFF)
                delay = min(retry_base * 2**failures, cap) * random.uniform(0.8, 1.0)
                failures = min(failures + 1, 30)
            await asyncio.sleep(delay)
            await self._refresh()


def _canonical_base64url(segment: str) -> bool:
    """Whether ``segment`` is unpadded base64url that re-encodes to itself."""
    if not _SEGMENT.fullmatch(segment) or len(segment) % 4 == 1:
        return False
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return False
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == segment
