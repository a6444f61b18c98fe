"""How calls and notifications are written into a shared store, and read back.

A notification is kept as Graph sent it (the item's raw JSON, in an envelope
with its tenant), and is parsed again by whichever instance runs it: the
parser stays the one authority on what an item means, and instances of
different callbot versions read each other's entries. Beside them, the inbox
holds what the bot itself knows of the call (that it placed the call, in which
tenant, and the bot's own participant id Graph's answer named; a transfer it
asked, and its target; that the instance keeping it alive stopped), each as one
tagged object (``{"fact": kind, "callId": ...}``), fed in its place among the
notifications.

A call record keeps what the sequencer needs to go on ordering the call (its
phase, state, roster, the digests of its last notifications and of its latest
roster, the number of the tone it expects next, whether it ended, whether the bot
placed it (until a state of it came), the transfers asked (each one's target, until
its failure is told) and up to which of them a ``transferring`` or a failure came,
how far its latest operations got) and the
call's merged snapshot, which carries ``chatInfo`` and ``meetingInfo`` so a
bot can rejoin a meeting after a restart. The roster's keys
are made again from its participants when a record is read, so a record written
by a version that keyed participants otherwise is diffed as if written by this one;
what the roster and snapshot take of the call's bytes is counted again from the record
as stored, as the sequencer counted it from the notifications.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from .. import events
from .._clock import from_wall_ms, wall_ms
from .._lifecycle import CallLife
from .._parse import parse_payload
from .._sequencing import (
    CallRecord,
    KeeperLeft,
    KeptOfRefused,
    OwnFact,
    Placed,
    TransferAsked,
    TransferRefused,
    entry_size,
    json_size,
    model_json,
    notification_digest,
    roster_key,
)
from ..models import Call as CallResource
from ..models import InvitationParticipantInfo, Participant

__all__ = [
    "RECORD_VERSION",
    "decode_entry",
    "decode_fact",
    "decode_record",
    "digest_of",
    "encode_entry",
    "encode_fact",
    "encode_record",
    "stored_proven",
]

RECORD_VERSION = 1
"""Written into each record; a record of another version is not trusted."""

# Entries were checked against max_json_depth on arrival; the envelope adds two levels.
_ENTRY_DEPTH = 1024


def digest_of(event: events.Event) -> str:
    """The hex digest two copies of one notification share (the sequencer's, in hex)."""
    return notification_digest(event).hex()


def _dumps(value: Any) -> str:
    """Compact JSON that reads back as ``value``: orjson's, at a tenth of json.dumps's cost
    (every notification is encoded), where it is exact."""
    try:
        data = orjson.dumps(value)
    except TypeError:
        data = b"null"  # integers beyond 64 bits and lone surrogates, which orjson refuses
    if b"null" in data:
        # orjson writes an infinite float (a literal like 1e400) as null: json keeps it, and
        # its ASCII escapes keep a lone surrogate encodable.
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True)
    return data.decode()


def encode_entry(event: events.Event) -> str:
    """An event as kept in a call's inbox: the raw item, in an envelope with its tenant."""
    envelope: dict[str, Any] = {"value": [event.raw]}
    if event.tenant_id is not None:
        envelope["tenantId"] = event.tenant_id
    return _dumps(envelope)


def decode_entry(text: str) -> events.Event:
    """The event an inbox entry holds (parsed again, as the receiver parsed it: with the
    tenant its token proved, whatever spelling the item gave it)."""
    envelope = json.loads(text)
    tenant = envelope.get("tenantId") if isinstance(envelope, dict) else None
    proven = tenant if isinstance(tenant, str) and tenant else None
    (event,) = parse_payload(envelope, max_depth=_ENTRY_DEPTH, tenant_id=proven)
    return event


_FACT = '{"fact":'
_PLACED_UNTAGGED = '{"placed":'
"""How the answer placing a call was kept before facts had one tagged form."""


def encode_fact(fact: OwnFact) -> str:
    """A fact the bot itself knows of a call, as kept in the call's inbox: in line with its
    notifications, so that whoever runs the call knows it before any notification appended
    after it. ``fact`` names its kind; a notification's envelope never starts with it."""
    body: dict[str, Any]
    if isinstance(fact, Placed):
        body = {"fact": "placed", "callId": fact.call_id}
        if fact.my_participant_id is not None:
            body["myParticipantId"] = fact.my_participant_id
        if fact.tenant_id is not None:
            body["tenantId"] = fact.tenant_id
    elif isinstance(fact, TransferAsked):
        body = {"fact": "transferAsked", "callId": fact.call_id}
        if fact.target is not None:
            body["target"] = _target_json(fact.target)
        if fact.ask is not None:
            body["ask"] = fact.ask
    elif isinstance(fact, TransferRefused):
        body = {"fact": "transferRefused", "callId": fact.call_id}
        if fact.ask is not None:
            body["ask"] = fact.ask
    elif isinstance(fact, KeptOfRefused):
        body = {"fact": "keptOfRefused", "callId": fact.call_id}
        body["digests"] = [digest.hex() for digest in fact.digests]
    else:
        body = {"fact": "keeperLeft", "callId": fact.call_id}
    return _dumps(body)


