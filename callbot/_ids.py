"""Identifier helpers shared by every stage."""

from __future__ import annotations

import re
from urllib.parse import quote

__all__ = [
    "MAX_ID_LENGTH",
    "clipped",
    "id_key",
    "path_segment",
    "quoted",
    "tenant_key",
    "usable_id",
]

# Ids a URL resolver would drop or climb instead of keeping as one segment.
_UNUSABLE = frozenset({"", ".", ".."})
# What ends, splits or escapes a URL path segment, or has no place in one: no Graph id holds
# these. Encoded, '%2F' and '%5C' are still split by a server that decodes them, and an escape
# ('%61' for 'a') spells another id the same to such a server. Control characters are C0, DEL
# and C1 (U+0080-U+009F: U+009B starts a terminal's escape sequence, U+0085 breaks a line).
_SEGMENT_BREAKER = re.compile(r"[/\\?#%\x00-\x20\x7f-\x9f]")

MAX_ID_LENGTH = 256
"""The longest id callbot takes: Graph's are GUIDs (36 characters). A longer one would be
carried into every log line, store key and Graph URL of its call."""


def id_key(identifier: str) -> str:
    """The form two Graph ids are compared in.

    Graph writes one id as ``0fe0623f-d628-...`` in a response and as
    ``0FE0623FD628...`` in a notification path, so compare without case or dashes. Any
    spelling a .NET service such as Graph reads as a GUID is that GUID here too (braces,
    parentheses, ``{0x0fe0623f,0xd628,...}``, white space around it, ``0x`` and ``+`` in
    its parts): else it would be another call to the tenant check and the same one to Graph.
    """
    key = identifier.replace("-", "").lower()
    if len(key) < 32 or (key.isalnum() and "x" not in key):
        # The usual GUID, or a name: shorter than any GUID's 32 digits, or with no brace,
        # 0x, + nor white space to read.
        return key
    if key and key[0] in "{(" and len(key) == 34 and key[-1] == _CLOSING[key[0]]:
        inner = key[1:-1]
        if all(c in _HEX for c in inner):
            return inner
    if identifier and all(c in _GUID_CHARACTERS or c.isspace() for c in identifier):
        guid = _dotnet_guid(identifier)
        if guid is not None:
            return guid
    return key


_CLOSING = {"{": "}", "(": ")"}
_HEX = frozenset("0123456789abcdef")
_ANY_CASE_HEX = frozenset("0123456789abcdefABCDEF")
# Every character .NET's Guid.Parse takes, besides white space.
_GUID_CHARACTERS = _ANY_CASE_HEX | frozenset("-{}(),xX+")


def _dotnet_guid(text: str) -> str | None:
    """The 32 hex digits of the GUID .NET's ``Guid.Parse`` reads in ``text``, or ``None``.

    As .NET reads one: white space around it ignored; ``(`` and ``{`` with a dash, the GUID
    in parentheses or braces; ``{`` without, the ``{0x..,0x..,0x..,{0x..,...}}`` form (white
    space anywhere, each part as many digits as fit, the two 16-bit parts cut to 16 bits);
    else 36 characters with dashes, or 32 without, each fixed-width part but the last
    possibly starting with ``+``, ``0x`` or both, as .NET still allows.
    """
    text = text.strip()
    if text[:1] == "{" and "-" not in text:
        return _x_form("".join(c for c in text if not c.isspace()))
    if len(text) == 38 and (text[0], text[-1]) in (("{", "}"), ("(", ")")):
        text = text[1:-1]
    if len(text) == 36 and "-" in text:
        if any(text[i] != "-" for i in (8, 13, 18, 23)):
            return None
        parts = [text[0:8], text[9:13], text[14:18], text[19:23], text[24:28]]
        last = text[28:36]
        if not all(c in _ANY_CASE_HEX for c in last):
            return None  # never took a prefix
        values = [_hex_part(part) for part in parts]
        if any(value is None for value in values):
            return None
        widths = (8, 4, 4, 4, 4)
        return "".join(f"{v:0{w}x}" for v, w in zip(values, widths, strict=True)) + last.lower()
    if len(text) == 32 and "-" not in text:
        values = [_hex_part(text[i : i + 8]) for i in range(0, 32, 8)]
        if any(value is None for value in values):
            return None
        return "".join(f"{v:08x}" for v in values)
    return None


