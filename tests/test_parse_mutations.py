"""Real notification bodies, changed in their structure, through the parser, the shared
store's encoding and the real receiver.

The corpus is every strict-JSON body kept under ``tests/fixtures``: Microsoft's documented
notifications, those recorded from a live Teams tenant, older published shapes and bodies
captured from bug reports. Each example changes one to three places of one body: a key
dropped; a value made null, another JSON type, very long, nested to just under or just
past the depth limit, odd Unicode (a lone surrogate, NUL, a direction mark), a huge
integer, a float, a number written as text; a key duplicated or spelled in another case;
the items swapped, or merged with another body's; a resource's data replaced by another
resource's, or its ``@odata.type`` by another type. Whatever the body:

* the parser gives events or a :class:`MalformedNotification` with a documented reason,
  never another exception;
* an accepted event reads back from a shared store's inbox as it was, and the record of
  its call, once the sequencer took the events, is written and read back;
* through the real receiver: never a 5xx nor the ``unparseable`` fallback, never an error
  logged, and every item accepted reaches a handler or is dropped with a counted reason.

The examples are drawn deterministically (``derandomize``): CI runs the same bodies each time.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from callbot import Call, Settings, events
from callbot._errors import MalformedNotification
from callbot._lifecycle import Lifecycle
from callbot._parse import parse_body
from callbot._sequencing import Sequencer
from callbot.store._codec import decode_entry, decode_record, encode_entry, encode_record
from callbot.testing import TEST_TENANT_ID, TokenAuthority

from .conftest import FIXTURES, BotServer, make_bot, normalized_json, until

MAX_DEPTH = Settings.max_json_depth
MAX_ITEMS = Settings.max_items_per_request
MAX_PARTICIPANTS = Settings.max_roster_size
# Every reason parse_body documents: any other is a refusal nobody anticipated.
REASONS = frozenset(
    {
        "not_json",
        "too_deep",
        "bad_shape",
        "empty",
        "too_many_items",
        "too_many_participants",
        "too_many_values",
        "bad_call_id",
        "tenant_mismatch",
        "legacy_format",
    }
)

Place = tuple[str | int, ...]
"""Where a value is in a body: the keys and indexes leading to it."""


def _own_tenant(node: Any) -> Any:
    """``node`` with every tenant it names the test token's: a body naming another tenant is
    refused before anything else of it is read."""
    if isinstance(node, dict):
        return {
            key: TEST_TENANT_ID
            if key == "tenantId" and isinstance(value, str)
            else _own_tenant(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_own_tenant(value) for value in node]
    return node


def _corpus() -> list[tuple[str, dict[str, Any]]]:
    bodies: list[tuple[str, dict[str, Any]]] = []
    for folder in ("notifications", "recorded", "captured"):
        for path in sorted((FIXTURES / folder).glob("*.json")):
            try:
                body = json.loads(path.read_bytes())
            except ValueError:  # documented with comments or trailing commas
                body = normalized_json(path.read_text(encoding="utf-8"))
            if isinstance(body, dict):
                bodies.append((f"{folder}/{path.name}", _own_tenant(body)))
    return bodies


CORPUS = _corpus()


def _odata_types(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        kind = node.get("@odata.type")
        if isinstance(kind, str):
            yield kind
        for value in node.values():
            yield from _odata_types(value)
    elif isinstance(node, list):
        for value in node:
            yield from _odata_types(value)


ODATA_TYPES = sorted({kind for _, body in CORPUS for kind in _odata_types(body)})


@dataclass(frozen=True)
class _Literal:
    """A number as written in the body: JSON allows spellings Python never writes."""

    text: str


@dataclass(frozen=True)
class _Pairs:
    """An object whose keys repeat, as written in the body."""

    pairs: tuple[tuple[str, Any], ...]


def _write(node: Any, ascii_only: bool) -> str:
    if isinstance(node, _Literal):
        return node.text
    if isinstance(node, dict | _Pairs):
        pairs = node.pairs if isinstance(node, _Pairs) else node.items()
        inner = ",".join(
            f"{json.dumps(key, ensure_ascii=ascii_only)}:{_write(value, ascii_only)}"
            for key, value in pairs
        )
        return "{" + inner + "}"
    if isinstance(node, list):
        return "[" + ",".join(_write(value, ascii_only) for value in node) + "]"
    return json.dumps(node, ensure_ascii=ascii_only)


def _places(node: Any, path: Place = ()) -> Iterator[Place]:
    """Every place inside ``node`` a mutation may change (an opaque ``_Pairs`` is one)."""
    children: Any = ()
    if isinstance(node, dict):
        children = node.items()
    elif isinstance(node, list):
        children = enumerate(node)
    for key, value in children:
        yield (*path, key)
        yield from _places(value, (*path, key))


def _at(node: Any, path: Place) -> Any:
    for key in path:
        node = node[key]
    return node


def _depth(node: Any) -> int:
    if isinstance(node, dict):
        return 1 + max(map(_depth, node.values()), default=0)
    if isinstance(node, list):
        return 1 + max(map(_depth, node), default=0)
    return 1 if isinstance(node, _Pairs) else 0


Mutation = Callable[[st.DrawFn, dict[str, Any]], None]
# Lone surrogates (valid JSON escapes with no UTF-8 form) the most: what breaks an encoder.
ODD_TEXT = ["\ud800", "\udfff", "\ud83d", "\udbff", "\x00", "\u202e", "\u200f", "\ufeff", "\uffff"]
ODD_NUMBERS: list[Any] = [
    2**64,
    -(2**63) - 1,
    10**30,
    1.5,
    -0.0,
    1e308,
    _Literal("1e400"),  # read as an infinite float
    _Literal("-1E+400"),
    _Literal("1e-400"),
    _Literal("1" * 400),
    "NaN",
    "Infinity",
    "-1e999",
    "0x10",
    " 7 ",
    "1_000",
    "\u00b2",  # a digit to str.isdigit, not to int()
]


def _place(draw: st.DrawFn, body: dict[str, Any], want: type | None = None) -> Place | None:
    places = [p for p in _places(body) if want is None or isinstance(_at(body, p), want)]
    return draw(st.sampled_from(places)) if places else None


def _set(body: dict[str, Any], path: Place, value: Any) -> None:
    _at(body, path[:-1])[path[-1]] = value


def drop(draw: st.DrawFn, body: dict[str, Any]) -> None:
    path = _place(draw, body)
    if path is not None:
        del _at(body, path[:-1])[path[-1]]


def null(draw: st.DrawFn, body: dict[str, Any]) -> None:
    path = _place(draw, body)
    if path is not None:
        _set(body, path, None)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float | _Literal):
        return "number"
    return type(value).__name__


def retype(draw: st.DrawFn, body: dict[str, Any]) -> None:
    """A string becomes a number, a list, an object or a bool, and so on."""
    path = _place(draw, body)
    if path is None:
        return
    value = _at(body, path)
    as_text = value if isinstance(value, str) else _write(value, True)
    others = [as_text, len(as_text), 0.5, [value], [], {"value": value}, {}, True, False]
    _set(body, path, draw(st.sampled_from([o for o in others if _kind(o) != _kind(value)])))


def long_text(draw: st.DrawFn, body: dict[str, Any]) -> None:
    path = _place(draw, body)
    if path is not None:
        value = _at(body, path)
        seed = value if isinstance(value, str) and value else "x"
        _set(body, path, seed * (draw(st.sampled_from((300, 5_000, 100_000))) // len(seed) + 1))


def nested(draw: st.DrawFn, body: dict[str, Any]) -> None:
    """A value wrapped in arrays and objects until the body is just under, at or just past
    the depth limit."""
    path = _place(draw, body)
    if path is None:
        return
    node = _at(body, path)
    target = MAX_DEPTH + draw(st.sampled_from((-1, 0, 1)))
    for level in range(target - len(path) - _depth(node)):
        node = [node] if level % 2 else {"a": node}
    _set(body, path, node)


def odd_unicode(draw: st.DrawFn, body: dict[str, Any]) -> None:
    """A string (an id, a name, a state) gets a character few texts hold."""
    path = _place(draw, body, str)
    if path is not None:
        value = _at(body, path)
        cut = draw(st.integers(0, len(value)))
        _set(body, path, value[:cut] + draw(st.sampled_from(ODD_TEXT)) + value[cut:])


def odd_number(draw: st.DrawFn, body: dict[str, Any]) -> None:
    path = _place(draw, body)
    if path is not None:
        _set(body, path, draw(st.sampled_from(ODD_NUMBERS)))


def duplicate_key(draw: st.DrawFn, body: dict[str, Any]) -> None:
    """One key of an object written twice, the other value before or after the first."""
    path = _place(draw, body, dict)
    node = _at(body, path) if path is not None else body
    if not node:
        return
    key = draw(st.sampled_from(sorted(node)))
    other = draw(st.sampled_from([None, "other", 0, {}, [], *node.values()]))
    pairs = list(node.items())
    index = [k for k, _ in pairs].index(key)
    pairs.insert(index + draw(st.sampled_from((0, 1))), (key, copy.deepcopy(other)))
    if path is None:
        body.clear()
        body["value"] = [_Pairs(tuple(pairs))]  # the envelope's repeat, in an item's place
    else:
        _set(body, path, _Pairs(tuple(pairs)))


def swap_items(draw: st.DrawFn, body: dict[str, Any]) -> None:
    """Two items of a list (the notifications of ``value``, a roster) change places; a list
    of one gets a copy of it."""
    path = _place(draw, body, list)
    items = body.get("value") if path is None else _at(body, path)
    if not isinstance(items, list) or not items:
        return
    if len(items) == 1:
        items.append(copy.deepcopy(items[0]))
        return
    first, second = draw(st.sampled_from([(i, j) for i in range(len(items)) for j in range(i)]))
    items[first], items[second] = items[second], items[first]


_CALL_ID = re.compile(r"calls/([^/\"\\?]+)")


def merge_bodies(draw: st.DrawFn, body: dict[str, Any]) -> None:
    """Another body's items join this one's, about this body's call, in some order."""
    _, other = draw(st.sampled_from(CORPUS))
    mine = _CALL_ID.search(_write(body, ascii_only=True))
    theirs = json.dumps(other.get("value", []))
    if mine is not None:
        theirs = _CALL_ID.sub(lambda _: mine.group(0), theirs)
    items = body.get("value")
    merged = [*(items if isinstance(items, list) else []), *json.loads(theirs)]
    body["value"] = draw(st.permutations(merged))


