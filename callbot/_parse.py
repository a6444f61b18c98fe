"""From the body Graph posts to the callback to typed :mod:`callbot.events`.

Wire format. The body must be strict JSON (RFC 8259) in UTF-8. A leading UTF-8
byte order mark is ignored, as RFC 8259 allows a parser to do; other encodings,
``NaN``/``Infinity`` and invalid UTF-8 are refused. Several of Microsoft's
documented example notifications carry ``//`` comments or trailing commas: those
are documentation artefacts, Graph itself sends JSON, so such bodies are refused
(reason ``not_json``) rather than guessed at.

Errors. :class:`~callbot._errors.MalformedNotification` with a stable ``reason``:

* ``not_json``  - not UTF-8, or not strict JSON;
* ``too_deep``  - containers nested deeper than ``max_depth`` (checked by a linear
  scan before decoding, so hostile nesting never reaches the recursive decoder);
* ``bad_shape`` - the envelope is wrong: top level not an object, ``value``
  missing or not a list, an item not an object, ``changeType`` missing or not a
  string, neither ``resourceUrl`` nor ``resource``, a path that is not under
  ``/communications/calls/{id}`` (or the older ``/app/calls/{id}``), or a segment
  after the call id, the ``changeType``, or an id in ``resourceData`` (an operation's
  ``id``, a participant's ``id`` or the id ending its ``@odata.id``, a content-sharing
  session's ``id``) that is ``.`` or ``..``, longer than an id may be or holds a
  character no Graph id has (as a call id: ``bad_call_id``);
* ``empty``     - ``value`` is an empty list;
* ``too_many_items`` - more items than ``max_items``; ``too_many_participants`` -
  an item, or the items together, listing more participants (entries of their
  ``resourceData``) than ``max_participants``; ``too_many_values`` - an item's list of
  participants holding more than 16 JSON objects and arrays each, the rest of an item
  more than 1,000, or a request more than a full roster's worth; all counted before any
  event is built;
* ``legacy_format`` - a body in the calling format that predates Graph (no
  ``value``, a top-level ``callState``): the receiver answers it ``204``, which
  asks the platform to send the notification again in Graph's format.

Enum values arrive in more than one case (``"Established"``, ``"Updated"``):
``changeType`` is normalised here and every enum-valued model field by the
models, so handlers always see Graph's own spelling.

Only the envelope can be malformed. ``resourceData`` that does not validate
against the models never rejects a notification: it becomes an
:class:`~callbot.events.UnknownNotification` carrying the data as received.

Routing by the path after ``calls/{id}`` (segments compared without case):

* nothing            -> a call event, decided in this order: ``created`` with state
  ``incoming`` or no state -> IncomingCall; ``deleted`` or state ``terminated`` ->
  CallTerminated (also without resourceData); ``toneInfo`` -> ToneReceived; any
  other state -> CallStateChanged; no state -> UnknownNotification
* ``participants[/{id}]`` -> ParticipantsUpdated (a ``deltaParticipants`` object, a
  ``created``/``deleted`` roster item, or a path naming one participant is a delta
  roster: only who changed)
* ``operations/{id}`` -> OperationUpdated, when the operation has a status (its id is
  the body's, else the path's; ``operations/participants``, where Graph posts the
  outcome of inviting several participants with ``"id": null``, names none). A
  documented roster was also posted on ``operations/participants``: a list of
  ``#microsoft.graph.participant`` there is a ParticipantsUpdated, a delta roster
  (it names the invitees, not everyone in the call).
* ``contentsharingsessions[/{id}]`` -> ContentSharingUpdated
* anything else      -> UnknownNotification
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
import structlog
from pydantic import BaseModel, ValidationError

from . import models
from ._errors import MalformedNotification
from ._ids import quoted, tenant_key, usable_id
from .events import (
    CallStateChanged,
    CallTerminated,
    ContentSharingUpdated,
    Event,
    IncomingCall,
    OperationUpdated,
    ParticipantsUpdated,
    ToneReceived,
    UnknownNotification,
)

__all__ = [
    "CALL_PATH",
    "DEFAULT_MAX_DEPTH",
    "parse_body",
    "parse_body_in_parts",
    "parse_payload",
    "roster_entries",
]

log = structlog.get_logger("callbot.parse")

_M = TypeVar("_M")
_E = TypeVar("_E", bound=Event)
_Model = TypeVar("_Model", bound=BaseModel)

DEFAULT_MAX_DEPTH = 64
CALL_PATH = "/communications/calls/"
"""Every event's ``resource_url`` starts with this, then the call id as the path wrote it."""

