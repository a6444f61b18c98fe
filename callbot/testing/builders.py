"""Builders of the notification bodies Graph posts, one function per kind of event.

Each builder returns one notification item made from :mod:`callbot.models`
(the models the parser reads); :func:`notifications` wraps items in the
envelope Graph POSTs::

    from callbot.testing import builders as b

    body = b.notifications(
        b.incoming_call("call-1", caller_name="Adele Vance"),
        b.call_state("call-1", "establishing"),
    )

| event | builder |
| --- | --- |
| ``IncomingCall`` | :func:`incoming_call` |
| ``CallStateChanged`` | :func:`call_state` (with ``result_info`` for a failed transfer) |
| ``CallTerminated`` | :func:`call_terminated` |
| ``ToneReceived`` | :func:`tone` |
| ``ParticipantsUpdated`` | :func:`roster` of :func:`participant` |
| ``OperationUpdated`` | :func:`operation_update` |
| ``ContentSharingUpdated`` | :func:`content_sharing` |
| ``UnknownNotification`` | :func:`unknown` |
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic.alias_generators import to_camel

from callbot import models

__all__ = [
    "call_state",
    "call_terminated",
    "content_sharing",
    "delta_roster",
    "incoming_call",
    "notifications",
    "operation_update",
    "participant",
    "roster",
    "tone",
    "unknown",
]


def _dump(model: models.GraphModel) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def _item(change_type: str, path: str, resource_data: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "@odata.type": "#microsoft.graph.commsNotification",
        "changeType": change_type,
        "resourceUrl": path,
    }
    if resource_data is not None:
        item["resourceData"] = resource_data
    return item


def _call_path(call_id: str) -> str:
    return f"/communications/calls/{call_id}"


def notifications(*items: Mapping[str, Any]) -> dict[str, Any]:
    """The ``commsNotifications`` envelope around one or more items."""
    return {"@odata.type": "#microsoft.graph.commsNotifications", "value": [dict(i) for i in items]}


# The identitySet's identity properties, by Graph's name (applicationInstance) and by the
# model's attribute (application_instance), each to Graph's name.
_IDENTITY_KINDS = {
    written: to_camel(name)
    for name, field in models.IdentitySet.model_fields.items()
    if field.annotation == models.Identity | None
    for written in (name, to_camel(name))
}


def _identity_kind(kind: str) -> str:
    """The identitySet property ``kind`` names; another (a typo) would make a participant
    whom no identity names, so it is refused."""
    known = _IDENTITY_KINDS.get(kind)
    if known is None:
        kinds = ", ".join(sorted(set(_IDENTITY_KINDS.values())))
        raise ValueError(f"unknown identity kind {kind!r}: one of {kinds}")
    return known


_RESULT_INFO_TYPE = "#microsoft.graph.resultInfo"

# Identities Entra ID issues: a roster names their tenant and provider (recorded sb12, sb16).
_DIRECTORY_KINDS = frozenset({"user", "application", "applicationInstance"})
_BOT_KINDS = frozenset({"application", "applicationInstance"})

# A Teams client's streams as a recorded roster lists them (sb12, sb16): kind, label, direction.
_CLIENT_STREAMS: tuple[tuple[str, str, str], ...] = (
    ("audio", "main-audio", "sendReceive"),
    ("video", "main-video", "receiveOnly"),
    ("videoBasedScreenSharing", "applicationsharing-video", "receiveOnly"),
    ("data", "data", "sendReceive"),
)
_AUDIO_ONLY = _CLIENT_STREAMS[:1]
# A phone's one stream, unlabelled, as Graph documents it (document 54).
_PHONE_STREAMS: tuple[tuple[str, str | None, str], ...] = (("audio", None, "sendReceive"),)

# What a Teams desktop client says it is in a roster (shaped as recorded, sb12).
_TEAMS_CLIENT_VERSION = (
    "SkypeSpaces/1415/1.0.0.2023092925/os=windows; osVer=10; deviceType=computer;"
    " browser=chrome; browserVer=118.0/TsCallingVersion=2023.32.01.4"
)


def _typed_identity(
    kind: str,
    identity_id: str,
    display_name: str | None,
    tenant_id: str | None,
    *,
    provider: bool = True,
) -> models.IdentitySet:
    """An identity set typed down to the identity, as a live roster and Graph's documented
    incoming calls write one (sb12, documents 18 and 22), with the tenant of directory
    identities and, unless ``provider`` is false, their provider (a roster names it, sb12; an
    incoming call does not, document 22)."""
    directory = tenant_id is not None and kind in _DIRECTORY_KINDS
    identity = models.Identity(
        odata_type="#microsoft.graph.identity",
        id=identity_id,
        display_name=display_name,
        tenant_id=tenant_id if directory else None,
        identity_provider="AAD" if directory and provider else None,
    )
    return models.IdentitySet.model_validate(
        {"@odata.type": "#microsoft.graph.identitySet", kind: identity}
    )


def incoming_call(
    call_id: str,
    *,
    caller_id: str = "8d1e6ab6-26c5-4e22-a1bc-06ea7343958e",
    caller_name: str | None = "Caller",
    caller_kind: str = "user",
    bot_app_id: str = "00000000-0000-0000-0000-000000000000",
    bot_name: str = "Bot",
    tenant_id: str | None = None,
    callback_uri: str | None = None,
    modalities: Iterable[str] = ("audio",),
    my_participant_id: str | None = None,
    bot_instance_id: str | None = None,
    region: str | None = "amer",
) -> dict[str, Any]:
    """A ``created`` call in state ``incoming``.

    ``caller_kind`` is ``"user"``, or ``"phone"`` for a PSTN caller (then
    ``caller_id`` is the phone number): an identity kind of Graph's ``identitySet``
    (``guest``, ``applicationInstance``, ...), and no other. ``my_participant_id`` is
    the bot's own participant id in the call (``myParticipantId``, as Graph's
    documented incoming calls carry it).

    The call is made to the bot's ``application`` (``bot_app_id``), unless
    ``bot_instance_id`` names the application instance (the object id of the
    resource account with the phone number) it was made to, as a phone call reaches a bot:
    the target is then that instance, named ``bot_name``, in ``tenant_id``, and the
    target's ``id`` is ``my_participant_id`` (a new one when not given), as Graph documents
    such a call; a caller with a directory identity (a user) is in ``tenant_id`` too. A
    call to the ``application`` names it as Graph documents one (a ``participantInfo``
    target) and no caller's tenant.

    ``region`` is where the caller is (``amer``, as Graph's current documented incoming
    calls name it; ``None``: not named), and, on a call to an instance, the target too.
    """
    target: models.InvitationParticipantInfo
    if bot_instance_id is None:
        # Typed down to the identity, as a participantInfo (document 18, a call to the app).
        target = models.InvitationParticipantInfo(
            odata_type="#microsoft.graph.participantInfo",
            identity=_typed_identity("application", bot_app_id, bot_name, None),
        )
    else:
        my_participant_id = my_participant_id or str(uuid.uuid4())
        # Typed down to the identity, with its tenant (document 22, a call to an instance).
        target = models.InvitationParticipantInfo(
            odata_type="#microsoft.graph.invitationParticipantInfo",
            id=my_participant_id,
            identity=_typed_identity(
                "applicationInstance", bot_instance_id, bot_name, tenant_id, provider=False
            ),
            endpoint_type="default",
            region=region,
        )
    # Document 22's caller, calling an instance, is in the call's tenant; document 18's,
    # calling the app, names none (nor does the call).
    caller_tenant = tenant_id if bot_instance_id is not None else None
    call = models.Call(
        odata_type="#microsoft.graph.call",
        id=call_id,
        state="incoming",
        direction="incoming",
        callback_uri=callback_uri,
        tenant_id=tenant_id,
        source=models.ParticipantInfo(
            odata_type="#microsoft.graph.participantInfo",
            identity=_typed_identity(
                _identity_kind(caller_kind), caller_id, caller_name, caller_tenant, provider=False
            ),
            region=region,
        ),
        targets=[target],
        requested_modalities=list(modalities),
        my_participant_id=my_participant_id,
    )
    return _item("created", _call_path(call_id), _dump(call))


def call_state(
    call_id: str,
    state: str,
    *,
    result_info: models.ResultInfo | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """An ``updated`` call in ``state``; extra call properties may be given by name."""
    call = models.Call(
        odata_type="#microsoft.graph.call", state=state, result_info=result_info, **fields
    )
    return _item("updated", _call_path(call_id), _dump(call))


def call_terminated(
    call_id: str,
    *,
    code: int | None = 0,
    subcode: int = 0,
    message: str = "Call ended.",
    termination_reason: str | None = None,
) -> dict[str, Any]:
    """A ``deleted`` call in state ``terminated``, with its resultInfo (none when ``code`` is
    ``None``, as Graph ends a call the bot rejected or redirected) and its
    ``terminationReason`` when given (``AppTransferred``: a consultative transfer completed)."""
    info = (
        None
        if code is None
        else models.ResultInfo(
            odata_type=_RESULT_INFO_TYPE, code=code, subcode=subcode, message=message
        )
    )
    call = models.Call(
        odata_type="#microsoft.graph.call",
        state="terminated",
        result_info=info,
        termination_reason=termination_reason,
    )
    return _item("deleted", _call_path(call_id), _dump(call))


def tone(call_id: str, tone_name: str, sequence_id: int) -> dict[str, Any]:
    """A DTMF tone (``"tone1"``, ``"star"``, ``"pound"``, ...) as Graph sends it."""
    call = models.Call(
        odata_type="#microsoft.graph.call",
        state="established",
        tone_info=models.ToneInfo(
            odata_type="#microsoft.graph.toneInfo", sequence_id=sequence_id, tone=tone_name
        ),
    )
    return _item("updated", _call_path(call_id), _dump(call))


def participant(
    participant_id: str,
    *,
    user_id: str | None = None,
    display_name: str | None = None,
    kind: str = "user",
    muted: bool = False,
    in_lobby: bool = False,
    removed_reason: str | None = None,
    tenant_id: str | None = None,
    first_source_id: int = 1,
    client_version: str | None = None,
) -> models.Participant:
    """A roster participant (use with ``roster``), shaped as a live Teams roster has one.

    ``removed_reason`` marks one who left (as delta rosters report it). ``tenant_id`` is
    the tenant of a user's or a bot's identity. Each media stream gets a ``sourceId`` of its
    own, numbered from ``first_source_id`` (give each participant of a call its own range:
    a bot maps the audio it receives to a speaker by it). A person's Teams client has an
    audio, a video, a screen-sharing and a data stream, a bot only audio. A phone is listed
    as Graph documents one (document 54; no live roster has one): its identity, its endpoint
    type and one audio stream, none of a Teams client's fields.
    ``client_version`` is what the participant's client says it is: by default a Teams
    desktop client's (a phone's: none), and for a bot ``<display name> (appid:<id>)`` (a
    live roster names the bot's app there, whatever identity the bot has in the call: give
    it). ``kind`` is
    the identity's kind in Graph's ``identitySet`` (``user``, ``phone``, ``guest``,
    ``application``, ``applicationInstance``, ...; ``application_instance`` too), and no
    other.
    """
    return _participant(
        participant_id,
        user_id=user_id,
        display_name=display_name,
        kind=_identity_kind(kind),
        muted=muted,
        in_lobby=in_lobby,
        removed_reason=removed_reason,
        tenant_id=tenant_id,
        first_source_id=first_source_id,
        client_version=client_version,
    )


def _participant(
    participant_id: str,
    *,
    user_id: str | None,
    display_name: str | None,
    kind: str,
    muted: bool,
    in_lobby: bool,
    removed_reason: str | None,
    tenant_id: str | None,
    first_source_id: int,
    client_version: str | None,
) -> models.Participant:
    """:func:`participant` of any ``kind`` (the simulator's, for one a bot's request named)."""
    identity_id = user_id or participant_id
    removed_state = (
        models.RemovedState(reason=removed_reason) if removed_reason is not None else None
    )
    client = (
        # No live roster has a phone: Graph documents one (document 54) with no client's fields.
        _Client(streams=_PHONE_STREAMS, client_version=client_version)
        if kind == "phone"
        else _teams_client(participant_id, identity_id, display_name, kind, client_version)
    )
    return models.Participant(
        odata_type="#microsoft.graph.participant",
        id=participant_id,
        info=models.ParticipantInfo(
            odata_type="#microsoft.graph.participantInfo",
            identity=_typed_identity(kind, identity_id, display_name, tenant_id),
            endpoint_type="default",
            endpoint_id=client.endpoint_id,
            language_id=client.language_id,
            client_version=client.client_version,
            participant_id=client.participant_id,
            replacement_link=client.replacement_link,
        ),
        media_streams=[
            models.MediaStream(
                odata_type="#microsoft.graph.mediaStream",
                media_type=media,
                label=label,
                source_id=str(first_source_id + n),
                direction=direction,
                server_muted=False,
            )
            for n, (media, label, direction) in enumerate(client.streams)
        ],
        is_muted=muted,
        is_in_lobby=in_lobby,
        published_states=client.published_states,
        meeting_role=client.meeting_role,
        replacement_link=client.replacement_link,
        is_identity_anonymized=client.is_identity_anonymized,
        removed_state=removed_state,
    )


@dataclass(frozen=True)
class _Client:
    """What a participant's client adds to a roster entry's identity: its media streams
    (kind, label, direction) and the fields it reports (``None``: not sent)."""

    streams: tuple[tuple[str, str | None, str], ...]
    client_version: str | None
    endpoint_id: str | None = None
    language_id: str | None = None
    participant_id: str | None = None
    replacement_link: str | None = None
    published_states: list[Any] | None = None
    meeting_role: str | None = None
    is_identity_anonymized: bool | None = None


def _teams_client(
    participant_id: str,
    identity_id: str,
    display_name: str | None,
    kind: str,
    client_version: str | None,
) -> _Client:
    """A person's Teams client or a bot, as a live roster lists them (sb12, sb15)."""
    bot = kind in _BOT_KINDS
    if client_version is None:
        client_version = (
            f"{display_name or 'Bot'} (appid:{identity_id})" if bot else _TEAMS_CLIENT_VERSION
        )
    return _Client(
        streams=_AUDIO_ONLY if bot else _CLIENT_STREAMS,
        client_version=client_version,
        endpoint_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"endpoint:{participant_id}")),
        # A person's client says its language; a bot's does not (recorded sb12).
        language_id=None if bot else "en-US",
        participant_id=participant_id,
        replacement_link=_replacement_link(participant_id),
        published_states=[],
        meeting_role="none",
        is_identity_anonymized=False,
    )


