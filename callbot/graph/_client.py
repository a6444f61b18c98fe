"""The Graph REST client: one shared session, app-only tokens, retries, request ids."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import BaseModel, ValidationError
from yarl import URL

from .. import _journal
from .._config import Settings, host_listed
from .._errors import ConfigurationError, GraphError
from .._log import RateLimitedLog
from ._credentials import (
    AsyncTokenCredential,
    CertificateCredential,
    ClientSecretCredential,
    TokenCache,
    graph_scope,
)
from ._http import (
    USER_AGENT,
    RawResponse,
    RequestStats,
    RetryPolicy,
    connection_trace,
    describe,
    error_from,
    send,
)

__all__ = ["GraphClient", "GraphResponse", "recording_url_refusal"]

log = structlog.get_logger("callbot.graph")

_MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
MAX_PAGES = 1000
"""How many pages :meth:`GraphClient.pages` follows before giving up (a chain that never ends)."""
MAX_LISTING_BYTES = 64 * 1024 * 1024
"""How many bytes of pages :meth:`GraphClient.pages` reads before giving up: what a listing
holds is bounded, whatever each page holds (a 5,000-participant meeting is about 20 MB)."""


def _origin(url: URL) -> tuple[str, str, int | None]:
    """Scheme, host and port (the default port when none is written), compared without case."""
    return (url.scheme.lower(), (url.host or "").lower().rstrip("."), url.port)


def recording_url_refusal(url: str, settings: Settings) -> str | None:
    """Why a recording may not be fetched from ``url`` (``None``: it may).

    Allowed: https from a host on ``settings.recording_hosts`` (``*.example.com``
    matches its subdomains), or the origin of ``settings.graph_url`` itself.
    """
    if any(ord(char) < 0x21 or ord(char) == 0x7F for char in url):
        return "the URL has spaces or control characters"
    try:
        parts = urlsplit(url)
        graph = urlsplit(settings.graph_url)
    except ValueError as exc:
        return f"not a URL: {exc!r}"
    if (parts.scheme, parts.netloc.lower()) == (graph.scheme, graph.netloc.lower()):
        return None
    if parts.scheme != "https":
        return f"scheme {parts.scheme or 'none'!r} is not https"
    host = (parts.hostname or "").lower().rstrip(".")
    if host_listed(host, settings.recording_hosts):
        return None
    return f"host {host!r} is not in recording_hosts (CALLBOT_RECORDING_HOSTS)"


ModelT = TypeVar("ModelT", bound=BaseModel)
ReadT = TypeVar("ReadT")
_WHOLE_BODY: Any = object()


@dataclass(frozen=True, kw_only=True)
class GraphResponse:
    """A successful Graph answer: status, headers, parsed JSON body (``None`` when empty)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: Any
    request_id: str | None
    client_request_id: str
    size: int = 0
    """The body's length in bytes, as Graph sent it."""

    @property
    def location(self) -> str | None:
        """The ``Location`` header (created resources, started operations)."""
        return self.headers.get("Location")

    def model(self, kind: type[ModelT], data: Any = _WHOLE_BODY) -> ModelT:
        """``data`` (the whole body by default) read as ``kind``: a :class:`GraphError`
        (``invalid_response``) when Graph's answer does not fit it, never a pydantic error."""
        return self.read(kind.model_validate, kind.__name__, data)

    def read(self, parse: Callable[[Any], ReadT], what: str, data: Any = _WHOLE_BODY) -> ReadT:
        """``parse(data)`` (the whole body by default), its pydantic error a :class:`GraphError`
        (``invalid_response``) saying the answer does not fit ``what``."""
        if data is _WHOLE_BODY:
            data = self.body if self.body is not None else {}
        try:
            return parse(data)
        except ValidationError as exc:
            raise GraphError(
                self.status,
                "invalid_response",
                f"Graph's answer does not fit {what}: {exc.error_count()} error(s)",
                request_id=self.request_id,
                client_request_id=self.client_request_id,
                body=self.body,
            ) from None


