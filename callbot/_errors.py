"""The errors a bot author can catch.

CallbotError
├── ConfigurationError      a setting is missing or invalid
├── AuthenticationError     an inbound callback's token was refused (.reason)
│   └── KeysUnavailable     no signing keys could be loaded yet
├── MalformedNotification   an inbound body could not be understood (.reason)
├── StoreUnavailable        the state store cannot be reached
├── GraphError              an outbound request failed (an error status, or no answer)
│   └── CallEnded           Graph no longer knows the call (404): it has ended
└── OperationFailed         a Graph operation ended with status "failed" (or its call first)
"""

from __future__ import annotations

from typing import Any, Self

__all__ = [
    "AuthenticationError",
    "CallEnded",
    "CallbotError",
    "ConfigurationError",
    "GraphError",
    "KeysUnavailable",
    "MalformedNotification",
    "OperationFailed",
    "StoreUnavailable",
]


CALL_NOT_FOUND = "8522"
"""Graph's error code for a call it does not have (never created or offered, or ended),
answered with 404 and ``Call not found.``, whatever part of the call was asked about."""


def answer_may_have_acted(status: int) -> bool:
    """Whether an answer with this status leaves open that Graph carried the request out:
    not when Graph refused it (a 4xx, but 408, which says only that Graph stopped waiting
    for it) or was unavailable (503: Graph's docs say to send it again later); 0 (no
    answer) leaves it open."""
    refused = 400 <= status < 500 and status != 408
    return not (refused or status == 503)


class CallbotError(Exception):
    """Base class of every error callbot raises on purpose."""


class ConfigurationError(CallbotError):
    """A required setting is missing, or a setting has an invalid value."""


class AuthenticationError(CallbotError):
    """An inbound request's bearer token was refused.

    ``reason`` is a short, stable, machine-readable word (``"expired"``,
    ``"bad_audience"``, ...) used in logs and metrics; ``str(exc)`` explains it.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class KeysUnavailable(AuthenticationError):
    """No signing keys have been loaded yet, so no token can be checked.

    The receiver answers 503 so that Graph retries later.
    """

    def __init__(self, detail: str = "signing keys are not loaded") -> None:
        super().__init__("keys_unavailable", detail)


class MalformedNotification(CallbotError):
    """An inbound body is not a notification callbot can understand."""

    def __init__(self, reason: str, detail: str = "", *, kept: int = 0) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.kept = kept
        """Items of the refused request kept all the same (its other tenant's items aside)."""


class StoreUnavailable(CallbotError):
    """The state store cannot be reached; nothing was accepted."""


class GraphError(CallbotError):
    """Graph answered a request with an error status, or gave no usable answer.

    Carries the HTTP ``status``, Graph's error ``code`` and ``message``, and the
    ``request_id`` Graph returned with the ``client_request_id`` callbot sent,
    which Microsoft support asks for. ``status`` is 0 when there was no answer:
    ``code`` is then ``connectionFailed`` (no connection, a timeout, or a
    connection closed once the request was sent; a ``POST`` that may have
    reached Graph is not sent again), ``requestFailed`` (another client error),
    ``urlNotOnGraph`` (a URL off ``graph_url``'s origin, never sent),
    ``responseTooLarge`` (a body past 16 MiB once decompressed) or
    ``tooManyPages`` (a next link repeated, past ``GraphClient.max_pages``, or
    once ``GraphClient.max_listing_bytes`` were read).
    A 429 or 503 is retried while the wait Graph asks for fits in the retry budget
    (``RetryPolicy.total_time``); past it, ``retry_after`` says how long Graph asked for.
    ``may_have_acted`` says whether Graph may have carried the request out.
    """

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        method: str = "",
        url: str = "",
        request_id: str | None = None,
        client_request_id: str | None = None,
        body: Any = None,
        retry_after: float | None = None,
        may_have_acted: bool | None = None,
    ) -> None:
        super().__init__(f"{method} {url} -> {status} {code or ''}: {message}".strip())
        self.status = status
        self.code = code
        self.message = message
        self.method = method
        self.url = url
        self.request_id = request_id
        self.client_request_id = client_request_id
        self.body = body
        self.retry_after = retry_after
        """Seconds to wait before sending again, as the answer's ``Retry-After`` named them
        (delta-seconds, or an HTTP date counted from when the answer came); ``None`` when
        it named none, or one that is no wait (negative, unreadable). Back off at least this
        long before repeating the request."""
        self.may_have_acted = (
            may_have_acted if may_have_acted is not None else answer_may_have_acted(status)
        )
        """Whether Graph may have carried the request out. ``False`` when it said it did not
        (a 4xx but 408 Request Timeout, or 503) and no earlier attempt may have reached it,
        or when the request never left (Graph could not be reached, a URL off Graph): sending
        it again cannot do it twice. ``True`` otherwise: a 5xx but 503, a 408, an answer
        lost (a timeout, a connection closed once the request was sent)."""

    @classmethod
    def from_graph_error(cls, exc: GraphError, *, may_have_acted: bool | None = None) -> Self:
        """The same answer from Graph, as this class (a :class:`CallEnded`, say), saying
        ``may_have_acted`` anew when it is given."""
        return cls(
            exc.status,
            exc.code,
            exc.message,
            method=exc.method,
            url=exc.url,
            request_id=exc.request_id,
            client_request_id=exc.client_request_id,
            body=exc.body,
            retry_after=exc.retry_after,
            may_have_acted=exc.may_have_acted if may_have_acted is None else may_have_acted,
        )


class CallEnded(GraphError):
    """An action on a call got 404: the call has ended (usually the caller hung up).

    Catch it where a handler should stop quietly; a handler that lets it escape
    is stopped without counting as a failure (it is logged at info level). A 404
    about one participant, operation or group of a call not known to have ended
    is a plain :class:`GraphError`: only that one is gone; unless Graph's error
    says the call is not found (code ``8522``) and the bot is in that call.
    ``Call.hangup`` raises none: a call that is gone is left already.
    """

    result_info: Any = None
    """Why the call ended, when Graph said (a :class:`~callbot.models.ResultInfo`): set
    when a wait for the call to be established (``Call.wait_until_established``) ends."""


def _code(result_info: Any, name: str) -> Any:
    number = getattr(result_info, name, None)
    return number if number is not None else getattr(result_info, f"{name}_text", None)


class OperationFailed(CallbotError):
    """A Graph operation (prompt, recording, transfer, ...) reported ``failed``, or its
    call ended first (``call_ended``; usually the caller hung up).

    ``operation`` is the final typed operation; ``result_info`` its resultInfo. Like
    :class:`CallEnded`, one that escapes a handler stops it quietly when ``call_ended`` is
    set or the call has ended by then (Graph may tell the failure just before the end).
    """

    def __init__(self, operation: Any, result_info: Any, *, call_ended: bool = False) -> None:
        # older notifications name the code instead of numbering it (ResultInfo.subcode_text)
        code = _code(result_info, "code")
        subcode = _code(result_info, "subcode")
        message = getattr(result_info, "message", None)
        op_id = getattr(operation, "id", None)
        super().__init__(f"operation {op_id} failed: {code}/{subcode} {message or ''}".strip())
        self.operation = operation
        self.result_info = result_info
        self.call_ended = call_ended
        """Whether the operation failed because its call ended before it did."""
