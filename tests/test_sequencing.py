"""The sequencer alone: holds, releases, stale, duplicate and straggler drops."""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import sys
import tracemalloc
from collections import Counter
from typing import Any

import pytest
from structlog.testing import capture_logs

from callbot import _sequencing as sequencing
from callbot import events, models
from callbot._errors import MalformedNotification
from callbot._ids import id_key
from callbot._lifecycle import KeepAliveResult, Lifecycle
from callbot._parse import parse_payload
from callbot._sequencing import MAX_HELD_BYTES, Delivery, Sequencer
from callbot.testing import builders as b

from .conftest import FIXTURES, until
from .test_recorded import CALLS

NEVER = 300.0
"""A reorder window no test waits out: what is held goes when its predecessor comes."""


def one(item: dict[str, Any]) -> events.Event:
    (event,) = parse_payload(b.notifications(item))
    return event


class Sink:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.ended: list[str] = []
        self.operations: list[str | None] = []

    @property
    def labels(self) -> list[str]:
        out = []
        for d in self.deliveries:
            e = d.event
            if isinstance(e, events.ToneReceived):
                out.append(f"tone:{e.tone}")
            elif isinstance(e, events.CallStateChanged):
                out.append(e.state)
            else:
                out.append(type(e).__name__)
        return out

    def sequencer(self, window: float = 0.05, grace: float = 0.05) -> Sequencer:
        lifecycle = Lifecycle(termination_grace=grace)
        lifecycle.when_ended(lambda key, info: self.ended.append(key))
        return Sequencer(
            self.deliveries.append,
            lifecycle,
            reorder_window=window,
            on_operation=lambda e: self.operations.append(e.operation_id),
        )


async def test_established_first_is_held_until_establishing() -> None:
    sink = Sink()
    seq = sink.sequencer(window=5)
    seq.accept(one(b.call_state("c", "established")))
    assert sink.labels == []
    seq.accept(one(b.call_state("c", "establishing")))
    assert sink.labels == ["establishing", "established"]
    assert seq.counts["held"] == 1
    seq.close()


async def test_a_roster_before_established_waits_for_it() -> None:
    """Graph may deliver a joined call's first roster before the ``established`` it follows,
    as it delivers ``established`` before ``establishing``: the roster waits for it."""
    sink = Sink()
    seq = sink.sequencer(window=5)
    seq.accept(one(b.call_state("c", "establishing")))
    seq.accept(one(b.roster("c", [b.participant("bot")])))
    seq.accept(one(b.tone("c", "tone1", 1)))
    assert sink.labels == ["establishing"]
    seq.accept(one(b.call_state("c", "established")))
    assert sink.labels == ["establishing", "established", "ParticipantsUpdated", "tone:tone1"]
    # Each handler sees the call established.
    states = [d.snapshot.state if d.snapshot else None for d in sink.deliveries]
    assert states == ["establishing", "established", "established", "established"]
    seq.close()


@pytest.mark.parametrize(
    ("arrivals", "delivered"),
    [
        # ringing overtakes the roster, which still waits for established
        (
            ["establishing", "roster", "ringing", "established"],
            ["establishing", "ringing", "established", "ParticipantsUpdated"],
        ),
        # established before establishing too: it waits for establishing, the roster for it
        (
            ["incoming", "roster", "established", "establishing"],
            ["incoming", "establishing", "established", "ParticipantsUpdated"],
        ),
        # a call that ends instead: the roster goes before its end
        (
            ["establishing", "roster", "terminated"],
            ["establishing", "ParticipantsUpdated", "terminated"],
        ),
        # a call known by nothing else yet holds nothing
        (["roster", "establishing"], ["ParticipantsUpdated", "establishing"]),
    ],
)
async def test_what_waits_for_established(arrivals: list[str], delivered: list[str]) -> None:
    sink = Sink()
    seq = sink.sequencer(window=5)
    for arrival in arrivals:
        if arrival == "roster":
            item = b.roster("c", [b.participant("bot")])
        elif arrival == "incoming":
            item = b.incoming_call("c")
        elif arrival == "terminated":
            item = b.call_terminated("c")
        else:
            item = b.call_state("c", arrival)
        seq.accept(one(item))
    labels = ["incoming" if label == "IncomingCall" else label for label in sink.labels]
    assert labels == delivered
    seq.close()


def recorded_item(name: str) -> dict[str, Any]:
    item: dict[str, Any] = json.loads((FIXTURES / "recorded" / name).read_text())["value"][0]
    return item


def documented_item(name: str, call_id: str = "c") -> dict[str, Any]:
    """Graph's documented notification ``name`` (tests/fixtures/notifications), about
    ``call_id`` (the path under the call kept)."""
    path = FIXTURES / "notifications" / name
    (item,) = json.loads(path.read_text())["value"]
    assert isinstance(item, dict)
    key = "resourceUrl" if "resourceUrl" in item else "resource"
    head, calls, rest = item[key].partition("/calls/")
    item[key] = f"{head}{calls}{call_id}{rest[rest.find('/') :] if '/' in rest else ''}"
    return item


@pytest.mark.parametrize(
    ("news", "establishing", "established", "kind"),
    [
        # the bot joins a meeting: Graph's documented roster of it overtakes its states
        (
            documented_item("08-application-post-calls-ex5-join-meeting-roster.json"),
            documented_item("06-application-post-calls-ex5-join-meeting-establishing.json"),
            documented_item("07-application-post-calls-ex5-join-meeting-established.json"),
            "ParticipantsUpdated",
        ),
        # a recorded group call: the roster the bot joined overtakes its states
        (
            recorded_item("sb15-groupcalls-groupcallbotjoin.json"),
            recorded_item("sb13-groupcalls-groupcallestablishing.json"),
            recorded_item("sb14-groupcalls-groupcallestablished.json"),
            "ParticipantsUpdated",
        ),
        # a call the bot created: content sharing overtakes its states
        (
            documented_item("03-application-post-calls-ex1-contentsharing-created.json"),
            documented_item("01-application-post-calls-ex1-p2p-call-establishing.json"),
            documented_item("02-application-post-calls-ex1-p2p-call-established.json"),
            "ContentSharingUpdated",
        ),
    ],
    ids=["joined-meeting-roster", "recorded-group-call-roster", "created-call-sharing"],
)
@pytest.mark.parametrize("told", ["placed", "noted"])
async def test_news_of_a_call_the_bot_placed_waits_for_established(
    news: dict[str, Any],
    establishing: dict[str, Any],
    established: dict[str, Any],
    kind: str,
    told: str,
) -> None:
    """A call the bot placed is being set up once Graph answered (the ``Placed`` fact): news
    without a state arriving before its ``establishing`` waits for ``established``, as for a
    call the bot answered, and its handlers see the call in a state."""
    sink = Sink()
    seq = sink.sequencer(window=NEVER)
    call_id = one(news).call_id
    if told == "placed":
        seq.placed(call_id, "bot-participant", None)
    else:
        seq.note(sequencing.Placed(call_id, None, None))
    seq.accept(one(news))
    assert sink.labels == []
    seq.accept(one(establishing))
    seq.accept(one(established))
    assert sink.labels == ["establishing", "established", kind]
    states = [d.snapshot.state if d.snapshot else None for d in sink.deliveries]
    assert states == ["establishing", "established", "established"]
    seq.close()


async def test_a_placed_call_s_news_waits_for_established_until_the_window_closes() -> None:
    """As an answered call's: with no ``established`` within the window, the news goes alone."""
    sink = Sink()
    seq = sink.sequencer(window=0.02)
    seq.placed("c", "me-1", None)
    seq.accept(one(b.roster("c", [b.participant("me-1")])))
    await until(lambda: len(sink.deliveries) == 1)
    assert sink.labels == ["ParticipantsUpdated"]
    assert seq.counts["released_alone"] == 1
    # Delivered before any state, it has the bot's own participant id all the same.
    snapshot = sink.deliveries[0].snapshot
    assert snapshot is not None
    assert snapshot.my_participant_id == "me-1"
    seq.close()


async def test_a_roster_waits_for_established_until_the_window_closes() -> None:
    sink = Sink()
    seq = sink.sequencer(window=0.02)
    seq.accept(one(b.call_state("c", "establishing")))
    seq.accept(one(b.roster("c", [b.participant("bot")])))
    await until(lambda: len(sink.deliveries) == 2)
    assert sink.labels == ["establishing", "ParticipantsUpdated"]
    assert seq.counts["released_alone"] == 1
    seq.accept(one(b.call_state("c", "established")))
    assert sink.labels == ["establishing", "ParticipantsUpdated", "established"]
    seq.close()


async def test_held_state_goes_alone_when_the_window_closes() -> None:
    sink = Sink()
    seq = sink.sequencer(window=0.02)
    seq.accept(one(b.call_state("c", "established")))
    seq.accept(one(b.tone("c", "tone5", 1)))  # waits behind the held state
    assert sink.labels == []
    await until(lambda: len(sink.labels) >= 2)  # the window closes on the loop's clock
    assert sink.labels == ["established", "tone:tone5"]
    assert seq.counts["released_alone"] == 1
    # The late predecessor is now stale.
    seq.accept(one(b.call_state("c", "establishing")))
    assert sink.labels == ["established", "tone:tone5"]
    assert seq.counts["stale"] == 1
    seq.close()


def establish(seq: Sequencer, *call_ids: str) -> None:
    """Take each call to ``established``: a tone before that would wait for it."""
    for call_id in call_ids:
        for state in ("establishing", "established"):
            seq.accept(one(b.call_state(call_id, state)))


async def test_exact_repeats_are_dropped_but_new_tones_are_not() -> None:
    sink = Sink()
    seq = sink.sequencer()
    establish(seq, "c")
    for item in (b.tone("c", "tone1", 1), b.tone("c", "tone1", 1), b.tone("c", "tone1", 2)):
        seq.accept(one(item))
    assert sink.labels == ["establishing", "established", "tone:tone1", "tone:tone1"]
    assert seq.counts["duplicate"] == 1
    seq.close()


def _rewritten(item: dict[str, Any], form: str) -> dict[str, Any]:
    """``item`` as Graph may write the same notification another time."""
    copy = {key: item[key] for key in reversed(item)}  # keys in another order
    path = copy["resourceUrl"]
    if form == "resource":
        copy["resource"] = path.replace("/communications/", "/app/")
        del copy["resourceUrl"]
    elif form == "absolute":
        copy["resourceUrl"] = "https://graph.microsoft.com/v1.0" + path
    elif form == "beta":
        copy["resourceUrl"] = "/beta" + path
    elif form == "id_case":
        call_id = path.rsplit("/", 1)[1]
        copy["resourceUrl"] = path.replace(call_id, call_id.upper().replace("-", ""))
    elif form == "change_case":
        copy["changeType"] = copy["changeType"].capitalize()
    data = copy.get("resourceData")
    if isinstance(data, dict):
        copy["resourceData"] = {key: data[key] for key in reversed(data)}
    return copy


FORMS = ("keys", "resource", "absolute", "beta", "id_case", "change_case")


@pytest.mark.parametrize("form", FORMS)
async def test_a_retry_written_another_way_is_still_a_duplicate(form: str) -> None:
    sink = Sink()
    seq = sink.sequencer()
    call_id = "6f1f5c00-8c1b-47f1-be9d-660c501041a9"
    tone = b.tone(call_id, "tone1", 6)
    establish(seq, call_id)
    for item in (tone, _rewritten(tone, form)):
        seq.accept(one(item))
    assert sink.labels == ["establishing", "established", "tone:tone1"]
    assert seq.counts["duplicate"] == 1
    seq.close()


async def test_the_same_words_about_another_call_or_path_are_not_a_duplicate() -> None:
    sink = Sink()
    seq = sink.sequencer()
    tone = b.tone("c", "tone1", 1)
    other_call = b.tone("d", "tone1", 1)
    other_change = {**tone, "changeType": "created"}
    establish(seq, "c", "d")
    for item in (tone, other_call, other_change):
        seq.accept(one(item))
    assert sink.labels[4:] == ["tone:tone1", "tone:tone1", "tone:tone1"]
    assert seq.counts["duplicate"] == 0
    seq.close()


async def test_stragglers_after_termination_are_dropped_then_state_released() -> None:
    sink = Sink()
    seq = sink.sequencer(grace=0.02)
    seq.accept(one(b.call_state("c", "establishing")))
    seq.accept(one(b.call_terminated("c")))
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.call_state("c", "established")))
    assert sink.labels == ["establishing", "terminated"]
    assert seq.counts["after_end"] == 2
    assert sink.ended == ["c"]
    assert list(seq.lifecycle.active()) == []
    await until(lambda: seq.record("c") is None)
    seq.close()


async def test_establishing_can_go_straight_to_terminating() -> None:
    sink = Sink()
    seq = sink.sequencer(window=5)
    for state in ("establishing", "terminating"):
        seq.accept(one(b.call_state("c", state)))
    assert sink.labels == ["establishing", "terminating"]
    seq.close()


async def test_a_redirected_call_is_never_live_and_its_redirecting_goes_at_once() -> None:
    """An incoming call the bot redirects goes to ``redirecting`` (then ``terminated``),
    never ``establishing``: nothing holds the ``redirecting`` for it, and it does not make
    the call established (no keep-alive, no ``wait_until_established``)."""
    sink = Sink()
    seq = sink.sequencer(window=5)
    seq.accept(one(b.incoming_call("c")))
    seq.accept(one(b.call_state("c", "redirecting")))
    assert sink.labels == ["IncomingCall", "redirecting"]
    life = seq.lifecycle.get("c")
    assert life is not None
    assert not life.established
    seq.accept(one(b.call_state("c", "terminated")))
    assert sink.labels == ["IncomingCall", "redirecting", "terminated"]
    assert sink.ended == ["c"]
    seq.close()


