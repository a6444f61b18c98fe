"""The callback endpoint: limits, authentication, parsing, queueing, the 202.

Nothing here runs bot code but the deployment chooser (a plain function, see
``callbot._affinity``): a request is answered as soon as its batch is
authenticated, parsed and accepted by the sequencer, or sent to another
deployment with a 302; handlers run afterwards.
"""

from __future__ import annotations

import asyncio
import codecs
import encodings
import encodings.aliases
import logging
import pkgutil
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import hdrs, web

from . import events
from ._auth import Authenticator
from ._counts import Counts
from ._errors import AuthenticationError, KeysUnavailable, MalformedNotification, StoreUnavailable
from ._log import RateLimitedLog, get_logger, is_enabled
from ._parse import parse_body_in_parts
from ._proxy import forwarded_client
from ._serving import BodyBudget, displaceable

__all__ = ["CALLBACK_BODIES_AT_ONCE", "TENANT_BODIES_AT_ONCE", "Receiver"]

# How a malformed body is answered, when not 400: too many items, or another tenant's.
_REFUSALS = {
    "too_many_items": (413, "malformed"),
    "too_many_participants": (413, "malformed"),
    "too_many_values": (413, "malformed"),
    "tenant_mismatch": (403, "auth_failed"),
    "call_backlog_full": (503, "unavailable"),
}
# Refusals Graph should send again, after this many seconds.
_RETRY_AFTER = {"call_backlog_full": "1"}

log = get_logger("callbot.receiver")

CALLBACK_BODIES_AT_ONCE = 16
"""How many bodies of ``max_body_bytes`` callbacks hold at most, all tenants together, from
before a body is read until its request is answered: 64 MiB by default. A body that came
whole with its headers (as Graph's usually do) is not counted: refusing it frees nothing."""
TENANT_BODIES_AT_ONCE = 8
"""How many of those the callbacks of one tenant hold at most: a token of any tenant passes
while ``allowed_tenants`` is empty, and one tenant's must not take what the others' need."""

# What _buffered_body returns while the body is still on its way.
_NOT_BUFFERED = b"\0not buffered"
# Anyone can send Graph's tracing headers, 8 KiB each: a log line keeps their start only.
_HEADER_SHOWN = 128
_UTF8 = frozenset({"utf-8", "utf8"})
# The codecs every other spelling of UTF-8 names (a BOM is the parser's to skip).
_UTF8_CODECS = frozenset({"utf-8", "utf-8-sig"})
# Codecs of host names and string literals, not documents (punycode's decoder is quadratic).
_NOT_CHARSETS = frozenset({"punycode", "idna", "unicode-escape", "raw-unicode-escape"})
_NOT_IN_A_CODEC_NAME = re.compile(r"[^a-z0-9.]+")


def _codec_key(name: str) -> str:
    """``name`` as codec names are compared: in lower case, each run of characters other
    than ASCII letters, digits and dots one ``_``, none at either end ("Windows-1252" is
    "windows_1252"), as Python's codec lookup spells them."""
    return _NOT_IN_A_CODEC_NAME.sub("_", name.lower()).strip("_")


_CODEC_NAMES = frozenset(
    _codec_key(name)
    for name in (
        *encodings.aliases.aliases,
        *encodings.aliases.aliases.values(),
        *(module.name for module in pkgutil.iter_modules(encodings.__path__)),
    )
)
"""Every name of a codec the standard library ships (its modules and their aliases), as
:func:`_codec_key` spells it: a charset is looked up only by one of these. The lookup keeps
each name it does not find for good, so any other name a body's charset gives is refused
unlooked-up, and what it does keep (a miss of ``aliases``, say) is one of these few."""