_BOM_BYTES = "\ufeff".encode()
# Escapes are matched as pairs so an escaped quote never toggles the string state.
_TOKENS = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)
_CALL_ROOTS = frozenset({("communications", "calls"), ("app", "calls")})
_CHANGE_TYPES = {name.lower(): name for name in ("created", "updated", "deleted")}
_API_VERSIONS = frozenset({"v1.0", "beta"})
# Objects and arrays built in one part at most (500 Teams participants, about 10 ms; 4,000
# empty call targets, about 40 ms): a part ends at 32 items or these.
_PART_CONTAINERS = 4_000
# JSON objects and arrays per participant listed: a Teams participant has 7-10 (recorded
# rosters). Anything else listing many (a call's ``targets`` or ``callRoutes``) would be
# built in one part, and kept, unbounded: an item's list of participants may hold this
# many per participant, the rest of the item _ITEM_CONTAINERS (a recorded call item
# holds fewer than 50).
_CONTAINERS_PER_PARTICIPANT = 16
_ITEM_CONTAINERS = 1_000


def parse_body(
    body: bytes,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_items: int | None = None,
    max_participants: int | None = None,
    tenant_id: str | None = None,
) -> list[Event]:
    """Parse the raw body of a callback request into events, one per notification item.

    See :func:`parse_body_in_parts` for the errors.
    """
    return [
        event
        for part in parse_body_in_parts(
            body,
            max_depth=max_depth,
            max_items=max_items,
            max_participants=max_participants,
            tenant_id=tenant_id,
        )
        for event in part
    ]


def parse_body_in_parts(
    body: bytes,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_items: int | None = None,
    max_participants: int | None = None,
    tenant_id: str | None = None,
    part_size: int = 32,
    lines: Any = None,
) -> Iterator[list[Event]]:
    """:func:`parse_body` in parts of at most ``part_size`` events (fewer when they list
    many participants), so a caller can let the event loop run between them; an error
    may come with any part (accept none before the last).

    ``tenant_id`` is the tenant the request's token proves: every event carries
    it, and an item that names another is refused (``tenant_mismatch``). A request
    listing more than ``max_participants`` participants, in one item or in all, is
    refused (``too_many_participants``): no roster may hold them, and building them
    is the costly part.

    Raises :class:`MalformedNotification` (``not_json``, ``too_deep``, ``bad_shape``,
    ``empty``, ``too_many_items``, ``too_many_participants``, ``too_many_values``, ``bad_call_id``,
    ``tenant_mismatch`` or ``legacy_format``); never raises a pydantic error. ``lines``
    takes the lines about properties left out (the module's logger by default; a server's
    is a :class:`~callbot._log.RateLimitedLog`: a body decides how many items it holds).
    """
    if body.startswith(_BOM_BYTES):
        body = body[len(_BOM_BYTES) :]
    scanned = body.translate(_SCANNED)
    # Objects and arrays, and brackets in strings: an upper bound that skips the scans below.
    openers = scanned.count(b"[")
    if openers > max_depth and _too_deep(body, max_depth):
        raise MalformedNotification("too_deep", f"JSON nested deeper than {max_depth} levels")
    if max_participants is not None:
        limit = max_participants * _CONTAINERS_PER_PARTICIPANT + _ITEM_CONTAINERS
        if openers > limit and _containers(body) > limit:
            raise MalformedNotification(
                "too_many_values", f"more than {limit} JSON objects and arrays in one request"
            )
    payload = _decode(body, scanned)
    items = payload.get("value") if isinstance(payload, dict) else None
    if max_items is not None and isinstance(items, list) and len(items) > max_items:
        # Counted before any event is built: building them is the costly part.
        raise MalformedNotification(
            "too_many_items", f"{len(items)} items in one request, at most {max_items}"
        )
    sizes = None
    if openers > _ITEM_CONTAINERS and isinstance(items, list):
        # A body this small cannot need more than one part, nor hold an item too large.
        sizes = [_size(item) for item in items]
        if max_participants is not None:
            _check_item_sizes(items, sizes)
    yield from _events_in_parts(
        payload, tenant_id, part_size, max_participants, sizes, log if lines is None else lines
    )