async def test_a_redirected_call_does_not_come_back_to_incoming() -> None:
    """``redirecting`` shares the incoming phase, but a call the bot redirected does not
    come back: an incoming-call notification arriving after it (another one Graph sent for
    the call, late) is stale, not the call moving back to ``incoming`` with the bot's
    ``on_incoming_call`` run a second time."""
    sink = Sink()
    seq = sink.sequencer(window=5)
    seq.accept(one(b.incoming_call("c")))
    seq.accept(one(b.call_state("c", "redirecting")))
    seq.accept(one(b.incoming_call("c", callback_uri="https://bot.example.test/late")))
    seq.accept(one(b.call_state("c", "incoming")))
    assert sink.labels == ["IncomingCall", "redirecting"]
    assert seq.counts["stale"] == 2
    life = seq.lifecycle.get("c")
    assert life is not None
    assert life.state == "redirecting"
    seq.accept(one(b.call_state("c", "redirecting", subject="again")))  # an update of it
    assert sink.labels == ["IncomingCall", "redirecting", "CallUpdated"]
    seq.close()


async def test_previous_state_and_snapshot_follow_delivery_order() -> None:
    sink = Sink()
    seq = sink.sequencer(window=5)
    seq.accept(one(b.incoming_call("c", caller_name="Ann")))
    seq.accept(one(b.call_state("c", "established")))
    seq.accept(one(b.call_state("c", "establishing")))
    states = [d.event for d in sink.deliveries if isinstance(d.event, events.CallStateChanged)]
    assert [(e.state, e.previous_state) for e in states] == [
        ("establishing", "incoming"),
        ("established", "establishing"),
    ]
    last = sink.deliveries[-1].snapshot
    assert last is not None
    assert last.state == "established"
    # Fields from the incoming call survive partial updates.
    assert last.direction == "incoming"
    seq.close()


async def test_operation_outcomes_are_reported_at_once_even_while_held() -> None:
    sink = Sink()
    seq = sink.sequencer(window=5)
    seq.accept(one(b.call_state("c", "established")))
    seq.accept(one(b.operation_update("c", "op-1")))
    assert sink.operations == ["op-1"]
    assert sink.labels == []
    seq.release_all()
    assert sink.labels == ["established", "OperationUpdated"]
    seq.close()


async def test_an_operation_only_goes_forward_and_ends_once() -> None:
    """Each status of an operation, in whatever case and with its id in whatever form Graph
    wrote it: one that is behind what was delivered of the operation, or an outcome once
    the operation had one, is stale; another operation, or one naming none, is not held
    back by it."""
    sink = Sink()
    seq = sink.sequencer()
    seq.accept(one(b.call_state("c", "establishing")))
    seq.accept(one(b.call_state("c", "established")))

    def status(op: str, value: str, **options: Any) -> events.Event:
        return one(b.operation_update("c", op, status=value, code=None, **options))

    op = "0fe0623f-d628-42ed-b4bd-8ac290072cc5"
    same_op = "0FE0623FD62842EDB4BD8AC290072CC5"
    seq.accept(status(op, "running"))
    seq.accept(status(same_op, "NotStarted"))  # behind running
    seq.accept(status(same_op, "Running", client_context="progress"))  # progress: news
    seq.accept(status(same_op, "statusGraphAddsLater"))  # taken as progress: news
    seq.accept(status(op, "completed"))
    seq.accept(status(same_op, "Running"))  # after the outcome
    seq.accept(status(same_op, "failed"))  # an outcome again, otherwise written
    seq.accept(status("other-op", "completed"))
    seq.accept(one(b.operation_update("c", "participants", status="completed", id=None)))
    seq.accept(one(b.operation_update("c", "participants", status="running", id=None)))
    delivered = [
        (d.event.operation_key, d.event.status)
        for d in sink.deliveries
        if isinstance(d.event, events.OperationUpdated)
    ]
    assert delivered == [
        ("0fe0623fd62842edb4bd8ac290072cc5", "running"),
        ("0fe0623fd62842edb4bd8ac290072cc5", "running"),
        ("0fe0623fd62842edb4bd8ac290072cc5", "statusGraphAddsLater"),
        ("0fe0623fd62842edb4bd8ac290072cc5", "completed"),
        ("otherop", "completed"),
        (None, "completed"),
        (None, "running"),
    ]
    assert seq.counts["stale"] == 3
    seq.close()


async def test_how_far_a_call_s_operations_got_is_bounded() -> None:
    sink = Sink()
    seq = sink.sequencer()
    seq.accept(one(b.call_state("c", "establishing")))
    seq.accept(one(b.call_state("c", "established")))
    for n in range(sequencing.SEEN_DIGESTS + 10):
        seq.accept(one(b.operation_update("c", f"op-{n}")))
    record = seq.record(id_key("c"))
    assert record is not None
    assert len(record.operations) == sequencing.SEEN_DIGESTS
    # The oldest are let go first.
    assert "op0" not in record.operations
    assert f"op{sequencing.SEEN_DIGESTS + 9}" in record.operations
    seq.close()


def test_a_call_s_digests_keep_the_latest_in_order() -> None:
    seen = sequencing.RecentDigests()
    assert seen.last() is None
    assert seen.add(b"first")
    assert not seen.add(b"first")  # a repeat is known
    for n in range(sequencing.SEEN_DIGESTS):
        assert seen.add(b"%d" % n)
    assert len(seen) == sequencing.SEEN_DIGESTS
    assert b"first" not in seen  # the oldest let go first
    assert b"0" in seen
    assert not seen.add(b"0")  # known: keeps its place, the oldest
    assert seen.add(b"new")
    assert b"0" not in seen
    assert seen.last() == b"new"


async def test_a_digest_past_the_latest_ones_is_news_again() -> None:
    sink = Sink()
    seq = sink.sequencer()
    seq.accept(one(b.call_state("c", "establishing")))
    seq.accept(one(b.call_state("c", "established")))
    first = b.operation_update("c", "op-first", status="running")
    seq.accept(one(first))
    seq.accept(one(first))  # a repeat: dropped
    assert seq.counts["duplicate"] == 1
    for n in range(sequencing.SEEN_DIGESTS - 1):
        seq.accept(one(b.operation_update("c", f"op-{n}", status="running")))
    seq.accept(one(first))  # still among the latest: a repeat
    assert seq.counts["duplicate"] == 2
    seq.accept(one(b.operation_update("c", "op-last", status="running")))
    record = seq.record(id_key("c"))
    assert record is not None
    assert len(record.seen) == sequencing.SEEN_DIGESTS
    delivered = len(sink.deliveries)
    seq.accept(one(first))  # past the latest ones: news again, as documented
    assert seq.counts["duplicate"] == 2
    assert len(sink.deliveries) == delivered + 1
    seq.close()


async def test_failed_transfer_established_again_is_delivered() -> None:
    sink = Sink()
    seq = sink.sequencer()
    seq.accept(one(b.call_state("c", "establishing")))
    seq.accept(one(b.call_state("c", "established")))
    seq.accept(one(b.call_state("c", "transferring")))
    info = b.call_state("c", "established")
    info["resourceData"]["resultInfo"] = {"code": 500, "subcode": 7000, "message": "failed"}
    seq.accept(one(info))
    assert sink.labels == ["establishing", "established", "transferring", "established"]
    last = sink.deliveries[-1].event
    assert isinstance(last, events.CallStateChanged)
    assert last.previous_state == "transferring"
    assert last.result_info is not None
    assert last.result_info.subcode == 7000
    seq.close()


def _agent(user_id: str) -> models.InvitationParticipantInfo:
    return models.InvitationParticipantInfo(
        identity=models.IdentitySet(user=models.Identity(id=user_id))
    )


@pytest.mark.looptime
async def test_a_call_back_from_transferring_without_a_result_is_that_transfer_s_failure() -> None:
    """Graph's 2019 shape (recorded gdh28, gdh29) tells a failed transfer by the call going
    back to ``established`` with no ``resultInfo``, past the reorder window (the target did
    not answer). It was not counted: the failure went untold, and the next transfer's
    failure was told as this one's, naming its target."""
    sink = Sink()
    seq = sink.sequencer(window=1)
    _established(seq)
    seq.lifecycle.transfer_asked("c", _agent("first"))
    seq.accept(one(b.call_state("c", "transferring")))
    await asyncio.sleep(1)  # the target rings
    seq.accept(one(b.call_state("c", "established")))  # no resultInfo
    back = sink.deliveries[-1].event
    assert isinstance(back, events.CallStateChanged)
    assert (back.state, back.previous_state, back.transfer_failed) == (
        "established",
        "transferring",
        True,
    )
    assert back.transfer_target == _agent("first")
    seq.lifecycle.transfer_asked("c", _agent("second"))
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(_failed_transfer()))  # the v1.0 shape
    second = sink.deliveries[-1].event
    assert isinstance(second, events.CallStateChanged)
    assert second.transfer_failed
    assert second.transfer_target == _agent("second")
    seq.close()


def _transfer_going(seq: Sequencer, after: str) -> None:
    """An established call whose transfer the bot asked is in ``after``: ``transferring``, or
    ``transferAccepted`` after it."""
    _established(seq)
    seq.lifecycle.transfer_asked("c", _agent("first"))
    seq.accept(one(b.call_state("c", "transferring")))
    if after == "transferAccepted":
        seq.accept(one(b.call_state("c", "transferAccepted")))


def _established_update() -> dict[str, Any]:
    """One of the ``established`` updates Teams repeats as a call starts (recorded sb09: audio
    active, no ``resultInfo``)."""
    late = b.call_state("c", "established")
    late["resourceData"]["mediaState"] = {"audio": "active"}
    return late


@pytest.mark.parametrize("after", ["transferring", "transferAccepted"])
async def test_an_update_sent_before_a_transfer_began_is_stale_behind_it(after: str) -> None:
    """Teams repeats ``established`` as a call starts (recorded sb02, sb03), each a request of
    its own: a bot transferring at once may get one behind the ``transferring``, or its
    ``transferAccepted``. With no ``resultInfo``, within the reorder window of the
    ``transferring`` (or once the transfer was accepted), it is that earlier update, or one
    sent after the transfer's failure: it waits for that failure (at most the window), not
    taken for it, and the call does not move back to ``established``; the transfer's
    progress goes before it, and the call's end drops it (``after_end``), as Graph tells them.
    (The window closing first drops it as stale: the test after this one.)"""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _transfer_going(seq, after)
    late = _established_update()
    seq.accept(one(late))
    seq.accept(one(late))  # Graph sent it twice: a repeat
    assert (seq.counts["held"], seq.counts["duplicate"]) == (1, 1)
    assert seq.lifecycle.get("c").state == after  # type: ignore[union-attr]
    if after == "transferring":
        seq.accept(one(b.call_state("c", "transferAccepted")))  # goes before the update
        assert sink.labels[-1] == "transferAccepted"
    seq.accept(one(b.call_terminated("c")))
    assert sink.labels[-3:] == ["transferring", "transferAccepted", "terminated"]
    assert not any(getattr(d.event, "transfer_failed", False) for d in sink.deliveries)
    assert (seq.counts["after_end"], seq.counts["stale"]) == (1, 0)
    # A failure told with its resultInfo is the failure, however soon it comes.
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.lifecycle.transfer_asked("c", _agent("first"))
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(_failed_transfer()))
    failed = sink.deliveries[-1].event
    assert isinstance(failed, events.CallStateChanged)
    assert failed.transfer_failed
    seq.close()


@pytest.mark.looptime
@pytest.mark.parametrize("after", ["transferring", "transferAccepted"])
async def test_an_update_held_for_a_transfer_s_outcome_is_stale_once_the_window_closes(
    after: str,
) -> None:
    """An update that may have been sent before the transfer began waits for the transfer's
    failure at most ``reorder_window``: with the transfer still going then, it was sent
    before it, and is dropped as stale (not the transfer's failure in Graph's 2019 shape,
    though it is delivered past the window of the ``transferring``: it is judged as of when
    it came)."""
    sink = Sink()
    seq = sink.sequencer(window=1)
    _transfer_going(seq, after)
    await asyncio.sleep(0.5)  # the loop's clock: within the window of the transferring
    late = _established_update()
    seq.accept(one(late))
    assert seq.counts["held"] == 1
    await until(lambda: seq.counts["stale"] == 1)
    progress = ["transferring", "transferAccepted"] if after == "transferAccepted" else [after]
    assert sink.labels[2:] == progress
    assert seq.lifecycle.get("c").state == after  # type: ignore[union-attr]
    assert not any(getattr(d.event, "transfer_failed", False) for d in sink.deliveries)
    record = seq.record(id_key("c"))
    assert record is not None
    assert record.held == []
    assert not record.held_at
    seq.close()


def _recorded_update_after_failure() -> dict[str, Any]:
    """Teams' update of the recorded call (sb09: ``established``, audio and no
    ``resultInfo``), sent once the call was back from a failed transfer: audio active."""
    item = recorded_item("sb09-p2p-callupdates-p2ptest2event3updatedwithmediastate.json")
    item["resourceData"]["mediaState"] = {"audio": "active"}
    item["resourceData"]["subject"] = "back from the transfer"  # not a copy of sb09
    return item


