"""What a shared store holds, as earlier releases wrote it, read by this one.

During a rolling upgrade, instances of two releases share one Redis: a call's
record and its inbox entries written by the older release are read by the newer
(and the other way round). ``fixtures/store/`` keeps what releases wrote for
three calls recorded from a live Teams tenant, a record after each notification
and the inbox entry of each: one file per form of the record, named by the
commit that wrote it, never edited. This release must carry every such call on
from any of those records exactly as if it had run the call from the start, and
must still write the newest form (a change to it is a new form: add a reader for
the old one, then a file of what the new one writes, with ``write_generation``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from callbot import events
from callbot._ids import id_key
from callbot._lifecycle import Lifecycle, phase_of_state
from callbot._parse import parse_payload
from callbot._sequencing import Delivery, Placed, Sequencer, TransferAsked, TransferRefused
from callbot.models import InvitationParticipantInfo
from callbot.store._codec import (
    decode_entry,
    decode_fact,
    decode_record,
    encode_entry,
    encode_fact,
    encode_record,
)

from .conftest import FIXTURES

STORED = FIXTURES / "store"
GENERATIONS = sorted(STORED.glob("written-by-*.json"))
NEWEST = STORED / "written-by-642061e.json"
"""The form this release writes."""

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
PLACED_AS = "bot-participant-1"
"""The bot's own participant id Graph's answer named, for the call the bot placed."""
TRANSFER_ASKED_AFTER = 2
"""In the call the bot placed, its handler asks a transfer after the third notification."""
TRANSFER_FAILED_AT = 4
"""In the call the bot placed, the fifth notification tells that transfer's failure."""
TRANSFER_TARGET = InvitationParticipantInfo.model_validate(
    {
        "@odata.type": "#microsoft.graph.invitationParticipantInfo",
        "identity": {"user": {"id": "agent-id", "displayName": "Agent"}},
    }
)
"""Whom that transfer was asked to."""
TRANSFER_ASK = "ask-1"
"""What names that ask (for a refusal of it)."""

TONE = "sb04-p2p-simpletest-p2ptest1event4tonepress.json"
ESTABLISHED_WITH_AUDIO = "sb03-p2p-simpletest-p2ptest1event3callestablishedwithaudio.json"
TRANSFER_FAILED = {
    "@odata.type": "#microsoft.graph.resultInfo",
    "code": 500,
    "subcode": 7000,
    "message": "Transfer failed.",
}
PROMPT_DONE = "sb05-p2p-simpletest-p2ptest1event5playpromptfinish.json"
Step = str | tuple[str, str, dict[str, Any]]
"""A recorded file, or one changed: its ``changeType`` and fields of its resourceData."""

