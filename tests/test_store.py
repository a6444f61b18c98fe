"""The store interface without a server: the memory store, the codec, the new hooks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from callbot import Call, ConfigurationError, Settings, events, models
from callbot._dispatch import Dispatcher, HandlerRegistry, _Slots
from callbot._errors import MalformedNotification
from callbot._ids import id_key
from callbot._lifecycle import CallLife, Lifecycle
from callbot._parse import parse_payload
from callbot._sequencing import (
    CallRecord,
    Delivery,
    KeptOfRefused,
    Placed,
    Sequencer,
    TransferAsked,
    TransferRefused,
    notification_digest,
)
from callbot.graph import CallServices
from callbot.store import MemoryStore, Store, open_store
from callbot.store._codec import (
    decode_entry,
    decode_fact,
    decode_record,
    encode_entry,
    encode_fact,
    encode_record,
)
from callbot.store._redis import _after
from callbot.testing import builders as b

from .conftest import Clock, until


def one(item: dict[str, Any], tenant: str | None = None) -> events.Event:
    body = b.notifications(item)
    if tenant is not None:
        body["tenantId"] = tenant
    (event,) = parse_payload(body)
    return event


def test_settings_name_the_store_and_its_lease() -> None:
    env = {"CALLBOT_STORE": "redis://127.0.0.1:6379/0", "CALLBOT_STORE_LEASE": "2.5"}
    settings = Settings.from_env(env)
    assert settings.store == "redis://127.0.0.1:6379/0"
    assert settings.store_lease == 2.5
    with pytest.raises(ConfigurationError, match="CALLBOT_STORE"):
        Settings(store="postgres://db")
    with pytest.raises(ConfigurationError, match="store_lease"):
        Settings(store_lease=0)
    assert Settings.from_env({"CALLBOT_STORE_REPLICAS": "1"}).store_replicas == 1
    with pytest.raises(ConfigurationError, match="CALLBOT_STORE_REPLICAS"):
        Settings(store_replicas=-1)
    with pytest.raises(ConfigurationError, match="not a Cluster"):
        Settings(store="redis+cluster://127.0.0.1:7000", store_replicas=1)


async def test_the_default_store_is_memory_and_behaves_as_before() -> None:
    settings = Settings(app_id="a", reorder_window=5)
    services = CallServices(settings)
    lifecycle = Lifecycle(termination_grace=settings.termination_grace)
    delivered: list[Delivery] = []

    class Capture(Dispatcher):
        def submit(self, delivery: Delivery, done: object = None) -> None:
            delivered.append(delivery)

    dispatcher = Capture(HandlerRegistry(), handle_for(services))
    store: Store = open_store(
        settings, dispatcher=dispatcher, lifecycle=lifecycle, outcomes=services
    )
    assert isinstance(store, MemoryStore)
    assert store.reachable
    await store.start()
    await store.ingest([one(b.call_state("c", "established"))])
    assert delivered == []  # held, as the sequencer always did
    await store.ingest([one(b.call_state("c", "establishing"))])
    assert [getattr(d.event, "state", None) for d in delivered] == ["establishing", "established"]
    assert [life.call_id for life in lifecycle.active()] == ["c"]
    assert store.counts["held"] == 1
    await store.drain(1.0)
    await store.close()
    await services.close()


def test_a_record_survives_the_round_trip() -> None:
    snapshot = models.Call.model_validate(
        {
            "@odata.type": "#microsoft.graph.call",
            "state": "established",
            "direction": "outgoing",
            "chatInfo": {"threadId": "19:meeting_abc@thread.v2", "messageId": "0"},
            "meetingInfo": {
                "@odata.type": "#microsoft.graph.organizerMeetingInfo",
                "organizer": {"user": {"id": "u1", "displayName": "Org"}},
            },
            "futureProperty": {"kept": True},
        }
    )
    record = CallRecord(CallLife("Call-1", phase=3, state="established"), snapshot=snapshot)
    record.roster = {"alice": b.participant("alice", muted=True)}
    record.roster_sequence = 4
    record.roster_changed = {"alice": 4, "bob": 2}
    record.roster_floor = 3
    record.tone_next = 8
    record.seen.update(dict.fromkeys([b"\x01" * 16, b"\x02" * 16]))
    record.latest = {"roster": b"\x03" * 16, "sharing": b"\x04" * 16}
    assert "resent" not in json.loads(encode_record(record))  # only while copies are to come
    record.resent = {b"\x05" * 16: 2, b"\x06" * 16: 1}
    copy = decode_record(encode_record(record))
    assert copy is not None
    assert (copy.call_id, copy.phase, copy.state, copy.closed) == (
        "Call-1",
        3,
        "established",
        False,
    )
    assert copy.snapshot == snapshot
    assert copy.snapshot is not None
    assert copy.snapshot.chat_info is not None
    assert copy.snapshot.chat_info.thread_id == "19:meeting_abc@thread.v2"
    assert isinstance(copy.snapshot.meeting_info, models.OrganizerMeetingInfo)
    assert copy.snapshot.model_extra == {"futureProperty": {"kept": True}}
    assert copy.roster == record.roster
    assert copy.roster_sequence == 4
    assert list(copy.roster_changed.items()) == [("alice", 4), ("bob", 2)]
    assert copy.roster_floor == 3
    assert copy.tone_next == 8
    assert list(copy.seen) == list(record.seen)
    assert copy.latest == record.latest
    assert list(copy.resent.items()) == list(record.resent.items())
    # An instance of the previous release reads the roster's under its old name.
    assert json.loads(encode_record(record))["roster_digest"] == (b"\x03" * 16).hex()
    assert decode_record('{"version": 999}') is None


async def test_a_record_read_back_counts_its_bytes_as_the_sequencer_did() -> None:
    """Whichever instance carries a call on counts its roster's bytes alike: from the record
    as stored, as its sequencer counted them from the notifications."""
    seq = Sequencer(lambda delivery: None, Lifecycle(termination_grace=1.0))
    seq.accept(one(b.call_state("c", "establishing")))
    seq.accept(one(b.call_state("c", "established")))
    people = [b.participant("alice", display_name="Alice"), b.participant("bob", muted=True)]
    seq.accept(one(b.roster("c", people)))
    record = seq.record("c")
    assert record is not None
    assert record.roster_bytes > 0
    copy = decode_record(encode_record(record))
    assert copy is not None
    assert copy.roster_sizes == record.roster_sizes
    assert copy.roster_bytes == record.roster_bytes
    assert record.snapshot is not None
    written = record.snapshot.model_dump_json(exclude_unset=True, by_alias=True)
    assert copy.snapshot_bytes == len(written)
    # The call's call_record_full line, once written, is not written again by another.
    assert "told_full" not in json.loads(encode_record(record))
    record.told_full = True
    again = decode_record(encode_record(record))
    assert again is not None
    assert again.told_full
    seq.close()


def test_an_entry_is_the_notification_as_received() -> None:
    event = one(b.operation_update("c", "op-1", client_context="ctx"), tenant="t-1")
    again = decode_entry(encode_entry(event))
    assert again == event
    assert again.tenant_id == "t-1"


def test_what_the_bot_knows_of_a_call_is_kept_apart_from_notifications() -> None:
    """The bot's own facts about a call (Graph's answer placing it, with its tenant and the
    bot's participant when it names one; a transfer asked or refused) go into the call's
    inbox beside its notifications, each as one tagged object, and are never taken for one;
    an instance of an earlier release, reading every entry as a notification, refuses them
    (and logs and skips them) rather than misreading them."""
    facts = (
        Placed("c-1", "me-1", "t-1"),
        Placed("c-1", None, "t-1"),
        TransferAsked("c-1"),
        TransferRefused("c-1"),
        KeptOfRefused("c-1", (b"\x01" * 16, b"\x02" * 16)),
    )
    kinds = ("placed", "transferAsked", "transferRefused", "keptOfRefused")
    for fact in facts:
        text = encode_fact(fact)
        assert json.loads(text)["fact"] in kinds
        assert decode_fact(text) == fact
        with pytest.raises(MalformedNotification):
            decode_entry(text)
    event = one(b.incoming_call("c-1", my_participant_id="me-1"), tenant="t-1")
    assert decode_fact(encode_entry(event)) is None
    # The form the answer placing a call was kept in before facts were tagged.
    untagged = '{"placed":{"callId":"c-1","myParticipantId":"me-1"}}'
    assert decode_fact(untagged) == Placed("c-1", "me-1")
    with pytest.raises(ValueError, match="does not know"):
        decode_fact('{"fact":"somethingLater","callId":"c-1"}')


def taken_over(seq: Sequencer, call_key: str) -> tuple[Sequencer, list[Delivery]]:
    """Another sequencer (another instance) adopting the call's record as stored, and what
    it delivers; ``seq`` is closed."""
    record = seq.record(call_key)
    assert record is not None
    stored = encode_record(record)
    seq.close()
    later: list[Delivery] = []
    other = Sequencer(later.append, Lifecycle(termination_grace=30), reorder_window=5)
    restored = decode_record(stored)
    assert restored is not None
    other.adopt(restored)
    return other, later


async def test_the_bot_s_own_participant_id_in_a_placed_call_survives_a_takeover() -> None:
    """Kept in the stored snapshot: whoever takes the call over delivers it, before any
    notification of the call was delivered (nothing but the answer placing it) or after."""
    for before in ((), (b.call_state("c", "establishing"),)):
        first: list[Delivery] = []
        seq = Sequencer(first.append, Lifecycle(termination_grace=30), reorder_window=5)
        seq.placed("c", "me-1")
        for item in before:
            seq.accept(one(item))
        other, later = taken_over(seq, "c")
        other.accept(one(b.call_state("c", "establishing")))
        other.accept(one(b.call_state("c", "established")))
        assert [d.snapshot.my_participant_id for d in later if d.snapshot] == ["me-1"] * len(later)
        assert len(later) == 2 - len(before)
        other.close()


async def test_a_restored_record_orders_the_next_events() -> None:
    first: list[Delivery] = []
    seq = Sequencer(first.append, Lifecycle(termination_grace=30), reorder_window=5)
    # The roster first: one of a call establishing would wait for it to be established.
    for item in (b.roster("c", [b.participant("a")]), b.call_state("c", "establishing")):
        seq.accept(one(item))
    other, later = taken_over(seq, "c")
    other.accept(one(b.call_state("c", "establishing")))  # a repeat: dropped
    other.accept(one(b.call_state("c", "established")))  # predecessor known: not held
    other.accept(one(b.roster("c", [b.participant("a"), b.participant("b")])))
    assert other.counts["duplicate"] == 1
    assert [type(d.event).__name__ for d in later] == ["CallStateChanged", "ParticipantsUpdated"]
    state = later[0].event
    assert isinstance(state, events.CallStateChanged)
    assert state.previous_state == "establishing"
    roster = later[1].event
    assert isinstance(roster, events.ParticipantsUpdated)
    assert [p.id for p in roster.joined] == ["b"]
    assert other.evict("c") is not None
    assert other.record("c") is None
    other.close()


def agent(user_id: str) -> models.InvitationParticipantInfo:
    """A transfer's target: the user ``user_id``."""
    return models.InvitationParticipantInfo.model_validate({"identity": {"user": {"id": user_id}}})


