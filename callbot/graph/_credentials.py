"""App-only tokens for Graph: client secret, certificate, or any azure-identity style credential.

:class:`TokenCache` sits in front of any credential: it keeps the token until
shortly before it expires and lets one refresh serve every concurrent caller.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote, quote_plus, urlsplit

import aiohttp
import jwt
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .._clock import loop_time
from .._config import DEFAULT_AUTHORITY_URL, https_problem
from .._errors import ConfigurationError, GraphError
from ._http import RetryPolicy, connection_trace, error_from, send

__all__ = [
    "AccessToken",
    "AsyncTokenCredential",
    "CertificateCredential",
    "ClientSecretCredential",
    "TokenCache",
    "TokenLike",
    "graph_scope",
]

log = structlog.get_logger("callbot.graph")
# What a bearer token may hold (RFC 6750's b64token): nothing a header would refuse.
_HEADER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

DEFAULT_SCOPE = "https://graph.microsoft.com/.default"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@runtime_checkable
class TokenLike(Protocol):
    """What a credential's ``get_token`` returns: azure-identity's ``AccessToken`` fits."""

    @property
    def token(self) -> str: ...

    @property
    def expires_on(self) -> int: ...


@runtime_checkable
class AsyncTokenCredential(Protocol):
    """Any object with ``async get_token(*scopes)`` (azure-identity's async credentials fit)."""

    async def get_token(self, *scopes: str) -> TokenLike: ...


@dataclass(frozen=True)
class AccessToken:
    """An access token and when it expires (seconds since the epoch)."""

    token: str
    expires_on: int


def graph_scope(graph_url: str) -> str:
    """The ``.default`` scope for the Graph deployment behind ``graph_url``.

    National clouds (``graph.microsoft.us``, ...) get their own scope; any other
    host (a local fake, a proxy) gets the global one.
    """
    parts = urlsplit(graph_url)
    host = (parts.hostname or "").lower()
    if host.startswith("graph.") or host.startswith("dod-graph.") or "microsoftgraph" in host:
        return f"https://{host}/.default"
    return DEFAULT_SCOPE


class _ClientCredentialsFlow(abc.ABC):
    """The OAuth 2.0 client credentials grant against a Microsoft identity platform tenant."""

    def __init__(
        self,
        tenant_id: str,
        client_id: str,
        *,
        authority_url: str,
        session: aiohttp.ClientSession | None,
        retry: RetryPolicy | None,
    ) -> None:
        if not tenant_id:
            raise ConfigurationError("tenant_id is required for an app-only token")
        if not client_id:
            raise ConfigurationError("client_id (the app id) is required for an app-only token")
        # The client secret or assertion travels to it.
        problem = https_problem(authority_url)
        if problem is not None:
            raise ConfigurationError(f"authority_url {authority_url!r} {problem}")
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.token_url = f"{authority_url.rstrip('/')}/{tenant_id}/oauth2/v2.0/token"
        self._session = session
        self._owns_session = session is None
        self._retry = retry or RetryPolicy(total_time=10.0)

    @abc.abstractmethod
    def _form(self) -> dict[str, str]:
        """The grant's proof of the client: a secret, or a signed assertion."""

    async def get_token(self, *scopes: str) -> AccessToken:
        """Request a token for ``scopes`` (default: Graph's ``.default`` scope)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(trace_configs=[connection_trace()])
        form = {
            "client_id": self.client_id,
            "scope": " ".join(scopes) or DEFAULT_SCOPE,
            "grant_type": "client_credentials",
            **self._form(),
        }
        issued_at = time.time()
        response = await send(
            self._session,
            "POST",
            self.token_url,
            policy=self._retry,
            form=form,
            log_fields={"client_id": self.client_id},
            # asking twice only mints a second token
            repeatable=True,
        )
        payload = response.json()
        # A token endpoint may echo the form back: the error must not carry the proof on.
        proofs = [value for key, value in form.items() if key in _PROOFS]
        if response.status != 200 or not isinstance(payload, Mapping):
            raise _redacted(error_from(response, method="POST", url=self.token_url), proofs)
        token = payload.get("access_token")
        if not isinstance(token, str) or not token:
            error = GraphError(
                response.status,
                "invalid_response",
                "token response has no access_token",
                method="POST",
                url=self.token_url,
                request_id=response.request_id,
                client_request_id=response.client_request_id,
                body=payload,
            )
            raise _redacted(error, proofs)
        lifetime = _lifetime(payload.get("expires_in"))
        log.info("graph_token_acquired", client_id=self.client_id, expires_in=lifetime)
        return AccessToken(token, int(issued_at + lifetime))

    async def close(self) -> None:
        """Close the HTTP session if this credential created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None


class ClientSecretCredential(_ClientCredentialsFlow):
    """App-only tokens with the app's client secret.

    ``session`` is an aiohttp session to share (the credential makes and closes its
    own when none is given). A session given is used as it is: aiohttp takes tracing
    only when a session is made, so when ``retry`` lets connecting take the whole
    attempt (its ``connect_timeout`` not shorter than ``request_timeout``), a token
    request that ran out of time still connecting cannot be told from one left without
    an answer. It is sent again all the same (asking twice only mints a second token),
    but its error says ``no answer``, and ``may_have_acted``, where it could have said
    ``no connection``.
    """

    def __init__(
        self,
        tenant_id: str,
        client_id: str,
        client_secret: str,
        *,
        authority_url: str = DEFAULT_AUTHORITY_URL,
        session: aiohttp.ClientSession | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(
            tenant_id, client_id, authority_url=authority_url, session=session, retry=retry
        )
        if not client_secret:
            raise ConfigurationError("client_secret is empty")
        self._secret = client_secret

    def __repr__(self) -> str:
        return f"ClientSecretCredential(tenant_id={self.tenant_id!r}, client_id={self.client_id!r})"

    def _form(self) -> dict[str, str]:
        return {"client_secret": self._secret}


class CertificateCredential(_ClientCredentialsFlow):
    """App-only tokens with a certificate: a client assertion JWT signed with its private key.

    The PEM (``certificate_path`` or ``certificate_data``) holds the private key
    and the certificate. The assertion carries the certificate's SHA-256
    (``x5t#S256``) and SHA-1 (``x5t``) thumbprints; RSA keys sign with ``PS256``
    (or ``RS256`` when asked), EC keys with ``ES256``. ``session`` is shared as
    :class:`ClientSecretCredential`'s is.
    """

    def __init__(
        self,
        tenant_id: str,
        client_id: str,
        certificate_path: str | Path | None = None,
        *,
        certificate_data: bytes | None = None,
        password: bytes | str | None = None,
        algorithm: str | None = None,
        authority_url: str = DEFAULT_AUTHORITY_URL,
        session: aiohttp.ClientSession | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(
            tenant_id, client_id, authority_url=authority_url, session=session, retry=retry
        )
        if certificate_data is None:
            if certificate_path is None:
                raise ConfigurationError("give certificate_path or certificate_data")
            try:
                certificate_data = Path(certificate_path).read_bytes()
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read certificate {certificate_path}: {exc}"
                ) from exc
        secret = password.encode() if isinstance(password, str) else password
        try:
            key = serialization.load_pem_private_key(certificate_data, secret)
            certificates = x509.load_pem_x509_certificates(certificate_data)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"the certificate PEM needs a private key and a certificate: {exc}"
            ) from exc
        if isinstance(key, rsa.RSAPrivateKey):
            self.algorithm = algorithm or "PS256"
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            self.algorithm = algorithm or "ES256"
        else:
            raise ConfigurationError("the certificate key must be RSA or EC")
        self._key = key
        self.certificate = certificates[0]
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        self.thumbprint_sha256 = _b64url(_digest(hashes.SHA256(), der))
        # SHA-1 here only names the certificate (x5t), as older token endpoints expect
        self.thumbprint_sha1 = _b64url(_digest(hashes.SHA1(), der))

    def __repr__(self) -> str:
        return (
            f"CertificateCredential(tenant_id={self.tenant_id!r}, client_id={self.client_id!r}, "
            f"x5t#S256={self.thumbprint_sha256!r})"
        )

    def client_assertion(self) -> str:
        """A fresh signed client assertion for the token endpoint (valid 10 minutes)."""
        now = int(time.time())
        claims = {
            "aud": self.token_url,
            "iss": self.client_id,
            "sub": self.client_id,
            "jti": str(uuid.uuid4()),
            "nbf": now,
            "iat": now,
            "exp": now + 600,
        }
        headers = {"typ": "JWT", "x5t#S256": self.thumbprint_sha256, "x5t": self.thumbprint_sha1}
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)

    def _form(self) -> dict[str, str]:
        return {
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.client_assertion(),
        }