def _recorded_call_item(name: str) -> dict[str, Any]:
    """A documented or recorded notification, about the recorded call sb07 to sb09 is."""
    call_id = one(recorded_item("sb07-p2p-callupdates-p2ptest2event1establishing.json")).call_id
    if name.startswith("gdh"):
        item = recorded_item(name)
        for key in ("resource", "resourceUrl"):
            if key in item:
                item[key] = f"/communications/calls/{call_id}"
        return item
    return documented_item(name, call_id)


@pytest.mark.parametrize("accepted", [True, False], ids=["accepted", "failing-at-once"])
async def test_an_update_sent_after_a_transfer_s_failure_goes_after_it(accepted: bool) -> None:
    """A transfer of the recorded call (sb07 to sb09) is asked; Graph posts ``transferring``
    with audio inactive (gdh28), then (if the target rings) ``transferAccepted`` (document
    25), then the failure (document 27) and an update with audio active again, each a
    request of its own: the update arrives first. It waits for the failure, then goes after
    it: handlers see the failure, then the update, and the call ends with audio active (it
    was dropped as stale, the call left with audio inactive)."""
    sink = Sink()
    seq = sink.sequencer(window=NEVER)
    for name in (
        "sb07-p2p-callupdates-p2ptest2event1establishing.json",
        "sb08-p2p-callupdates-p2ptest2event2established.json",
        "sb09-p2p-callupdates-p2ptest2event3updatedwithmediastate.json",
    ):
        seq.accept(one(recorded_item(name)))
    call_id = sink.deliveries[0].event.call_id
    seq.lifecycle.transfer_asked(call_id, _agent("agent"))
    seq.accept(one(_recorded_call_item("gdh28-beta-call-transfer-2019.json")))
    if accepted:
        seq.accept(one(_recorded_call_item("25-call-transfer-transfer-accepted.json")))
    seq.accept(one(_recorded_update_after_failure()))
    seq.accept(one(_recorded_call_item("27-call-transfer-transfer-failed-7000.json")))
    progress = ["transferring", "transferAccepted"] if accepted else ["transferring"]
    assert sink.labels[3:] == [*progress, "established", "CallUpdated"]
    assert _told_failed(sink) == [("CallStateChanged", progress[-1])]
    last = sink.deliveries[-1]
    assert isinstance(last.event, events.CallUpdated)
    assert not last.event.transfer_failed
    assert "media_state" in last.event.changed
    assert last.snapshot is not None
    assert last.snapshot.media_state is not None
    assert last.snapshot.media_state.audio == "active"
    assert (seq.counts["stale"], seq.counts["duplicate"]) == (0, 0)
    seq.close()


TRANSFER_FAILED = models.ResultInfo(code=500, subcode=7000, message="Transfer failed.")


def _failed_transfer(call_id: str = "c") -> dict[str, Any]:
    return b.call_state(call_id, "established", result_info=TRANSFER_FAILED)


async def test_a_transfer_failure_before_its_transferring_waits_for_it() -> None:
    """Each notification is a request of its own: the failure of a transfer (``established``
    with a ``resultInfo``) may arrive before that transfer's ``transferring``. It went at
    once, and ``transferring`` after it left the call transferring, though it is back in
    ``established``. It waits for ``transferring``; a copy of it meanwhile is a repeat, and
    what comes behind it waits behind it."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(_failed_transfer()))
    seq.accept(one(_failed_transfer()))  # Graph sent it twice
    seq.accept(one(b.tone("c", "tone1", 1)))
    assert sink.labels == ["establishing", "established"]
    seq.accept(one(b.call_state("c", "transferring")))
    assert sink.labels[2:] == ["transferring", "established", "tone:tone1"]
    back = sink.deliveries[3]
    assert isinstance(back.event, events.CallStateChanged)
    assert back.event.previous_state == "transferring"
    assert back.event.result_info == TRANSFER_FAILED
    assert back.snapshot is not None
    assert back.snapshot.state == "established"
    assert back.life.state == "established"  # and it stays there
    assert seq.counts["held"] == 1
    assert seq.counts["duplicate"] == 1
    # Tried again, it fails alike, in Graph's order this time: nothing waits.
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(_failed_transfer()))
    assert sink.labels[5:] == ["transferring", "established"]
    assert seq.counts["held"] == 1
    seq.close()


async def test_a_transfer_failure_whose_transferring_never_comes_goes_with_the_window() -> None:
    """Graph may tell a failed transfer by the update alone: it waits the window, then goes
    as it is (an update), once; a later update with a ``resultInfo`` and no transfer asked
    since waits for nothing."""
    sink = Sink()
    seq = sink.sequencer(window=0.05)
    _established(seq)
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(_failed_transfer()))
    assert sink.labels == ["establishing", "established"]
    await until(lambda: len(sink.deliveries) == 3)
    failed = sink.deliveries[2].event
    assert isinstance(failed, events.CallUpdated)
    assert failed.result_info == TRANSFER_FAILED
    assert seq.counts["released_alone"] == 1
    seq.accept(one(_failed_transfer()))  # a repeat
    other = models.ResultInfo(code=500, subcode=7001, message="Something else.")
    seq.accept(one(b.call_state("c", "established", result_info=other)))
    assert sink.labels[3:] == ["CallUpdated"]
    assert seq.counts["duplicate"] == 1
    assert seq.counts["held"] == 1
    seq.close()


async def test_nothing_waits_for_a_transferring_unless_a_transfer_is_on_its_way() -> None:
    """A ``resultInfo`` with no transfer asked, an update without one while a transfer is on
    its way, and a transfer Graph completes go at once."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.accept(one(_failed_transfer()))
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(b.call_state("c", "established", subject="again")))
    seq.accept(one(b.call_state("c", "hold")))
    seq.accept(one(b.call_state("c", "established")))
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(b.call_state("c", "transferAccepted")))
    seq.accept(one(b.call_terminated("c", code=0, subcode=7015, message="transferred")))
    assert sink.labels == [
        "establishing",
        "established",
        "CallUpdated",
        "CallUpdated",
        "hold",
        "established",
        "transferring",
        "transferAccepted",
        "terminated",
    ]
    assert seq.counts["held"] == 0
    seq.close()


async def test_a_call_ending_lets_a_transfer_failure_go_first() -> None:
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(_failed_transfer()))
    seq.accept(one(b.call_terminated("c")))
    assert sink.labels[2:] == ["CallUpdated", "terminated"]
    seq.close()


async def test_a_state_behind_a_waiting_transfer_failure_is_delivered_once() -> None:
    """A state arriving while a transfer's failure waits for its ``transferring`` waits
    behind it; Graph sending it twice meanwhile is a repeat, not the call moving again."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(_failed_transfer()))
    seq.accept(one(b.call_state("c", "hold")))
    seq.accept(one(b.call_state("c", "hold")))
    seq.accept(one(b.call_state("c", "transferring")))
    assert sink.labels[2:] == ["transferring", "established", "hold"]
    assert seq.counts["duplicate"] == 1
    seq.close()


async def test_a_tone_that_came_before_a_transfer_failure_goes_before_it() -> None:
    """A tone waiting for the one before it, then a transfer's failure waiting for its
    ``transferring``: the ``transferring`` goes right before the failure, the tone before
    both."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.tone("c", "tone3", 3)))
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(_failed_transfer()))
    seq.accept(one(b.tone("c", "tone2", 2)))
    assert sink.labels[2:] == ["tone:tone1", "tone:tone2", "tone:tone3"]
    seq.accept(one(b.call_state("c", "transferring")))
    assert sink.labels[5:] == ["transferring", "established"]
    # And with the transferring first, it waits behind the tone, before the failure.
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(b.tone("c", "tone5", 5)))
    seq.accept(one(_failed_transfer()))
    seq.accept(one(b.call_state("c", "transferring")))
    assert sink.labels[7:] == []
    seq.accept(one(b.tone("c", "tone4", 4)))
    assert sink.labels[7:] == ["tone:tone4", "tone:tone5", "transferring", "established"]
    assert seq.counts["released_alone"] == 0
    seq.close()


async def test_tones_wait_behind_a_transfer_failure_whatever_tone_waits_with_it() -> None:
    """A tone arriving while a transfer's failure waits for its ``transferring`` waits behind
    it, as any later event: a tone already waiting behind that failure did not make the next
    one go at once, ahead of the failure, of the states held with it and of that tone (the
    call's first tones, which wait for no number, reached handlers swapped)."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(_failed_transfer()))
    seq.accept(one(b.tone("c", "tone5", 5)))  # the call's first tone, behind the failure
    seq.accept(one(b.tone("c", "tone6", 6)))
    assert sink.labels[2:] == []
    seq.accept(one(b.call_state("c", "transferring")))
    assert sink.labels[2:] == ["transferring", "established", "tone:tone5", "tone:tone6"]
    # With the tone before it delivered: the next key waits behind the failure and the
    # hold that came before it, though a later key waits for it.
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(_failed_transfer()))
    seq.accept(one(b.call_state("c", "hold")))
    seq.accept(one(b.tone("c", "tone8", 8)))
    seq.accept(one(b.tone("c", "tone7", 7)))
    assert sink.labels[6:] == []
    seq.accept(one(b.call_state("c", "transferring")))
    assert sink.labels[6:] == ["transferring", "established", "hold", "tone:tone7", "tone:tone8"]
    assert seq.counts["released_alone"] == 0
    seq.close()


async def test_tones_held_behind_a_transfer_failure_keep_their_order_after_the_window() -> None:
    """A transfer's failure told by the update alone waits out the window, and tones behind
    it with it; no number was skipped, so the call's later tones still go in ``sequenceId``
    order: the window closing gave tone order up for the rest of the call."""
    sink = Sink()
    seq = sink.sequencer(window=0.02)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(_failed_transfer()))
    seq.accept(one(b.tone("c", "tone2", 2)))
    await until(lambda: len(sink.deliveries) == 5)
    assert sink.labels[2:] == ["tone:tone1", "CallUpdated", "tone:tone2"]
    record = seq.record(id_key("c"))
    assert record is not None
    assert record.tone_next == 3
    seq.accept(one(b.tone("c", "tone4", 4)))
    seq.accept(one(b.tone("c", "tone3", 3)))
    assert sink.labels[5:] == ["tone:tone3", "tone:tone4"]
    seq.close()


async def test_a_transfer_asked_while_the_last_one_s_failure_waits_gets_its_own_failure() -> None:
    """The bot asks a transfer again before the first one's news came (its request failed
    without a refusal, or it asked twice): the first ``transferring`` is the first
    transfer's, not the second's, so the second's failure, worded as the first, waits for
    the second ``transferring`` rather than be taken for a repeat of the first failure
    (which left the call ``transferring`` though it is back in ``established``)."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(_failed_transfer()))  # the first transfer's failure, swapped: it waits
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(b.call_state("c", "transferring")))
    assert sink.labels[2:] == ["transferring", "established"]
    seq.accept(one(_failed_transfer()))  # the second's, swapped too: it waits
    assert sink.labels[4:] == []
    seq.accept(one(b.call_state("c", "transferring")))
    assert sink.labels[4:] == ["transferring", "established"]
    assert sink.deliveries[-1].life.state == "established"
    assert seq.counts["duplicate"] == 0
    assert seq.counts["held"] == 2
    seq.close()


async def test_two_transfers_failing_without_a_transferring_each_tell_their_failure() -> None:
    """Graph may tell a failed transfer by the update alone: asked twice, the two failures,
    worded alike, are each news (and go when the window closes)."""
    sink = Sink()
    seq = sink.sequencer(window=0.02)
    _established(seq)
    seq.lifecycle.transfer_asked("c")
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(_failed_transfer()))
    await until(lambda: len(sink.deliveries) == 3)
    seq.accept(one(_failed_transfer()))
    await until(lambda: len(sink.deliveries) == 4)
    assert sink.labels[2:] == ["CallUpdated", "CallUpdated"]
    assert seq.counts["duplicate"] == 0
    seq.close()


async def test_a_refused_transfer_does_not_settle_the_one_asked_before_it() -> None:
    """Graph refused the second transfer asked while the first one's failure waits for its
    ``transferring``: that failure still waits for it."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.note(sequencing.TransferAsked("c"))
    seq.accept(one(_failed_transfer()))
    seq.note(sequencing.TransferAsked("c"))
    seq.note(sequencing.TransferRefused("c"))
    assert sink.labels[2:] == []
    seq.accept(one(b.call_state("c", "transferring")))
    assert sink.labels[2:] == ["transferring", "established"]
    assert sink.deliveries[-1].life.state == "established"
    seq.accept(one(_failed_transfer()))  # a copy: no transfer was asked since
    assert seq.counts["duplicate"] == 1
    seq.close()


async def test_each_transfer_s_failure_is_told_behind_a_waiting_tone() -> None:
    """Two transfers asked, each failure arriving before its ``transferring``, behind a tone
    waiting for the one before it: the first ``transferring`` waits behind the tone, right
    before its failure, and counts there. The second failure, worded as the first, was then
    taken for a copy of the first (which seemed still to wait) and dropped; the second
    ``transferring`` went before the first failure."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.tone("c", "tone3", 3)))  # waits for tone2
    seq.lifecycle.transfer_asked("c")
    seq.lifecycle.transfer_asked("c")
    for _ in range(2):
        seq.accept(one(_failed_transfer()))
        seq.accept(one(b.call_state("c", "transferring")))
    assert sink.labels[2:] == ["tone:tone1"]
    seq.accept(one(b.tone("c", "tone2", 2)))
    moves = ["transferring", "established"] * 2
    assert sink.labels[3:] == ["tone:tone2", "tone:tone3", *moves]
    assert sink.deliveries[-1].life.state == "established"
    assert seq.counts["duplicate"] == 0
    seq.close()