def foreign_data(draw: st.DrawFn, body: dict[str, Any]) -> None:
    """An item's ``resourceData`` is another resource's (a call's on a roster path, a roster
    on an operation's), or data of no resource at all."""
    items = body.get("value")
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        return
    _, other = draw(st.sampled_from(CORPUS))
    theirs = [i["resourceData"] for i in other.get("value", []) if "resourceData" in i]
    data = draw(st.sampled_from([*theirs, "text", 7, [], [1, "a"], [[]], [None], {}]))
    target = draw(st.sampled_from([i for i in items if isinstance(i, dict)] or [items[0]]))
    target["resourceData"] = copy.deepcopy(data)


def recase_key(draw: st.DrawFn, body: dict[str, Any]) -> None:
    path = _place(draw, body)
    if path is None or not isinstance(path[-1], str) or not path[-1]:
        return
    owner, key = _at(body, path[:-1]), path[-1]
    spelled = draw(st.sampled_from((key[0].upper() + key[1:], key.upper(), key.lower(), key + " ")))
    owner[spelled] = owner.pop(key)


def odata_type(draw: st.DrawFn, body: dict[str, Any]) -> None:
    path = _place(draw, body, dict)
    if path is not None:
        kinds = [*ODATA_TYPES, "#microsoft.graph.", "#", 5, None, ["#microsoft.graph.call"]]
        _at(body, path)["@odata.type"] = draw(st.sampled_from(kinds))