def target_of(delivery: Delivery) -> models.InvitationParticipantInfo | None:
    """The target the delivered event names as its failed transfer's."""
    event = delivery.event
    assert isinstance(event, events.CallStateChanged | events.CallUpdated)
    return event.transfer_target


async def test_a_restored_record_knows_the_transfer_its_last_run_asked() -> None:
    """A handler hearing a transfer fail tries another target; that transfer fails as the
    first did (an update alone). The instance taking the call over next did not know the
    transfer was asked (the count was not stored): it dropped the failure as a repeat. Each
    failure names its own target, the second after the takeover too."""
    first: list[Delivery] = []
    calls = Lifecycle(termination_grace=30)
    seq = Sequencer(first.append, calls, reorder_window=5)
    why = models.ResultInfo(code=500, subcode=7000, message="Transfer failed.")
    failure = b.call_state("c", "established", result_info=why)
    for item in (b.call_state("c", "establishing"), b.call_state("c", "established")):
        seq.accept(one(item))
    calls.transfer_asked("c", agent("a"))
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(failure))
    assert [target_of(d) for d in first[2:]] == [None, agent("a")]
    calls.transfer_asked("c", agent("b"))  # its handler tries another target
    other, later = taken_over(seq, "c")
    other.accept(one(failure))  # the second transfer's failure, by the update alone
    other.accept(one(failure))  # Graph sent it twice
    other.release_all()  # its transferring never came within the window
    assert [type(d.event) for d in later] == [events.CallUpdated]
    assert [target_of(d) for d in later] == [agent("b")]
    assert other.counts["duplicate"] == 1
    other.close()


