"""Small value objects bot authors pass to call actions, and their Graph wire form.

Every action also accepts the raw Graph dict, or a :mod:`callbot.models` model,
wherever it accepts one of these, for anything they do not model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypedDict, Unpack

from pydantic import BaseModel

from .. import models
from ..models._base import UNKNOWN_FUTURE_VALUE

__all__ = [
    "EndpointType",
    "InvitationOptions",
    "MediaInfoLike",
    "Modality",
    "PromptLike",
    "RecordingStatus",
    "RejectReason",
    "RoutingMode",
    "RoutingPolicy",
    "ScreenSharingRole",
    "Target",
    "TargetLike",
    "ToneName",
    "dump",
    "graph_values",
    "identity_set_json",
    "invitation_json",
    "media_info",
    "media_info_json",
    "media_prompt",
    "participant_info_json",
    "prompt_json",
    "prompts_json",
    "string_list",
]

IDENTITY = "#microsoft.graph.identity"
IDENTITY_SET = "#microsoft.graph.identitySet"
INVITATION = "#microsoft.graph.invitationParticipantInfo"
PARTICIPANT_INFO = "#microsoft.graph.participantInfo"
# The properties of Graph's participantInfo (v1.0 schema), in the order they are written: a
# model sent where Graph declares one keeps these and no others (participantInfo is no open
# type; rosters add Teams' own, endpointId, clientVersion, ..., to what Graph sends).
PARTICIPANT_INFO_PROPERTIES = (
    "identity",
    "participantId",
    "endpointType",
    "languageId",
    "region",
    "countryCode",
)
MEDIA_PROMPT = "#microsoft.graph.mediaPrompt"
MEDIA_INFO = "#microsoft.graph.mediaInfo"

# What call actions take for each Graph enum, in Graph's spelling (the members of the
# alias of callbot.models that reads it, but unknownFutureValue, or those the request
# documents when it takes fewer), so mypy sees a misspelt one; at run time
# models.graph_value checks them, and reads any case.
Modality: TypeAlias = Literal["audio", "video", "videoBasedScreenSharing", "data", "unknown"]
"""A modality to answer or place a call with (``unknown`` on Graph's beta only)."""
RejectReason: TypeAlias = Literal["none", "busy", "forbidden"]
"""Why the bot rejects a call."""
RecordingStatus: TypeAlias = Literal["notRecording", "recording", "failed"]
"""What the bot tells Teams of its recording (``updateRecordingStatus`` documents no
``unknown``, which Graph writes of a participant's recording)."""
ScreenSharingRole: TypeAlias = Literal["viewer", "sharer"]
"""The bot's screen-sharing role."""
RoutingMode: TypeAlias = Literal["oneToOne", "multicast"]
"""How an audio routing group routes its sources to its receivers."""
RoutingPolicy: TypeAlias = Literal[
    "none",
    "noMissedCall",
    "disableForwardingExceptPhone",
    "disableForwarding",
    "preferSkypeForBusiness",
]
"""How a redirected call may be routed further."""
EndpointType: TypeAlias = Literal[
    "default", "voicemail", "skypeForBusiness", "skypeForBusinessVoipPhone"
]
"""Which endpoint of a target is invited."""
ToneName: TypeAlias = Literal[
    "tone0",
    "tone1",
    "tone2",
    "tone3",
    "tone4",
    "tone5",
    "tone6",
    "tone7",
    "tone8",
    "tone9",
    "star",
    "pound",
    "a",
    "b",
    "c",
    "d",
    "flash",
]
"""A DTMF tone as Graph names it."""


class InvitationOptions(TypedDict, total=False):
    """How a target is invited (``invitationParticipantInfo`` properties besides identity)."""

    replaces_call_id: str
    """Consultative transfer / invite: the call this one replaces."""
    participant_id: str
    """Move an existing participant (from another meeting), or name the transferee."""
    endpoint_type: EndpointType
    """``default``, ``voicemail``, ``skypeForBusiness``, ``skypeForBusinessVoipPhone``
    (another raises ``ValueError``)."""
    language_id: str
    region: str
    hidden: bool
    remove_from_default_audio_routing_group: bool


@dataclass(frozen=True, kw_only=True)
class Target:
    """Someone to call, invite, redirect or transfer to.

    Build one with :meth:`user`, :meth:`phone`, :meth:`application`,
    :meth:`application_instance` or :meth:`guest`::

        Target.user("550fae72-...", display_name="Heidi Steen")
        Target.phone("+12345678901")
        Target.user(user_id, replaces_call_id=other_call.id)   # consultative transfer

    ``kind`` is the ``identitySet`` property the identity goes under (``user``,
    ``phone``, ``application``, ``applicationInstance``, ``guest``, ...).
    """

    kind: str
    id: str
    display_name: str | None = None
    tenant_id: str | None = None
    identity_provider: str | None = None
    replaces_call_id: str | None = None
    participant_id: str | None = None
    endpoint_type: EndpointType | None = None
    language_id: str | None = None
    region: str | None = None
    hidden: bool | None = None
    remove_from_default_audio_routing_group: bool | None = None

    def __post_init__(self) -> None:
        if self.endpoint_type is not None:
            # Made before any client is known: endpointType has no member only beta has.
            spelt = models.graph_value(
                models.EndpointType, self.endpoint_type, "endpoint_type", beta=True
            )
            object.__setattr__(self, "endpoint_type", spelt)

    @classmethod
    def identity(
        cls,
        kind: str,
        id: str,
        display_name: str | None = None,
        tenant_id: str | None = None,
        *,
        identity_provider: str | None = None,
        **options: Unpack[InvitationOptions],
    ) -> Target:
        """A target of any identity kind (the ``identitySet`` property name)."""
        if not id:
            raise ValueError("a target needs an id")
        return cls(
            kind=kind,
            id=id,
            display_name=display_name,
            tenant_id=tenant_id,
            identity_provider=identity_provider,
            **options,
        )

    @classmethod
    def user(
        cls,
        id: str,
        display_name: str | None = None,
        tenant_id: str | None = None,
        *,
        identity_provider: str | None = None,
        **options: Unpack[InvitationOptions],
    ) -> Target:
        """A Teams / Entra ID user by object id (``tenant_id`` for a user of another tenant)."""
        return cls.identity(
            "user", id, display_name, tenant_id, identity_provider=identity_provider, **options
        )

    @classmethod
    def phone(
        cls, number: str, display_name: str | None = None, **options: Unpack[InvitationOptions]
    ) -> Target:
        """A PSTN number in E.164 form (``+12345678901``); spaces, dashes, dots and
        parentheses written between its digits (``+1 (234) 567-8901``) are left out."""
        if _PHONE_NUMBER.fullmatch(number):
            number = _PHONE_SEPARATORS.sub("", number)
        return cls.identity("phone", number, display_name, **options)

    @classmethod
    def application(
        cls, id: str, display_name: str | None = None, **options: Unpack[InvitationOptions]
    ) -> Target:
        """An application (another bot) by app id."""
        return cls.identity("application", id, display_name, **options)

    @classmethod
    def application_instance(
        cls,
        id: str,
        display_name: str | None = None,
        tenant_id: str | None = None,
        **options: Unpack[InvitationOptions],
    ) -> Target:
        """An application instance (a bot with a phone number) by object id.

        Use it as the ``source`` of a call to a PSTN number.
        """
        return cls.identity("applicationInstance", id, display_name, tenant_id, **options)

    @classmethod
    def guest(
        cls, id: str, display_name: str | None = None, **options: Unpack[InvitationOptions]
    ) -> Target:
        """A guest identity (for a bot joining a meeting as a guest): any unique id."""
        return cls.identity("guest", id, display_name, **options)

    def with_options(self, **options: Unpack[InvitationOptions]) -> Target:
        """A copy with invitation options changed (``replaces_call_id=``, ...)."""
        return dataclasses.replace(self, **options)

    def identity_json(self) -> dict[str, Any]:
        """The ``identity`` object."""
        identity: dict[str, Any] = {"@odata.type": IDENTITY, "id": self.id}
        if self.display_name is not None:
            identity["displayName"] = self.display_name
        if self.tenant_id is not None:
            identity["tenantId"] = self.tenant_id
        if self.identity_provider is not None:
            identity["identityProvider"] = self.identity_provider
        return identity

    def identity_set_json(self) -> dict[str, Any]:
        """The ``identitySet`` with this one identity."""
        return {"@odata.type": IDENTITY_SET, self.kind: self.identity_json()}

    def invitation_json(self) -> dict[str, Any]:
        """The ``invitationParticipantInfo`` (call targets, invitees, transfer targets)."""
        body: dict[str, Any] = {"@odata.type": INVITATION, "identity": self.identity_set_json()}
        for key, value in (
            ("endpointType", self.endpoint_type),
            ("replacesCallId", self.replaces_call_id),
            ("participantId", self.participant_id),
            ("languageId", self.language_id),
            ("region", self.region),
            ("hidden", self.hidden),
            ("removeFromDefaultAudioRoutingGroup", self.remove_from_default_audio_routing_group),
        ):
            if value is not None:
                body[key] = value
        return body

    def participant_info_json(self) -> dict[str, Any]:
        """The ``participantInfo`` (a call's source, a transfer's transferee)."""
        body: dict[str, Any] = {
            "@odata.type": PARTICIPANT_INFO,
            "identity": self.identity_set_json(),
        }
        for key, value in (
            ("endpointType", self.endpoint_type),
            ("participantId", self.participant_id),
            ("languageId", self.language_id),
            ("region", self.region),
        ):
            if value is not None:
                body[key] = value
        return body


TargetLike: TypeAlias = (
    Target | str | models.InvitationParticipantInfo | models.ParticipantInfo | Mapping[str, Any]
)
"""A :class:`Target`, a Teams user's id (``Target.user(id)``), a model, or the raw Graph dict.

A model is sent as the type Graph declares where it goes, whichever of the two it is: an
incoming call's ``source`` or a participant's ``info`` (a ``participantInfo``) can be called,
invited or transferred to, and the bot's own identity (an incoming call's ``targets[0]``, an
``invitationParticipantInfo``) be a call's ``source``; see :func:`invitation_json` and
:func:`participant_info_json`. A raw dict is sent as given."""


PromptLike: TypeAlias = str | models.Prompt | Mapping[str, Any]
"""A media URL, a :class:`callbot.models.MediaPrompt` (see :func:`media_prompt`), or a dict."""

MediaInfoLike: TypeAlias = str | models.MediaInfo | models.MediaPrompt | Mapping[str, Any]
"""A media URL, a :class:`callbot.models.MediaInfo` (see :func:`media_info`), or a dict."""


def dump(value: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """The wire form of a model (camelCase, ``@odata.type``, no nulls) or a copy of a dict.

    A model is what Graph sent (an incoming call's ``targets[0]``, a participant's ``info``)
    or was built from it: wherever it holds ``unknownFutureValue``, the member Graph writes
    for one the reader's schema lacks, the property is left out, and the value left out of a
    list, since Graph takes it in no request. A dict is sent as its author wrote it."""
    if isinstance(value, BaseModel):
        dumped: dict[str, Any] = _sendable(
            value.model_dump(mode="json", by_alias=True, exclude_none=True)
        )
        return dumped
    return dict(value)


def _sendable(node: Any) -> Any:
    """``node`` (a model's JSON) without ``unknownFutureValue`` wherever it sits."""
    if isinstance(node, dict):
        return {k: _sendable(v) for k, v in node.items() if v != UNKNOWN_FUTURE_VALUE}
    if isinstance(node, list):
        return [_sendable(v) for v in node if v != UNKNOWN_FUTURE_VALUE]
    return node


def media_prompt(uri: str, *, resource_id: str | None = None) -> models.MediaPrompt:
    """A prompt playing the media file at ``uri``.

    ``resource_id`` is the key Graph caches the file under (pre-fetched media is
    matched by it).
    """
    return models.MediaPrompt(
        media_info=models.MediaInfo(odata_type=MEDIA_INFO, uri=uri, resource_id=resource_id)
    )


def media_info(uri: str, *, resource_id: str | None = None) -> models.MediaInfo:
    """A media file for Graph to pre-fetch when the call starts."""
    return models.MediaInfo(uri=uri, resource_id=resource_id)


def string_list(values: Sequence[str], name: str) -> list[str]:
    """``values`` as a list. A lone string is a sequence of strings to Python and to mypy:
    sent, it would be its characters (``modalities="audio"``), so it is refused."""
    if isinstance(values, str):
        raise TypeError(f"{name} takes a list of strings, not one: {name}=[{values!r}]")
    return list(values)


def graph_values(kind: Any, values: Sequence[str], name: str, *, beta: bool) -> list[str]:
    """``values`` as a list of members of the Graph enum ``kind`` (a :mod:`callbot.models`
    alias), each as :func:`callbot.models.graph_value` checks and spells it."""
    return [models.graph_value(kind, v, name, beta=beta) for v in string_list(values, name)]


def prompt_json(prompt: PromptLike) -> dict[str, Any]:
    """The ``mediaPrompt`` wire form of a URL, a model or a dict."""
    if isinstance(prompt, str):
        return dump(media_prompt(prompt))
    return dump(prompt)


def prompts_json(prompts: PromptLike | Sequence[PromptLike]) -> list[dict[str, Any]]:
    """One prompt or several, as the ``prompts`` list."""
    if isinstance(prompts, str | BaseModel | Mapping):
        return [prompt_json(prompts)]
    return [prompt_json(p) for p in prompts]


def media_info_json(value: MediaInfoLike) -> dict[str, Any]:
    """The ``mediaInfo`` wire form (pre-fetch entries)."""
    if isinstance(value, str):
        return {"uri": value}
    if isinstance(value, models.MediaPrompt):
        if value.media_info is None:
            raise ValueError("a media prompt without mediaInfo cannot be pre-fetched")
        return dump(value.media_info)
    return dump(value)


# An Entra ID object id (a GUID); a phone number as people write one (digits, maybe a
# leading '+', spaces, dashes, dots or parentheses between them).
_OBJECT_ID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_PHONE_NUMBER = re.compile(r"\+?\(?[0-9][0-9 ().-]*[0-9]")
_PHONE_SEPARATORS = re.compile(r"[ ().-]")


def _user(value: str) -> Target:
    """A target given as a plain string: a Teams user's object id, never a number or a
    sign-in name (Graph would look either up as a user's id, and fail or ring nobody)."""
    if _OBJECT_ID.fullmatch(value):
        return Target.user(value)  # an object id, even one whose hex digits are all 0-9
    if _PHONE_NUMBER.fullmatch(value):
        digits = _PHONE_SEPARATORS.sub("", value)
        if digits.startswith("+"):
            raise ValueError(f"{value!r} looks like a phone number: pass Target.phone({digits!r})")
        raise ValueError(
            f"{value!r} looks like a phone number: pass it to Target.phone() in E.164 form: "
            "'+' and the country code first, then the number ('+12345678901')"
        )
    if "@" in value:
        raise ValueError(
            f"{value!r} is a sign-in name: Graph names a user by its object id (Target.user(id))"
        )
    return Target.user(value)


def identity_set_json(value: TargetLike | models.IdentitySet) -> dict[str, Any]:
    """The ``identitySet`` of a target (or an identity set given as such)."""
    if isinstance(value, str):
        value = _user(value)
    if isinstance(value, Target):
        return value.identity_set_json()
    if isinstance(value, models.IdentitySet):
        return dump(value)
    if isinstance(value, models.InvitationParticipantInfo | models.ParticipantInfo):
        return dump(value.identity) if value.identity is not None else {}
    if "identity" in value:
        return dict(value["identity"])
    return dict(value)


def invitation_json(value: TargetLike, *, replaces_call_id: str | None = None) -> dict[str, Any]:
    """The ``invitationParticipantInfo`` wire form of a target (a call's targets, invitees,
    a transfer's or a redirect's targets), replacing the call ``replaces_call_id`` unless the
    target names the call it replaces itself.

    A :class:`callbot.models.InvitationParticipantInfo` is sent with what it holds (Graph's
    type is open), typed ``invitationParticipantInfo``. A
    :class:`callbot.models.ParticipantInfo` (an incoming call's ``source``, a participant's
    ``info``) becomes one: ``identity``, the one property of the two types that names whom to
    invite, and ``participantId`` when the invitation replaces a call, where it names the
    participant to move out of that call (Graph's "move a participant from another meeting"):
    without one, it would name a participant of a call the request does not name. Its
    ``endpointType``, ``languageId``, ``region`` and ``countryCode`` tell of the leg it was
    read from, not how to invite anyone: invitationParticipantInfo has none of them (give them
    as :class:`Target` options to send them)."""
    if isinstance(value, str):
        value = _user(value)
    body: dict[str, Any]
    if isinstance(value, Target):
        body = value.invitation_json()
    elif isinstance(value, models.ParticipantInfo):
        body = {"@odata.type": INVITATION}
        if value.identity is not None:
            body["identity"] = dump(value.identity)
        if value.participant_id is not None and replaces_call_id is not None:
            body["participantId"] = value.participant_id
    elif isinstance(value, models.InvitationParticipantInfo):
        body = {"@odata.type": INVITATION, **_without_type(dump(value))}
    else:
        body = dump(_a_target(value))
    if replaces_call_id is not None:
        body.setdefault("replacesCallId", replaces_call_id)
    return body


def participant_info_json(value: TargetLike) -> dict[str, Any]:
    """The ``participantInfo`` wire form of a target (a call's source, a transfer's
    transferee).

    A :class:`callbot.models.ParticipantInfo` or a
    :class:`callbot.models.InvitationParticipantInfo` (the bot's own identity, an incoming
    call's ``targets[0]``) is sent typed ``participantInfo``, with those of its properties
    participantInfo has (``identity``, ``participantId``, ``endpointType``, ``languageId``,
    ``region``, ``countryCode``): an invitation's ``replacesCallId``, ``hidden`` and
    ``removeFromDefaultAudioRoutingGroup`` ask something of an invitation, and what Teams adds
    to a roster's (``endpointId``, ``clientVersion``, ...) is no property of the type."""
    if isinstance(value, str):
        value = _user(value)
    if isinstance(value, Target):
        return value.participant_info_json()
    if isinstance(value, models.ParticipantInfo | models.InvitationParticipantInfo):
        held = dump(value)
        return {
            "@odata.type": PARTICIPANT_INFO,
            **{name: held[name] for name in PARTICIPANT_INFO_PROPERTIES if name in held},
        }
    return dump(_a_target(value))


def _without_type(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key != "@odata.type"}


def _a_target(value: object) -> Mapping[str, Any]:
    """A target given as a raw dict (the two participant models are converted before); anything
    else raises (``dict()`` would read a list of targets as pairs, or refuse it with a message
    about sequences; a model sent as itself would be some other Graph type)."""
    if isinstance(value, Mapping):
        return value
    if isinstance(value, BaseModel):
        # Any other model would go as itself: a roster's participant as a participant
        # resource, its media streams and all, where Graph takes a participant's info.
        hint = " (a participant's is its .info)" if isinstance(value, models.Participant) else ""
        raise TypeError(
            "a target model is a models.InvitationParticipantInfo or a models.ParticipantInfo"
            f"{hint}, not {type(value).__name__}"
        )
    if isinstance(value, list | tuple | set):
        raise TypeError(
            f"targets are given one by one: (a, b), not ([a, b]); got a {type(value).__name__}"
        )
    raise TypeError(
        f"a target is a Target, a user's id, a model or a dict, not {type(value).__name__}: "
        f"{value!r}"
    )