async def test_a_transfer_s_transferring_goes_before_its_failure_held_behind_another() -> None:
    """The first transfer's ``transferring`` went; its failure waits behind a tone, and the
    second transfer's failure behind that: the second ``transferring`` goes right before the
    second failure. It went after it, so that failure waited out the window and the call was
    left ``transferring``."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.lifecycle.transfer_asked("c")
    seq.lifecycle.transfer_asked("c")
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.tone("c", "tone3", 3)))  # waits for tone2
    seq.accept(one(_failed_transfer()))
    seq.accept(one(_failed_transfer()))  # the second transfer's
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(b.tone("c", "tone2", 2)))
    assert sink.labels[2:] == [
        "transferring",
        "tone:tone1",
        "tone:tone2",
        "tone:tone3",
        "established",
        "transferring",
        "established",
    ]
    assert sink.deliveries[-1].life.state == "established"
    record = seq.record(id_key("c"))
    assert record is not None
    assert not record.held
    assert seq.counts["released_alone"] == 0
    seq.close()


def _told_failed(sink: Sink) -> list[tuple[str, str | None]]:
    """Each delivery flagged as a transfer's failure: its kind and the state it came from."""
    return [
        (type(d.event).__name__, getattr(d.event, "previous_state", None))
        for d in sink.deliveries
        if isinstance(d.event, events.CallStateChanged | events.CallUpdated)
        and d.event.transfer_failed
    ]


async def test_each_transfer_s_failure_is_flagged_once_whichever_way_graph_tells_it() -> None:
    """The sequencer counts the transfers asked and which had their failure: a delivery that
    is such news says so (``transfer_failed``), once per transfer, back from
    ``transferring`` (a transition) or told by the update alone (an update, once the window
    closed). A copy, or a ``resultInfo`` with no transfer asked, is none."""
    sink = Sink()
    seq = sink.sequencer(window=0.02)
    _established(seq)
    seq.accept(one(_failed_transfer()))  # no transfer asked: a reason, not a failure
    seq.note(sequencing.TransferAsked("c"))
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(_failed_transfer()))
    seq.accept(one(_failed_transfer()))  # Graph sent it twice
    assert _told_failed(sink) == [("CallStateChanged", "transferring")]
    back = sink.deliveries[-1].event
    assert isinstance(back, events.CallStateChanged)
    assert back.result_info == TRANSFER_FAILED
    seq.note(sequencing.TransferAsked("c"))  # tried again: told by the update alone
    seq.accept(one(_failed_transfer()))
    await until(lambda: len(_told_failed(sink)) == 2)
    seq.accept(one(_failed_transfer()))  # Graph sent it twice
    assert _told_failed(sink) == [("CallStateChanged", "transferring"), ("CallUpdated", None)]
    assert sink.labels[2:] == ["CallUpdated", "transferring", "established", "CallUpdated"]
    assert seq.counts["duplicate"] == 2
    seq.close()


async def test_two_transfers_asked_at_once_have_their_failures_flagged_each() -> None:
    """Two transfers asked before any news: each failure, worded alike, is flagged, the first
    waiting for its ``transferring`` and the second told by the update alone."""
    sink = Sink()
    seq = sink.sequencer(window=0.02)
    _established(seq)
    seq.note(sequencing.TransferAsked("c"))
    seq.note(sequencing.TransferAsked("c"))
    seq.accept(one(_failed_transfer()))  # before its transferring: it waits
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(_failed_transfer()))
    await until(lambda: len(sink.deliveries) == 5)
    assert _told_failed(sink) == [("CallStateChanged", "transferring"), ("CallUpdated", None)]
    seq.close()


async def test_a_transfer_refused_or_completed_has_no_failure_flagged() -> None:
    """A transfer Graph refused (a 4xx: ``TransferRefused``) brings no news, so a copy of the
    last failure is a repeat; a transfer that completes ends the call, its ``terminated``
    carrying a ``resultInfo`` too, and a ``transferAccepted`` naming one is progress: no
    failure is flagged."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.note(sequencing.TransferAsked("c"))
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(_failed_transfer()))
    seq.note(sequencing.TransferAsked("c"))
    seq.note(sequencing.TransferRefused("c"))
    seq.accept(one(_failed_transfer()))  # a copy: the refused transfer brings no news
    assert seq.counts["duplicate"] == 1
    seq.note(sequencing.TransferAsked("c"))
    seq.accept(one(b.call_state("c", "transferring")))
    going = models.ResultInfo(code=200, message="transferAccepted")
    seq.accept(one(b.call_state("c", "transferAccepted", result_info=going)))
    seq.accept(one(b.call_terminated("c", code=0, subcode=7015, message="transferred")))
    assert sink.labels[2:] == [
        "transferring",
        "established",
        "transferring",
        "transferAccepted",
        "terminated",
    ]
    assert _told_failed(sink) == [("CallStateChanged", "transferring")]
    assert seq.counts["held"] == 0
    seq.close()


async def test_a_transferring_after_its_transfer_s_outcome_is_stale() -> None:
    """A transfer's failure waits the window for its ``transferring``, then goes alone; that
    ``transferring`` coming later is of a transfer already told, and is dropped as stale. It
    went: the call seemed transferring after its handlers were told the transfer failed, and
    the next transfer's failure, told by the update alone, came as a move back to
    ``established``. A copy of ``transferring`` Graph sends after ``transferAccepted`` is a
    repeat."""
    sink = Sink()
    seq = sink.sequencer(window=0.02)
    _established(seq)
    seq.note(sequencing.TransferAsked("c"))
    seq.accept(one(_failed_transfer()))
    await until(lambda: len(sink.deliveries) == 3)
    seq.accept(one(b.call_state("c", "transferring")))  # the first transfer's, too late
    assert sink.labels[2:] == ["CallUpdated"]
    assert sink.deliveries[-1].life.state == "established"
    assert seq.counts["stale"] == 1
    seq.note(sequencing.TransferAsked("c"))  # tried again: told by the update alone
    seq.accept(one(_failed_transfer()))
    await until(lambda: len(sink.deliveries) == 4)
    assert _told_failed(sink) == [("CallUpdated", None), ("CallUpdated", None)]
    seq.note(sequencing.TransferAsked("c"))  # a third, which completes
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(b.call_state("c", "transferAccepted")))
    seq.accept(one(b.call_state("c", "transferring")))  # Graph retried it, late
    seq.accept(one(b.call_terminated("c", code=0, subcode=7015, message="transferred")))
    assert sink.labels[4:] == ["transferring", "transferAccepted", "terminated"]
    assert (seq.counts["stale"], seq.counts["duplicate"]) == (1, 1)
    seq.close()


async def test_a_transfer_s_acceptance_before_its_transferring_waits_for_it() -> None:
    """A transfer goes ``transferring``, then ``transferAccepted``; each is a request of its
    own, and the acceptance may come first. It waits for ``transferring``, which goes before
    it, as ``establishing`` goes before ``established``: it was dropped as stale, and
    ``on_state("transferring")`` never ran. A copy of ``transferring`` is a repeat."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.lifecycle.transfer_asked("c", _agent("first"))
    seq.accept(one(b.call_state("c", "transferAccepted")))
    assert sink.labels[2:] == []
    seq.accept(one(b.call_state("c", "transferring")))
    assert sink.labels[2:] == ["transferring", "transferAccepted"]
    accepted = sink.deliveries[-1].event
    assert isinstance(accepted, events.CallStateChanged)
    assert accepted.previous_state == "transferring"
    seq.accept(one(b.call_state("c", "transferring")))  # Graph sent it twice
    assert (seq.counts["stale"], seq.counts["duplicate"], seq.counts["held"]) == (0, 1, 1)
    seq.accept(one(b.call_terminated("c", code=0, subcode=7015, message="transferred")))
    assert sink.labels[2:] == ["transferring", "transferAccepted", "terminated"]
    assert not any(getattr(d.event, "transfer_failed", False) for d in sink.deliveries)
    assert seq.counts["released_alone"] == 0
    seq.close()


async def test_a_transfer_s_acceptance_whose_transferring_never_comes_goes_with_the_window() -> (
    None
):
    """``transferAccepted`` waits the window for its ``transferring``, then goes alone, counted
    as the transfer's progress: a ``transferring`` after it is stale (a transfer only goes
    forward), and a copy of that a repeat. The call's end lets one waiting go first."""
    sink = Sink()
    seq = sink.sequencer(window=0.02)
    _established(seq)
    seq.lifecycle.transfer_asked("c", _agent("first"))
    seq.accept(one(b.call_state("c", "transferAccepted")))
    assert sink.labels[2:] == []  # held: nothing awaited since it came
    await until(lambda: len(sink.deliveries) == 3)
    assert sink.labels[2:] == ["transferAccepted"]
    seq.accept(one(b.call_state("c", "transferring")))  # too late
    seq.accept(one(b.call_state("c", "transferring")))  # Graph sent it twice
    assert (seq.counts["stale"], seq.counts["duplicate"]) == (1, 1)
    assert seq.lifecycle.get("c").state == "transferAccepted"  # type: ignore[union-attr]
    seq.close()
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.lifecycle.transfer_asked("c", _agent("first"))
    seq.accept(one(b.call_state("c", "transferAccepted")))
    seq.accept(one(b.call_terminated("c", code=0, subcode=7015, message="transferred")))
    assert sink.labels[2:] == ["transferAccepted", "terminated"]
    seq.close()