_PROOFS = frozenset({"client_secret", "client_assertion"})
# Answers that are no refusal of the request itself: asking again later may succeed.
_NOT_REFUSALS = frozenset({408, 429})
DEFAULT_LIFETIME = 3600
# A cached token is still sent while its refresh fails, until this long before it expires
# (clocks differ: Graph must not see it expired).
_EXPIRY_SKEW = 60.0
MAX_LIFETIME = 24 * 3600


def _lifetime(value: Any) -> int:
    """Seconds a token lasts from ``expires_in``: 1 hour when missing or unusable, at most 24 h.

    A lifetime of zero or less would have every request fetch a new token.
    """
    try:
        seconds = int(value)
    except (TypeError, ValueError, OverflowError):
        return DEFAULT_LIFETIME
    return min(seconds, MAX_LIFETIME) if seconds > 0 else DEFAULT_LIFETIME


def _redacted(error: GraphError, proofs: list[str]) -> GraphError:
    """``error`` with every spelling of ``proofs`` in its message and body replaced."""
    secrets = sorted({s for proof in proofs for s in _spellings(proof)}, key=len, reverse=True)
    return GraphError(
        error.status,
        error.code,
        _scrub(error.message, secrets),
        method=error.method,
        url=error.url,
        request_id=error.request_id,
        client_request_id=error.client_request_id,
        body=_scrub(error.body, secrets),
        retry_after=error.retry_after,
    )