def decode_fact(text: str) -> OwnFact | None:
    """The fact an entry ``encode_fact`` wrote; ``None`` for a notification. Raises
    ``ValueError`` for a kind this version does not know (a later one wrote it)."""
    if text.startswith(_FACT):
        body = json.loads(text)
        kind, call_id = body["fact"], str(body["callId"])
        if kind == "placed":
            return Placed(
                call_id,
                _text_or_none(body.get("myParticipantId")),
                _text_or_none(body.get("tenantId")),
            )
        if kind == "transferAsked":
            return TransferAsked(
                call_id, _target(body.get("target")), _text_or_none(body.get("ask"))
            )
        if kind == "transferRefused":
            return TransferRefused(call_id, _text_or_none(body.get("ask")))
        if kind == "keeperLeft":
            return KeeperLeft(call_id)
        if kind == "keptOfRefused":
            return KeptOfRefused(call_id, tuple(bytes.fromhex(d) for d in body["digests"]))
        raise ValueError(f"an inbox fact of a kind this version does not know: {kind!r}")
    if text.startswith(_PLACED_UNTAGGED):
        placed = json.loads(text)["placed"]
        return Placed(str(placed["callId"]), str(placed["myParticipantId"]))
    return None


def _target_json(target: InvitationParticipantInfo) -> Any:
    """A transfer's target as kept: its wire form (``transferTarget``)."""
    return target.model_dump(mode="json", by_alias=True, exclude_unset=True)


def _target(stored: Any) -> InvitationParticipantInfo | None:
    """A transfer's target as kept; ``None`` when it was written without one (a release
    that did not keep targets, or one whose failure was told already)."""
    return None if stored is None else InvitationParticipantInfo.model_validate(stored)


def _text_or_none(value: Any) -> str | None:
    """A fact's optional id: ``None`` when the fact was written without it."""
    return None if value is None else str(value)


def encode_record(record: CallRecord) -> str:
    """A call record as JSON (what is held or backlogged is not kept: the inbox has it)."""
    head = {
        "version": RECORD_VERSION,
        "call_id": record.call_id,
        "phase": record.phase,
        "state": record.state,
        "ended": record.closed,
        "proven": record.life.proven,
        "roster_sequence": record.roster_sequence,
        "tone_next": record.tone_next,
        # Read by instances of the previous release during a rolling upgrade.
        "transfers": record.life.transfers,
        "transfer_targets": [
            None if target is None else _target_json(target)
            for target in record.life.transfer_targets
        ],
        "transfers_told": record.transfers_told,
        "transferring_told": record.transferring_told,
        "latest": {kind: digest.hex() for kind, digest in record.latest.items()},
        # Read by instances of the previous release during a rolling upgrade.
        "roster_digest": digest.hex() if (digest := record.latest.get("roster")) else None,
        "seen": [digest.hex() for digest in record.seen],
        "operations": record.operations,
    }
    if record.roster_floor is not None:
        head["roster_floor"] = record.roster_floor  # only a call with numbered whole rosters
    if record.roster_changed:
        head["roster_changed"] = record.roster_changed  # only a call with delta rosters has it
    if record.life.last_ask is not None:
        head["last_ask"] = record.life.last_ask  # only while a transfer asked is counted
    if record.life.withdrawn is not None:
        head["withdrawn"] = record.life.withdrawn  # only a call a transfer was withdrawn on
    if record.transferring_at is not None and record.life.state == "transferring":
        # Whether an update came within reorder_window of it, judged by whoever runs the call next.
        head["transferring_at"] = wall_ms(record.transferring_at)
    if record.placed and record.life.state is None:
        # Only until a state comes (then its phase says it): the next run holds its news.
        head["placed"] = True
    if record.told_full:
        head["told_full"] = True  # the call's call_record_full line is not written again
    if record.resent:
        # only a call with a request refused in part, until Graph sent it again
        head["resent"] = [[digest.hex(), left] for digest, left in record.resent.items()]
    # Models serialize themselves (faster than going through Python dicts).
    snapshot = "null" if record.snapshot is None else model_json(record.snapshot)
    roster = ",".join(f"{json.dumps(key)}:{model_json(p)}" for key, p in record.roster.items())
    try:
        # no floats in the head: orjson's null is always None here
        opened = orjson.dumps(head).decode()
    except TypeError:  # a lone surrogate in an id or state, which orjson refuses
        opened = json.dumps(head, separators=(",", ":"), ensure_ascii=True)
    opening = opened[:-1]  # without its closing brace
    return f'{opening},"snapshot":{snapshot},"roster":{{{roster}}}}}'