async def test_a_record_keeps_the_targets_of_transfers_whose_failure_waits_only() -> None:
    """The record keeps the target of each transfer asked until its failure is told (named
    once, no longer kept after: a call transferring again and again keeps a small record),
    and still counts every one. A record written before targets were kept counts its
    transfers: their failures are told, and name no target."""
    seq = Sequencer(lambda delivery: None, Lifecycle(termination_grace=30), reorder_window=300)
    why = models.ResultInfo(code=500, subcode=7000, message="Transfer failed.")
    for item in (b.call_state("c", "establishing"), b.call_state("c", "established")):
        seq.accept(one(item))
    seq.note(TransferAsked("c", agent("a")))
    seq.note(TransferAsked("c", agent("b")))
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(b.call_state("c", "established", result_info=why)))  # a's failure
    record = seq.record("c")
    assert record is not None
    stored = json.loads(encode_record(record))
    assert stored["transfers"] == 2  # as the previous release reads it
    assert stored["transfer_targets"] == [
        None,
        agent("b").model_dump(mode="json", by_alias=True, exclude_unset=True),
    ]
    older = {key: value for key, value in stored.items() if key != "transfer_targets"}
    for text, named in ((json.dumps(stored), agent("b")), (json.dumps(older), None)):
        later: list[Delivery] = []
        other = Sequencer(later.append, Lifecycle(termination_grace=30), reorder_window=300)
        restored = decode_record(text)
        assert restored is not None
        other.adopt(restored)
        assert restored.life.transfers == 2
        other.accept(one(b.call_state("c", "transferring")))
        other.accept(one(b.call_state("c", "established", result_info=why)))  # b's failure
        assert [target_of(d) for d in later] == [None, named]
        back = later[-1].event
        assert isinstance(back, events.CallStateChanged)
        assert back.transfer_failed
        other.close()
    seq.close()


