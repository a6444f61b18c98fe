"""Region affinity: sending a new call to the deployment of the bot that should run it.

Graph posts a call's first notification to whichever deployment GeoDNS resolves
for the data center hosting the call. A bot that decides, from that notification,
that another deployment should run the call answers ``302 Found`` with that
deployment's callback URL in ``Location``, and Graph posts the call there
(msteams-docs, call-notifications.md, "Redirects for region affinity").

The bot author's :data:`DeploymentChooser` decides; :class:`RegionAffinity`
asks it only about a request that is one new call's incoming-call notification,
checks what it returns, and never lets a failure of it lose the call: the call
is then run here.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Final
from urllib.parse import urlsplit

from . import events
from ._callables import handler_name
from ._config import https_problem
from ._log import get_logger

__all__ = ["REDIRECT_OUTCOMES", "DeploymentChooser", "RegionAffinity", "location_problem"]

log = get_logger("callbot.affinity")

DeploymentChooser = Callable[[events.IncomingCall], str | None]
"""``def choose(event: IncomingCall) -> str | None``: another deployment's callback URL, or
``None`` to run the call here."""

REDIRECT_OUTCOMES: Final = ("redirected", "bad_location", "chooser_failed")
"""What became of each call the chooser was asked about and did not keep here: sent on with
a 302, or run here because its answer was not a usable URL or it raised."""

MAX_LOCATION_LENGTH: Final = 2048


def location_problem(value: object) -> str | None:
    """Why ``value`` cannot be sent as a 302's ``Location``, or ``None`` when it can: an
    absolute ``https`` URL (``http`` only for 127.0.0.1, localhost or ::1), printable ASCII
    only (no CR, LF or space that would end or split the header), no credentials, no
    fragment."""
    if not isinstance(value, str):
        return f"not a string but {type(value).__name__}"
    if not value:
        return "empty"
    if len(value) > MAX_LOCATION_LENGTH:
        return f"longer than {MAX_LOCATION_LENGTH} characters"
    if not all("!" <= character <= "~" for character in value):
        return "has a space, a control character (CR, LF, ...) or a character outside ASCII"
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number 0-65535
    except ValueError:
        return "has a port that is not a number 0-65535"
    if not parts.hostname:
        return "not an absolute URL (scheme://host/path)"
    if parts.username is not None or parts.password is not None:
        return "carries credentials"
    if "#" in value:
        return "has a fragment"
    return https_problem(value)


def _endpoint(url: str) -> tuple[str, str, int | None, str, str]:
    """What a URL posts to, compared without the case of its scheme and host, or the default
    port written out."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port, parts.path or "/", parts.query


def _incoming_call_alone(batch: Sequence[events.Event]) -> events.IncomingCall | None:
    """The incoming call a request carries when it carries nothing else (a copy of it aside):
    a request mixing in anything else is run here, so that nothing else goes with the 302."""
    first = batch[0] if batch else None
    if not isinstance(first, events.IncomingCall):
        return None
    for event in batch[1:]:
        if not isinstance(event, events.IncomingCall) or event.call_key != first.call_key:
            return None
    return first


class RegionAffinity:
    """Asks the bot's chooser where a new call should run, for the receiver's 302.

    ``chooser`` gives the chooser registered now (``None``: every call runs here);
    ``known_here(call_id)`` says whether this deployment already knows the call (it
    runs it, or ended it lately: a copy of its incoming call stays here); ``own_url``
    is this bot's callback URL (a chooser naming it means here).
    """

    def __init__(
        self,
        chooser: Callable[[], DeploymentChooser | None],
        *,
        known_here: Callable[[str], bool],
        own_url: str | None,
    ) -> None:
        self._chooser = chooser
        self._known_here = known_here
        self._own = _endpoint(own_url) if own_url else None
        self.counts: Counter[str] = Counter(dict.fromkeys(REDIRECT_OUTCOMES, 0))
        """outcome -> calls: ``redirected``, ``bad_location``, ``chooser_failed``."""

    def location_for(self, batch: Sequence[events.Event]) -> str | None:
        """The other deployment's callback URL this request's call goes to, or ``None`` to
        accept the request here (as every request is without a chooser)."""
        chooser = self._chooser()
        if chooser is None:
            return None
        call = _incoming_call_alone(batch)
        if call is None or self._known_here(call.call_id):
            return None
        try:
            chosen: object = chooser(call)
        except Exception as exc:
            self.counts["chooser_failed"] += 1
            log.exception(
                "deployment_choice_failed",
                reason="chooser_failed",
                detail=repr(exc),
                chooser=_name(chooser),
                call_id=call.call_id,
                tenant_id=call.tenant_id,
            )
            return None
        if chosen is None:
            return None
        problem = location_problem(chosen)
        if problem is not None or not isinstance(chosen, str):
            if inspect.isawaitable(chosen):
                # A function that returned a coroutine: close it, no warning about it later.
                getattr(chosen, "close", lambda: None)()
            self.counts["bad_location"] += 1
            log.error(
                "deployment_choice_failed",
                reason="bad_location",
                detail=problem,
                location=repr(chosen)[:200],
                chooser=_name(chooser),
                call_id=call.call_id,
                tenant_id=call.tenant_id,
            )
            return None
        if self._own is not None and _endpoint(chosen) == self._own:
            return None  # this deployment's own callback URL: the call runs here
        self.counts["redirected"] += 1
        return chosen


def _name(chooser: DeploymentChooser) -> str:
    return handler_name(chooser)
