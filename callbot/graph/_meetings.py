"""Which meeting to join: from a Teams join URL, a join meeting id, or explicit coordinates."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

from .._config import host_listed
from ._values import Target

__all__ = ["TEAMS_HOSTS", "Meeting", "parse_join_url"]

TEAMS_HOSTS: frozenset[str] = frozenset(
    {
        "teams.microsoft.com",
        "teams.cloud.microsoft",
        "teams.live.com",
        "gov.teams.microsoft.us",
        "dod.teams.microsoft.us",
        "teams.microsoftonline.cn",
    }
)
"""The hosts Teams writes join URLs on: worldwide, its newer domain, personal Teams, the US
government clouds (GCC High, DoD) and Teams operated by 21Vianet."""

MAX_SAFE_LINKS_WRAPPINGS = 4
"""Wrappings a join URL may be in (Safe Links, again for a mail forwarded on; the launcher
page; the web client's address): one in more is refused, not unwrapped without end."""

CHAT_INFO = "#microsoft.graph.chatInfo"
ORGANIZER_MEETING_INFO = "#microsoft.graph.organizerMeetingInfo"
JOIN_MEETING_ID_MEETING_INFO = "#microsoft.graph.joinMeetingIdMeetingInfo"
TOKEN_MEETING_INFO = "#microsoft.graph.tokenMeetingInfo"


@dataclass(frozen=True, kw_only=True)
class Meeting:
    """A meeting to join, named one of three ways.

    * by its chat thread and organizer (scheduled, private chat and channel
      meetings, Meet Now): :meth:`thread`, or :meth:`from_url` with a Teams join URL;
    * by its join meeting id and passcode: :meth:`join_id`;
    * by a token (policy-based recording): :meth:`from_token`.

    ``tenant_id`` is the meeting's tenant, sent as the call's ``tenantId``.
    """

    thread_id: str | None = None
    message_id: str | None = None
    reply_chain_message_id: str | None = None
    organizer: Target | None = None
    tenant_id: str | None = None
    join_meeting_id: str | None = None
    passcode: str | None = None
    token: str | None = None
    allow_conversation_without_host: bool | None = None

    @classmethod
    def thread(
        cls,
        thread_id: str,
        *,
        organizer: Target | str,
        message_id: str = "0",
        reply_chain_message_id: str | None = None,
        tenant_id: str | None = None,
        allow_conversation_without_host: bool | None = None,
    ) -> Meeting:
        """A meeting named by its chat thread (``19:meeting_...@thread.v2``) and organizer.

        ``organizer`` is a :class:`Target` or the organizer's user id (then in
        ``tenant_id``). Channel meetings give the channel post's ``message_id``.
        """
        if isinstance(organizer, str):
            organizer = Target.user(organizer, tenant_id=tenant_id)
        return cls(
            thread_id=thread_id,
            message_id=message_id,
            reply_chain_message_id=reply_chain_message_id,
            organizer=organizer,
            tenant_id=tenant_id,
            allow_conversation_without_host=allow_conversation_without_host,
        )

    @classmethod
    def join_id(
        cls, join_meeting_id: str, passcode: str | None = None, *, tenant_id: str | None = None
    ) -> Meeting:
        """A meeting named by its join meeting id (and passcode when it has one)."""
        return cls(join_meeting_id=join_meeting_id, passcode=passcode, tenant_id=tenant_id)

    @classmethod
    def from_token(cls, token: str, *, tenant_id: str | None = None) -> Meeting:
        """A meeting named by a meeting token."""
        return cls(token=token, tenant_id=tenant_id)

    @classmethod
    def from_url(cls, url: str, *, hosts: Collection[str] = TEAMS_HOSTS) -> Meeting:
        """The meeting a Teams join URL points to (see :func:`parse_join_url`)."""
        return parse_join_url(url, hosts=hosts)

    def chat_info_json(self) -> dict[str, Any] | None:
        """The call's ``chatInfo`` (``None`` for meetings named by id or token)."""
        if self.thread_id is None:
            return None
        body: dict[str, Any] = {"@odata.type": CHAT_INFO, "threadId": self.thread_id}
        if self.message_id is not None:
            body["messageId"] = self.message_id
        if self.reply_chain_message_id is not None:
            body["replyChainMessageId"] = self.reply_chain_message_id
        return body

    def meeting_info_json(self) -> dict[str, Any]:
        """The call's ``meetingInfo``."""
        if self.join_meeting_id is not None:
            body: dict[str, Any] = {
                "@odata.type": JOIN_MEETING_ID_MEETING_INFO,
                "joinMeetingId": self.join_meeting_id,
            }
            if self.passcode is not None:
                body["passcode"] = self.passcode
            return body
        if self.token is not None:
            return {"@odata.type": TOKEN_MEETING_INFO, "token": self.token}
        if self.organizer is None:
            raise ValueError("a meeting needs an organizer, a join meeting id or a token")
        body = {
            "@odata.type": ORGANIZER_MEETING_INFO,
            "organizer": self.organizer.identity_set_json(),
        }
        if self.allow_conversation_without_host is not None:
            body["allowConversationWithoutHost"] = self.allow_conversation_without_host
        return body


def parse_join_url(url: str, *, hosts: Collection[str] = TEAMS_HOSTS) -> Meeting:
    """Turn a Teams meeting join URL into the :class:`Meeting` it names.

    ``https://teams.microsoft.com/l/meetup-join/{thread id}/{message id}?context={json}``
    gives the chat thread, the message id, and from the URL-encoded JSON context
    the tenant (``Tid``), the organizer (``Oid``) and, for channel meetings, the
    reply chain's ``MessageId``. ``https://teams.microsoft.com/meet/{id}?p={passcode}``
    gives a join meeting id and passcode. Safe Links wrapping is removed, and so is what
    a browser shows of a join link (the launcher page's ``url``, the web client's ``#``).

    The URL must be ``https`` on one of ``hosts``: Teams' own (:data:`TEAMS_HOSTS`) unless
    given (``*.example.com`` matches its subdomains), so that a link to another site, in a
    chat message say, is not taken for a meeting.

    Raises ``ValueError`` when the URL is neither form, is on another host, or lacks the
    tenant or organizer.
    """
    link = url
    for _ in range(MAX_SAFE_LINKS_WRAPPINGS + 1):
        parts = urlsplit(link.strip())
        query = parse_qs(parts.query)
        host = (parts.hostname or "").lower()
        if host.endswith("safelinks.protection.outlook.com") and query.get("url"):
            link = query["url"][0]
        elif "meetup-join" in parts.fragment.lower():
            # The web client's address of a join link has it after the ``#``.
            link = f"{parts.scheme}://{parts.netloc}/{parts.fragment.lstrip('/')}"
        elif parts.path.lower().endswith("/launcher.html") and query.get("url"):
            # A join link opened in a browser goes through this page, which names it in ``url``.
            link = urljoin(f"{parts.scheme}://{parts.netloc}/", query["url"][0])
        else:
            break
    else:
        raise ValueError(
            f"not a Teams join URL: wrapped more than {MAX_SAFE_LINKS_WRAPPINGS} times "
            f"(Safe Links, the launcher page, the web client): {url[:200]!r}"
        )
    # The meeting is named by the path alone: the host is what says the link is Teams'.
    if parts.scheme.lower() != "https":
        raise ValueError(f"not a Teams join URL: scheme {parts.scheme!r} is not https: {url!r}")
    if not host_listed(host, hosts):
        listed = ", ".join(sorted(hosts))
        raise ValueError(f"not a Teams join URL: host {host!r} is not one of {listed}: {url!r}")
    segments = [s for s in parts.path.split("/") if s]
    lowered = [s.lower() for s in segments]
    if "meetup-join" in lowered:
        index = lowered.index("meetup-join")
        rest = segments[index + 1 :]
        if not rest:
            raise ValueError(f"join URL has no meeting thread: {url!r}")
        thread_id = unquote(rest[0])
        message_id = unquote(rest[1]) if len(rest) > 1 else "0"
        context = _context(query, url)
        tenant_id = _pick(context, "tid")
        organizer_id = _pick(context, "oid")
        if tenant_id is None or organizer_id is None:
            raise ValueError(f"join URL context has no Tid/Oid (tenant and organizer): {url!r}")
        return Meeting(
            thread_id=thread_id,
            message_id=message_id,
            reply_chain_message_id=_pick(context, "messageid"),
            organizer=Target.user(organizer_id, tenant_id=tenant_id),
            tenant_id=tenant_id,
        )
    if "meet" in lowered:
        index = lowered.index("meet")
        rest = segments[index + 1 :]
        if not rest:
            raise ValueError(f"join URL has no meeting id: {url!r}")
        passcode = query.get("p", [None])[0]
        return Meeting.join_id(unquote(rest[0]), passcode)
    raise ValueError(f"not a Teams meeting join URL: {url!r}")


def _context(query: dict[str, list[str]], url: str) -> dict[str, Any]:
    raw = query.get("context", [None])[0]
    if raw is None:
        raise ValueError(f"join URL has no context (tenant and organizer): {url!r}")
    try:
        context = json.loads(raw)
    except ValueError:
        # some clients encode the context twice
        try:
            context = json.loads(unquote(raw))
        except ValueError as exc:
            raise ValueError(f"join URL context is not JSON: {url!r}") from exc
    if not isinstance(context, dict):
        raise ValueError(f"join URL context is not a JSON object: {url!r}")
    return context


def _pick(context: dict[str, Any], name: str) -> str | None:
    for key, value in context.items():
        if key.lower() == name and isinstance(value, str) and value:
            return value
    return None
