"""Identifier helpers shared by every stage."""

from __future__ import annotations

from urllib.parse import quote

__all__ = ["MAX_ID_LENGTH", "id_key", "path_segment", "quoted", "tenant_key", "usable_id"]

# Ids a URL resolver would drop or climb instead of keeping as one segment.
_UNUSABLE = frozenset({"", ".", ".."})

MAX_ID_LENGTH = 256
"""The longest id callbot takes: Graph's are GUIDs (36 characters). A longer one would be
carried into every log line, store key and Graph URL of its call."""


def id_key(identifier: str) -> str:
    """The form two Graph ids are compared in.

    Graph writes one id as ``0fe0623f-d628-...`` in a response and as
    ``0FE0623FD628...`` in a notification path, so compare without case or dashes. A GUID
    in braces or parentheses (``{0fe0623f-...}``) is the same GUID to a .NET service such
    as Graph, so it is the same id here too: else it would be another call to the tenant
    check and the same one to Graph.
    """
    key = identifier.replace("-", "").lower()
    if key and key[0] in "{(" and len(key) == 34 and key[-1] == _CLOSING[key[0]]:
        inner = key[1:-1]
        if all(c in _HEX for c in inner):
            return inner
    return key


_CLOSING = {"{": "}", "(": ")"}
_HEX = frozenset("0123456789abcdef")


def tenant_key(tenant_id: str) -> str:
    """The form two tenant ids are compared in (a token's ``tid``, a notification's
    ``tenantId``, ``allowed_tenants``, the tenant a call belongs to): without case."""
    return tenant_id.lower()


def path_segment(identifier: str) -> str:
    """``identifier`` as exactly one URL path segment, for every Graph path built from an id.

    Everything outside the unreserved characters is percent-encoded (``/`` too), and
    the empty id, ``.`` and ``..`` raise ``ValueError``: a URL resolver would drop or
    climb them, so ``participants.remove("..")`` would address the call itself.
    """
    if not isinstance(identifier, str):
        raise ValueError(f"an id must be a string, got {type(identifier).__name__}")
    if not usable_id(identifier):
        raise ValueError(
            f"{quoted(identifier)} is not a usable id: empty, '.', '..', longer than"
            f" {MAX_ID_LENGTH} characters or not UTF-8, it would not stay one path segment"
        )
    return quote(identifier, safe="")


def usable_id(identifier: str) -> bool:
    """Whether :func:`path_segment` accepts ``identifier`` (checked without percent-encoding)."""
    if identifier in _UNUSABLE or len(identifier) > MAX_ID_LENGTH:
        return False
    try:
        identifier.encode()
    except UnicodeEncodeError:
        # A lone surrogate has no UTF-8 form: no URL (nor Redis key) can carry it.
        return False
    return True


def quoted(text: str) -> str:
    """``text`` (an id, a path) as an error message shows it: quoted, cut short if long."""
    if len(text) <= 64:
        return repr(text)
    return f"{text[:64]!r}... ({len(text)} characters)"