async def test_a_transfer_s_acceptance_after_its_failure_is_stale() -> None:
    """Graph tells a transfer ``transferring``, ``transferAccepted``, then its failure; the
    acceptance arriving after the failure is of a transfer already told: the call stays
    ``established`` and its handlers are not told it is being transferred again."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.lifecycle.transfer_asked("c", _agent("first"))
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(_failed_transfer()))
    seq.accept(one(b.call_state("c", "transferAccepted")))
    assert sink.labels[2:] == ["transferring", "established"]
    assert seq.counts["stale"] == 1
    assert seq.lifecycle.get("c").state == "established"  # type: ignore[union-attr]
    seq.close()


@pytest.mark.parametrize("first", ["failure", "acceptance"])
@pytest.mark.parametrize("then", ["transferring", "window-closes"])
async def test_a_transfer_s_acceptance_and_failure_wait_for_its_transferring(
    first: str, then: str
) -> None:
    """A transfer accepted, then failed, with its ``transferring`` late: the failure
    (``established`` with a ``resultInfo``) and ``transferAccepted``, whichever came first,
    wait for it, and go after it, the acceptance before the failure (a transfer's progress
    before its end). The acceptance let the failure go at once, and the ``transferring``
    behind them was stale. With the ``transferring`` lost, both go when the window closes,
    the acceptance first (counted as the transfer's progress), and a ``transferring`` coming
    after them is stale."""
    sink = Sink()
    seq = sink.sequencer(window=300 if then == "transferring" else 0.02)
    _established(seq)
    seq.lifecycle.transfer_asked("c", _agent("first"))
    accepted = one(b.call_state("c", "transferAccepted"))
    failed = one(_failed_transfer())
    for event in (failed, accepted) if first == "failure" else (accepted, failed):
        seq.accept(event)
    assert sink.labels[2:] == []  # held: nothing awaited since they came
    if then == "transferring":
        seq.accept(one(b.call_state("c", "transferring")))
        assert sink.labels[2:] == ["transferring", "transferAccepted", "established"]
    else:
        await until(lambda: len(sink.deliveries) == 4)
        assert sink.labels[2:] == ["transferAccepted", "established"]
    back = sink.deliveries[-1].event
    assert isinstance(back, events.CallStateChanged)
    assert back.previous_state == "transferAccepted"
    assert back.transfer_failed
    assert back.transfer_target == _agent("first")
    late = then == "window-closes"
    if late:
        seq.accept(one(b.call_state("c", "transferring")))
    assert (seq.counts["stale"], seq.counts["released_alone"]) == (int(late), int(late))
    assert seq.lifecycle.get("c").state == "established"  # type: ignore[union-attr]
    seq.close()


async def test_a_transfer_s_acceptance_goes_before_its_failure_held_behind_a_tone() -> None:
    """A transfer's failure waits behind a tone waiting for the one before it, and its
    ``transferAccepted`` comes after it: the acceptance goes right before the failure (a
    transfer's progress before its end). It went after it, and was stale then."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.lifecycle.transfer_asked("c", _agent("first"))
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(b.tone("c", "tone3", 3)))  # waits for tone2
    seq.accept(one(_failed_transfer()))
    seq.accept(one(b.call_state("c", "transferAccepted")))
    assert sink.labels[2:] == ["tone:tone1", "transferring"]
    seq.accept(one(b.tone("c", "tone2", 2)))
    assert sink.labels[4:] == ["tone:tone2", "tone:tone3", "transferAccepted", "established"]
    assert _told_failed(sink) == [("CallStateChanged", "transferAccepted")]
    assert seq.counts["stale"] == 0
    seq.close()


async def test_a_copy_of_a_failure_behind_a_stale_acceptance_held_is_a_repeat() -> None:
    """A transfer's failure went; its ``transferAccepted``, later, waits behind a tone
    waiting for the one before it, and will be stale. Graph sending the failure again
    meanwhile is a repeat: the acceptance was taken for where the call goes next, so the
    copy for the call moving back, and it reached handlers as an update."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.lifecycle.transfer_asked("c", _agent("first"))
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(_failed_transfer()))
    seq.accept(one(b.tone("c", "tone3", 3)))  # waits for tone2
    seq.accept(one(b.call_state("c", "transferAccepted")))
    seq.accept(one(_failed_transfer()))  # Graph sent it twice
    seq.accept(one(b.tone("c", "tone2", 2)))
    assert sink.labels[2:] == [
        "tone:tone1",
        "transferring",
        "established",
        "tone:tone2",
        "tone:tone3",
    ]
    assert (seq.counts["stale"], seq.counts["duplicate"]) == (1, 1)
    seq.close()


async def test_an_update_sent_before_a_transfer_counts_nothing_for_the_news_held() -> None:
    """Two transfers asked before any news; behind a tone waiting for the one before it, an
    update that may have been sent before the first transfer began (it waits for that
    transfer's outcome), the first transfer's acceptance and failure, the second's failure
    and its ``transferring``. What is held was judged as if that update moved the call: the
    acceptance was counted as the second transfer's progress, so its ``transferring`` went
    behind its failure; the failure waited out the window (told as an update) and the
    ``transferring`` was stale. Each is judged as delivery will judge it, and a transfer's
    progress held behind its failure goes before it: all go once the tone comes, the update
    right after the first transfer's failure (which came meanwhile: it was sent after it)."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.lifecycle.transfer_asked("c", _agent("first"))
    seq.lifecycle.transfer_asked("c", _agent("second"))
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(b.tone("c", "tone3", 3)))  # waits for tone2
    before = b.call_state("c", "established")
    before["resourceData"]["mediaState"] = {"audio": "active"}
    seq.accept(one(before))
    seq.accept(one(b.call_state("c", "transferAccepted")))
    seq.accept(one(_failed_transfer()))
    seq.accept(one(_failed_transfer()))  # the second transfer's, worded as the first's
    seq.accept(one(b.call_state("c", "transferring")))  # the second transfer's
    seq.accept(one(b.tone("c", "tone2", 2)))
    assert sink.labels[2:] == [
        "tone:tone1",
        "transferring",
        "tone:tone2",
        "tone:tone3",
        "transferAccepted",
        "established",
        "CallUpdated",
        "transferring",
        "established",
    ]
    assert _told_failed(sink) == [
        ("CallStateChanged", "transferAccepted"),
        ("CallStateChanged", "transferring"),
    ]
    failed = [d.event for d in sink.deliveries if getattr(d.event, "transfer_failed", False)]
    assert [getattr(e, "transfer_target", None) for e in failed] == [
        _agent("first"),
        _agent("second"),
    ]
    update = sink.deliveries[-3].event
    assert isinstance(update, events.CallUpdated)
    assert update.changed == {"media_state"}
    record = seq.record(id_key("c"))
    assert record is not None
    assert not record.held
    assert (seq.counts["stale"], seq.counts["released_alone"]) == (0, 0)
    seq.close()


def _two_transfers_asked_after_a_tone() -> tuple[Sink, Sequencer]:
    """An established call, its first tone, two transfers asked, and the first one's
    ``transferring``."""
    sink = Sink()
    seq = sink.sequencer(window=1)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.lifecycle.transfer_asked("c", _agent("first"))
    seq.lifecycle.transfer_asked("c", _agent("second"))
    seq.accept(one(b.call_state("c", "transferring")))
    return sink, seq


def _assert_each_transfer_failed_after_the_tones(sink: Sink) -> None:
    """Tones 2 and 3 went behind the first ``transferring``, then each transfer's failure
    after its own ``transferring``."""
    assert sink.labels[2:] == [
        "tone:tone1",
        "transferring",
        "tone:tone2",
        "tone:tone3",
        "established",
        "transferring",
        "established",
    ]
    assert _told_failed(sink) == [
        ("CallStateChanged", "transferring"),
        ("CallStateChanged", "transferring"),
    ]


@pytest.mark.looptime
async def test_what_is_held_is_judged_as_of_when_it_came() -> None:
    """What is held is judged as of when it came, however late it is delivered: the call
    back in ``established`` without a ``resultInfo``, coming within the window of the first
    transfer's ``transferring``, waits for that transfer's outcome, and is not taken for its
    failure in Graph's 2019 shape when delivered past that window, behind a tone (the walk
    of what is held judged it one way, delivery the other). The failure after it is the
    first transfer's: it goes before the update, then the second transfer's
    ``transferring``."""
    sink, seq = _two_transfers_asked_after_a_tone()
    await asyncio.sleep(0.9)
    seq.accept(one(b.tone("c", "tone3", 3)))  # waits for tone2
    seq.accept(one(b.call_state("c", "established", subject="back")))  # no resultInfo
    seq.accept(one(_failed_transfer()))
    seq.accept(one(b.call_state("c", "transferring")))
    await asyncio.sleep(0.6)  # past the first transferring's window, within the tone's
    seq.accept(one(b.tone("c", "tone2", 2)))
    assert sink.labels[2:] == [
        "tone:tone1",
        "transferring",
        "tone:tone2",
        "tone:tone3",
        "established",
        "CallUpdated",
        "transferring",
    ]
    assert _told_failed(sink) == [("CallStateChanged", "transferring")]
    failure = sink.deliveries[-3].event
    assert isinstance(failure, events.CallStateChanged)
    assert failure.transfer_target == _agent("first")
    assert (seq.counts["stale"], seq.counts["released_alone"]) == (0, 0)
    seq.close()


@pytest.mark.looptime
async def test_a_copy_of_a_failure_held_behind_a_transfer_s_2019_failure_is_a_repeat() -> None:
    """Two transfers asked; past the window of the first one's ``transferring``, behind a
    tone waiting for the one before it, the call back in ``established`` without a
    ``resultInfo`` (that transfer's failure in Graph's 2019 shape), then the second
    transfer's failure, twice, before its ``transferring``. The second failure waits for
    that, and its copy meanwhile is a repeat: what is held was judged without counting the
    2019 failure, so the copy was taken for news and reached handlers as an update."""
    sink, seq = _two_transfers_asked_after_a_tone()
    await asyncio.sleep(2)  # the target rings
    seq.accept(one(b.tone("c", "tone3", 3)))  # waits for tone2
    seq.accept(one(b.call_state("c", "established", subject="back")))  # no resultInfo
    seq.accept(one(_failed_transfer()))
    seq.accept(one(_failed_transfer()))  # Graph sent it twice
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(b.tone("c", "tone2", 2)))
    _assert_each_transfer_failed_after_the_tones(sink)
    assert (seq.counts["duplicate"], seq.counts["released_alone"]) == (1, 0)
    seq.close()


async def test_a_roster_that_comes_back_after_a_change_is_not_a_duplicate() -> None:
    sink = Sink()
    seq = sink.sequencer()
    alice, bob = b.participant("alice"), b.participant("bob")
    for people in ([alice], [alice], [alice, bob], [alice]):
        seq.accept(one(b.roster("meet", people)))
    rosters = [d.event for d in sink.deliveries]
    assert len(rosters) == 3
    last = rosters[-1]
    assert isinstance(last, events.ParticipantsUpdated)
    assert [p.id for p in last.left] == ["bob"]
    assert seq.counts["duplicate"] == 1
    seq.close()


def rosters(sink: Sink) -> list[events.ParticipantsUpdated]:
    return [d.event for d in sink.deliveries if isinstance(d.event, events.ParticipantsUpdated)]


def names(people: list[models.Participant]) -> list[str | None]:
    return [p.display_name or p.id for p in people]


async def test_a_leave_is_seen_when_the_participant_who_changed_last_leaves() -> None:
    # rosterSequenceNumber is when each participant last changed: bob joined last, at 2.
    sink = Sink()
    seq = sink.sequencer()
    alice = b.participant("alice").model_copy(update={"roster_sequence_number": 1})
    bob = b.participant("bob").model_copy(update={"roster_sequence_number": 2})
    seq.accept(one(b.roster("meet", [alice, bob])))
    seq.accept(one(b.roster("meet", [alice])))
    assert [names(r.left) for r in rosters(sink)] == [[], ["bob"]]
    assert seq.counts["stale"] == 0
    seq.close()


async def test_a_participant_named_by_its_path_is_the_one_named_by_its_id() -> None:
    sink = Sink()
    seq = sink.sequencer()
    by_id = recorded_item("gdh11-beta-participant-mute-2018.json")  # the 2018 mute roster
    bot_id = by_id["resourceData"][1]["id"]
    seq.accept(one(by_id))
    # The same call's invite roster names participants by path only, in both dialects.
    for name in (
        "gdh10-beta-participant-invite-2018.json",
        "gdh30-beta-participant-invite-2019.json",
    ):
        seq.accept(one(recorded_item(name)))
    app, communications = rosters(sink)[1:]
    # The two documents give Test User two participant ids: only the bot is the same one.
    assert bot_id not in [p.id for p in app.joined + app.left]
    assert "Test Bot" not in names(app.joined + app.left)
    assert (communications.joined, communications.left) == ([], [])
    assert bot_id.lower() in sink.deliveries[-1].roster
    seq.close()


async def test_an_invitee_sent_without_an_id_keeps_its_entry_once_it_has_one() -> None:
    sink = Sink()
    seq = sink.sequencer()
    joined = recorded_item("sb16-groupcalls-groupcalluserjoin.json")  # Sam2 and the bot
    pending = copy.deepcopy(joined)
    sam = pending["resourceData"][0]
    sam["id"] = None  # as Graph documents an invitee still being added
    del sam["info"]["participantId"]
    for item in (recorded_item("sb15-groupcalls-groupcallbotjoin.json"), pending, joined):
        seq.accept(one(item))
    assert [(names(r.joined), names(r.left), names(r.updated)) for r in rosters(sink)] == [
        (["CallAndRedirectBot"], [], []),
        (["Sam2"], [], []),
        ([], [], ["Sam2"]),
    ]
    assert sorted(sink.deliveries[-1].roster) == sorted(
        id_key(p["id"]) for p in joined["resourceData"]
    )
    seq.close()


async def test_a_delta_removal_finds_an_invitee_added_without_an_id() -> None:
    sink = Sink()
    seq = sink.sequencer()
    invitee = b.participant("sam", display_name="Sam").model_copy(update={"id": None})
    added = b.participant("sam", display_name="Sam").model_copy(update={"id": "P-1"})
    seq.accept(one(b.delta_roster("c", [invitee], sequence_number=1, change_type="created")))
    seq.accept(one(b.delta_roster("c", [added], sequence_number=2, change_type="deleted")))
    assert [(names(r.joined), names(r.left)) for r in rosters(sink)] == [
        (["Sam"], []),
        ([], ["Sam"]),
    ]
    assert sink.deliveries[-1].roster == {}
    seq.close()


async def test_a_participant_without_an_id_stays_while_its_details_change() -> None:
    sink = Sink()
    seq = sink.sequencer()
    people = [
        b.participant(n, display_name=n.title()).model_copy(update={"id": None})
        for n in ("ann", "bob")
    ]
    seq.accept(one(b.roster("c", people)))
    moved = [
        p.model_copy(
            update={"info": p.info.model_copy(update={"region": "westus", "language_id": "de-DE"})}
        )
        for p in people
        if p.info is not None
    ]
    seq.accept(one(b.roster("c", moved)))
    assert [(names(r.joined), names(r.left), names(r.updated)) for r in rosters(sink)] == [
        (["Ann", "Bob"], [], []),
        ([], [], ["Ann", "Bob"]),
    ]
    seq.close()


async def test_only_someone_in_the_roster_can_leave_it() -> None:
    sink = Sink()
    seq = sink.sequencer()
    ann, bob, cat = (b.participant(n, display_name=n.title()) for n in ("ann", "bob", "cat"))
    # As the documented 2018 roster: created and deleted items, no sequence numbers.
    added, removal, later = b.roster("c", [ann, bob]), b.roster("c", [ann]), b.roster("c", [cat])
    added["changeType"] = later["changeType"] = "created"
    removal["changeType"] = "deleted"
    for item in (added, removal, later, removal):  # the removal again, after another roster
        seq.accept(one(item))
    dan = b.participant("dan", display_name="Dan", removed_reason="left")
    seq.accept(one(b.roster("c", [bob, cat, dan])))  # a full roster: dan never was in it
    assert [names(r.left) for r in rosters(sink)] == [[], ["Ann"], [], [], []]
    assert [names(r.joined) for r in rosters(sink)][-1] == []
    seq.close()


async def test_a_delta_that_comes_after_a_later_one_still_tells_who_it_names() -> None:
    # Each delta names only who changed: a later one does not carry an earlier one's news.
    sink = Sink()
    seq = sink.sequencer()
    ann, bob, cat = (b.participant(n, display_name=n.title()) for n in ("ann", "bob", "cat"))
    for item in (
        b.delta_roster("c", [ann], sequence_number=1, change_type="created"),
        b.delta_roster("c", [cat], sequence_number=3, change_type="created"),
        b.delta_roster("c", [bob], sequence_number=2, change_type="created"),  # late: bob joined
        b.delta_roster("c", [bob], sequence_number=5, change_type="deleted"),
        b.delta_roster("c", [cat], sequence_number=4, change_type="deleted"),  # late: cat left
    ):
        seq.accept(one(item))
    assert [(names(r.joined), names(r.left)) for r in rosters(sink)] == [
        (["Ann"], []),
        (["Cat"], []),
        (["Bob"], []),
        ([], ["Bob"]),
        ([], ["Cat"]),
    ]
    assert sorted(sink.deliveries[-1].roster) == ["ann"]
    assert seq.counts["stale"] == 0
    seq.close()