def _hex_part(part: str) -> int | None:
    """One part of a GUID as .NET reads it: a ``+``, then ``0x``, may come before the digits;
    ``None`` for anything but hex digits, or more than 8 of them past leading zeros."""
    if part.startswith("+"):
        part = part[1:]
    if len(part) > 1 and part[0] == "0" and part[1] in "xX":
        part = part[2:]
    digits = part.lstrip("0")
    if len(digits) > 8 or not all(c in _ANY_CASE_HEX for c in digits):
        return None
    return int(digits or "0", 16)


def _x_form(text: str) -> str | None:
    """``{0xAAAAAAAA,0xBBBB,0xCCCC,{0xDD,0xEE,0xFF,0xGG,0xHH,0xII,0xJJ,0xKK}}`` (no white
    space left) as .NET reads it."""
    if not (text.startswith("{") and text.endswith("}}")):
        return None
    head, brace, tail = text[1:-2].partition(",{")
    fields = head.split(",")
    octets = tail.split(",")
    if not brace or len(fields) != 3 or len(octets) != 8:
        return None
    values: list[int] = []
    for field in fields + octets:
        if field[:2] not in ("0x", "0X"):
            return None
        value = _hex_part(field[2:])
        if value is None or not field[2:]:
            return None
        values.append(value)
    first, second, third, *rest = values
    if any(octet > 0xFF for octet in rest):
        return None
    # .NET keeps the low 16 bits of the second and third parts, whatever they held.
    return f"{first:08x}{second & 0xFFFF:04x}{third & 0xFFFF:04x}" + "".join(
        f"{octet:02x}" for octet in rest
    )


def tenant_key(tenant_id: str) -> str:
    """The form two tenant ids are compared in (a token's ``tid``, a notification's
    ``tenantId``, ``allowed_tenants``, the tenant a call belongs to): without case."""
    return tenant_id.lower()


def path_segment(identifier: str) -> str:
    """``identifier`` as exactly one URL path segment, for every Graph path built from an id.

    Everything outside the unreserved characters is percent-encoded, and an id
    :func:`usable_id` refuses raises ``ValueError``: a URL resolver would drop or climb
    ``.`` and ``..`` (``participants.remove("..")`` would address the call itself), and a
    server decoding ``%2F`` would split ``../../{other call}``.
    """
    if not isinstance(identifier, str):
        raise ValueError(f"an id must be a string, got {type(identifier).__name__}")
    if not usable_id(identifier):
        raise ValueError(
            f"{quoted(identifier)} is not a usable id: empty, '.', '..', longer than"
            f" {MAX_ID_LENGTH} characters, not UTF-8, or holding '/', '\\', '?', '#', '%',"
            " a space or a control character, it would not stay one path segment"
        )
    return quote(identifier, safe="")


def usable_id(identifier: str) -> bool:
    """Whether ``identifier`` stays one URL path segment naming one thing however a server
    reads it: the one rule for every id, in a notification (``callbot._parse``) or placed in a
    Graph path (:func:`path_segment`)."""
    if (
        identifier in _UNUSABLE
        or len(identifier) > MAX_ID_LENGTH
        or _SEGMENT_BREAKER.search(identifier)
    ):
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


def clipped(text: str | None) -> str | None:
    """A value a notification sent (a state, a status) as a log line shows it: whole when it
    is no longer than an id may be, else its first ``MAX_ID_LENGTH`` characters."""
    if text is None or len(text) <= MAX_ID_LENGTH:
        return text
    return f"{text[:MAX_ID_LENGTH]}... ({len(text)} characters)"