FLOWS: dict[str, list[Step]] = {
    "p2p-placed-tone-prompt-hangup": [
        "sb01-p2p-simpletest-p2ptest1event1callestablishing.json",
        "sb02-p2p-simpletest-p2ptest1event2callestablished.json",
        ESTABLISHED_WITH_AUDIO,  # then the bot asks a transfer
        (ESTABLISHED_WITH_AUDIO, "updated", {"state": "transferring"}),
        (ESTABLISHED_WITH_AUDIO, "updated", {"resultInfo": TRANSFER_FAILED}),
        TONE,  # numbered 6
        (TONE, "updated", {"toneInfo": {"sequenceId": 8, "tone": "tone3"}}),  # waits for 7
        (TONE, "updated", {"toneInfo": {"sequenceId": 7, "tone": "tone2"}}),
        PROMPT_DONE,
        (PROMPT_DONE, "updated", {"status": "running"}),  # its progress, after its outcome
        "sb06-p2p-simpletest-p2ptest1event6hangup.json",
    ],
    "p2p-chat-info-roster": [
        "sb07-p2p-callupdates-p2ptest2event1establishing.json",
        "sb08-p2p-callupdates-p2ptest2event2established.json",
        "sb09-p2p-callupdates-p2ptest2event3updatedwithmediastate.json",
        "sb10-p2p-callupdates-p2ptest2event4updatedwithchatinfo.json",
        "sb11-p2p-callupdates-p2ptest2event5updatedwithrandomshit.json",
        "sb12-p2p-callupdates-p2ptest2event6userjoin.json",
    ],
    "group-call": [
        "sb13-groupcalls-groupcallestablishing.json",
        "sb14-groupcalls-groupcallestablished.json",
        "sb15-groupcalls-groupcallbotjoin.json",
        "sb16-groupcalls-groupcalluserjoin.json",
        "sb17-groupcalls-groupcallend.json",
    ],
}
"""The steps every file in ``fixtures/store`` was written from: frozen with them."""
HOLDING = {("p2p-placed-tone-prompt-hangup", 7)}
"""Where a run stops with a notification held (tone 8, waiting for 7): not a checkpoint the
record alone carries on from (the inbox hands the held one over again), so not cut there."""
TARGETS_UNKNOWN = {"written-by-43b44af.json", "written-by-1693383.json"}
"""Records written before a transfer's target was kept: a failure told after a takeover
between the transfer and its failure names no target."""
PROOF_UNKNOWN = {"written-by-43b44af.json", "written-by-1693383.json", "written-by-3f6d113.json"}
"""Records written before a call was kept pending until proven real (Graph accepted a request
of the bot's own on it): each call they hold was kept as a live one."""
PROGRESS_UNKNOWN = {("written-by-43b44af.json", "p2p-placed-tone-prompt-hangup", 9)}
"""A record written before how far operations got was kept (docs/scaling.md, rolling
upgrade): an operation's progress arriving after its outcome goes on to handlers."""
FACTS = (
    Placed("c-1", "me-1", "t-1"),
    Placed("c-1", None, "t-1"),
    TransferAsked("c-1"),
    TransferRefused("c-1"),
    TransferAsked("c-1", TRANSFER_TARGET),
    TransferAsked("c-1", TRANSFER_TARGET, TRANSFER_ASK),
    TransferRefused("c-1", TRANSFER_ASK),
)


def sequencer(out: list[Delivery]) -> Sequencer:
    # A window no step reaches: the calls come in order, so nothing is ever held for it.
    return Sequencer(out.append, Lifecycle(termination_grace=30), reorder_window=300)


def run_step(seq: Sequencer, flow: str, step: int, event: events.Event) -> None:
    """Feed one notification of ``flow`` as the bot's first run did, with what the bot
    itself did around it (placing the call, asking a transfer)."""
    placed = flow.startswith("p2p-placed")
    if placed and step == 0:
        seq.placed(event.call_id, PLACED_AS, TENANT)
    seq.accept(event)
    if placed and step == TRANSFER_ASKED_AFTER:
        seq.lifecycle.transfer_asked(event.call_id, TRANSFER_TARGET, TRANSFER_ASK)


def write_generation() -> dict[str, Any]:
    """What this release stores for the recorded calls: a file for ``fixtures/store``
    (called in a running event loop, as the sequencer is)."""
    stored: dict[str, Any] = {"flows": {}, "facts": [encode_fact(fact) for fact in FACTS]}
    for flow, steps in FLOWS.items():
        seq = sequencer([])
        entries, records = [], []
        for step, spec in enumerate(steps):
            (event,) = parse_payload(body_of(spec), tenant_id=TENANT)
            entries.append(encode_entry(event))
            run_step(seq, flow, step, event)
            record = seq.record(id_key(event.call_id))
            assert record is not None
            records.append(encode_record(record))
        seq.close()
        stored["flows"][flow] = {"steps": steps, "entries": entries, "records": records}
    return stored


def body_of(step: Step) -> dict[str, Any]:
    """The notification a step of a call is: a recorded one, changed as the step says."""
    name, change_type, fields = (step, None, {}) if isinstance(step, str) else step
    body: dict[str, Any] = json.loads((FIXTURES / "recorded" / name).read_text(encoding="utf-8"))
    item = body["value"][0]
    if change_type is not None:
        item["changeType"] = change_type
    for key, value in fields.items():
        old = item["resourceData"].get(key)
        item["resourceData"][key] = {**old, **value} if isinstance(old, dict) else value
    return body