def _spellings(secret: str) -> set[str]:
    """``secret`` as an echo may spell it: as written, as the form sent it (URL-encoded either
    way, its escapes in either case) and as a JSON string writes it."""
    encoded = {way(secret, safe=safe) for way in (quote, quote_plus) for safe in ("", "/")}
    encoded |= {re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), e) for e in encoded}
    return {secret, json.dumps(secret)[1:-1], *encoded} - {""}


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "[redacted]")
        return value
    if isinstance(value, Mapping):
        return {_scrub(k, secrets): _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(item, secrets) for item in value]
    return value


def _consume(task: asyncio.Task[str]) -> None:
    # every awaiter sees the failure; this only keeps an unawaited one out of the logs
    if not task.cancelled():
        task.exception()


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenCache:
    """Caches one credential's token for one scope; one refresh serves all concurrent callers.

    A token is used until ``refresh_margin`` seconds (at most half its lifetime)
    before it expires. A failed fetch is not asked again at once: for ``backoff``
    seconds, doubled after each failure in a row up to ``max_backoff`` (or for the
    ``Retry-After`` the token endpoint sent, when longer, up to ``max_backoff``), every
    caller gets the fetch's own exception (for the built-in credentials a
    :class:`~callbot.GraphError` with what the token endpoint answered) without
    the credential being asked. The first caller after that fetches again; a
    success starts the count over. Each failed fetch writes one log line:
    ``graph_token_refused`` (error) when the token endpoint refused the request with a
    4xx (``invalid_client``, ``unauthorized_client``, ``invalid_request`` for a tenant
    it does not know, ``invalid_scope``; not 408 or 429), else
    ``graph_token_failed`` (warning). A token due for refresh that has not
    expired is still used while the refresh runs or fails: callers never wait
    for a refresh while they hold a valid token.
    """

    def __init__(
        self,
        credential: AsyncTokenCredential,
        scope: str,
        *,
        refresh_margin: float = 300.0,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.credential = credential
        self.scope = scope
        self._margin = refresh_margin
        self._backoff = backoff
        self._max_backoff = max(backoff, max_backoff)
        # Expiry is a wall-clock time (the token's own); tests pass a clock they move.
        self._now = wall_clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._usable_until = 0.0
        self._inflight: asyncio.Task[str] | None = None
        self._failure: Exception | None = None
        self._failure_tb: TracebackType | None = None
        self._failures = 0
        self._retry_at = 0.0
        self.fetches = 0
        """How many times the credential was asked (for metrics and tests)."""

    def invalidate(self, token: str | None = None) -> None:
        """Forget the cached token (after Graph refused it); given ``token``, only if it is
        still the one cached (a refusal of an older token leaves a newer one alone)."""
        if token is not None and token != self._token:
            return
        self._token = None
        self._refresh_at = 0.0
        self._usable_until = 0.0

    @property
    def cached(self) -> bool:
        """Whether a token is cached and fresh."""
        return self._token is not None and self._now() < self._refresh_at

    async def get(self) -> str:
        """A valid token, fetched only when the cached one is missing or about to expire.

        A token due for refresh that has not expired yet is returned at once while the
        refresh runs (and while it fails). Otherwise raises the last fetch's exception while
        backing off after it.
        """
        if self._token is not None and self._now() < self._refresh_at:
            return self._token
        task = self._inflight
        if task is None:
            failure = self._failure
            if failure is not None and loop_time() < self._retry_at:
                return self._still_usable(failure)
            task = asyncio.ensure_future(self._fetch())
            task.add_done_callback(_consume)
            self._inflight = task
        if self._token is not None and self._now() < self._usable_until:
            return self._token  # still valid: nobody waits for its refresh
        try:
            # shield: a caller that gives up must not cancel the refresh the others await
            return await asyncio.shield(task)
        except Exception as exc:
            return self._still_usable(exc)

    def _still_usable(self, failure: Exception) -> str:
        """The cached token if it has not expired, else ``failure`` raised."""
        if self._token is not None and self._now() < self._usable_until:
            return self._token
        # What asyncio does for every awaiter of one failed task: the same exception.
        raise failure.with_traceback(self._failure_tb or failure.__traceback__)

    async def _fetch(self) -> str:
        try:
            self.fetches += 1
            fetched_at = self._now()
            result: Any = await self.credential.get_token(self.scope)
            token = result.token
            if not isinstance(token, str) or not _HEADER_TOKEN.fullmatch(token):
                # Cached, it would fail every request before any left (no 401 to refetch on).
                raise GraphError(
                    0,
                    "invalid_response",
                    "the credential's access token is empty or not a bearer token"
                    " (RFC 6750: letters, digits and -._~+/ then '=')",
                )
            expires_on = float(result.expires_on)
            lifetime = max(0.0, expires_on - fetched_at)
            self._token = token
            self._refresh_at = expires_on - min(self._margin, lifetime / 2)
            self._usable_until = expires_on - _EXPIRY_SKEW
            self._failure = self._failure_tb = None
            self._failures = 0
            return str(token)
        except Exception as exc:
            self._back_off(exc)
            raise
        finally:
            self._inflight = None

    def _back_off(self, failure: Exception) -> None:
        self._failures += 1
        # the exponent is bounded: 2.0 ** n overflows long before failures stop counting
        delay = min(self._max_backoff, self._backoff * 2.0 ** min(self._failures - 1, 32))
        named = failure.retry_after if isinstance(failure, GraphError) else None
        if named is not None:
            # Sooner only meets another refusal; max_backoff keeps a huge one from idling the bot.
            delay = max(delay, min(named, self._max_backoff))
        self._failure = failure
        self._failure_tb = failure.__traceback__
        self._retry_at = loop_time() + delay
        fields: dict[str, Any] = {
            "scope": self.scope,
            "error": str(failure) or type(failure).__name__,
            "failures": self._failures,
            "retry_in": delay,
        }
        if isinstance(failure, GraphError):
            fields.update(
                status=failure.status, code=failure.code, url=failure.url, retry_after=named
            )
            # A 4xx is the request refused as it is (AADSTS90002, no such tenant, is a 400
            # invalid_request): configuration, not an outage.
            if 400 <= failure.status < 500 and failure.status not in _NOT_REFUSALS:
                log.error(
                    "graph_token_refused",
                    detail="the token endpoint refused the app's token request: check app_id,"
                    " tenant_id, app_secret or certificate_path, and graph_url (its scope)",
                    **fields,
                )
                return
        log.warning("graph_token_failed", **fields)