async def test_a_restored_record_knows_the_transferring_its_last_run_saw() -> None:
    """A transfer's failure waits for that transfer's ``transferring``: the instance taking
    the call over between the two must know the ``transferring`` came, or the failure waits
    a window for it. A record written without it waits for none (as before it was kept)."""
    first: list[Delivery] = []
    seq = Sequencer(first.append, Lifecycle(termination_grace=30), reorder_window=300)
    for item in (b.call_state("c", "establishing"), b.call_state("c", "established")):
        seq.accept(one(item))
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(b.call_state("c", "transferring")))
    record = seq.record("c")
    assert record is not None
    stored = encode_record(record)
    older = json.loads(stored)
    del older["transferring_told"]
    why = models.ResultInfo(code=500, subcode=7000, message="Transfer failed.")
    failure = b.call_state("c", "established", result_info=why)
    for text in (stored, json.dumps(older)):
        later: list[Delivery] = []
        other = Sequencer(later.append, Lifecycle(termination_grace=30), reorder_window=300)
        restored = decode_record(text)
        assert restored is not None
        other.adopt(restored)
        other.accept(one(failure))
        (back,) = later
        assert isinstance(back.event, events.CallStateChanged)
        assert back.event.previous_state == "transferring"
        other.close()
    seq.close()


async def test_a_call_back_in_the_process_that_lost_it_counts_each_transfer_once() -> None:
    """With a shared store a transfer asked is a fact in the call's inbox, counted as the
    call's run feeds it. A run that fed some past its last checkpoint, then lost the call,
    feeds them again when the call comes back to the same process: its life kept the count
    it had reached, and the transfers were counted twice. The first transfer's failure then
    waited for a ``transferring`` that had come."""
    delivered: list[Delivery] = []
    seq = Sequencer(delivered.append, Lifecycle(termination_grace=30), reorder_window=300)
    for item in (b.call_state("c", "establishing"), b.call_state("c", "established")):
        seq.accept(one(item))
    seq.note(TransferAsked("c"))
    seq.accept(one(b.call_state("c", "transferring")))
    record = seq.record("c")
    assert record is not None
    checkpoint = encode_record(record)
    why = models.ResultInfo(code=500, subcode=7000, message="Transfer failed.")
    failure = b.call_state("c", "established", result_info=why)
    # Fed past the checkpoint, never acknowledged: the run lost the call here.
    seq.accept(one(failure))
    seq.note(TransferAsked("c"))
    seq.evict("c")
    delivered.clear()
    restored = decode_record(checkpoint)
    assert restored is not None
    seq.adopt(restored)  # the same process runs the call again, from the checkpoint
    seq.accept(one(failure))
    assert [d.event.state for d in delivered if isinstance(d.event, events.CallStateChanged)] == [
        "established"
    ]  # at once: its transferring came before the checkpoint
    seq.note(TransferAsked("c"))
    seq.accept(one(failure))  # the second transfer fails as the first did, by the update alone
    seq.release_all()  # its transferring never came
    seq.accept(one(failure))  # Graph sent it twice
    assert [type(d.event) for d in delivered] == [events.CallStateChanged, events.CallUpdated]
    assert seq.counts["duplicate"] == 1
    seq.close()