def what_handlers_see(delivery: Delivery) -> dict[str, Any]:
    """Everything of a delivery a handler reads."""
    event = delivery.event
    return {
        "event": event.model_dump(mode="json", exclude={"raw"}),
        "type": type(event).__name__,
        "snapshot": (
            None
            if delivery.snapshot is None
            else delivery.snapshot.model_dump(mode="json", by_alias=True, exclude_unset=True)
        ),
        "roster": {
            key: p.model_dump(mode="json", by_alias=True, exclude_unset=True)
            for key, p in delivery.roster.items()
        },
        "life": (delivery.life.phase, delivery.life.state, delivery.life.ended),
    }


def load(path: Path) -> dict[str, Any]:
    stored: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return stored


def cuts() -> list[tuple[Path, str, int]]:
    """Every (form, call, number of notifications its first run had fed) to carry on from."""
    return [
        (path, flow, fed)
        for path in GENERATIONS
        for flow, steps in FLOWS.items()
        for fed in range(1, len(steps))
        if (flow, fed) not in HOLDING
    ]


def test_every_form_of_the_record_is_kept() -> None:
    assert NEWEST in GENERATIONS
    assert len(GENERATIONS) >= 2
    for path in GENERATIONS:
        assert set(load(path)["flows"]) == set(FLOWS), path.name


@pytest.mark.parametrize(
    ("path", "flow", "fed"), cuts(), ids=lambda v: v.name if isinstance(v, Path) else str(v)
)
async def test_a_call_stored_by_an_earlier_release_goes_on_as_if_never_stored(
    path: Path, flow: str, fed: int
) -> None:
    """An instance of this release takes the call over from the record an earlier one
    checkpointed after ``fed`` notifications, and runs the inbox entries after them: its
    handlers see what they would have seen had this release run the call from the start."""
    stored = load(path)["flows"][flow]
    entries = [decode_entry(text) for text in stored["entries"]]
    # The last entry fed comes again: its acknowledgement was lost with the first run.
    again = [*entries[:fed], entries[fed - 1], *entries[fed:]]
    whole: list[Delivery] = []
    seq = sequencer(whole)
    before = 0
    for step, event in enumerate(again):
        if step == fed:
            before = len(whole)
            seq.accept(event)
        else:
            run_step(seq, flow, step if step < fed else step - 1, event)
    seq.close()
    expected = [what_handlers_see(d) for d in whole[before:]]
    record = decode_record(stored["records"][fed - 1])
    assert record is not None, "an earlier release's record is not read"
    carried: list[Delivery] = []
    other = sequencer(carried)
    other.adopt(record)
    other.accept(entries[fed - 1])
    for step in range(fed, len(entries)):
        run_step(other, flow, step, entries[step])
    other.close()
    assert expected, "the rest of the call gives its handlers nothing to compare"
    seen = [what_handlers_see(d) for d in carried]
    if (path.name, flow, fed) in PROGRESS_UNKNOWN:
        late = [
            s for s in seen if s["type"] == "OperationUpdated" and s["event"]["status"] == "running"
        ]
        assert len(late) == 1
        seen.remove(late[0])
    placed = flow.startswith("p2p-placed")
    if path.name in TARGETS_UNKNOWN and placed and TRANSFER_ASKED_AFTER < fed <= TRANSFER_FAILED_AT:
        (failure,) = [s for s in expected if s["event"].get("transfer_failed")]
        assert failure["event"]["transfer_target"] == TRANSFER_TARGET.model_dump(mode="json")
        failure["event"]["transfer_target"] = None  # the record did not keep it
    assert seen == expected


async def test_the_calls_are_cut_where_nothing_waits() -> None:
    """Each checkpoint carried on from leaves nothing held; the one that does is left out."""
    for flow, steps in FLOWS.items():
        seq = sequencer([])
        for step, spec in enumerate(steps):
            (event,) = parse_payload(body_of(spec), tenant_id=TENANT)
            run_step(seq, flow, step, event)
            record = seq.record(id_key(event.call_id))
            assert record is not None
            assert bool(record.held) == ((flow, step + 1) in HOLDING), (flow, step)
        seq.close()


