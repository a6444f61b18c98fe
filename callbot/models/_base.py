"""The base every Graph communications model derives from, and ``@odata.type`` helpers."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, get_args

from pydantic import (
    AliasChoices,
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
)
from pydantic.alias_generators import to_camel
from pydantic_core import CoreSchema, core_schema

__all__ = [
    "UNKNOWN_FUTURE_VALUE",
    "GraphEnum",
    "GraphModel",
    "enum_members",
    "graph_value",
    "odata_discriminator",
    "odata_type_field",
    "type_name",
    "wire_names",
]

_GRAPH_PREFIX = "microsoft.graph."


def _capitalised(name: str) -> str:
    return name[:1].upper() + name[1:]


def wire_names(*names: str) -> AliasChoices:
    """Where a property is read from: each of ``names``, then each with a capital first
    letter, since Teams has sent properties so (``MeetingUrl``, ``TranscriptionInfo``,
    ``ApplicationType``)."""
    pascal = [_capitalised(name) for name in names if _capitalised(name) not in names]
    return AliasChoices(*names, *pascal)


def _property_names(field: str) -> AliasChoices:
    return wire_names(to_camel(field))


def odata_type_field(default: str | None = None) -> Any:
    """The ``odata_type`` field, read from ``@odata.type`` and written back under that key."""
    # validation/serialization aliases instead of alias= keep ``odata_type=`` a valid keyword
    # for type checkers, which read alias= as the constructor's parameter name.
    return Field(
        default,
        validation_alias=AliasChoices("@odata.type", "odata_type"),
        serialization_alias="@odata.type",
    )


class GraphModel(BaseModel):
    """Base of every Graph resource model.

    Fields are snake_case in Python and camelCase on the wire (both accepted when
    reading, and the wire name with a capital first letter too, as Teams has sent some;
    ``model_dump(by_alias=True)`` writes the camelCase form). Properties Graph
    adds that a model does not declare are kept in ``model_extra``, because Graph
    types are open and grow. callbot never mutates a parsed model.
    """

    model_config = ConfigDict(
        populate_by_name=True,
        alias_generator=AliasGenerator(
            validation_alias=_property_names, serialization_alias=to_camel
        ),
        extra="allow",
    )

    odata_type: str | None = odata_type_field()
    odata_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("@odata.id", "odata_id"),
        serialization_alias="@odata.id",
    )
    """The resource's path, which older notifications carry (``/app/calls/{id}/...``)."""
    odata_etag: str | None = Field(
        default=None,
        validation_alias=AliasChoices("@odata.etag", "odata_etag"),
        serialization_alias="@odata.etag",
    )
    """The resource's version tag, as sent."""


class _Spelling(dict[str, str]):
    """Each known member under its own spelling and in lower case; any other value is looked
    up in lower case, and is itself when no member has that lower case."""

    def __missing__(self, value: str) -> str:
        return self.get(value.lower(), value)


class GraphEnum:
    """``Annotated`` metadata of a ``str`` property whose Graph type is an enum.

    A known member is read in Graph's spelling whatever its case (``Established``
    -> ``established``), so code compares with ``==``; any other value is kept as
    sent, because Graph adds members. ``members`` lists the known ones; ``beta`` those
    of them that Graph's beta has and v1.0 does not (listed after the others).
    """

    __slots__ = ("_spelling", "beta", "members")

    def __init__(self, *members: str, beta: tuple[str, ...] = ()) -> None:
        self.members: tuple[str, ...] = members + beta
        self.beta: frozenset[str] = frozenset(beta)
        self._spelling = _Spelling({member.lower(): member for member in self.members})
        self._spelling.update((member, member) for member in self.members)

    def canonical(self, value: str) -> str:
        """``value`` in Graph's spelling when it is a known member, else as given."""
        return self._spelling[value]

    def sendable(self, *, beta: bool) -> tuple[str, ...]:
        """The members a request may carry on Graph's beta (``beta``) or v1.0: never
        ``unknownFutureValue``, which only says Graph has a member the reader does not know."""
        return tuple(
            member
            for member in self.members
            if member != UNKNOWN_FUTURE_VALUE and (beta or member not in self.beta)
        )

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        # The dict's own lookup: a value sent in Graph's spelling (nearly all) runs no Python.
        return core_schema.no_info_after_validator_function(
            self._spelling.__getitem__, handler(source)
        )

    def __repr__(self) -> str:
        return f"GraphEnum{self.members!r}"