async def test_a_record_written_with_older_roster_keys_diffs_as_before() -> None:
    ann = {"id": "ann", "info": {"identity": {"user": {"id": "u1", "displayName": "Ann"}}}}
    bob = {
        "@odata.id": "/app/calls/c/participants/P-2",
        "info": {"identity": {"user": {"id": "u2", "displayName": "Bob"}}},
    }
    cat_info = {"identity": {"user": {"id": "u3", "displayName": "Cat"}}, "languageId": "en-US"}
    dump = models.ParticipantInfo.model_validate(cat_info).model_dump(mode="json")
    stored = {
        "version": 1,
        "call_id": "c",
        "phase": 3,
        "state": "established",
        "ended": False,
        "roster_sequence": None,
        "roster_digest": None,
        "seen": [],
        "snapshot": None,
        # Keys as earlier versions wrote them: by id, by path, by the whole info.
        "roster": {
            "ann": ann,
            "odata:/app/calls/c/participants/p-2": bob,
            "info:" + json.dumps(dump, sort_keys=True): {"info": cat_info},
        },
    }
    record = decode_record(json.dumps(stored))
    assert record is not None
    out: list[Delivery] = []
    seq = Sequencer(out.append, Lifecycle(termination_grace=30), reorder_window=5)
    seq.adopt(record)
    now = [ann, {**bob, "id": "P-2"}, {"info": {**cat_info, "languageId": "de-DE"}}]
    seq.accept(one(b.roster("c", [models.Participant.model_validate(p) for p in now])))
    (delivery,) = out
    roster = delivery.event
    assert isinstance(roster, events.ParticipantsUpdated)
    assert (roster.joined, roster.left) == ([], [])
    # Bob's id was the one ending his path already: the same participant, unchanged.
    assert [p.display_name for p in roster.updated] == ["Cat"]
    seq.close()


async def test_a_record_written_before_deltas_were_tracked_drops_a_late_delta_as_before() -> None:
    # It does not say who changed since: a late delta could bring back who left.
    seq = Sequencer(lambda delivery: None, Lifecycle(termination_grace=30), reorder_window=5)
    ann, bob = (b.participant(n, display_name=n.title()) for n in ("ann", "bob"))
    for item in (
        b.delta_roster("c", [ann], sequence_number=1, change_type="created"),
        b.delta_roster("c", [bob], sequence_number=2, change_type="created"),
        b.delta_roster("c", [bob], sequence_number=5, change_type="deleted"),
    ):
        seq.accept(one(item))
    record = seq.record("c")
    assert record is not None
    stored = json.loads(encode_record(record))
    del stored["roster_changed"]  # as the release before wrote it
    seq.close()
    out: list[Delivery] = []
    other = Sequencer(out.append, Lifecycle(termination_grace=30), reorder_window=5)
    restored = decode_record(json.dumps(stored))
    assert restored is not None
    other.adopt(restored)
    other.accept(one(b.delta_roster("c", [b.participant("bob", muted=True)], sequence_number=4)))
    assert out == []
    assert other.counts["stale"] == 1
    other.close()


async def test_a_record_written_before_tones_were_counted_lets_the_next_tone_go() -> None:
    stored = json.loads(encode_record(CallRecord(CallLife("c", phase=3, state="established"))))
    del stored["tone_next"]
    record = decode_record(json.dumps(stored))
    assert record is not None
    assert record.tone_next is None
    out: list[Delivery] = []
    seq = Sequencer(out.append, Lifecycle(termination_grace=30), reorder_window=300)
    seq.adopt(record)
    seq.accept(one(b.tone("c", "tone5", 5)))  # no count kept: nothing it could wait for
    assert [type(d.event) for d in out] == [events.ToneReceived]
    seq.close()


async def test_a_record_read_back_knows_how_far_its_operations_got() -> None:
    """Another instance carrying the call on drops an operation's progress arriving after
    the outcome this one delivered, as this one would."""
    first: list[Delivery] = []
    seq = Sequencer(first.append, Lifecycle(termination_grace=30), reorder_window=300)
    seq.accept(one(b.call_state("c", "establishing")))
    seq.accept(one(b.call_state("c", "established")))
    seq.accept(one(b.operation_update("c", "0FE0623F-D628-42ED-B4BD-8AC290072CC5")))
    record = seq.record(id_key("c"))
    assert record is not None
    stored = encode_record(record)
    seq.close()
    copy = decode_record(stored)
    assert copy is not None
    assert copy.operations == record.operations
    out: list[Delivery] = []
    seq = Sequencer(out.append, Lifecycle(termination_grace=30), reorder_window=300)
    seq.adopt(copy)
    progress = b.operation_update("c", "0fe0623fd62842edb4bd8ac290072cc5", status="running")
    seq.accept(one(progress))
    assert out == []
    assert seq.counts["stale"] == 1
    seq.close()