def as_utf8(body: bytes, charset: str) -> bytes:
    """``body`` in UTF-8: as it is when it is UTF-8 already (a mislabelled body, or plain
    ASCII) or labelled UTF-8 in any spelling (the parser holds it to strict UTF-8), else
    decoded as ``charset`` says (``LookupError`` for a charset no codec of the standard
    library is named, or a codec that is no character set, ``UnicodeError`` for a codec that
    refuses to replace what it cannot read; bytes a charset cannot read become U+FFFD
    otherwise, and the JSON check decides)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        key = _codec_key(charset)
        if key not in _CODEC_NAMES:
            raise LookupError(f"no codec is named {charset[:64]!r}") from None
        name = codecs.lookup(key).name
        if name in _NOT_CHARSETS:
            raise LookupError(f"{charset[:64]!r} is not a character set") from None
        if name in _UTF8_CODECS:
            # UTF-8 however the label spells it ("u8", "UTF_8"): strict, so the parser refuses.
            return body
        # A codec for bytes, not text (base64, zlib), raises LookupError here.
        return body.decode(name, errors="replace").encode("utf-8")
    return body


Ingest = Callable[[Sequence[events.Event]], Awaitable[None]]
Redirect = Callable[[Sequence[events.Event]], str | None]
"""The other deployment's callback URL a parsed batch goes to, or ``None`` to accept it."""