async def test_a_late_delta_does_not_undo_a_later_change_of_whom_it_names() -> None:
    sink = Sink()
    seq = sink.sequencer()
    ann = b.participant("ann", display_name="Ann")
    for item in (
        b.delta_roster("c", [ann], sequence_number=1, change_type="created"),
        b.delta_roster("c", [ann], sequence_number=3, change_type="deleted"),
        # Older news of ann, and a copy of the first: she has left since.
        b.delta_roster("c", [b.participant("ann", muted=True)], sequence_number=2),
        b.delta_roster("c", [ann], sequence_number=1, change_type="created"),
    ):
        seq.accept(one(item))
    assert [(names(r.joined), names(r.left)) for r in rosters(sink)] == [
        (["Ann"], []),
        ([], ["Ann"]),
    ]
    assert sink.deliveries[-1].roster == {}
    assert seq.counts["stale"] == 2
    seq.close()


async def test_a_delta_past_the_roster_s_bound_still_tells_who_left_and_changed() -> None:
    sink = Sink()
    seq = Sequencer(sink.deliveries.append, Lifecycle(termination_grace=0.05), max_roster=2)
    ann, bob, cat, dan = (
        b.participant(n, display_name=n.title()) for n in ("ann", "bob", "cat", "dan")
    )
    seq.accept(one(b.delta_roster("c", [ann, bob], sequence_number=1, change_type="created")))
    gone = b.participant("ann", display_name="Ann", removed_reason="left")
    muted = b.participant("bob", display_name="Bob", muted=True)
    # Ann leaves, Bob mutes, Cat and Dan join: only one of them fits.
    seq.accept(one(b.delta_roster("c", [gone, muted, cat, dan], sequence_number=2)))
    seq.accept(one(b.delta_roster("c", [bob, cat], sequence_number=3, change_type="deleted")))
    assert [(names(r.joined), names(r.left), names(r.updated)) for r in rosters(sink)] == [
        (["Ann", "Bob"], [], []),
        (["Cat"], ["Ann"], ["Bob"]),
        ([], ["Bob", "Cat"], []),
    ]
    assert sink.deliveries[-1].roster == {}
    assert seq.counts["roster_full"] == 1
    seq.close()


async def test_a_delta_older_than_a_whole_roster_is_stale_for_everyone() -> None:
    # The whole roster numbered 5 tells everyone as of then: Dan left at 3 and was back by 5.
    sink = Sink()
    seq = sink.sequencer()
    ann, dan = b.participant("ann", display_name="Ann"), b.participant("dan", display_name="Dan")
    whole = b.roster("c", [ann, dan])
    whole["sequenceNumber"] = 5
    for item in (
        whole,
        b.delta_roster("c", [dan], sequence_number=3, change_type="deleted"),
        b.delta_roster("c", [b.participant("zed")], sequence_number=4, change_type="created"),
    ):
        seq.accept(one(item))
    assert [(names(r.joined), names(r.left)) for r in rosters(sink)] == [(["Ann", "Dan"], [])]
    assert sorted(sink.deliveries[-1].roster) == ["ann", "dan"]
    assert seq.counts["stale"] == 2
    seq.close()


async def test_a_notification_about_one_participant_is_not_the_whole_roster() -> None:
    sink = Sink()
    seq = sink.sequencer()
    alice, bob = b.participant("p-alice"), b.participant("p-bob")
    seq.accept(one(b.roster("c", [alice, bob])))
    muted = b.participant("p-bob", muted=True)
    item = b.roster("c", [muted])
    item["resourceUrl"] += "/p-bob"
    item["resourceData"] = item["resourceData"][0]
    seq.accept(one(item))
    update = sink.deliveries[-1].event
    assert isinstance(update, events.ParticipantsUpdated)
    assert (update.joined, update.left, update.updated) == ([], [], [muted])
    assert set(sink.deliveries[-1].roster) == {"palice", "pbob"}
    seq.close()


@pytest.mark.parametrize(
    "ending",
    [
        # As the documented 2018 reject: deleted, the call named but no state.
        {"changeType": "deleted", "resourceData": {"@odata.type": "#microsoft.graph.call"}},
        {"changeType": "deleted", "resourceData": None},
        # Deleted, still naming the state the call was in.
        {"changeType": "deleted", "resourceData": {"state": "established"}},
    ],
)
async def test_the_snapshot_is_in_the_state_the_lifecycle_entered(ending: dict[str, Any]) -> None:
    sink = Sink()
    seq = sink.sequencer()
    for state in ("establishing", "established"):
        seq.accept(one(b.call_state("c", state)))
    seq.accept(one({**b.call_state("c", "established"), **ending}))
    last = sink.deliveries[-1]
    assert isinstance(last.event, events.CallTerminated)
    assert last.life.state == "terminated"
    # A handler's call.state reads the snapshot: it must not say the call is still up.
    assert last.snapshot is not None
    assert last.snapshot.state == "terminated"
    seq.close()


async def test_a_tone_does_not_move_the_snapshot_out_of_the_call_s_state() -> None:
    sink = Sink()
    seq = sink.sequencer()
    for state in ("establishing", "established", "hold"):
        seq.accept(one(b.call_state("c", state)))
    # Graph's tone notifications repeat "established" whatever the call is in.
    seq.accept(one(b.tone("c", "tone1", 1)))
    last = sink.deliveries[-1]
    assert isinstance(last.event, events.ToneReceived)
    assert last.snapshot is not None
    assert last.snapshot.state == last.life.state == "hold"
    seq.close()


# The recorded Teams call whose caller pressed 1 (toneInfo sequenceId 6).
ESTABLISHING = "sb01-p2p-simpletest-p2ptest1event1callestablishing.json"
ESTABLISHED = "sb02-p2p-simpletest-p2ptest1event2callestablished.json"
TONE = "sb04-p2p-simpletest-p2ptest1event4tonepress.json"


@pytest.mark.parametrize(
    "arrivals",
    [
        [TONE, ESTABLISHING, ESTABLISHED],
        [TONE, ESTABLISHED, ESTABLISHING],
        [ESTABLISHING, TONE, ESTABLISHED],
        [ESTABLISHED, TONE, ESTABLISHING],
    ],
    ids=["before-both", "before-both-swapped", "between", "behind-held-established"],
)
async def test_a_tone_before_its_call_is_established_waits_for_it(arrivals: list[str]) -> None:
    sink = Sink()
    seq = sink.sequencer(window=300)  # released by its predecessors, never by the clock
    for name in arrivals:
        seq.accept(one(recorded_item(name)))
    assert sink.labels == ["establishing", "established", "tone:tone1"]
    assert seq.counts["released_alone"] == 0
    seq.close()


@pytest.mark.looptime
async def test_a_call_known_by_its_tones_alone_is_live() -> None:
    """A process started after the call did (no shared store) knows it by its tones alone
    (recorded sb04: ``established`` with ``toneInfo``). The first waits the window for a
    state in vain; then the call is live: the next tones wait for nothing, it is kept alive,
    and once a request of the bot's own is accepted it is no longer pending, so not
    forgotten as ``never_established`` with a tone held."""
    sent: list[str] = []

    async def keep_alive(call_id: str) -> KeepAliveResult:
        sent.append(call_id)
        return KeepAliveResult.OK

    sink = Sink()
    lifecycle = Lifecycle(
        termination_grace=5, keep_alive_interval=60, send_keep_alive=keep_alive, pending_ttl=30
    )
    forgotten: list[str] = []
    lifecycle.when_forgotten(lambda key, why: forgotten.append(why))
    seq = Sequencer(sink.deliveries.append, lifecycle, reorder_window=1)
    first = recorded_item(TONE)
    seq.accept(one(first))
    assert sink.labels == []  # a state may still come first
    await asyncio.sleep(1)
    assert sink.labels == ["tone:tone1"]
    life = lifecycle.get(first["resourceUrl"].rsplit("/", 1)[-1])
    assert life is not None
    assert life.state is None  # no state was delivered: one that comes is a transition
    assert life.keeping_alive
    lifecycle.prove(life.call_id)  # the handler's prompt was accepted
    assert not life.pending
    for number in (7, 8):
        again = copy.deepcopy(first)
        again["resourceData"]["toneInfo"]["sequenceId"] = number
        again["resourceData"]["toneInfo"]["tone"] = f"tone{number - 5}"
        seq.accept(one(again))
    assert sink.labels == ["tone:tone1", "tone:tone2", "tone:tone3"]  # at once
    await asyncio.sleep(61)
    assert sent == [life.call_id]
    assert forgotten == []
    seq.close()


async def test_a_tone_waits_behind_states_it_does_not_follow_and_goes_before_the_end() -> None:
    sink = Sink()
    seq = sink.sequencer(window=300)
    call_id = "6f1f5c00-8c1b-47f1-be9d-660c501041a9"
    seq.accept(one(recorded_item(TONE)))
    seq.accept(one(b.roster(call_id, [b.participant("alice")])))  # waits behind the tone
    seq.accept(one(b.call_state(call_id, "ringing")))
    seq.accept(one(recorded_item(ESTABLISHING)))
    # ringing went: the tone still waits for the call to be established, the roster behind it
    assert sink.labels == ["establishing", "ringing"]
    seq.accept(one(b.call_terminated(call_id)))
    assert sink.labels == [
        "establishing",
        "ringing",
        "tone:tone1",
        "ParticipantsUpdated",
        "terminated",
    ]
    seq.close()


async def test_a_tone_whose_call_is_never_seen_established_goes_when_the_window_closes() -> None:
    sink = Sink()
    seq = sink.sequencer(window=0.05)
    seq.accept(one(recorded_item(TONE)))
    assert sink.labels == []
    await until(lambda: sink.labels == ["tone:tone1"])
    assert seq.counts["released_alone"] == 1
    seq.close()


def _established(seq: Sequencer, call_id: str = "c") -> None:
    seq.accept(one(b.call_state(call_id, "establishing")))
    seq.accept(one(b.call_state(call_id, "established")))


async def test_tones_of_an_established_call_go_in_sequence_order() -> None:
    """A tone whose predecessor (its ``sequenceId`` less one) has not come waits for it, and
    what arrives behind it waits behind it: news (a roster) and a state of the call alike
    (the keys were pressed before it)."""
    sink = Sink()
    seq = sink.sequencer(window=300)  # released by the tone awaited, never by the clock
    _established(seq)
    seq.accept(one(b.tone("c", "tone5", 5)))  # the first: nothing known before it
    seq.accept(one(b.tone("c", "tone7", 7)))
    seq.accept(one(b.roster("c", [b.participant("alice")])))
    seq.accept(one(b.call_state("c", "established", media_state={"audio": "active"})))
    seq.accept(one(b.tone("c", "tone8", 8)))
    assert sink.labels == ["establishing", "established", "tone:tone5"]
    seq.accept(one(b.tone("c", "tone6", 6)))
    assert sink.labels == [
        "establishing",
        "established",
        "tone:tone5",
        "tone:tone6",
        "tone:tone7",
        "ParticipantsUpdated",
        "CallUpdated",
        "tone:tone8",
    ]
    assert seq.counts["released_alone"] == 0
    record = seq.record(id_key("c"))
    assert record is not None
    assert not record.held
    assert record.hold_timer is None
    seq.close()


async def test_tones_held_for_established_go_after_it_in_sequence_order() -> None:
    sink = Sink()
    seq = sink.sequencer(window=300)
    seq.accept(one(b.call_state("c", "establishing")))
    for n in (4, 2, 3):
        seq.accept(one(b.tone("c", f"tone{n}", n)))
    seq.accept(one(b.call_state("c", "established")))
    assert sink.labels == ["establishing", "established", "tone:tone2", "tone:tone3", "tone:tone4"]
    seq.close()


async def test_a_tone_whose_predecessor_never_comes_goes_when_the_window_closes() -> None:
    sink = Sink()
    seq = sink.sequencer(window=0.05)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.tone("c", "tone3", 3)))
    seq.accept(one(b.tone("c", "tone4", 4)))
    assert sink.labels[-1] == "tone:tone1"
    await until(lambda: sink.labels[-2:] == ["tone:tone3", "tone:tone4"])
    assert seq.counts["released_alone"] == 1
    # The one it waited for, late: it goes at once, and the next waits for no one.
    seq.accept(one(b.tone("c", "tone2", 2)))
    seq.accept(one(b.tone("c", "tone5", 5)))
    assert sink.labels[-2:] == ["tone:tone2", "tone:tone5"]
    # A number skipped for good: the call's tones are not numbered one by one (or one was
    # lost), so a later gap holds nothing rather than each key for a window.
    seq.accept(one(b.tone("c", "tone8", 8)))
    seq.accept(one(b.tone("c", "tone7", 7)))
    assert sink.labels[-2:] == ["tone:tone8", "tone:tone7"]
    assert seq.counts["released_alone"] == 1
    record = seq.record(id_key("c"))
    assert record is not None
    assert record.tone_next == sequencing.TONES_UNORDERED
    seq.close()