async def test_a_record_written_with_a_roster_digest_still_knows_its_latest_roster() -> None:
    roster = b.roster("c", [b.participant("ann")])
    event = one(roster)
    stored = json.loads(encode_record(CallRecord(CallLife("c", phase=3, state="established"))))
    del stored["latest"]
    stored["roster_digest"] = notification_digest(event).hex()
    record = decode_record(json.dumps(stored))
    assert record is not None
    assert record.latest == {"roster": notification_digest(event)}
    out: list[Delivery] = []
    seq = Sequencer(out.append, Lifecycle(termination_grace=30))
    seq.adopt(record)
    seq.accept(one(roster))
    assert out == []
    assert seq.counts["duplicate"] == 1
    seq.close()


async def test_evicting_a_held_call_cancels_its_window(clock: Clock) -> None:
    out: list[Delivery] = []
    seq = Sequencer(out.append, Lifecycle(termination_grace=30), reorder_window=0.01)
    seq.accept(one(b.call_state("c", "established")))
    seq.evict("c")
    await clock.advance(1.0)  # well past the window: its timer, were it left, has fired
    assert out == []
    seq.close()


async def test_the_dispatcher_says_when_a_delivery_is_done() -> None:
    registry = HandlerRegistry()
    ran: list[str] = []

    async def handler(call: Any, event: events.Event) -> None:
        await asyncio.sleep(0)
        ran.append(call.id)

    registry.add(events.Event, handler)
    services = CallServices(Settings(app_id="a"))
    done: list[str] = []
    dispatcher = Dispatcher(registry, handle_for(services))
    seq = Sequencer(
        lambda d: dispatcher.submit(d, done=lambda d: done.append(d.event.call_id)),
        Lifecycle(termination_grace=30),
    )
    seq.accept(one(b.incoming_call("x")))
    assert done == []
    await dispatcher.join(5)
    assert ran == ["x"]
    assert done == ["x"]
    seq.close()
    await services.close()


async def test_an_event_no_handler_wants_costs_no_task_and_no_handle() -> None:
    registry = HandlerRegistry()
    tones: list[str] = []

    async def on_tone(call: Any, event: events.ToneReceived) -> None:
        tones.append(event.tone)

    registry.add(events.ToneReceived, on_tone)
    services = CallServices(Settings(app_id="a"))
    handles: list[str] = []

    def handle(delivery: Delivery) -> Call:
        handles.append(type(delivery.event).__name__)
        return services.call(delivery.event.call_id, snapshot=delivery.snapshot)

    dispatcher = Dispatcher(registry, handle)
    seq = Sequencer(dispatcher.submit, Lifecycle(termination_grace=30))
    seq.accept(one(b.incoming_call("x")))
    seq.accept(one(b.call_state("x", "establishing")))
    assert dispatcher.busy_calls == 0
    assert dispatcher.counts["handled"] == 2
    seq.accept(one(b.call_state("x", "established")))
    seq.accept(one(b.tone("x", "tone5", 1)))
    assert dispatcher.busy_calls == 1
    await dispatcher.join(5)
    assert tones == ["tone5"]
    assert handles == ["ToneReceived"]
    assert dispatcher.counts["handled"] == 4
    seq.close()
    await services.close()


def blocked_memory_bot(
    tone_fails: str,
) -> tuple[MemoryStore, Dispatcher, Lifecycle, asyncio.Event, list[str], CallServices]:
    """A memory store whose tone handler waits for the returned event, then raises for
    ``tone_fails``; a window no test waits out."""
    settings = Settings(app_id="a", reorder_window=60)
    services = CallServices(settings)
    lifecycle = Lifecycle(termination_grace=settings.termination_grace)
    registry = HandlerRegistry()
    gate = asyncio.Event()
    ran: list[str] = []

    async def on_tone(call: Call, event: events.ToneReceived) -> None:
        await gate.wait()
        ran.append(event.tone)
        if event.tone == tone_fails:
            raise RuntimeError("a bug of the handler's")

    registry.add(events.ToneReceived, on_tone)
    dispatcher = Dispatcher(registry, handle_for(services))
    store = open_store(settings, dispatcher=dispatcher, lifecycle=lifecycle, outcomes=services)
    assert isinstance(store, MemoryStore)
    return store, dispatcher, lifecycle, gate, ran, services