UNKNOWN_FUTURE_VALUE = "unknownFutureValue"
"""What Graph writes for an enum member the reader's schema lacks: never a value to send."""


def _enum_of(alias: Any) -> GraphEnum | None:
    for meta in get_args(alias)[1:]:
        if isinstance(meta, GraphEnum):
            return meta
    return None


def enum_members(alias: Any) -> tuple[str, ...]:
    """The known members of an enum alias such as ``models.Tone`` (``()`` for other types)."""
    enum = _enum_of(alias)
    return enum.members if enum is not None else ()


def graph_value(
    alias: Any,
    value: object,
    name: str,
    *,
    beta: bool,
    only: Collection[str] | None = None,
) -> str:
    """``value``, the argument ``name`` of a request, in Graph's spelling, when it is a member
    of the enum ``alias`` (``models.RejectReason``, ...) that Graph's beta (``beta``) or v1.0
    takes; any case is read, as notifications are (``"Busy"`` -> ``"busy"``). ``only`` names
    the members the request takes, when it documents fewer than the enum has
    (``updateRecordingStatus`` takes no ``unknown``). Anything else raises ``ValueError``
    naming the argument, the value and the members taken: Graph would refuse a misspelt
    value, or read it as another."""
    enum = _enum_of(alias)
    if enum is None:
        raise TypeError(f"{alias!r} is no Graph enum alias")
    allowed = enum.sendable(beta=beta)
    if only is not None:
        allowed = tuple(member for member in allowed if member in only)
    spelt = enum.canonical(value) if isinstance(value, str) else value
    if spelt in allowed:
        return str(spelt)
    if spelt in enum.beta and (only is None or spelt in only):
        raise ValueError(
            f"{name}={value!r} is Graph beta's only; v1.0 takes {', '.join(map(repr, allowed))}."
            " Set graph_url (CALLBOT_GRAPH_URL) to https://graph.microsoft.com/beta to send it"
        )
    raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def type_name(value: Any) -> str | None:
    """The lower-case Graph type name of ``value``'s ``@odata.type``.

    ``"#microsoft.graph.recordOperation"`` -> ``"recordoperation"``. Accepts a
    mapping or a :class:`GraphModel`; ``None`` when there is no usable type.
    """
    raw: Any
    if isinstance(value, Mapping):
        raw = value.get("@odata.type")
    elif isinstance(value, GraphModel):
        raw = value.odata_type
    else:
        return None
    if not isinstance(raw, str):
        return None
    name = raw.strip().lstrip("#").lower()
    if name.startswith(_GRAPH_PREFIX):
        name = name[len(_GRAPH_PREFIX) :]
    return name or None


def odata_discriminator(
    variants: Mapping[str, type[GraphModel]],
    *,
    fallback: str,
    hints: Mapping[str, str] | None = None,
) -> Callable[[Any], str]:
    """A pydantic ``Discriminator`` callable choosing a variant by ``@odata.type``.

    ``variants`` maps a lower-case Graph type name (also used as the ``Tag``) to its
    class, and includes ``fallback`` (the open base class). Input without a known
    type falls back to the variant named by the first property listed in ``hints``
    (property -> tag) that it carries, else to ``fallback``, so unknown or new
    types still validate.
    """
    known = dict(variants)
    key_hints = dict(hints or {})

    def choose(value: Any) -> str:
        if isinstance(value, GraphModel):
            # an already-built model keeps its class: the most specific variant wins
            for tag, cls in known.items():
                if tag != fallback and isinstance(value, cls):
                    return tag
            return fallback
        name = type_name(value)
        if name in known:
            return name
        if isinstance(value, Mapping):
            for key, tag in key_hints.items():
                if key in value or _capitalised(key) in value:
                    return tag
        return fallback

    return choose