@pytest.mark.looptime
async def test_a_tone_waits_its_own_window_not_the_first_held_one_s() -> None:
    """Each held event waits ``reorder_window`` from when it came: a tone that began to wait
    a tenth of a window before the call's first hold would have closed still waits for its
    predecessor, which comes within its own window, and the call's tones stay in order."""
    sink = Sink()
    seq = sink.sequencer(window=1)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.tone("c", "tone3", 3)))  # waits for 2
    await asyncio.sleep(0.9)
    seq.accept(one(b.tone("c", "tone5", 5)))  # waits for 4, from now
    await asyncio.sleep(0.05)
    seq.accept(one(b.tone("c", "tone2", 2)))  # 2 and 3 go; 5 waits on
    assert sink.labels[2:] == ["tone:tone1", "tone:tone2", "tone:tone3"]
    await asyncio.sleep(0.5)  # past the window of 3, within that of 5
    assert sink.labels[-1] == "tone:tone3"
    seq.accept(one(b.tone("c", "tone4", 4)))
    assert sink.labels[-2:] == ["tone:tone4", "tone:tone5"]
    assert seq.counts["released_alone"] == 0
    record = seq.record(id_key("c"))
    assert record is not None
    assert (record.tone_next, record.hold_timer, record.held_at) == (6, None, None)
    seq.close()


@pytest.mark.looptime
async def test_what_waits_behind_an_event_let_go_alone_waits_its_own_window() -> None:
    """A transfer's ``transferAccepted`` arriving before its ``transferring``, while a tone
    waits for one that never comes: the tone's window closes first, and it goes alone; the
    acceptance waits on for its ``transferring`` within its own window, and goes after it (it
    went alone with the tone, and the ``transferring`` that came next was dropped as stale)."""
    sink = Sink()
    seq = sink.sequencer(window=1)
    _established(seq)
    seq.lifecycle.transfer_asked("c", _agent("first"))
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.tone("c", "tone3", 3)))  # 2 never comes
    await asyncio.sleep(0.9)
    seq.accept(one(b.call_state("c", "transferAccepted")))
    await asyncio.sleep(0.2)
    assert sink.labels[-1] == "tone:tone3"
    assert seq.lifecycle.get("c").state == "established"  # type: ignore[union-attr]
    seq.accept(one(b.call_state("c", "transferring")))
    assert sink.labels[-3:] == ["tone:tone3", "transferring", "transferAccepted"]
    assert (seq.counts["stale"], seq.counts["released_alone"]) == (0, 1)
    seq.close()


@pytest.mark.parametrize("state", ["transferring", "hold"])
async def test_a_state_waits_behind_a_tone_that_came_before_it(state: str) -> None:
    """A state of the live call arriving while a tone waits for the one before it is not
    that tone's predecessor: the keys were pressed before the call moved, so it waits
    behind them. A copy of it meanwhile is judged against it, not the state before it: a
    repeat; the state before it once more is the call moving back."""
    sink = Sink()
    seq = sink.sequencer(window=300)  # released by the tone awaited, never by the clock
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.tone("c", "tone3", 3)))
    seq.accept(one(b.call_state("c", state)))
    seq.accept(one(b.call_state("c", state)))  # Graph sent it twice
    assert sink.labels[2:] == ["tone:tone1"]
    seq.accept(one(b.tone("c", "tone2", 2)))
    assert sink.labels[2:] == ["tone:tone1", "tone:tone2", "tone:tone3", state]
    moved = sink.deliveries[-1].event
    assert isinstance(moved, events.CallStateChanged)
    assert moved.previous_state == "established"
    assert sink.deliveries[-1].life.state == state
    assert seq.counts["duplicate"] == 1
    assert seq.counts["released_alone"] == 0
    seq.accept(one(b.tone("c", "tone5", 5)))
    seq.accept(one(b.call_state("c", "established")))  # back, behind the waiting tone
    seq.accept(one(b.call_state("c", state)))  # and away again: news, not a repeat
    seq.accept(one(b.tone("c", "tone4", 4)))
    assert sink.labels[6:] == ["tone:tone4", "tone:tone5", "established", state]
    assert seq.counts["duplicate"] == 1
    seq.close()


async def test_a_state_waits_behind_every_tone_numbered_up_to_one_before_it() -> None:
    """Tones taking their places in ``sequenceId`` order never move one that came before a
    state behind it: a tone numbered below one that came first was pressed before too."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.accept(one(b.tone("c", "tone4", 4)))
    seq.accept(one(b.tone("c", "tone7", 7)))
    seq.accept(one(b.call_state("c", "transferring")))
    seq.accept(one(b.tone("c", "tone6", 6)))
    seq.accept(one(b.tone("c", "tone5", 5)))
    assert sink.labels[2:] == [
        "tone:tone4",
        "tone:tone5",
        "tone:tone6",
        "tone:tone7",
        "transferring",
    ]
    seq.close()


async def test_a_copy_of_a_state_held_behind_a_tone_is_judged_by_every_state_held() -> None:
    """States held behind a tone waiting for the one before it, the second adding a value
    the first did not carry: Graph sending the first again changes nothing, as it would
    with nothing held. It was judged against the last state held alone, and reached
    handlers a second time (an update changing nothing)."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.tone("c", "tone3", 3)))  # waits for tone2
    seq.accept(one(b.call_state("c", "hold", subject="on hold")))
    seq.accept(one(b.call_state("c", "hold", media_state={"audio": "inactive"})))
    seq.accept(one(b.call_state("c", "hold", subject="on hold")))  # Graph sent it again
    seq.accept(one(b.tone("c", "tone2", 2)))
    assert sink.labels[2:] == ["tone:tone1", "tone:tone2", "tone:tone3", "hold", "CallUpdated"]
    update = sink.deliveries[-1].event
    assert isinstance(update, events.CallUpdated)
    assert update.changed == {"media_state"}
    assert seq.counts["duplicate"] == 1
    seq.close()


async def test_the_call_s_end_lets_a_waiting_tone_go_first() -> None:
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.tone("c", "tone3", 3)))
    seq.accept(one(b.call_terminated("c")))
    assert sink.labels[-3:] == ["tone:tone1", "tone:tone3", "terminated"]
    seq.close()


def _sorts_while(accepting: list[events.Event], seq: Sequencer) -> int:
    """How many times the sequencer sorted what it holds while taking ``accepting``."""
    code = sequencing._in_lifecycle_order.__code__
    sorts = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal sorts
        if event == "call" and frame.f_code is code:
            sorts += 1

    sys.setprofile(count)
    try:
        for event in accepting:
            seq.accept(event)
    finally:
        sys.setprofile(None)
    return sorts


async def test_a_tone_that_lets_no_waiting_tone_go_does_not_walk_the_backlog() -> None:
    """While tones wait for their predecessors, a tone that goes at once without letting any
    of them go (a late one, or the next of a run far below them) must not make the sequencer
    sort and walk every waiting event for each: that runs inside the request."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    waiting = 100
    for n in range(waiting):  # every other number after 202: each waits
        seq.accept(one(b.tone("c", "tone9", 203 + 2 * n)))
    late = [one(b.tone("c", "tone0", -n)) for n in range(100)]
    run = [one(b.tone("c", "tone2", n)) for n in range(2, 202)]
    assert _sorts_while([*late, *run], seq) == 0
    assert sink.labels[3:] == ["tone:tone0"] * 100 + ["tone:tone2"] * 200
    record = seq.record(id_key("c"))
    assert record is not None
    assert len(record.held) == waiting
    # The one the first waits for lets it go, and only it: the next waits for its own.
    assert _sorts_while([one(b.tone("c", "tone8", 202))], seq) == 1
    assert sink.labels[-2:] == ["tone:tone8", "tone:tone9"]
    assert len(record.held) == waiting - 1
    seq.close()


async def test_tones_waiting_for_predecessors_are_bounded_per_call() -> None:
    """A flood of tones of an established call each missing its predecessor (a token
    holder's, not a caller's) goes on once more wait than any caller could press in a
    window, as digit collection lets it, rather than be kept and sorted at each arrival."""
    sink = Sink()
    seq = sink.sequencer(window=300)  # the window never closes in this test
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    for sequence in range(3, 3 + 2 * 200, 2):  # every other number: each waits
        seq.accept(one(b.tone("c", "tone2", sequence)))
    tones = [d.event for d in sink.deliveries if isinstance(d.event, events.ToneReceived)]
    assert [t.sequence_id for t in tones] == [1, *range(3, 3 + 2 * 129, 2)]  # 129 waited
    assert seq.counts["released_alone"] == 1
    record = seq.record(id_key("c"))
    assert record is not None
    assert len(record.held) == 200 - 129  # what came next waits again, for one window
    seq.close()


FLOOD_ITEM_BYTES = 1_000_000  # a body under 1 MiB: aiohttp warns of larger ones it sends


def flood_item(call_id: str, n: int) -> dict[str, Any]:
    """News of a call that callbot does not model, its data ``FLOOD_ITEM_BYTES`` long: one of
    the bodies a token holder may post (up to ``max_body_bytes``, 4 MiB by default)."""
    data = {"n": n, "text": "x" * FLOOD_ITEM_BYTES}
    return b.unknown(call_id, f"/someFutureResource{n}", resource_data=data)


async def test_what_a_call_holds_in_its_window_stays_within_its_bytes() -> None:
    """Behind a held tone, a call kept each body a token holder posted, whole, until 1,000
    waited: up to 4 GiB for one call with 4 MiB bodies (1 GiB measured for 999 bodies of
    1 MiB). What it holds stops at ``MAX_HELD_BYTES``, counted as each was digested."""
    names: list[str] = []  # what was delivered, not the events: only the sequencer keeps them
    seq = Sequencer(
        lambda delivery: names.append(type(delivery.event).__name__),
        Lifecycle(termination_grace=0.05),
        reorder_window=300,  # the window never closes in this test
    )
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.tone("c", "tone3", 3)))  # waits for tone 2, which never comes
    flood = 3 * MAX_HELD_BYTES // FLOOD_ITEM_BYTES
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(flood):
            seq.accept(one(flood_item("c", n)))
            record = seq.record(id_key("c"))
            assert record is not None
            # Each flood item held counts at least its text; all of them at most the bound.
            waiting = sum(isinstance(e, events.UnknownNotification) for e in record.held)
            assert waiting * FLOOD_ITEM_BYTES <= record.held_bytes <= MAX_HELD_BYTES
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert names.count("UnknownNotification") > flood - MAX_HELD_BYTES // FLOOD_ITEM_BYTES
    # Kept whole, the flood took three times the bound; within it, about the bound.
    assert peak < 2 * MAX_HELD_BYTES, peak
    seq.close()


async def test_what_leaves_a_calls_window_no_longer_counts_against_its_bytes() -> None:
    """A tone's predecessor lets part of what a call holds go: what went no longer counts in
    the window's bytes, so what still waits is released for ``MAX_HELD_BYTES`` only once it
    alone would take the window past them."""
    sink = Sink()
    seq = sink.sequencer(window=300)  # the window never closes in this test
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.tone("c", "tone3", 3)))  # waits for tone 2
    half = MAX_HELD_BYTES // FLOOD_ITEM_BYTES // 2
    for n in range(half):
        seq.accept(one(flood_item("c", n)))
    record = seq.record(id_key("c"))
    assert record is not None
    before = record.held_bytes
    seq.accept(one(b.tone("c", "tone5", 5)))  # waits for tone 4, and what came behind it too
    for n in range(half, 2 * half):
        seq.accept(one(flood_item("c", n)))
    behind = record.held_bytes - before
    seq.accept(one(b.tone("c", "tone2", 2)))  # tone 3 goes, and what it held up
    assert len(record.held) == 1 + half
    assert record.held_bytes == behind
    for n in range(2 * half, 2 * half + half // 2):
        seq.accept(one(flood_item("c", n)))
    assert seq.counts["released_alone"] == 0  # what waits is within the bound by itself
    assert len(record.held) == 1 + half + half // 2
    seq.close()


async def test_a_window_past_its_bytes_goes_at_once_in_arrival_order() -> None:
    """What a call holds goes as it does past 1,000 events once its bytes would pass
    ``MAX_HELD_BYTES``: every event delivered once, in the order it came, with one line."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    _established(seq)
    seq.accept(one(b.tone("c", "tone1", 1)))
    seq.accept(one(b.tone("c", "tone3", 3)))
    flood = MAX_HELD_BYTES // FLOOD_ITEM_BYTES + 8
    with capture_logs() as logs:
        for n in range(flood):
            seq.accept(one(flood_item("c", n)))
    delivered = [
        d.event.resource_data["n"]
        for d in sink.deliveries
        if isinstance(d.event, events.UnknownNotification)
    ]
    assert delivered == list(range(flood))
    # The tone held goes first, before what came behind it.
    assert sink.labels[:4] == ["establishing", "established", "tone:tone1", "tone:tone3"]
    released = [line for line in logs if line["event"] == "held_notification_released"]
    assert [(line["reason"], line["kind"]) for line in released] == [
        ("backlog_full", "ToneReceived")
    ]
    assert seq.counts["released_alone"] == 1
    record = seq.record(id_key("c"))
    assert record is not None
    assert (record.held, record.held_bytes) == ([], 0)
    seq.close()