def _replacement_link(participant_id: str) -> str:
    """Where Teams would take a participant's replacement: shaped as recorded, on a host
    that resolves nowhere."""
    compact = participant_id.replace("-", "").lower()
    return (
        f"https://cc.simulator.invalid/cc/v1/callParticipant/{participant_id}/replacement"
        f"?rt={compact}"
    )


def roster(call_id: str, participants: Iterable[models.Participant]) -> dict[str, Any]:
    """An ``updated`` participants collection: the whole roster as it now is."""
    return _item("updated", _call_path(call_id) + "/participants", [_dump(p) for p in participants])


def delta_roster(
    call_id: str,
    participants: Iterable[models.Participant],
    *,
    sequence_number: int,
    change_type: str = "updated",
) -> dict[str, Any]:
    """A delta roster (``isDeltaRosterEnabled``): only the participants that changed.

    ``change_type`` is ``created`` for participants who joined, ``updated`` for
    those who changed and ``deleted`` for those who left; ``sequence_number``
    orders the deltas of a call.
    """
    data = {
        "@odata.type": "#microsoft.graph.deltaParticipants",
        "sequenceNumber": sequence_number,
        "participants": [_dump(p) for p in participants],
    }
    return _item(change_type, _call_path(call_id) + "/participants", data)


