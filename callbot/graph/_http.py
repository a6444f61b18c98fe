"""Outbound HTTP with retries: 429/503/504 and connection failures, within a time budget."""

from __future__ import annotations

import asyncio
import html as html_lib
import json
import math
import random
import re
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .._errors import GraphError, answer_may_have_acted

__all__ = [
    "RawResponse",
    "RequestStats",
    "RetryPolicy",
    "connection_trace",
    "parse_retry_after",
    "send",
]

log = structlog.get_logger("callbot.graph")

RETRY_STATUSES = frozenset({429, 503, 504})
USER_AGENT = "callbot/0.1"
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
"""The largest response body :func:`send` reads (after decompression); a longer one raises."""
_CHUNK = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How hard outbound requests try before giving up.

    A request that gets 429, 503 or 504, or fails to connect, is sent again (a 504,
    or a connection lost once sent, only when the request is repeatable) after
    an exponential backoff with jitter starting at ``base_delay`` and capped at
    ``max_delay``, or after ``Retry-After`` when Graph names a longer wait; no
    retry is scheduled past ``total_time`` seconds after the first attempt (the
    last answer's :class:`~callbot.GraphError` then carries its ``Retry-After`` as
    ``retry_after``).
    ``request_timeout`` bounds each single attempt, its connecting included.
    ``connect_timeout`` bounds making its connection (waiting for a free one, looking
    up the name, TCP and TLS). An attempt that ran out of either before it had a
    connection never reached Graph, so it is sent again whatever the request; when
    ``connect_timeout`` is not shorter than ``request_timeout``, connecting simply
    gets the whole attempt.
    """

    total_time: float = 30.0
    base_delay: float = 0.5
    max_delay: float = 8.0
    request_timeout: float = 30.0
    connect_timeout: float = 10.0

    def backoff(self, attempt: int) -> float:
        """The delay before retry number ``attempt`` (1-based) when the server named none."""
        ceiling: float = min(self.max_delay, self.base_delay * (2.0 ** (attempt - 1)))
        # "equal jitter": spread retries of many clients without dropping to zero
        return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass
class RequestStats:
    """What outbound requests met: each attempt's outcome, and how many were retried."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(method, status) -> attempts; status ``connection_error`` when none came back."""
    retries: int = 0


@dataclass(frozen=True, kw_only=True)
class RawResponse:
    """A final answer to a request (after retries): status, headers and body."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    client_request_id: str
    acted_before: bool = False
    """Whether an earlier attempt of the request may have been carried out (a repeatable
    request sent again after a 504 or a lost answer)."""
    gave_up: bool = False
    """Whether this answer would have been retried (a 429, a 503, a 504 to a repeatable
    request) had the retry budget left time for the wait."""

    @property
    def request_id(self) -> str | None:
        """Graph's ``request-id`` header, quoted by Microsoft support."""
        return self.headers.get("request-id")

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked to wait before asking again (``Retry-After``), ``None``
        when it named no wait or none :func:`parse_retry_after` can read."""
        return parse_retry_after(self.headers.get("Retry-After"))

    def json(self) -> Any:
        """The body parsed as JSON, ``None`` when empty or not JSON."""
        if not self.body.strip():
            return None
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):  # nested too deeply for the decoder
            return None


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (0 for
    a date already past); ``None`` when absent or unreadable (negative, NaN, infinite)."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        # delta-seconds is a count (RFC 9110): "-4" or "inf" names no wait at all.
        return seconds if 0.0 <= seconds < math.inf else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now or datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


def error_from(response: RawResponse, *, method: str, url: str) -> GraphError:
    """A :class:`GraphError` carrying Graph's ``{"error": {"code", "message"}}``."""
    payload = response.json()
    code: str | None = None
    message = ""
    if isinstance(payload, Mapping):
        error = payload.get("error")
        if isinstance(error, Mapping):
            code = _code_text(error.get("code"))
            message = _str_or_none(error.get("message")) or ""
        elif isinstance(error, str):
            # the token endpoint answers {"error": "invalid_client", "error_description": ...}
            code = error
            message = _str_or_none(payload.get("error_description")) or ""
    if not message:
        # Graph's own error with an empty message ("NotFound", ""), or a gateway's page.
        message = (None if code else _text_of(response)) or _phrase(response.status)
    return GraphError(
        response.status,
        code,
        message,
        method=method,
        url=url,
        request_id=response.request_id,
        client_request_id=response.client_request_id,
        body=payload,
        retry_after=response.retry_after,
        may_have_acted=response.acted_before or answer_may_have_acted(response.status),
    )