class Receiver:
    """Serves the callback URL for one bot."""

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        ingest: Ingest,
        max_body_bytes: int,
        max_json_depth: int,
        max_items: int | None = None,
        max_participants: int | None = None,
        body_timeout: float | None = None,
        observe_ack: Callable[[float], None] | None = None,
        while_draining: Callable[[Sequence[events.Event]], None] | None = None,
        redirect: Redirect | None = None,
    ) -> None:
        self._auth = authenticator
        self._ingest = ingest
        self._max_body = max_body_bytes
        self._max_depth = max_json_depth
        self._max_items = max_items
        self._max_participants = max_participants
        self._body_timeout = body_timeout
        self._observe_ack = observe_ack
        self._while_draining = while_draining
        self._redirect = redirect
        # Lines of each item (a property left out): a body decides how many items it holds.
        self._item_lines = RateLimitedLog(get_logger("callbot.parse"))
        self.draining = False
        """While true, callbacks get 503 so that Graph retries against another instance."""
        self.counts: Counter[tuple[str, str]] = Counts()
        """(outcome, reason) -> count: accepted items, and refused requests by reason."""
        self.bodies = BodyBudget(
            lambda: max_body_bytes,
            bodies=CALLBACK_BODIES_AT_ONCE,
            what="callback bodies",
            per_sender=(TENANT_BODIES_AT_ONCE, "tenant"),
        )
        """What the bodies of callbacks being read (or handled once read) hold, by tenant."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one callback POST."""
        started = time.perf_counter()  # the acknowledgement's real seconds, for the metrics
        authorizations = request.headers.getall("Authorization", [])
        if len(authorizations) > 1:
            # Two headers would let a proxy and the bot each read a different one.
            return self._refuse(
                401,
                "auth_failed",
                "duplicate_header",
                "more than one Authorization header",
                self._context(request),
                headers={"WWW-Authenticate": 'Bearer error="invalid_request"'},
            )
        try:
            token = await self._auth.verify(authorizations[0] if authorizations else None)
        except KeysUnavailable as exc:
            return self._refuse(
                503,
                "unavailable",
                exc.reason,
                str(exc),
                self._context(request),
                headers={"Retry-After": "5"},
            )
        except AuthenticationError as exc:
            challenge = f'Bearer error="invalid_token", error_description="{exc.reason}"'
            return self._refuse(
                401,
                "auth_failed",
                exc.reason,
                str(exc),
                self._context(request),
                headers={"WWW-Authenticate": challenge},
            )
        tenant_id = token.tenant_id
        if request.content_type != "application/json":
            return self._refuse(
                415,
                "malformed",
                "bad_content_type",
                "expected Content-Type: application/json",
                self._context(request, tenant_id),
            )
        if hdrs.CONTENT_ENCODING in request.headers:  # checked first: the usual request has none
            codings = ",".join(request.headers.getall(hdrs.CONTENT_ENCODING)).lower().split(",")
            coding = next((c.strip() for c in codings if c.strip() not in ("", "identity")), None)
            if coding is not None:
                # Graph does not compress callbacks; the bot never inflates (CallBot.create_app).
                return self._refuse(
                    415,
                    "malformed",
                    "bad_content_encoding",
                    f"Content-Encoding {coding[:64]!r} is not accepted: send the body as it is",
                    self._context(request, tenant_id),
                )
        body = self._buffered_body(request)
        if body is not _NOT_BUFFERED:
            return await self._handle_body(request, body, tenant_id, started)
        # Still on its way: held within the callbacks' budget, and the tenant's share of it.
        claimed = self.bodies.size_of(request)
        refusal = self.bodies.claim(claimed, tenant_id)
        if refusal is not None:
            response = self._refuse(
                503,
                "unavailable",
                "bodies_busy",
                refusal,
                self._context(request, tenant_id),
                headers={"Retry-After": "1"},
            )
            response.force_close()  # its body is not read
            return response
        try:
            try:
                with displaceable(request, "a callback's body"):
                    async with asyncio.timeout(self._body_timeout):
                        body = await self._read_limited(request)
            except TimeoutError:
                # A sender that trickles its body would otherwise hold the connection open.
                response = self._refuse(
                    408,
                    "malformed",
                    "body_timeout",
                    f"body not received within {self._body_timeout} s",
                    self._context(request, tenant_id),
                )
                response.force_close()
                return response
            except ConnectionResetError:
                # Gone before its body was: closed by its sender, or for a new connection (the
                # guard said so). Nobody reads an answer.
                response = web.Response(status=400)
                response.force_close()
                return response
            return await self._handle_body(request, body, tenant_id, started)
        finally:
            self.bodies.release(claimed, tenant_id)

    async def _handle_body(
        self, request: web.Request, body: bytes | None, tenant_id: str, started: float
    ) -> web.StreamResponse:
        """Answer a callback whose token passed, once its body is read (``None``: too large)."""
        if body is None:
            return self._refuse(
                413,
                "malformed",
                "too_large",
                f"body larger than {self._max_body} bytes",
                self._context(request, tenant_id),
            )
        charset = request.charset
        if charset is not None and charset.lower() not in _UTF8:
            # Graph has labelled bodies Windows-1252: one that is not UTF-8 is read as labelled.
            try:
                body = as_utf8(body, charset)
            except (LookupError, UnicodeError):
                # Unknown, or a codec that is no text encoding (idna refuses what it cannot read).
                return self._refuse(
                    415,
                    "malformed",
                    "bad_content_type",
                    f"unknown charset {charset[:64]!r}",
                    self._context(request, tenant_id),
                )
            if len(body) > self._max_body:
                # Decoded, it grew: a byte of Windows-1252 may be three of UTF-8.
                return self._refuse(
                    413,
                    "malformed",
                    "too_large",
                    f"body larger than {self._max_body} bytes read as {charset[:64]!r}",
                    self._context(request, tenant_id),
                )
        try:
            batch: list[events.Event] = []
            for part in parse_body_in_parts(
                body,
                max_depth=self._max_depth,
                max_items=self._max_items,
                max_participants=self._max_participants,
                tenant_id=tenant_id,
                lines=self._item_lines,
            ):
                if batch:
                    # A large batch is built in parts: health checks and other calls go between.
                    await asyncio.sleep(0)
                batch.extend(part)
        except MalformedNotification as exc:
            if exc.reason == "legacy_format":
                # The calling platform resends a notification answered 204 in Graph's format.
                self.counts["resend_requested", exc.reason] += 1
                log.info("callback_resend_requested", reason=exc.reason, **self._context(request))
                return web.Response(status=204)
            status, outcome = _REFUSALS.get(exc.reason, (400, "malformed"))
            return self._refuse(
                status, outcome, exc.reason, str(exc), self._context(request, tenant_id)
            )
        except Exception as exc:
            # A body the parser cannot cope with is still the sender's problem: 4xx, not 5xx.
            log.exception("parser_failed", error=repr(exc))
            return self._refuse(
                400, "malformed", "unparseable", repr(exc), self._context(request, tenant_id)
            )
        # Only a new call's incoming call may be sent elsewhere: the usual request asks nothing.
        # (Its exact class, as the sequencer tells events apart: isinstance costs more.)
        if self._redirect is not None and type(batch[0]) is events.IncomingCall:
            # After authentication: a stranger never learns where the other deployments are.
            location = self._redirect(batch)
            if location is not None:
                log.info(
                    "callback_redirected",
                    call_id=batch[0].call_id,
                    location=location,
                    **self._context(request, tenant_id),
                )
                # Nothing of the call is kept: Graph posts it, and what follows, to location.
                return web.Response(status=302, headers={"Location": location})
        if self.draining:
            if self._while_draining is not None:
                # Running handlers may be waiting for these outcomes to finish.
                self._while_draining(batch)
            return self._refuse(
                503,
                "unavailable",
                "draining",
                "shutting down",
                self._context(request, tenant_id),
                headers={"Retry-After": "1"},
            )
        try:
            await self._ingest(batch)
        except MalformedNotification as exc:
            status, outcome = _REFUSALS.get(exc.reason, (400, "malformed"))
            self.counts["accepted", ""] += exc.kept  # the request's items the store kept
            retry = _RETRY_AFTER.get(exc.reason)
            return self._refuse(
                status,
                outcome,
                exc.reason,
                str(exc),
                self._context(request, tenant_id),
                headers=None if retry is None else {"Retry-After": retry},
            )
        except StoreUnavailable as exc:
            return self._refuse(
                503,
                "unavailable",
                "store_unavailable",
                str(exc),
                self._context(request, tenant_id),
                headers={"Retry-After": "1"},
            )
        self.counts["accepted", ""] += len(batch)
        if is_enabled(logging.DEBUG):
            # Built only when it can be written: the 202 path is hot.
            log.debug(
                "callback_accepted",
                items=len(batch),
                call_id=batch[0].call_id,
                **self._context(request, tenant_id),
            )
        if self._observe_ack is not None:
            self._observe_ack(time.perf_counter() - started)
        return web.Response(status=202)

    def _context(self, request: web.Request, tenant_id: str | None = None) -> dict[str, Any]:
        """Who sent a request, for its log line (unset values left out)."""
        client = forwarded_client(request)
        context = {
            "client": client.address,
            "scheme": client.scheme,
            "chain_id": _shown(request, "X-Microsoft-Skype-Chain-ID"),
            "message_id": _shown(request, "X-Microsoft-Skype-Message-ID"),
            # Set on a notification Graph sends again: the message id of its first sending.
            "original_message_id": _shown(request, "X-Microsoft-Skype-Original-Message-ID"),
            "tenant_id": tenant_id,
        }
        return {k: v for k, v in context.items() if v is not None}

    def _buffered_body(self, request: web.Request) -> bytes | None:
        """The body when all of it has arrived (the usual case: no deadline to keep), else
        ``_NOT_BUFFERED``; ``None`` when it is too large."""
        declared = request.content_length
        if declared is not None and declared > self._max_body:
            return None
        content = request.content
        if not content.is_eof():
            return _NOT_BUFFERED
        body = content.read_nowait()
        return body if len(body) <= self._max_body else None

    async def _read_limited(self, request: web.Request) -> bytes | None:
        # The declared length was checked by _buffered_body, which always runs first.
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            size += len(chunk)
            if size > self._max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def _refuse(
        self,
        status: int,
        outcome: str,
        reason: str,
        detail: str,
        context: dict[str, Any],
        *,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        self.counts[outcome, reason] += 1
        log.warning(
            "callback_refused",
            status=status,
            outcome=outcome,
            reason=reason,
            detail=detail,
            **context,
        )
        return web.json_response(
            {"error": reason, "detail": detail}, status=status, headers=headers
        )


def _shown(request: web.Request, header: str) -> str | None:
    """A header as a log line shows it: its first ``_HEADER_SHOWN`` characters."""
    value = request.headers.get(header)
    return None if value is None else value[:_HEADER_SHOWN]