# Keys callbot decides with (the envelope's, the routing's, the models' that order a call):
# one a body lacks may still come.
DECIDING_KEYS = [
    "sequenceNumber",
    "tenantId",
    "state",
    "toneInfo",
    "tone",
    "sequenceId",
    "resultInfo",
    "code",
    "subcode",
    "status",
    "id",
    "participants",
    "@odata.type",
    "changeType",
    "resourceUrl",
    "resource",
    "resourceData",
    "value",
    "callState",
    "clientContext",
]
ODD_VALUES: list[Any] = [*ODD_NUMBERS, *ODD_TEXT, None, True, 7, "", "x", [], {}, [{}], {"a": 1}]


def _deciding_objects(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The envelope, its items and their resources."""
    yield body
    items = body.get("value")
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        yield item
        data = item.get("resourceData")
        for resource in data if isinstance(data, list) else [data]:
            if isinstance(resource, dict):
                yield resource


def add_key(draw: st.DrawFn, body: dict[str, Any]) -> None:
    """An object callbot reads gets a key it decides with, holding an odd value."""
    node = draw(st.sampled_from(list(_deciding_objects(body))))
    node[draw(st.sampled_from(DECIDING_KEYS))] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))


MUTATIONS: list[Mutation] = [
    add_key,
    drop,
    null,
    retype,
    long_text,
    nested,
    odd_unicode,
    odd_number,
    duplicate_key,
    swap_items,
    merge_bodies,
    foreign_data,
    recase_key,
    odata_type,
]


@dataclass(frozen=True)
class Mutated:
    """A body as posted, what it was made from and how."""

    source: str
    mutations: tuple[str, ...]
    data: bytes


@st.composite
def mutated_bodies(draw: st.DrawFn) -> Mutated:
    source, original = draw(st.sampled_from(CORPUS))
    body = copy.deepcopy(original)
    done: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        mutation = draw(st.sampled_from(MUTATIONS))
        mutation(draw, body)
        done.append(mutation.__name__)
    # Unescaped, a lone surrogate is no UTF-8: the body is then not JSON either.
    text = _write(body, ascii_only=draw(st.sampled_from((True, True, False))))
    return Mutated(source, tuple(done), text.encode("utf-8", "surrogatepass"))


def _parse(data: bytes) -> list[events.Event]:
    return parse_body(
        data,
        max_depth=MAX_DEPTH,
        max_items=MAX_ITEMS,
        max_participants=MAX_PARTICIPANTS,
        tenant_id=TEST_TENANT_ID,
    )


async def _records_read_back(parsed: list[events.Event]) -> None:
    """The sequencer takes the events; each call's record is written as a shared store
    writes it, and read back."""
    sequencer = Sequencer(lambda delivery: None, Lifecycle(termination_grace=60.0))
    for event in parsed:
        sequencer.accept(event)
    for key in {event.call_key for event in parsed}:
        record = sequencer.record(key)
        if record is not None:
            again = decode_record(encode_record(record))
            assert again is not None
            assert (again.call_id, again.state, again.phase) == (
                record.call_id,
                record.state,
                record.phase,
            )
    sequencer.close()


@settings(
    max_examples=600,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated_bodies())
def test_a_changed_real_body_gives_events_or_a_clear_refusal(body: Mutated) -> None:
    with capture_logs():
        try:
            parsed = _parse(body.data)
        except MalformedNotification as exc:
            refused: str | None = exc.reason
        else:
            refused = None
        assert refused is None or refused in REASONS, refused
        hypothesis.event(
            refused or "events"
        )  # the spread of outcomes: --hypothesis-show-statistics
        if refused is not None:
            return
        assert parsed
        for event in parsed:
            event.model_dump(mode="json")  # a handler may read anything of it
            # Another instance sharing the store runs what this one accepted: the same event.
            assert decode_entry(encode_entry(event)) == event
        asyncio.run(_records_read_back(parsed))


_CALL_ID_BYTES = re.compile(_CALL_ID.pattern.encode())
_CALLS = itertools.count()


@dataclass
class _Receiving:
    server: BotServer
    handled: list[str]


@pytest.fixture
async def receiving(authority: TokenAuthority, serve: Any) -> _Receiving:
    bot = make_bot(authority, reorder_window=0.05)
    handled: list[str] = []

    @bot.on(events.Event)
    async def inspect(call: Call, event: events.Event) -> None:
        event.model_dump(mode="json")
        handled.append(event.call_key)

    return _Receiving(await serve(bot), handled)


def _accounted(receiving: _Receiving) -> bool:
    """Whether every item accepted so far was handled or dropped with a counted reason."""
    text = receiving.server.bot.metrics.render().decode()

    def total(outcome: str) -> float:
        prefix = f'callbot_notifications_total{{outcome="{outcome}",'
        return sum(
            float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(prefix)
        )

    return total("accepted") == len(receiving.handled) + total("dropped")


@settings(
    max_examples=30,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # one bot serves every example
    ],
)
@given(st.lists(mutated_bodies(), min_size=8, max_size=8))
async def test_changed_real_bodies_through_the_receiver(
    receiving: _Receiving, bodies: list[Mutated]
) -> None:
    statuses: list[int] = []
    with capture_logs() as logs:
        for body in bodies:
            # A call of its own for each body: a call that ended drops all that follows.
            data = _CALL_ID_BYTES.sub(rb"\g<0>-%d" % next(_CALLS), body.data)
            response = await receiving.server.post(None, raw=data)
            await response.read()
            statuses.append(response.status)
        await until(lambda: _accounted(receiving))
    assert all(status in (202, 204, 400, 403, 413) for status in statuses), statuses
    refusals = [line.get("reason") for line in logs if line["event"] == "callback_refused"]
    assert "unparseable" not in refusals
    assert [line for line in logs if line.get("log_level") in ("error", "critical")] == []