_TAG = re.compile(r"<[^>]*>")
_MESSAGE_CHARS = 300


def _text_of(response: RawResponse) -> str:
    """What a body that is no Graph error says, on one line: an HTML page's title (or
    its text), else the text itself; at most 300 characters."""
    text = response.body[: 64 * 1024].decode("utf-8", "replace")
    html = "html" in response.headers.get("Content-Type", "").lower() or text.lstrip()[:1] == "<"
    if html:
        text = html_lib.unescape(_TAG.sub(" ", _title(text) or text))
    return " ".join(text.split())[:_MESSAGE_CHARS]


def _title(page: str) -> str | None:
    """The text of an HTML page's ``<title>`` (found by position: linear on any page)."""
    lowered = page.lower()
    start = lowered.find("<title")
    opened = lowered.find(">", start) if start >= 0 else -1
    end = lowered.find("</title", opened) if opened >= 0 else -1
    return page[opened + 1 : end] if end >= 0 else None


def _phrase(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def describe(exc: BaseException) -> str:
    """What went wrong with a request, without its headers (``repr`` would show the token)."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}: {exc.status} {exc.message}".strip()
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or ``None`` past ``limit`` bytes (a huge or decompression-bomb answer)."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _code_text(value: Any) -> str | None:
    """Graph's error code as text: ``8522`` written as a number is the code ``"8522"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _str_or_none(value)


# Reserved characters, and "%" so that escapes stay: quote() leaves these as they are.
_URL_CHARACTERS = "%:/?#[]@!$&'()*+,;="

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})

# What aiohttp raises while connecting, before a byte of the request is written: no
# connection (DNS, TCP, TLS, proxy), ClientTimeout.connect run out, a pinned certificate refused.
_NOT_SENT = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
    aiohttp.ServerFingerprintMismatch,
)


class _Progress:
    """How far one attempt got: its connection as the session's :func:`connection_trace`
    saw it, its answer as :func:`send` did."""

    __slots__ = ("answered", "connected", "headers", "status")

    def __init__(self) -> None:
        self.connected: bool | None = None
        """``None`` on a session without the trace, else whether a connection was had."""
        self.answered = False
        """Whether the answer's status and headers came."""
        self.status: int | None = None
        """The answer's status, once it came."""
        self.headers: CIMultiDictProxy[str] | None = None
        """The answer's headers, once they came."""

    def refusal(self, client_request_id: str, *, acted_before: bool) -> RawResponse | None:
        """The answer without its body, when its status says Graph did not act on the
        request (429, 503, a 4xx but 408); else ``None``."""
        if self.status is None or self.headers is None or answer_may_have_acted(self.status):
            return None
        return RawResponse(
            status=self.status,
            headers=self.headers,
            body=b"",
            client_request_id=client_request_id,
            acted_before=acted_before,
        )