class GraphClient:
    """Sends requests to Graph on behalf of the app.

    Paths are relative to ``settings.graph_url`` (``/communications/calls``);
    an absolute URL (an ``@odata.nextLink``) is sent only when it is on the origin
    of ``graph_url`` (same scheme, host and port), since every request carries the
    app token; any other raises :class:`~callbot.GraphError` (code
    ``urlNotOnGraph``) before anything is sent. Every request carries a new
    ``client-request-id`` (the same on each of its retries); ``scenario_id`` ties the
    requests of one call flow together. Error statuses raise :class:`~callbot.GraphError`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        credential: AsyncTokenCredential | None = None,
        retry: RetryPolicy | None = None,
        scope: str | None = None,
    ) -> None:
        self.settings = settings
        self.retry = retry or RetryPolicy(
            total_time=settings.graph_retry_time, request_timeout=settings.graph_request_timeout
        )
        self.scope = scope or graph_scope(settings.graph_url)
        self.stats = RequestStats()
        """Outcomes of requests sent so far (read by the metrics endpoint)."""
        self._credential = credential
        self._owned_credential: ClientSecretCredential | CertificateCredential | None = None
        self._tokens: TokenCache | None = (
            TokenCache(credential, self.scope) if credential is not None else None
        )
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._recording_context: ssl.SSLContext | None = None
        self._graph_origin = _origin(URL(settings.graph_url))
        self.max_pages = MAX_PAGES
        self.max_listing_bytes = MAX_LISTING_BYTES
        # Failures' lines: a sender inventing calls decides how many actions fail at Graph.
        self._lines = RateLimitedLog(log)
        """How many pages :meth:`pages` follows before raising ``GraphError``."""

    @property
    def has_credentials(self) -> bool:
        """Whether a credential was given or can be built from the settings."""
        s = self.settings
        return self._credential is not None or bool(s.app_secret or s.certificate_path)

    @property
    def acting_tenant(self) -> str | None:
        """The id of the tenant the app token acts in: the settings' ``tenant_id`` when the
        credential is built from the settings and that is a tenant id; ``None`` for a
        credential given in code (its tenant is its own) or a tenant named by a domain
        (``contoso.onmicrosoft.com``), which the token endpoint takes but Graph's tokens do
        not carry (their ``tid`` is the id)."""
        tenant = self.settings.tenant_id
        if self._credential is not None or not tenant:
            return None
        try:
            return str(uuid.UUID(tenant))
        except ValueError:
            return None

    @property
    def tokens(self) -> TokenCache:
        """The app token cache (built from the settings on first use)."""
        if self._tokens is None:
            self._tokens = TokenCache(self._build_credential(), self.scope)
        return self._tokens

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared HTTP session (created on first use). Once :meth:`close` closed it,
        ``RuntimeError`` until :meth:`open`: a session built then would be closed by no one."""
        self._check_open()
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(trace_configs=[connection_trace()])
            # aiohttp would resend an idempotent request cut off once sent, unseen by the
            # retries here: a DELETE done by the first would then fail on the second's 404.
            self._session._retry_connection = False
        return self._session

    def _build_credential(self) -> AsyncTokenCredential:
        s = self.settings
        if not s.tenant_id:
            raise ConfigurationError("tenant_id is required to call Graph (CALLBOT_TENANT_ID)")
        credential: ClientSecretCredential | CertificateCredential
        if s.certificate_path:
            credential = CertificateCredential(
                s.tenant_id,
                s.app_id,
                s.certificate_path,
                authority_url=s.authority_url,
                session=self.session,
                retry=self.retry,
            )
        elif s.app_secret:
            credential = ClientSecretCredential(
                s.tenant_id,
                s.app_id,
                s.app_secret,
                authority_url=s.authority_url,
                session=self.session,
                retry=self.retry,
            )
        else:
            raise ConfigurationError(
                "no Graph credentials: set app_secret (CALLBOT_APP_SECRET) or certificate_path "
                "(CALLBOT_CERTIFICATE_PATH), or pass credential="
            )
        self._owned_credential = credential
        return credential

    async def token(self) -> str:
        """A valid app token (cached)."""
        return await self.tokens.get()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "the Graph client is closed: the bot has stopped, so its calls cannot be acted on"
                " (start the bot again first)"
            )

    def open(self) -> None:
        """Open the shared session (again, after :meth:`close`)."""
        self._closed = False
        _ = self.session

    async def close(self) -> None:
        """Close the shared session, and the credential built from the settings; requests
        then raise ``RuntimeError`` until :meth:`open` (which builds both anew)."""
        self._closed = True
        if self._owned_credential is not None:
            await self._owned_credential.close()
            # It sends through the session closed here: a later use builds it on the next one.
            self._owned_credential = None
            self._tokens = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> str:
        """The absolute URL of a Graph path (an absolute URL is returned as it is)."""
        if path.startswith(("http://", "https://")):
            return path
        return self.settings.graph_url.rstrip("/") + "/" + path.lstrip("/")

    def url_refusal(self, url: str) -> str | None:
        """Why the app token may not be sent to ``url`` (``None``: it is on Graph's origin)."""
        try:
            # yarl reads the port and the host's punycode lazily: all of it is read here.
            target = URL(url, encoded=True)
            if not target.absolute:
                return "not an absolute URL"
            if target.raw_user is not None or target.raw_password is not None:
                return "the URL carries user info"
            origin = _origin(target)
        except (ValueError, UnicodeError) as exc:
            return f"not a URL: {exc!r}"
        if origin != self._graph_origin:
            return f"{url!r} is not on the origin of graph_url (CALLBOT_GRAPH_URL)"
        return None

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        scenario_id: str | None = None,
        call_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        repeatable: bool | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> GraphResponse:
        """Send a request to Graph; returns the response or raises ``GraphError``.

        ``repeatable`` says whether the request may be sent again after a failure
        that could have happened once Graph had it (default: the method is idempotent).
        ``before_send`` is awaited right before the request goes out: not for a request
        refused here, nor for one a re-run handler is answered from the journal.
        A ``DELETE`` answered 404 after an earlier attempt that may have been carried out
        (a 504, an answer lost) returns that answer: what it deletes is gone, as asked.
        """
        self._check_open()  # before a transfer is noted, or a step journaled, for nothing
        url = self.url(path)
        fields: dict[str, Any] = {"scenario_id": scenario_id}
        if call_id is not None:
            fields["call_id"] = call_id
        # Every request carries the app token: it goes to Graph's own origin or nowhere.
        refusal = self.url_refusal(url)
        if refusal is not None:
            log.warning("graph_url_refused", method=method, url=url, reason=refusal, **fields)
            raise GraphError(
                0,
                "urlNotOnGraph",
                f"the app token is only sent to graph_url's origin: {refusal}",
                method=method,
                url=url,
                may_have_acted=False,
            )
        tokens = self.tokens
        # A handler run again after a takeover is served what its first run got.
        step = await _journal.step_for(method, url)
        if step is not None:
            recorded = await step.recall()
            if recorded is not None:
                log.info("graph_action_replayed", method=method, url=url, call_id=call_id)
                return _replayed(recorded)
        if before_send is not None:
            await before_send()

        # Every attempt asks for its header first: one token here per attempt made.
        sent: list[str] = []
        token_failed = False

        async def authorization() -> str:
            nonlocal token_failed
            try:
                token = await tokens.get()
            except GraphError:
                token_failed = True
                raise
            sent.append(token)
            return "Bearer " + token

        def unauthorized() -> None:
            # Only the token Graph refused: another request may have replaced it already.
            tokens.invalidate(sent[-1] if sent else None)

        extra = dict(headers or {})
        if scenario_id is not None:
            extra["scenario-id"] = scenario_id
        try:
            raw = await send(
                self.session,
                method,
                url,
                policy=self.retry,
                authorization=authorization,
                on_unauthorized=unauthorized,
                json_body=json,
                headers=extra,
                log_fields=fields,
                stats=self.stats,
                repeatable=repeatable,
            )
        except GraphError as exc:
            # No token: the token cache said why, once per fetch rather than once per request.
            if not token_failed:
                # connectionFailed: sent as often as it safely could be, and no answer came.
                gave_up = exc.code == "connectionFailed"
                _log_failure(self._lines, exc, gave_up=gave_up, attempt=len(sent), fields=fields)
            raise
        result = self._result(raw, method=method, url=url, fields=fields, attempt=len(sent))
        if step is not None:
            await step.record(result.status, result.location, result.body)
        return result

    async def pages(
        self,
        first: GraphResponse,
        kind: type[ModelT],
        *,
        scenario_id: str | None = None,
        call_id: str | None = None,
    ) -> AsyncIterator[ModelT]:
        """The ``value`` items of ``first`` and of each page its ``@odata.nextLink`` leads to,
        each read as ``kind`` (an item that does not fit is the error of its own page).

        A next link is fetched like any request (so only from Graph's origin); a link
        seen before, more than :attr:`max_pages` pages, or a next page once
        :attr:`max_listing_bytes` were read, raises ``GraphError``.
        """
        response = first
        followed: set[str] = set()
        read = 0
        while True:
            read += response.size
            body = response.body if isinstance(response.body, Mapping) else {}
            items = body.get("value")
            for item in items if isinstance(items, list) else []:
                yield response.model(kind, item)
            next_link = body.get("@odata.nextLink")
            if not isinstance(next_link, str):
                return
            # A loop or an endless chain would hold the handler for ever.
            why = None
            if next_link in followed:
                why = "repeats a page"
            elif len(followed) + 1 >= self.max_pages:
                why = f"leads past {self.max_pages} pages"
            elif read >= self.max_listing_bytes:
                why = f"leads past {self.max_listing_bytes} bytes"
            if why is not None:
                log.warning("graph_pages_refused", url=next_link, reason=why, call_id=call_id)
                raise GraphError(
                    0,
                    "tooManyPages",
                    f"@odata.nextLink {why}; pages not followed further",
                    method="GET",
                    url=next_link,
                    may_have_acted=False,
                )
            followed.add(next_link)
            response = await self.request(
                "GET", next_link, scenario_id=scenario_id, call_id=call_id
            )

    def check_recording_url(self, url: str, **fields: Any) -> None:
        """Raise ``ValueError`` (and log why) unless a recording may be fetched from ``url``
        (see :func:`recording_url_refusal`)."""
        refusal = recording_url_refusal(url, self.settings)
        if refusal is not None:
            log.warning("recording_refused", url=url, reason=refusal, **fields)
            raise ValueError(f"recording not fetched from {url}: {refusal}")

    async def download(
        self,
        url: str,
        *,
        bearer: str,
        write: Callable[[bytes], Awaitable[None]],
        call_id: str | None = None,
    ) -> int:
        """Stream a recording to ``write`` with its own bearer token; returns its size.

        Only URLs :func:`recording_url_refusal` accepts are fetched, redirects
        included; a refused URL or an answer larger than ``max_recording_bytes``
        raises ``ValueError``, an HTTP failure or a download not finished within
        ``recording_download_timeout`` :class:`~callbot.GraphError`.
        """
        self._check_open()
        fields = {"call_id": call_id} if call_id is not None else {}
        deadline = self.settings.recording_download_timeout
        try:
            # A sender trickling bytes would otherwise hold the handler for as long as it likes.
            async with asyncio.timeout(deadline):
                return await self._download(url, bearer=bearer, write=write, fields=fields)
        except TimeoutError:
            reason = f"recording not received within recording_download_timeout ({deadline} s)"
            log.warning("recording_download_failed", url=url, error=reason, **fields)
            raise GraphError(0, "connectionFailed", reason, method="GET", url=url) from None

    async def _download(
        self,
        url: str,
        *,
        bearer: str,
        write: Callable[[bytes], Awaitable[None]],
        fields: Mapping[str, Any],
    ) -> int:
        limit = self.settings.max_recording_bytes
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.retry.request_timeout, sock_read=self.retry.request_timeout
        )
        headers = {"Authorization": "Bearer " + bearer, "User-Agent": USER_AGENT}
        current = url
        for _ in range(_MAX_REDIRECTS + 1):
            self.check_recording_url(current, **fields)
            try:
                async with self.session.get(
                    current,
                    headers=headers,
                    allow_redirects=False,
                    timeout=timeout,
                    ssl=self._recording_ssl(),
                ) as response:
                    if response.status in (301, 302, 303, 307, 308):
                        location = response.headers.get("Location", "")
                        current = str(URL(current).join(URL(location)))
                        continue
                    if response.status >= 300:
                        body = await response.content.read(4096)
                        raw = RawResponse(
                            status=response.status,
                            headers=response.headers,
                            body=body,
                            client_request_id="",
                        )
                        self._result(raw, method="GET", url=current, fields=fields)
                    declared = response.content_length
                    if declared is not None and declared > limit:
                        raise ValueError(
                            f"recording is {declared} bytes, more than max_recording_bytes "
                            f"({limit}, CALLBOT_MAX_RECORDING_BYTES)"
                        )
                    size = 0
                    async for chunk in response.content.iter_chunked(_CHUNK):
                        size += len(chunk)
                        if size > limit:
                            raise ValueError(
                                f"recording is more than max_recording_bytes "
                                f"({limit}, CALLBOT_MAX_RECORDING_BYTES)"
                            )
                        await write(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = describe(exc)
                log.warning("recording_download_failed", url=current, error=reason, **fields)
                raise GraphError(0, "connectionFailed", reason, method="GET", url=current) from None
            log.info("recording_downloaded", url=current, size=size, **fields)
            return size
        raise ValueError(f"recording not fetched from {url}: more than {_MAX_REDIRECTS} redirects")

    def _recording_ssl(self) -> ssl.SSLContext | bool:
        if self._recording_context is None and self.settings.recording_ca_file:
            self.load_recording_ca()
        return self._recording_context if self._recording_context is not None else True

    def load_recording_ca(self) -> None:
        """Read ``recording_ca_file`` (when set); one that cannot be read is a setting's error."""
        path = self.settings.recording_ca_file
        if path is None or self._recording_context is not None:
            return
        context = ssl.create_default_context()
        try:
            context.load_verify_locations(cafile=path)
        except OSError as exc:  # missing, a directory, no PEM certificate (ssl.SSLError)
            raise ConfigurationError(
                f"cannot read recording_ca_file {path}: {exc.strerror or exc} "
                "(CALLBOT_RECORDING_CA_FILE)"
            ) from None
        self._recording_context = context

    def _result(
        self,
        raw: RawResponse,
        *,
        method: str,
        url: str,
        fields: Mapping[str, Any],
        attempt: int = 1,
    ) -> GraphResponse:
        # A DELETE is idempotent: once an attempt may have done it, "not found" is done.
        deleted_before = method == "DELETE" and raw.status == 404 and raw.acted_before
        # Redirects are not followed (they would take the token along), so they fail too.
        if raw.status >= 300 and not deleted_before:
            error = error_from(raw, method=method, url=url)
            _log_failure(self._lines, error, gave_up=raw.gave_up, attempt=attempt, fields=fields)
            raise error
        log.info(
            "graph_request_ok",
            method=method,
            url=url,
            status=raw.status,
            request_id=raw.request_id,
            client_request_id=raw.client_request_id,
            **({"deleted_by_earlier_attempt": True} if deleted_before else {}),
            **fields,
        )
        return GraphResponse(
            status=raw.status,
            headers=raw.headers,
            body=raw.json(),
            request_id=raw.request_id,
            client_request_id=raw.client_request_id,
            size=len(raw.body),
        )


def _log_failure(
    lines: RateLimitedLog,
    error: GraphError,
    *,
    gave_up: bool,
    attempt: int,
    fields: Mapping[str, Any],
) -> None:
    """The one line a failed request writes: ``graph_request_gave_up`` when it would have
    been sent again had the retry budget (or the chance of acting twice) allowed,
    ``graph_request_failed`` otherwise."""
    lines.warning(
        "graph_request_gave_up" if gave_up else "graph_request_failed",
        method=error.method,
        url=error.url,
        status=error.status,
        code=error.code,
        error=error.message,
        retry_after=error.retry_after,
        request_id=error.request_id,
        client_request_id=error.client_request_id,
        attempt=attempt,
        **fields,
    )


def _replayed(recorded: dict[str, Any]) -> GraphResponse:
    """A recorded answer as a response (only what actions read of it is kept)."""
    headers: CIMultiDict[str] = CIMultiDict()
    if recorded.get("location"):
        headers["Location"] = recorded["location"]
    return GraphResponse(
        status=int(recorded["status"]),
        headers=CIMultiDictProxy(headers),
        body=recorded.get("body"),
        request_id=None,
        client_request_id="replayed",
    )