@pytest.mark.parametrize("path", GENERATIONS, ids=lambda p: p.name)
async def test_a_call_stored_before_calls_were_proven_goes_on_as_a_live_call(path: Path) -> None:
    """A call the previous release kept as a live one is taken over as one: not pending,
    never let go as an id a sender invented. This release stores whether the call is proven
    (the call the bot placed is; the others never saw a request of the bot's own)."""
    for flow, stored in load(path)["flows"].items():
        proven = path.name in PROOF_UNKNOWN or flow.startswith("p2p-placed")
        for text in stored["records"]:
            record = decode_record(text)
            assert record is not None
            seq = sequencer([])
            seq.adopt(record)
            life = seq.lifecycle.get(record.call_id)
            assert life is not None
            assert life.proven is proven, (flow, record.state)
            ringing = record.phase < phase_of_state("establishing")
            assert life.pending is (not proven or ringing), (flow, record.state)
            seq.close()


@pytest.mark.parametrize("path", GENERATIONS, ids=lambda p: p.name)
def test_entries_and_facts_an_earlier_release_wrote_are_read(path: Path) -> None:
    stored = load(path)
    for flow, written in stored["flows"].items():
        for spec, text in zip(FLOWS[flow], written["entries"], strict=True):
            (event,) = parse_payload(body_of(spec), tenant_id=TENANT)
            assert decode_entry(text) == event, (flow, spec)
            assert decode_fact(text) is None
    # An earlier release wrote the facts it knew, those first.
    assert tuple(decode_fact(text) for text in stored["facts"]) == FACTS[: len(stored["facts"])]


async def test_this_release_writes_the_newest_form() -> None:
    """An instance of the previous release reads what this one writes only if the form is
    one it knows: a change here must keep the old form readable and add a file."""
    written = write_generation()
    newest = load(NEWEST)
    assert written["facts"] == newest["facts"]
    for flow, stored in newest["flows"].items():
        again = written["flows"][flow]
        assert again["entries"] == stored["entries"], flow
        assert [_timeless(r) for r in again["records"]] == [
            _timeless(r) for r in stored["records"]
        ], flow


def _timeless(text: str) -> dict[str, Any]:
    """A record as JSON, with when its ``transferring`` came (the wall clock, a time of the run
    that wrote it) only said to be there."""
    record: dict[str, Any] = json.loads(text)
    at = record.pop("transferring_at", None)
    if at is not None:
        assert isinstance(at, int)
        record["transferring_at"] = "a time"
    return record


async def test_a_placed_call_stored_before_any_state_holds_its_news_on_the_next_run() -> None:
    """A call the bot placed, stored before Graph posted any state of it (the instance that
    placed it stopped, or gave the call up once the answer was noted), is still being set up
    for whoever runs it next: a roster arriving before its states waits for ``established``
    there too."""
    establishing, established, roster, *_ = FLOWS["group-call"]
    steps = [
        parse_payload(body_of(step), tenant_id=TENANT)[0]
        for step in (roster, establishing, established)
    ]
    call_id = steps[0].call_id
    first = sequencer([])
    first.placed(call_id, PLACED_AS, TENANT)
    record = first.record(id_key(call_id))
    assert record is not None
    stored = encode_record(record)
    first.close()
    assert json.loads(stored)["placed"] is True
    out: list[Delivery] = []
    seq = sequencer(out)
    adopted = decode_record(stored)
    assert adopted is not None
    seq.adopt(adopted)
    for event in steps:
        seq.accept(event)
    seq.close()
    seen = [(type(d.event).__name__, d.snapshot.state if d.snapshot else None) for d in out]
    assert seen == [
        ("CallStateChanged", "establishing"),
        ("CallStateChanged", "established"),
        ("ParticipantsUpdated", "established"),
    ]
    # Once a state came, its phase says the call is being set up: nothing more is written.
    assert "placed" not in json.loads(encode_record(adopted))