def _attempt_failure(exc: BaseException, policy: RetryPolicy, progress: _Progress) -> str:
    """What went wrong with an attempt: a timeout says which bound ran out, after how long,
    and how far the attempt got (aiohttp's own timeout for the whole attempt says nothing)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        what = f"no connection within connect_timeout ({policy.connect_timeout:g} s)"
    elif isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientError):
        if progress.answered:
            what = "the answer did not come in full"
        elif progress.connected is False:
            what = "no connection"
        else:
            what = "no answer"
        what += f" within request_timeout ({policy.request_timeout:g} s)"
    else:
        return describe(exc)
    return f"{type(exc).__name__}: {what}"


async def _request_started(
    session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestStartParams
) -> None:
    if isinstance(progress := context.trace_request_ctx, _Progress):
        progress.connected = False


async def _connected(session: aiohttp.ClientSession, context: Any, params: object) -> None:
    if isinstance(progress := context.trace_request_ctx, _Progress):
        progress.connected = True


def connection_trace() -> aiohttp.TraceConfig:
    """The tracing a session needs for :func:`send` to know whether an attempt that timed
    out had its connection: aiohttp's timeout for the whole attempt does not say."""
    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(_request_started)
    trace.on_connection_create_end.append(_connected)
    trace.on_connection_reuseconn.append(_connected)
    return trace