async def established_with_tones(store: MemoryStore, call: str) -> None:
    """Tones 1 and 2 of an established call handed on, tone 4 held for tone 3."""
    states = [b.call_state(call, "establishing"), b.call_state(call, "established")]
    await store.ingest([one(b.incoming_call(call)), *(one(item) for item in states)])
    # No handler wants them: done as they were handed on.
    assert store.backlog(id_key(call)) == (0, 0)
    await store.ingest([one(b.tone(call, f"tone{n}", n)) for n in (1, 2, 4)])
    await store.ingest([one(b.tone(call, "tone1", 1))])  # a repeat: dropped, never counted
    record = store.known(id_key(call))
    assert record is not None
    assert len(record.held) == 1
    entries, size = store.backlog(id_key(call))
    assert entries == 2
    assert size > 0


async def test_a_calls_backlog_counts_deliveries_until_their_handlers_finish() -> None:
    """The memory store counts what it hands a call's handlers until they finished, a handler
    that raised included: what is dropped or held is not counted, and the count goes back to
    nothing once the handlers caught up."""
    store, dispatcher, _, gate, ran, services = blocked_memory_bot("tone2")
    key = id_key("c")
    await established_with_tones(store, "c")
    await store.ingest([one(b.tone("c", "tone3", 3))])  # lets tone 4 out of the window
    assert store.backlog(key)[0] == 4
    gate.set()
    await until(lambda: not dispatcher.busy_with(key))
    assert ran == ["tone1", "tone2", "tone3", "tone4"]
    assert dispatcher.counts["handler_errors"] == 1
    assert store.backlog(key) == (0, 0)
    await store.close()
    await services.close()


async def test_a_calls_backlog_is_let_go_when_it_is_forgotten_or_the_bot_stops() -> None:
    """Deliveries of a call forgotten while they run are counted until they finish (what it
    held is dropped uncounted); what a shutdown abandons is let go with the store."""
    store, dispatcher, lifecycle, gate, _, services = blocked_memory_bot("tone1")
    forgotten, stopped = id_key("forgotten"), id_key("stopped")
    await established_with_tones(store, "forgotten")
    await established_with_tones(store, "stopped")
    lifecycle._forget(forgotten, "gone")
    assert store.known(forgotten) is None
    assert store.backlog(forgotten)[0] == 2
    await store.drain(1.0)  # the held tone 4 of the call still known goes now
    assert store.backlog(stopped)[0] == 3
    gate.set()
    await until(lambda: not dispatcher.busy_with(forgotten) and not dispatcher.busy_with(stopped))
    assert store.backlog(forgotten) == store.backlog(stopped) == (0, 0)
    gate.clear()
    await store.ingest([one(b.tone("stopped", "tone5", 5))])
    assert len(await dispatcher.join(0)) == 1
    assert store.backlog(stopped)[0] == 1
    await store.close()
    assert store.backlog(stopped) == (0, 0)
    await services.close()


async def test_a_failing_matches_is_a_handler_error_outside_the_request() -> None:
    registry = HandlerRegistry()
    ran: list[str] = []

    def broken(event: events.Event) -> bool:
        raise AttributeError("tone_info")

    async def on_tone(call: Any, event: events.ToneReceived) -> None:
        ran.append("tone")

    async def on_end(call: Any, event: events.CallTerminated) -> None:
        ran.append("end")

    registry.add(events.ToneReceived, on_tone, matches=broken)
    registry.add(events.CallTerminated, on_end)
    services = CallServices(Settings(app_id="a"))
    dispatcher = Dispatcher(registry, handle_for(services))
    seq = Sequencer(dispatcher.submit, Lifecycle(termination_grace=30))
    seq.accept(one(b.incoming_call("x")))
    seq.accept(one(b.call_state("x", "established")))
    # Accepting never runs a handler's filter: it cannot fail the request.
    seq.accept(one(b.tone("x", "tone1", 1)))
    seq.accept(one(b.call_terminated("x")))
    await dispatcher.join(5)
    assert ran == ["end"]
    assert dispatcher.counts["handler_errors"] == 1
    seq.close()
    await services.close()


async def test_a_failing_matches_stops_its_own_handler_alone() -> None:
    # "Every handler whose registration matches an event runs": one filter's bug is its
    # handler's error, not the silence of the event's other handlers.
    registry = HandlerRegistry()
    ran: list[str] = []
    reported: list[tuple[str, str]] = []

    def broken(event: events.Event) -> bool:
        raise AttributeError("identity")

    async def picky(call: Any, event: events.IncomingCall) -> None:
        ran.append("picky")

    async def answer(call: Any, event: events.IncomingCall) -> None:
        ran.append("answer")

    async def on_error(call: Any, event: events.Event, exc: BaseException) -> None:
        reported.append((type(event).__name__, repr(exc)))

    registry.add(events.IncomingCall, picky, matches=broken)
    registry.add(events.IncomingCall, answer)
    registry.add_error_handler(on_error)
    services = CallServices(Settings(app_id="a"))
    dispatcher = Dispatcher(registry, handle_for(services))
    seq = Sequencer(dispatcher.submit, Lifecycle(termination_grace=30))
    seq.accept(one(b.incoming_call("x")))
    await dispatcher.join(5)
    assert ran == ["answer"]
    assert reported == [("IncomingCall", "AttributeError('identity')")]
    assert dispatcher.counts["handler_errors"] == 1
    seq.close()
    await services.close()