async def test_a_state_while_news_waits_for_established_does_not_walk_the_backlog() -> None:
    """While a roster waits for ``established`` (up to ``_MAX_BACKLOG`` events behind it), a
    token holder sending updates of ``ringing`` or stale copies of ``establishing`` (each a
    little different, so no repeat) must not make the sequencer sort and walk every waiting
    event for each: that runs inside the request, on the event loop every call shares."""
    sink = Sink()
    seq = sink.sequencer(window=300)
    seq.accept(one(b.call_state("c", "establishing")))
    waiting = 500
    for n in range(waiting):  # each a different roster: none is a repeat
        seq.accept(one(b.roster("c", [b.participant(f"p{n}")])))
    states = [one(b.call_state("c", "ringing", subject=f"r{n}")) for n in range(200)]
    states += [one(b.call_state("c", "establishing", subject=f"e{n}")) for n in range(200)]
    codes = {
        sequencing._follows.__code__: "follows",
        sequencing._in_lifecycle_order.__code__: "sorted",
    }
    calls: Counter[str] = Counter()

    def count(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in codes:
            calls[codes[frame.f_code]] += 1

    sys.setprofile(count)
    try:
        for event in states:
            seq.accept(event)
    finally:
        sys.setprofile(None)
    assert sink.labels == ["establishing", "ringing"] + ["CallUpdated"] * 199
    assert seq.counts["stale"] == 200
    record = seq.record(id_key("c"))
    assert record is not None
    assert len(record.held) == waiting  # still waiting for established
    # The first ringing moves the call on: what waits is looked at once, not per state.
    assert calls["sorted"] <= 1, calls
    assert calls["follows"] <= 4 * len(states) + 2 * waiting, calls
    seq.accept(one(b.call_state("c", "established")))
    assert sink.labels[-waiting - 1 :] == ["established"] + ["ParticipantsUpdated"] * waiting
    seq.close()


async def test_the_invitees_roster_of_an_invitation_is_not_the_whole_roster() -> None:
    """Graph posts the participants an invitation of several added on the invitation's path
    (``operations/participants``, document 50): they join, and the rest of the call stays."""
    sink = Sink()
    seq = sink.sequencer()
    name = "50-participant-invite-ex2-roster-participants-added.json"
    item = json.loads((FIXTURES / "notifications" / name).read_text())["value"][0]
    call_id = item["resourceUrl"].split("/")[3]
    organizer, bot = b.participant("p-organizer"), b.participant("p-bot", kind="application")
    seq.accept(one(b.roster(call_id, [organizer, bot])))
    seq.accept(one(item))
    added = rosters(sink)[-1]
    assert len(added.participants) == 2
    assert (added.joined, added.left, added.updated) == (added.participants, [], [])
    assert {"porganizer", "pbot"} < set(sink.deliveries[-1].roster)
    assert len(sink.deliveries[-1].roster) == 4
    seq.close()


def naming_me(item: dict[str, Any], participant_id: str | None) -> dict[str, Any]:
    """A call notification naming ``participant_id`` as the bot's own (``null``: none)."""
    item["resourceData"]["myParticipantId"] = participant_id
    return item


async def test_a_placed_call_s_snapshot_has_the_bot_s_own_participant_id_from_the_answer() -> None:
    """Graph names the bot's participant in its answer to the request placing a call, never
    in the call's notifications: each delivery's snapshot has it, a roster that came before
    any state (and waited for ``established``) too, and a notification naming another or none
    leaves it as Graph answered."""
    sink = Sink()
    seq = sink.sequencer(window=5)
    seq.placed("placed-call", "me-1")
    seq.accept(one(b.roster("placed-call", [b.participant("me-1"), b.participant("alice")])))
    seq.accept(one(b.call_state("placed-call", "establishing")))
    seq.accept(one(naming_me(b.call_state("placed-call", "established"), "someone-else")))
    seq.accept(one(naming_me(b.call_state("placed-call", "established", subject="x"), None)))
    seq.accept(one(b.call_terminated("placed-call")))
    assert sink.labels == [
        "establishing",
        "established",
        "ParticipantsUpdated",
        "CallUpdated",
        "terminated",
    ]
    assert [d.snapshot.my_participant_id if d.snapshot else None for d in sink.deliveries] == [
        "me-1"
    ] * 5
    update = sink.deliveries[3].event
    assert isinstance(update, events.CallUpdated)
    assert update.changed == {"subject"}  # the id it named is not what the call now has
    seq.close()


async def test_the_answer_placing_a_call_counts_when_notifications_came_first() -> None:
    """Graph may post a placed call's first notifications before the bot reads its answer to
    the request: the deliveries after the answer have the bot's id, the answer's."""
    sink = Sink()
    seq = sink.sequencer(window=5)
    seq.accept(one(naming_me(b.call_state("c", "establishing"), "from-a-notification")))
    seq.placed("c", "me-1")
    seq.accept(one(b.call_state("c", "established")))
    ids = [d.snapshot.my_participant_id if d.snapshot else None for d in sink.deliveries]
    assert ids == ["from-a-notification", "me-1"]
    record = seq.record(id_key("c"))
    assert record is not None
    assert record.snapshot is not None
    assert record.snapshot.state == "established"
    seq.accept(one(b.call_terminated("c")))
    seq.placed("c", "late")  # an answer read after the call's end changes nothing
    assert record.closed
    assert record.snapshot is None
    seq.close()


def told_by(item: dict[str, Any], tenant: str) -> events.Event:
    """The event ``item`` is, posted with a token proving ``tenant``."""
    (event,) = parse_payload(b.notifications(item), tenant_id=tenant)
    return event


async def test_a_placed_call_is_the_tenant_s_it_was_placed_in_before_any_notification() -> None:
    """The answer placing a call binds it to the tenant it was placed in, whether or not it
    names the bot's participant: another tenant's notification naming the call is refused,
    the call's own go on. A call a notification bound first keeps that tenant."""
    sink = Sink()
    seq = sink.sequencer(window=5)
    seq.placed("placed-call", None, "Tenant-A")
    with pytest.raises(MalformedNotification) as refused:
        seq.accept_batch([told_by(b.call_state("placed-call", "establishing"), "tenant-b")])
    assert refused.value.reason == "tenant_mismatch"
    seq.accept_batch([told_by(b.call_state("placed-call", "establishing"), "tenant-a")])
    assert sink.labels == ["establishing"]
    assert sink.deliveries[0].snapshot is not None
    assert sink.deliveries[0].snapshot.my_participant_id is None
    seq.accept_batch([told_by(b.call_state("told-first", "establishing"), "tenant-b")])
    seq.placed("told-first", "me-1", "tenant-a")
    assert seq.lifecycle.belongs_elsewhere("told-first", "tenant-a")
    seq.close()


async def test_an_incoming_call_keeps_the_bot_s_own_participant_id_it_came_with() -> None:
    """Documented incoming calls name the bot's participant (``myParticipantId``): a later
    notification of the call naming none does not take it away."""
    sink = Sink()
    seq = sink.sequencer(window=5)
    seq.accept(one(b.incoming_call("in", my_participant_id="me-in")))
    seq.accept(one(naming_me(b.call_state("in", "establishing"), None)))
    seq.accept(one(b.call_state("in", "established")))
    ids = [d.snapshot.my_participant_id if d.snapshot else None for d in sink.deliveries]
    assert ids == ["me-in"] * 3
    seq.close()


def assert_same_model(ours: Any, theirs: Any) -> None:
    """``ours`` is the model pydantic's own copy gives: type, values, fields set, extras."""
    assert type(ours) is type(theirs)
    assert ours == theirs
    assert ours.model_fields_set == theirs.model_fields_set
    assert ours.model_extra == theirs.model_extra
    assert ours.model_dump() == theirs.model_dump()


@pytest.mark.parametrize(
    ("model", "update"),
    [
        # A frozen event without unknown properties (extra="forbid"): a transition's copy.
        (
            one(b.call_state("copy-1", "established")),
            {"previous_state": "establishing"},
        ),
        # A call keeping unknown properties: declared fields, a new unknown one, a kept one.
        (
            models.Call.model_validate(
                {"id": "copy-2", "state": "established", "brandNew": {"x": 1}}
            ),
            {"state": "terminated", "my_participant_id": "p-1", "brandNew": 2, "other": [3]},
        ),
        # Nothing changed at all.
        (models.Call.model_validate({"id": "copy-3", "state": "established"}), {}),
    ],
)
def test_a_delivery_copy_is_the_copy_pydantic_makes(model: Any, update: dict[str, Any]) -> None:
    before = model.model_copy(deep=True)
    ours = sequencing._copied(model, update)
    assert_same_model(ours, model.model_copy(update=update))
    # The original is left as it was, and shares no container the copy changes.
    assert model == before
    assert model.model_fields_set == before.model_fields_set
    assert ours.__dict__ is not model.__dict__
    assert ours.model_extra is None or ours.model_extra is not model.model_extra


def _merged_plainly(old: models.Call, new: models.Call) -> models.Call:
    """_merge's rule written with pydantic's own copy."""
    changes = {name: getattr(new, name) for name in new.model_fields_set}
    if old.my_participant_id is not None:
        changes.pop("my_participant_id", None)
    kept, extra = old.model_extra or {}, new.model_extra or {}
    if extra and kept and len(kept) + len(extra) > sequencing._MAX_EXTRA_PROPERTIES:
        old = old.model_copy()
        old.__pydantic_extra__ = {}
    return old.model_copy(update=changes)


_MANY = {f"invented{n}": n for n in range(200)}


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # Declared fields replaced and added, an unknown property replaced and one added.
        (
            {"id": "m-1", "state": "establishing", "kept": 1, "same": {"a": 1}},
            {"state": "established", "callbackUri": "https://x", "kept": 2, "fresh": [1]},
        ),
        # The bot's own participant id stays as first named; a notification may name it first.
        ({"id": "m-2", "myParticipantId": "me"}, {"myParticipantId": "other", "state": "x"}),
        ({"id": "m-3"}, {"myParticipantId": "me", "@odata.type": "#microsoft.graph.call"}),
        # Nothing carried; nothing unknown on either side.
        ({"id": "m-4", "state": "established", "extra": True}, {}),
        ({"id": "m-5"}, {"state": "established"}),
        # Past the bound of unknown properties: only the latest notification's are kept.
        ({"id": "m-6", **_MANY}, {f"more{n}": n for n in range(100)}),
        ({"id": "m-7", **_MANY}, {"state": "established"}),
    ],
)
def test_a_merged_snapshot_is_the_copy_pydantic_makes(
    old: dict[str, Any], new: dict[str, Any]
) -> None:
    before, after = models.Call.model_validate(old), models.Call.model_validate(new)
    kept = before.model_copy(deep=True)
    ours = sequencing._merge(before, after)
    assert_same_model(ours, _merged_plainly(before, after))
    assert before == kept
    assert before.model_fields_set == kept.model_fields_set
    assert ours.model_extra is not before.model_extra
    assert ours.model_extra is not after.model_extra


def _written(model: models.GraphModel) -> int:
    """What a call's record writes of a model."""
    return len(model.model_dump_json(by_alias=True, exclude_unset=True).encode())


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_a_recorded_call_keeps_all_it_brought_and_counts_no_less_than_it_takes(
    name: str,
) -> None:
    """A call's bytes are counted without measuring its snapshot at each notification: the
    count is never below what its record writes, and a recorded call is far from its bounds
    (nothing it brought is left out)."""
    sink = Sink()
    seq = sink.sequencer(window=5)
    for body in CALLS[name].bodies():
        for event in parse_payload(body):
            seq.accept(event)
            record = seq.record(event.call_key)
            assert record is not None
            snapshot = record.snapshot
            assert record.snapshot_bytes >= (0 if snapshot is None else _written(snapshot))
            sizes = {key: len(key) + _written(p) for key, p in record.roster.items()}
            assert record.roster_sizes == sizes
            assert record.roster_bytes == sum(sizes.values())
    assert seq.counts["not_kept"] == 0
    seq.close()


def test_events_are_told_apart_by_their_exact_class() -> None:
    """The sequencer, the parser and the dispatcher compare an event's class instead of
    isinstance (which pydantic's classes answer through their metaclass): true only while
    no event class derives from another but CallTerminated from CallStateChanged."""
    classes = [
        value
        for value in vars(events).values()
        if isinstance(value, type) and issubclass(value, events.Event)
    ]
    derived = {
        cls.__name__: base.__name__
        for cls in classes
        for base in cls.__bases__
        if base is not events.Event and issubclass(base, events.Event)
    }
    assert derived == {"CallTerminated": "CallStateChanged"}
    # The one test of a state change names every class that is one.
    changes = {cls for cls in classes if issubclass(cls, events.CallStateChanged)}
    assert changes == sequencing._STATE_CHANGES


async def test_what_was_kept_of_a_request_refused_in_part_is_a_repeat_when_sent_again() -> None:
    """A request refused in part (503: a call's backlog full) comes again whole, as often as
    it is refused: the states and rosters kept of it are repeats in each copy, each as often
    as the request holds it, though the same state once the call left it is news otherwise.
    Once the copies came, it is news again."""
    sink = Sink()
    seq = sink.sequencer(window=5)
    for state in ("establishing", "established"):
        seq.accept(one(b.call_state("c", state)))
    moves = [b.call_state("c", state) for state in ("hold", "established", "hold")]
    request = [*moves, b.roster("c", [b.participant("alice")])]
    refusing = {"roster": True}

    def full(event: events.Event, call_key: str) -> bool:
        return refusing["roster"] and isinstance(event, events.ParticipantsUpdated)

    for _ in range(2):
        with pytest.raises(MalformedNotification) as refused:
            seq.accept_batch(parse_payload(b.notifications(*request)), full)
        assert (refused.value.reason, refused.value.kept) == ("call_backlog_full", 3)
    refusing["roster"] = False
    seq.accept_batch(parse_payload(b.notifications(*request)), full)
    assert sink.labels[2:] == ["hold", "established", "hold", "ParticipantsUpdated"]
    assert seq.counts["duplicate"] == 6
    seq.accept(one(b.call_state("c", "established")))  # the call moving back: news
    assert sink.labels[-1] == "established"
    seq.close()