def decode_record(text: str) -> CallRecord | None:
    """The record ``encode_record`` wrote; ``None`` for one of another version."""
    body = json.loads(text)
    if not isinstance(body, dict) or body.get("version") != RECORD_VERSION:
        return None
    snapshot = body.get("snapshot")
    targets = _targets(body)
    transfers = len(targets)
    # Written without it: the transfers asked are taken as seen, so no failure waits.
    transferring_told = _number(body.get("transferring_told"))
    roster = _roster(body.get("roster") or {})
    record = CallRecord(
        CallLife(
            str(body["call_id"]),
            phase=int(body["phase"]),
            state=body.get("state"),
            ended=bool(body.get("ended")),
            transfer_targets=targets,
            last_ask=_text_or_none(body.get("last_ask")),
            withdrawn=_text_or_none(body.get("withdrawn")),
            proven=_proven(body),
        ),
        closed=bool(body.get("ended")),
        snapshot=None if snapshot is None else CallResource.model_validate(snapshot),
        roster={key: participant for key, (participant, _) in roster.items()},
        roster_sizes={key: size for key, (_, size) in roster.items()},
        roster_bytes=sum(size for _, size in roster.values()),
        snapshot_bytes=0 if snapshot is None else json_size(snapshot),
        told_full=bool(body.get("told_full")),
        placed=body.get("placed") is True,
        roster_sequence=body.get("roster_sequence"),
        roster_floor=_number(body.get("roster_floor")),
        tone_next=_number(body.get("tone_next")),
        transfers_told=_number(body.get("transfers_told")) or 0,
        transferring_told=transfers if transferring_told is None else transferring_told,
        latest={kind: bytes.fromhex(digest) for kind, digest in _latest(body).items()},
    )
    for digest in body.get("seen") or ():
        record.seen.add(bytes.fromhex(digest))
    record.operations = _numbers_by_key(body.get("operations"))
    record.roster_changed = _numbers_by_key(body.get("roster_changed"))
    record.resent = {bytes.fromhex(digest): int(left) for digest, left in body.get("resent") or ()}
    transferring_at = _number(body.get("transferring_at"))
    if transferring_at is not None:
        record.transferring_at = from_wall_ms(transferring_at)
    return record


def stored_proven(text: str) -> bool:
    """Whether the record ``encode_record`` wrote holds its call proven (only that read: an
    unreadable record counts as proven, so a real call's is never taken for invented)."""
    try:
        body = json.loads(text)
    except ValueError:
        return True
    return not isinstance(body, dict) or _proven(body)


def _proven(body: dict[str, Any]) -> bool:
    # Written before calls were proven: it was kept as a live call, and still is.
    return bool(body.get("proven", True))


def _targets(body: dict[str, Any]) -> list[InvitationParticipantInfo | None]:
    """The target of each transfer asked on the call; a record written before targets were
    kept counts its transfers only, and their failures name none."""
    stored = body.get("transfer_targets")
    if isinstance(stored, list):
        return [_target(target) for target in stored]
    return [None] * (_number(body.get("transfers")) or 0)


def _number(value: Any) -> int | None:
    """An integer the record kept; ``None`` for one written before it was kept."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _numbers_by_key(stored: Any) -> dict[str, int]:
    """A number by key, in the order kept (how far each operation got, the delta roster that
    last changed each participant); none for a record written before it was kept (an
    operation's progress after its outcome, or a late delta, then goes as before)."""
    if not isinstance(stored, dict):
        return {}
    return {str(key): step for key, step in stored.items() if _number(step) is not None}


def _latest(body: dict[str, Any]) -> dict[str, str]:
    """The latest digests by kind; a record written before content sharing had one keeps
    its roster's under ``roster_digest``."""
    latest = body.get("latest")
    if isinstance(latest, dict):
        return latest
    roster = body.get("roster_digest")
    return {"roster": roster} if roster else {}


def _roster(stored: dict[str, Any]) -> dict[str, tuple[Participant, int]]:
    """A stored roster keyed again as the sequencer keys it now, whatever form wrote it,
    with what each participant takes of the call's bytes."""
    roster: dict[str, tuple[Participant, int]] = {}
    for key, value in stored.items():
        participant = Participant.model_validate(value)
        # One named by nothing keeps its stored key: its place in the roster it came in.
        kept = roster_key(participant) or str(key)
        roster[kept] = participant, entry_size(kept, value)
    return roster