AuthHeader = Callable[[], Awaitable[str | None]]
"""Gives the ``Authorization`` header value for one attempt (``None``: send none)."""


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    policy: RetryPolicy,
    authorization: AuthHeader | None = None,
    on_unauthorized: Callable[[], None] | None = None,
    json_body: Any = None,
    form: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    log_fields: Mapping[str, Any] | None = None,
    stats: RequestStats | None = None,
    repeatable: bool | None = None,
    max_body: int = MAX_RESPONSE_BYTES,
) -> RawResponse:
    """Send one request, retrying throttling, unavailability and connection failures.

    ``url`` is sent as written: escapes and reserved characters stay as they are,
    and only what a URL cannot hold (a space, non-ASCII text) is percent-encoded.
    Every attempt carries the same ``client-request-id``; a retry says which it is in
    ``Retry-Attempt`` (1 for the first retry), as Graph's SDKs send them.
    Returns the first response that is not retried, whatever its status (a 504 to a
    request that is not repeatable is returned as it is); a request
    that never got a response raises :class:`GraphError` with status 0; one whose
    status says Graph did not act (429, 503, a 4xx but 408) is that answer even when its
    body was cut off (then empty). A 401 is
    retried once after ``on_unauthorized`` (which drops a cached token). A request
    that may have reached the server is sent again only when ``repeatable``
    (default: the method is idempotent). One that had no connection yet did not:
    ``session`` needs :func:`connection_trace` to tell so when ``request_timeout``
    runs out while connecting (without it, such an attempt counts as sent). A body
    longer than ``max_body`` bytes
    (once decompressed) raises :class:`GraphError` with status 0.
    Each retry is logged here; the request's outcome is not: the caller, which knows
    what the answer means, writes its one line.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + policy.total_time
    fields = dict(log_fields or {})
    attempt = 0
    reauthenticated = False
    stats = stats if stats is not None else RequestStats()
    # A POST that may have reached Graph must not be sent twice (a second call placed).
    safe = method in _IDEMPOTENT if repeatable is None else repeatable
    # Whether an attempt so far may have been carried out: an error then says so.
    acted = False
    # yarl would decode what path_segment encoded (%3B to ;): quote the rest only.
    target = URL(quote(url, safe=_URL_CHARACTERS), encoded=True)
    # One id for every attempt, as Graph's SDKs resend a request: support traces it by this id.
    client_request_id = str(uuid.uuid4())
    timeout = aiohttp.ClientTimeout(total=policy.request_timeout, connect=policy.connect_timeout)
    while True:
        attempt += 1
        # What every line about this attempt says.
        attempt_fields = {
            "method": method,
            "url": url,
            "attempt": attempt,
            "client_request_id": client_request_id,
            **fields,
        }
        request_headers: CIMultiDict[str] = CIMultiDict({"client-request-id": client_request_id})
        request_headers["User-Agent"] = USER_AGENT
        if attempt > 1:
            request_headers["Retry-Attempt"] = str(attempt - 1)
        request_headers.update(headers or {})
        if authorization is not None:
            try:
                value = await authorization()
            except GraphError as exc:
                # No token, so this attempt never left: Graph acted only if an earlier one did.
                # A new error: the token provider gives its own to every request that waited.
                raise GraphError.from_graph_error(exc, may_have_acted=acted) from None
            if value is not None:
                request_headers["Authorization"] = value
        kwargs: dict[str, Any] = {}
        if form is not None:
            kwargs["data"] = dict(form)
        elif json_body is not None:
            kwargs["json"] = json_body
        else:
            # No body (keepAlive, DELETE), no Content-Type: as Graph documents those requests.
            kwargs["skip_auto_headers"] = ("Content-Type",)
        progress = _Progress()
        try:
            async with session.request(
                method,
                target,
                headers=request_headers,
                timeout=timeout,
                # A redirect would carry the bearer token to wherever Location points.
                allow_redirects=False,
                trace_request_ctx=progress,
                **kwargs,
            ) as resp:
                progress.answered = True
                progress.status, progress.headers = resp.status, resp.headers
                body = await _read_body(resp, max_body)
                earlier, acted = acted, acted or answer_may_have_acted(resp.status)
                if body is None:
                    stats.outcomes[method, "too_large"] += 1
                    raise GraphError(
                        0,
                        "responseTooLarge",
                        f"the body of the {resp.status} answer is more than {max_body} bytes",
                        method=method,
                        url=url,
                        client_request_id=client_request_id,
                    )
                response = RawResponse(
                    status=resp.status,
                    headers=resp.headers,
                    body=body,
                    client_request_id=client_request_id,
                    acted_before=earlier,
                )
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            # A status saying Graph did not act (429, 503, a 4xx) is that answer, body or not.
            refusal = progress.refusal(client_request_id, acted_before=acted)
            if refusal is None:
                stats.outcomes[method, "connection_error"] += 1
                delay = policy.backoff(attempt)
                reason = _attempt_failure(exc, policy, progress)
                # The attempt's timeout may strike while still connecting: the trace tells.
                sent = not isinstance(exc, _NOT_SENT) and progress.connected is not False
                acted = acted or sent
                if (sent and not safe) or loop.time() + delay > deadline:
                    # Not chained: aiohttp's exceptions hold the request headers (the token).
                    raise GraphError(
                        0,
                        "connectionFailed",
                        reason,
                        method=method,
                        url=url,
                        client_request_id=client_request_id,
                        may_have_acted=acted,
                    ) from None
                log.warning(
                    "graph_request_retry", error=reason, delay=round(delay, 3), **attempt_fields
                )
                stats.retries += 1
                await asyncio.sleep(delay)
                continue
            response = refusal
        except aiohttp.ClientError as exc:
            stats.outcomes[method, "client_error"] += 1
            raise GraphError(
                0,
                "requestFailed",
                describe(exc),
                method=method,
                url=url,
                client_request_id=client_request_id,
            ) from None
        stats.outcomes[method, str(response.status)] += 1
        if response.status == 401 and on_unauthorized is not None and not reauthenticated:
            # a cached token can be revoked before its expiry: fetch a new one once
            reauthenticated = True
            on_unauthorized()
            continue
        # Sent again only when repeatable, or when Graph did not act on it (429, 503).
        if response.status in RETRY_STATUSES and (
            safe or not answer_may_have_acted(response.status)
        ):
            named = response.retry_after
            # Retry-After: 0 on every answer would have us hammer Graph until the budget ends.
            delay = max(named or 0.0, policy.backoff(attempt))
            if loop.time() + delay > deadline:
                return replace(response, gave_up=True)
            log.warning(
                "graph_request_retry",
                delay=round(delay, 3),
                status=response.status,
                request_id=response.request_id,
                **attempt_fields,
            )
            stats.retries += 1
            await asyncio.sleep(delay)
            continue
        return response