async def test_a_handler_slot_is_given_back_however_its_run_ends() -> None:
    registry = HandlerRegistry()
    gates = {call: asyncio.Event() for call in ("a", "b", "d")}
    started: list[str] = []

    async def on_state(call: Any, event: events.CallStateChanged) -> None:
        started.append(call.id)
        await gates[call.id].wait()
        if call.id == "a":
            raise RuntimeError("the handler's own bug")

    async def on_incoming(call: Any, event: events.IncomingCall) -> None:
        started.append(call.id)

    registry.add(events.CallStateChanged, on_state)
    registry.add(events.IncomingCall, on_incoming)
    services = CallServices(Settings(app_id="a"))
    dispatcher = Dispatcher(registry, handle_for(services), max_concurrent=1)
    seq = Sequencer(dispatcher.submit, Lifecycle(termination_grace=30))
    for call in ("a", "b", "d"):
        seq.accept(one(b.call_state(call, "establishing")))
    await until(lambda: started == ["a"])
    # An incoming call never waits for a slot, even with every one taken.
    seq.accept(one(b.incoming_call("c")))
    await until(lambda: started == ["a", "c"])
    gates["a"].set()  # a fails: its slot goes to b
    await until(lambda: started == ["a", "c", "b"])
    dispatcher._workers[id_key("b")].cancel()  # b is stopped: its slot goes to d
    await until(lambda: started == ["a", "c", "b", "d"])
    gates["d"].set()
    await dispatcher.join(5)
    assert dispatcher.counts["handler_errors"] == 1
    seq.close()
    await services.close()


async def test_handler_slots_go_in_turn_and_a_cancelled_run_keeps_none() -> None:
    slots = _Slots(1)
    slots.free -= 1  # one run holds the only slot
    order: list[str] = []

    async def run(name: str) -> None:
        await slots.wait()
        order.append(name)

    first, second, third = (asyncio.create_task(run(n)) for n in ("first", "second", "third"))
    await until(lambda: len(slots.waiting) == 3)
    second.cancel()  # gave up while waiting: never holds a slot
    await until(lambda: second.done())
    assert len(slots.waiting) == 2
    slots.give_back()
    await first
    assert order == ["first"]
    slots.give_back()  # handed to third, which is cancelled before it runs: passed on
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    assert order == ["first"]
    assert (slots.free, len(slots.waiting)) == (1, 0)


def handle_for(services: CallServices) -> Callable[[Delivery], Call]:
    def handle(delivery: Delivery) -> Call:
        return services.call(delivery.event.call_id, snapshot=delivery.snapshot)

    return handle


def test_stream_ids_step_to_the_next_one() -> None:
    assert _after("1700000000000-0") == "1700000000000-1"
    assert _after("1700000000000-41") == "1700000000000-42"


def test_every_key_of_a_call_is_in_one_cluster_slot() -> None:
    from redis.crc import key_slot

    from callbot.store._redis import _Keys

    keys = _Keys("callbot:app:")
    names = keys.of("1f2e3d4c", "inbox", "seen", "lease", "fence", "call", "journal")
    assert {key_slot(name.encode()) for name in names} == {key_slot(b"1f2e3d4c")}
    assert keys.record("1f2e3d4c") in names


def test_store_urls_name_a_deployment_or_are_refused_with_the_choices() -> None:
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.sentinel import SentinelConnectionPool

    from callbot.store._redis import connect

    for url in ("redis+cluster://127.0.0.1:7000", "rediss+cluster://127.0.0.1:7000"):
        assert Settings(store=url).store == url
        assert all(isinstance(client, RedisCluster) for client in connect(url))
    url = "redis+sentinel://alice:pw@10.0.0.1:26379,10.0.0.2/primary/2"
    commands, _ = connect(url)
    pool = commands.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "primary"
    assert [
        s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels
    ] == [
        26379,
        26379,
    ]
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["username"] == "alice"
    with pytest.raises(ConfigurationError, match="redis\\+sentinel://"):
        connect("memcached://127.0.0.1")
    with pytest.raises(ConfigurationError, match="CALLBOT_STORE"):
        Settings(store="redis+proxy://127.0.0.1")