def operation_update(
    call_id: str,
    operation_id: str,
    *,
    operation_type: str = "playPromptOperation",
    status: str = "completed",
    client_context: str | None = None,
    code: int | None = 200,
    subcode: int | None = 0,
    message: str | None = "Action completed.",
    **fields: Any,
) -> dict[str, Any]:
    """An operation's outcome: ``deleted`` on ``.../operations/{id}`` with its status."""
    data = {
        "@odata.type": f"#microsoft.graph.{operation_type}",
        "id": operation_id,
        "status": status,
        "clientContext": client_context,
        **{_camel(k): v for k, v in fields.items()},
    }
    if code is not None:
        data["resultInfo"] = {
            "@odata.type": "#microsoft.graph.resultInfo",
            "code": code,
            "subcode": subcode,
            "message": message,
        }
    operation = models.parse_operation(data)
    return _item("deleted", f"{_call_path(call_id)}/operations/{operation_id}", _dump(operation))


def content_sharing(
    call_id: str, session_ids: Iterable[str], *, change_type: str = "created"
) -> dict[str, Any]:
    """Content sharing sessions started (``created``), changed or ended (``deleted``)."""
    sessions = [
        models.ContentSharingSession(odata_type="#microsoft.graph.contentSharingSession", id=s)
        for s in session_ids
    ]
    return _item(
        change_type, _call_path(call_id) + "/contentsharingsessions", [_dump(s) for s in sessions]
    )


def unknown(
    call_id: str,
    subpath: str = "",
    *,
    change_type: str = "updated",
    resource_data: Any = None,
) -> dict[str, Any]:
    """A notification callbot does not model (it becomes an ``UnknownNotification``).

    ``subpath`` follows the call's path (``"/someFutureResource"``);
    ``resource_data`` is sent as given.
    """
    return _item(change_type, _call_path(call_id) + subpath, resource_data)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