def parse_payload(
    payload: Any, *, max_depth: int = DEFAULT_MAX_DEPTH, tenant_id: str | None = None
) -> list[Event]:
    """Like :func:`parse_body`, for a body already decoded from JSON (tests, replays)."""
    if _object_too_deep(payload, max_depth):
        raise MalformedNotification("too_deep", f"payload nested deeper than {max_depth} levels")
    return _events_from(payload, tenant_id)


# -- depth checks ----------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    # As orjson reads numbers: one past a double's range is refused, not made an infinity
    # (which a digest or a store would then write as null).
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"the number {text[:32]} is out of range")
    return number


# The stdlib decoder, for what orjson refuses (lone surrogates) or reads inexactly.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)
# orjson reads an integer outside 64 bits as a float: 19 digits in a row go to the stdlib.
# (Found in a body with every digit mapped to "0": a tenth of a regular expression's cost.
# The same pass maps "{" to "[", so one count of "[" counts objects and arrays.)
_SCANNED = bytes.maketrans(b"0123456789{", b"0000000000[")
_LONG_NUMBER = b"0" * 19


def _decode(body: bytes, scanned: bytes) -> Any:
    """``body`` decoded; ``scanned`` is ``body.translate(_SCANNED)``."""
    if scanned.find(_LONG_NUMBER) == -1:
        try:
            # orjson is strict JSON in UTF-8 at a fraction of the stdlib's cost.
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        text = str(body, "utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedNotification("not_json", f"body is not valid UTF-8: {exc}") from None
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise MalformedNotification("too_deep", "JSON nested too deeply to decode") from None
    except ValueError as exc:
        raise MalformedNotification("not_json", f"body is not JSON: {exc}") from None


def _too_deep(body: bytes, max_depth: int) -> bool:
    depth = 0
    in_string = False
    for token in _TOKENS.findall(body):
        if token == b'"':
            in_string = not in_string
        elif in_string or token[0] == 0x5C:  # a backslash: an escaped pair
            continue
        elif token in b"[{":
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def _containers(body: bytes) -> int:
    """How many objects and arrays ``body`` holds (brackets in strings do not count)."""
    count = 0
    in_string = False
    for token in _TOKENS.findall(body):
        if token == b'"':
            in_string = not in_string
        elif not in_string and token in b"[{":
            count += 1
    return count


def _size(node: Any) -> int:
    """How many objects and arrays a decoded value holds, itself included."""
    count = 0
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        else:
            continue
        count += 1
    return count


def _check_item_sizes(items: list[Any], sizes: list[int]) -> None:
    """Refuse an item holding more objects and arrays than the participants it lists may."""
    for index, (item, size) in enumerate(zip(items, sizes, strict=True)):
        # The allowance per participant is for the participants: what the item holds
        # besides them (a call's targets, an invented list) gets _ITEM_CONTAINERS at most.
        listed = _listed(item)
        in_list = 0 if listed is None else _size(listed)
        allowed = len(listed or ()) * _CONTAINERS_PER_PARTICIPANT + 1
        if in_list > allowed or size - in_list > _ITEM_CONTAINERS:
            raise MalformedNotification(
                "too_many_values",
                f"value[{index}] holds {size} JSON objects and arrays, at most "
                f"{_ITEM_CONTAINERS} besides {_CONTAINERS_PER_PARTICIPANT} per participant",
            )


def _object_too_deep(payload: Any, max_depth: int) -> bool:
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        node, depth = stack.pop()
        children: Any
        if isinstance(node, Mapping):
            children = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


# -- envelope --------------------------------------------------------------------------------


def _events_from(payload: Any, tenant_id: str | None = None) -> list[Event]:
    # A decoded payload (tests, replays) is built in one part: nothing waits on the loop.
    return [event for part in _events_in_parts(payload, tenant_id, 1 << 30) for event in part]


def _events_in_parts(
    payload: Any,
    tenant_id: str | None,
    size: int,
    max_entries: int | None = None,
    sizes: list[int] | None = None,
    lines: Any = log,
) -> Iterator[list[Event]]:
    """Events in parts of at most ``size`` items and about ``_PART_CONTAINERS`` objects and
    arrays (``sizes``: each item's, when the body is large enough to need them)."""
    if not isinstance(payload, dict):
        raise MalformedNotification(
            "bad_shape", f"top level is {type(payload).__name__}, not an object"
        )
    items = payload.get("value")
    if items is None and "callState" in payload:
        raise MalformedNotification(
            "legacy_format", "a notification in the calling format that predates Graph"
        )
    if not isinstance(items, list):
        raise MalformedNotification("bad_shape", "'value' is missing or not a list")
    if not items:
        raise MalformedNotification("empty", "'value' is an empty list")
    if max_entries is not None:
        # Counted before any event is built: building participants is the costly part.
        entries = 0
        for index, item in enumerate(items):
            count = len(_listed(item) or ())
            if count > max_entries:
                raise MalformedNotification(
                    "too_many_participants",
                    f"value[{index}] lists {count} participants, at most {max_entries}",
                )
            entries += count
        if entries > max_entries:
            # Items of empty participants ({}: 3 bytes each) would build a million per body.
            raise MalformedNotification(
                "too_many_participants",
                f"the request lists {entries} participants, at most {max_entries} in all",
            )
    part: list[Event] = []
    weight = 0
    for index, item in enumerate(items):
        part.append(_event_for(index, item, payload, tenant_id, lines))
        weight += sizes[index] if sizes is not None else 0
        if len(part) >= size or weight >= _PART_CONTAINERS:
            yield part
            part, weight = [], 0
    if part:
        yield part


def _listed(item: Any) -> list[Any] | None:
    """The participants (or other entries) an item's ``resourceData`` lists, if any."""
    data = item.get("resourceData") if isinstance(item, dict) else None
    if isinstance(data, dict):
        data = data.get("participants")
    return data if isinstance(data, list) else None


def _event_for(
    index: int, item: Any, envelope: dict[str, Any], tenant_id: str | None, lines: Any
) -> Event:
    if not isinstance(item, dict):
        raise MalformedNotification("bad_shape", f"value[{index}] is not an object")
    change_type = item.get("changeType")
    if not isinstance(change_type, str):
        raise MalformedNotification(
            "bad_shape", f"value[{index}].changeType is missing or not a string"
        )
    known = _CHANGE_TYPES.get(change_type.lower())
    if known is None:
        if not usable_id(change_type):
            # It decides what the item is: held to the rule of the ids it routes with.
            raise MalformedNotification(
                "bad_shape",
                f"value[{index}].changeType {quoted(change_type)} is not a usable name",
            )
        known = change_type
    change_type = known
    path = path_of(item)
    if path is None:
        raise MalformedNotification(
            "bad_shape", f"value[{index}] has neither resourceUrl nor resource"
        )
    split = _split_call_path(path)
    if split is None:
        raise MalformedNotification(
            "bad_shape", f"value[{index}] path {quoted(path)} is not a call path"
        )
    call_id, rest, resource_url = split
    # resource_url is a path handlers may request: each id in it stays one segment, naming one
    # call, however a server reads it ('#x' would be dropped, '%2e%2e' or '%2F' climb).
    if not usable_id(call_id):
        raise MalformedNotification(
            "bad_call_id", f"value[{index}] call id {quoted(call_id)} is not a usable id"
        )
    for segment in rest:
        if not usable_id(segment):
            raise MalformedNotification(
                "bad_shape",
                f"value[{index}] path {quoted(path)} has a segment that is not a usable id",
            )
    data = item.get("resourceData")
    common: dict[str, Any] = {
        "call_id": call_id,
        "change_type": change_type,
        "resource_url": resource_url,
        "raw": item,
        "tenant_id": _tenant_of(data, item, envelope, tenant_id),
    }
    try:
        event = _route(rest, change_type, data, item, common, lines)
    except ValidationError:
        return _new(UnknownNotification, common, resource_data=data)
    if type(event) not in _NAMING_IDS:
        # The usual event: its ids are the path's. (Built above: its class is exactly one of
        # the parser's; isinstance would call pydantic's metaclass, twice.)
        return event
    for named in _ids_in_body(event):
        if not usable_id(named):
            raise MalformedNotification(
                "bad_shape",
                f"value[{index}] names the id {quoted(named)}, which is not a usable id",
            )
    return event


def path_of(item: dict[str, Any]) -> str | None:
    """The path a notification names: ``resourceUrl``, the current form, else ``resource``
    (``/app/calls/...``, the older one)."""
    for key in ("resourceUrl", "resource"):
        value = item.get(key)
        if isinstance(value, str):
            value = value.strip()
            if value:
                return value
    return None


def _split_call_path(path: str) -> tuple[str, list[str], str] | None:
    """``(call_id, segments after it, the path as resource_url writes it)``, or ``None`` when
    ``path`` is not under a call."""
    if path.startswith(CALL_PATH) and "?" not in path:
        # The path as Graph writes it: no version, host, query nor empty segment to take out.
        segments = path[len(CALL_PATH) :].split("/")
        if "" not in segments:
            return segments[0], segments[1:], path
    if "://" in path:
        try:
            path = urlsplit(path).path
        except ValueError:  # an unreadable host ("https://[/...")
            return None
    path = path.split("?", 1)[0]
    segments = [segment for segment in path.split("/") if segment]
    if segments and segments[0].lower() in _API_VERSIONS:
        segments = segments[1:]
    if len(segments) < 3 or (segments[0].lower(), segments[1].lower()) not in _CALL_ROOTS:
        return None
    return segments[2], segments[3:], CALL_PATH + "/".join(segments[2:])


_NAMING_IDS = (OperationUpdated, ParticipantsUpdated, ContentSharingUpdated)
"""The events that take ids from their body (:func:`_ids_in_body`)."""


def _ids_in_body(event: Event) -> Iterator[str]:
    """The ids an event takes from its body that callbot keys a call's record by, logs and
    hands to handlers as ids, however the body spells them: held to the rule of the path's
    (:func:`~callbot._ids.usable_id`)."""
    if isinstance(event, OperationUpdated):
        if event.operation_id:
            # The body's id takes the place of the path's.
            yield event.operation_id
    elif isinstance(event, ParticipantsUpdated):
        # Each one's ``id``, or the id ending its ``@odata.id`` (the model reads it so).
        yield from (participant.id for participant in event.participants if participant.id)
    elif isinstance(event, ContentSharingUpdated):
        # The only session's id takes the place of the path's when the path names none.
        yield from (session.id for session in event.sessions if session.id)


def _tenant_of(
    data: Any, item: dict[str, Any], envelope: dict[str, Any], proven: str | None
) -> str | None:
    """The tenant the token proves (``proven``), else the first the notification names."""
    named: str | None = None
    for tenant in (
        data.get("tenantId") if isinstance(data, dict) else None,
        item.get("tenantId"),
        envelope.get("tenantId"),
    ):
        if not tenant or not isinstance(tenant, str) or tenant == proven:
            continue  # none, or the token's as the token writes it: the usual notification
        # Lowered only here, for a tenant spelled otherwise than the token's (rare).
        if proven is not None and tenant_key(tenant) != tenant_key(proven):
            raise MalformedNotification(
                "tenant_mismatch", "a notification names another tenant than its token"
            )
        named = named or tenant
    return proven if proven is not None else named


# -- routing ---------------------------------------------------------------------------------


def _route(
    rest: list[str],
    change_type: str,
    data: Any,
    item: dict[str, Any],
    common: dict[str, Any],
    lines: Any,
) -> Event:
    if not rest:
        return _call_event(change_type, data, common, lines)
    kind = rest[0].lower()
    if len(rest) <= 2:
        if kind == "participants":
            # A path naming one participant is about that one, never the whole roster.
            return _participants_event(data, item, common, lines, partial=len(rest) == 2)
        if kind == "operations":
            if _is_roster(data):
                # The invitation's participants, not the call's roster: the others stay.
                return _participants_event(data, item, common, lines, partial=True)
            # ``operations/participants`` names an invitation's invitees, not an operation.
            named = len(rest) == 2 and rest[1].lower() != "participants"
            return _operation_event(data, rest[1] if named else None, common, lines)
        if kind == "contentsharingsessions":
            path_id = rest[1] if len(rest) == 2 else None
            return _content_sharing_event(data, path_id, common, lines)
    return _new(UnknownNotification, common, resource_data=data)


def _first_object(data: Any) -> dict[str, Any] | None:
    if isinstance(data, dict):
        return data
    if isinstance(data, list):
        return next((entry for entry in data if isinstance(entry, dict)), None)
    return None


_TRIMS = 3
"""Rounds of leaving out properties that do not fit, at most, before an item is unknown."""
_NAMES_LOGGED = 16
_MISFITS = 10_000
"""Properties not fitting in one item, at most, that are left out one by one; past it the
item is unknown at once (it stays whole in ``raw``): a hostile body must not buy a long turn
of the event loop, and one Graph changed that much is not callbot's model any more."""


def _typed(
    validate: Callable[[dict[str, Any]], _M],
    bodies: list[dict[str, Any]],
    common: dict[str, Any],
    lines: Any,
) -> list[_M]:
    """``validate`` each body; a property that does not fit its model is left out of the
    typed result (it stays in the event's ``raw``), with one log line for the item, rather
    than the whole item becoming unknown: one odd property must not lose a call's end, state
    or outcome. Raises ``ValidationError`` when what is left still does not fit."""
    try:
        return [validate(body) for body in bodies]
    except ValidationError:
        pass  # the rare case, apart: the usual one costs nothing more
    left_out: list[str] = []
    typed = [_fitting(validate, body, left_out) for body in bodies]
    if left_out:
        names = sorted(set(left_out))
        lines.warning(
            "notification_properties_left_out",
            call_id=common["call_id"],
            change_type=common["change_type"],
            # A line stays short however many properties a body gets wrong.
            properties=names[:_NAMES_LOGGED],
            count=len(names),
            detail="they do not fit callbot's model; the event's raw item has them",
        )
    return typed


def _typed_one(
    validate: Callable[[dict[str, Any]], _M],
    body: dict[str, Any],
    common: dict[str, Any],
    lines: Any,
) -> _M:
    """:func:`_typed` of one body (a call, an operation): the usual case in one call."""
    try:
        return validate(body)
    except ValidationError:
        return _typed(validate, [body], common, lines)[0]


def _fitting(
    validate: Callable[[dict[str, Any]], _M], body: dict[str, Any], left_out: list[str]
) -> _M:
    try:
        return validate(body)
    except ValidationError as exc:
        failure = exc
    if failure.error_count() > _MISFITS:
        raise failure
    body = copy.deepcopy(body)  # the item itself is the event's raw: never changed
    for _ in range(_TRIMS):
        # Where each error is in the data, found before anything is left out.
        found = {at for error in failure.errors() if (at := _located(body, error["loc"]))}
        removed: list[str] = []
        gone: set[tuple[int | str, ...]] = set()
        for at in sorted(found, key=len):
            # Outermost first, each prefix looked up once: linear in the errors.
            if any(at[:depth] in gone for depth in range(1, len(at))):
                continue  # inside what was left out already
            _drop(body, at)
            gone.add(at)
            removed.append(".".join(map(str, at)))
        if not removed or failure.error_count() > _MISFITS:
            break
        left_out += removed
        try:
            return validate(body)
        except ValidationError as exc:
            failure = exc
    raise failure


def _located(body: dict[str, Any], where: tuple[int | str, ...]) -> tuple[int | str, ...] | None:
    """Where in ``body`` the object property an error's location leads to is (the last one on
    the way, when the location goes on into a list), or ``None`` when it names none."""
    node: Any = body
    path: list[int | str] = []
    named = 0
    for part in where:
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
            path.append(part)
            named = len(path)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        # Else a union member's or a validator's name: not in the data.
    return tuple(path[:named]) if named else None


def _drop(body: dict[str, Any], at: tuple[int | str, ...]) -> None:
    """Delete the property at ``at`` (as :func:`_located` found it) from ``body``."""
    node: Any = body
    for part in at[:-1]:
        node = node[part]
    del node[at[-1]]


# pydantic-core validates; pydantic's __init__ and model_validate are frames of Python around it,
# as costly as the validation of an event: the parser calls pydantic-core itself.


def _new(cls: type[_E], common: dict[str, Any], **fields: Any) -> _E:
    """``cls(**common, **fields)``, validated alike."""
    return _validator(cls)({**common, **fields})


# Each model's validator, read once: a pydantic class's attribute is read through its
# metaclass's __getattr__ hook (several hundred instructions, twice a notification). The
# models are complete when imported: pydantic never builds them another validator.
_VALIDATORS: dict[type[BaseModel], Callable[[dict[str, Any]], Any]] = {}


def _validator(model: type[_Model]) -> Callable[[dict[str, Any]], _Model]:
    """``model.model_validate``, validating alike."""
    validate = _VALIDATORS.get(model)
    if validate is None:
        validate = _VALIDATORS[model] = model.__pydantic_validator__.validate_python
    return validate


def _call_event(change_type: str, data: Any, common: dict[str, Any], lines: Any) -> Event:
    body = _first_object(data)
    if body is None:
        if change_type == "deleted":
            # The call is gone even when Graph says nothing more about it.
            return _new(CallTerminated, common, state="terminated", call=models.Call())
        return _new(UnknownNotification, common, resource_data=data)
    call = _typed_one(_validator(models.Call), body, common, lines)
    claimed, proven = call.tenant_id, common["tenant_id"]
    if claimed and proven and claimed != proven and tenant_key(claimed) != tenant_key(proven):
        # However the body spelled it (in a list, as "tenant_id"): the call's tenant is one.
        raise MalformedNotification(
            "tenant_mismatch", "a notification names another tenant than its token"
        )
    state = call.state
    if change_type == "created" and state in (None, "incoming"):
        return _new(IncomingCall, common, call=call)
    if change_type == "deleted" or state == "terminated":
        return _new(
            CallTerminated, common, state="terminated", call=call, result_info=call.result_info
        )
    if call.tone_info is not None and call.tone_info.tone is not None:
        return _new(
            ToneReceived,
            common,
            tone=call.tone_info.tone,
            sequence_id=call.tone_info.sequence_id,
            call=call,
        )
    if call.state is None:
        return _new(UnknownNotification, common, resource_data=data)
    return _new(CallStateChanged, common, state=call.state, call=call, result_info=call.result_info)


def _is_roster(data: Any) -> bool:
    return (
        isinstance(data, list)
        and bool(data)
        and all(models.type_name(entry) == "participant" for entry in data)
    )


def _participants_event(
    data: Any, item: dict[str, Any], common: dict[str, Any], lines: Any, *, partial: bool = False
) -> Event:
    # A full roster is updated with everyone; a delta roster names who was added or removed.
    # ``partial``: the path names some participants only (one, or an invitation's invitees).
    delta = partial or common["change_type"] in ("created", "deleted")
    # Only the notification's number orders rosters: participants' highest falls as one leaves.
    sequence = _as_int(item.get("sequenceNumber"))
    if _delta_shaped(data):
        delta = True
        if sequence is None:
            sequence = _as_int(data.get("sequenceNumber"))
    entries = roster_entries(data)
    if entries is None or not all(isinstance(entry, dict) for entry in entries):
        return _new(UnknownNotification, common, resource_data=item.get("resourceData"))
    participants = _typed(_validator(models.Participant), entries, common, lines)
    return _new(
        ParticipantsUpdated,
        common,
        participants=participants,
        sequence_number=sequence,
        delta=delta,
    )


def _delta_shaped(data: Any) -> bool:
    """Whether a roster's ``resourceData`` is a ``deltaParticipants`` object (or any object
    listing ``participants``): only who changed."""
    return isinstance(data, dict) and (
        models.type_name(data) == "deltaparticipants" or isinstance(data.get("participants"), list)
    )


def roster_entries(data: Any) -> list[Any] | None:
    """The entries a roster notification's ``resourceData`` lists, in the order of its
    event's ``participants`` (one participant each); ``None`` when it lists none."""
    if _delta_shaped(data):
        data = data.get("participants")
    return data if isinstance(data, list) else [data] if isinstance(data, dict) else None


def _operation_event(data: Any, path_id: str | None, common: dict[str, Any], lines: Any) -> Event:
    body = _first_object(data)
    if body is None:
        return _new(UnknownNotification, common, resource_data=data)
    operation = _typed_one(models.parse_operation, body, common, lines)
    operation_id = operation.id or path_id
    if operation.status is None:
        return _new(UnknownNotification, common, resource_data=data)
    return _new(
        OperationUpdated,
        common,
        operation=operation,
        operation_id=operation_id,
        status=operation.status,
        result_info=operation.result_info,
        client_context=operation.client_context,
    )


def _content_sharing_event(
    data: Any, path_id: str | None, common: dict[str, Any], lines: Any
) -> Event:
    entries: list[Any]
    if data is None:
        entries = []
    elif isinstance(data, list):
        entries = data
    elif isinstance(data, dict):
        entries = [data]
    else:
        return _new(UnknownNotification, common, resource_data=data)
    if not all(isinstance(entry, dict) for entry in entries):
        return _new(UnknownNotification, common, resource_data=data)
    sessions = _typed(_validator(models.ContentSharingSession), entries, common, lines)
    session_id = path_id or (sessions[0].id if len(sessions) == 1 else None)
    return _new(ContentSharingUpdated, common, sessions=sessions, session_id=session_id)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None
