"""The Graph simulator: what it posts back for each request, and its scripted far end."""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from callbot import Call, CallBot, CallEnded, GraphError, OperationFailed, events, models
from callbot._parse import parse_payload
from callbot.graph import AccessToken, Target
from callbot.testing import (
    DeliveryOptions,
    Simulator,
    SimulatorError,
    TokenAuthority,
    Traffic,
    builders,
    run_with_simulator,
)

from .conftest import APP_ID, make_bot, plain_server, until

# How Teams names the bot in a roster: by its Teams id (recorded sb12).
BOT_IN_ROSTER = f"28:{APP_ID}"

Seen = list[events.Event]


MEETING_URL = (
    "https://teams.microsoft.com/l/meetup-join/19%3ameeting_abc%40thread.v2/0"
    "?context=%7b%22Tid%22%3a%22t-1%22%2c%22Oid%22%3a%22o-1%22%7d"
)
"""A Teams meeting's join URL (the tenant and organizer in its context)."""


def label(event: events.Event) -> str:
    if isinstance(event, events.ToneReceived):
        return f"tone:{event.tone}"
    if isinstance(event, events.CallStateChanged):
        return event.state
    return type(event).__name__


def recording_bot(**options: Any) -> tuple[CallBot, Seen]:
    """A bot that records every event its handlers see."""
    bot = CallBot(app_id=APP_ID, **options)
    seen: Seen = []

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        seen.append(event)

    return bot, seen


def answering_bot(*, subscribe: bool = True, **options: Any) -> tuple[CallBot, Seen]:
    bot, seen = recording_bot(**options)

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    if subscribe:

        @bot.on_state("established")
        async def subscribe_to_tones(call: Call, event: events.CallStateChanged) -> None:
            if event.previous_state != "transferring":
                await call.subscribe_to_tone()

    return bot, seen


def _counted(seen: Seen, name: str, count: int) -> bool:
    return labels(seen).count(name) == count


def labels(seen: Seen, call_id: str | None = None) -> list[str]:
    return [label(e) for e in seen if call_id is None or e.call_key == call_id.replace("-", "")]


async def test_answer_brings_establishing_established_its_update_and_the_roster() -> None:
    bot, seen = answering_bot()
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call(from_user="Adele Vance")
        await call.wait_for_state("established")
        answer = await sim.wait_for_request("answer")
        assert answer.json["callbackUri"] == sim.callback_url
        await until(lambda: any(isinstance(e, events.ParticipantsUpdated) for e in seen))
    # As recorded from Teams: established again once media flows, an update of the state.
    assert labels(seen)[:5] == [
        "IncomingCall",
        "establishing",
        "established",
        "CallUpdated",
        "ParticipantsUpdated",
    ]
    update = seen[3]
    assert isinstance(update, events.CallUpdated)
    # With the empty meeting capability and co-organizers Teams adds to it (sb03).
    assert update.changed == {"media_state", "meeting_capability", "co_organizers"}
    incoming = seen[0]
    assert isinstance(incoming, events.IncomingCall)
    assert incoming.call.source is not None
    assert incoming.call.source.identity is not None
    assert incoming.call.source.identity.user is not None
    assert incoming.call.source.identity.user.display_name == "Adele Vance"
    roster = seen[4]
    assert isinstance(roster, events.ParticipantsUpdated)
    names = sorted(
        (p.info.identity.user or p.info.identity.application).display_name or ""  # type: ignore[union-attr]
        for p in roster.participants
    )
    assert names == [BOT_IN_ROSTER, "Adele Vance"]
    assert call.states == ["incoming", "establishing", "established"]


async def test_a_misspelt_action_or_state_is_refused_at_once() -> None:
    """A name FakeGraph has no request for matched none: ``assert not
    call.requests_for("transfer_call")`` passed whatever the bot did, ``fail_next`` failed
    nothing, and ``wait_for_request`` or ``wait_for_state`` failed only after its timeout."""
    bot, _ = answering_bot()
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        with pytest.raises(ValueError, match="no request 'play_prompt': did you mean 'playPrompt'"):
            call.requests_for("play_prompt")
        with pytest.raises(ValueError, match="no request 'Transfer': did you mean 'transfer'"):
            sim.requests_for("Transfer")
        with pytest.raises(ValueError, match="no request 'hangup'"):
            await call.wait_for_request("hangup", timeout=60)
        with pytest.raises(ValueError, match="no request 'playprompt': did you mean 'playPrompt'"):
            sim.graph.fail_next("playprompt", 500)
        with pytest.raises(ValueError, match="unknown call state 'establised'"):
            await call.wait_for_state("establised", timeout=60)
        assert call.requests_for("transfer") == []
        sim.graph.fail_next("/communications/calls/x/playPrompt", 500)  # a path, as it is
        await call.wait_for_state("Established")  # in any case, as on_state takes it
        await call.hangup()


async def test_keep_alives_can_be_tested_with_a_short_interval() -> None:
    """A bot served by the simulator sends keep-alives as it is configured to, for each
    established call every interval it was configured with, and a test sees them as Graph
    requests; ``keep_alive=False`` turns them off for a test."""
    bot, _seen = answering_bot()
    bot.configure(keep_alive_interval=1.0)
    async with run_with_simulator(bot, keep_alive=False) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await call.hangup()
        await call.wait_until_ended()
        assert sim.graph.requests_for("keepAlive") == []
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await until(lambda: len(sim.graph.requests_for("keepAlive")) >= 2)
        assert {r.path for r in sim.graph.requests_for("keepAlive")} == {
            f"/communications/calls/{call.id}/keepAlive"
        }
        await call.hangup()
    assert bot.settings.keep_alive_interval == 1.0  # the bot's own settings come back


async def test_disorderly_delivery_still_reaches_handlers_once_and_in_order() -> None:
    bot, seen = answering_bot()
    async with run_with_simulator(
        bot, delivery=DeliveryOptions(out_of_order=True, duplicate=True)
    ) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await call.press("1")
        await call.hangup()
        await until(lambda: "terminated" in labels(seen))
        await sim.settled()
        posted = [t.summary for t in sim.traffic if t.kind == "notification"]
    assert posted.index("call established") < posted.index("call establishing")
    assert posted.count("call established") == 2
    assert labels(seen) == [
        "IncomingCall",
        "establishing",
        "established",
        "CallUpdated",
        "ParticipantsUpdated",
        "tone:tone1",
        "terminated",
    ]


async def test_a_prompt_completes_once_it_would_have_played() -> None:
    bot, _ = answering_bot()
    timings: list[float] = []

    @bot.on_tone
    async def play(call: Call, event: events.ToneReceived) -> None:
        started = time.monotonic()
        op = await call.play_prompt(["https://x.example/a.wav", "https://x.example/b.wav"])
        result = await op.wait(timeout=5)
        assert result.status == "completed"
        timings.append(time.monotonic() - started)

    async with run_with_simulator(bot, prompt_duration=0.15) as sim:
        await sim.incoming_call()
        await sim.press("5")
        await until(lambda: bool(timings))
    # Two prompts of 0.15 s: never completed sooner (a slow machine only makes it later).
    assert timings[0] >= 0.3


async def test_a_prompt_completes_with_the_prompts_it_played() -> None:
    """As recorded from a Teams call (sb05): the completed playPromptOperation repeats the
    prompts played, beside its completionReason."""
    bot, _ = answering_bot()
    results: list[models.PlayPromptOperation] = []

    @bot.on_tone
    async def play(call: Call, event: events.ToneReceived) -> None:
        op = await call.play_prompt(["https://x.example/a.wav", "https://x.example/b.wav"])
        results.append(await op.wait(timeout=5))

    async with run_with_simulator(bot) as sim:
        await sim.incoming_call()
        await sim.press("5")
        await until(lambda: bool(results))
    assert results[0].completion_reason == "completedSuccessfully"
    assert results[0].prompts is not None
    played = [p for p in results[0].prompts if isinstance(p, models.MediaPrompt)]
    uris = [p.media_info.uri if p.media_info else None for p in played]
    assert uris == ["https://x.example/a.wav", "https://x.example/b.wav"]


async def test_a_recording_is_served_only_with_its_access_token() -> None:
    bot, _ = answering_bot()
    downloaded: list[bytes] = []
    locations: list[str] = []

    @bot.on_tone
    async def record(call: Call, event: events.ToneReceived) -> None:
        op = await call.record_response(max_record_duration=10)
        result = await op.wait(timeout=5)
        assert result.recording_location
        assert result.recording_access_token
        locations.append(result.recording_location)
        downloaded.append(await call.download_recording(op))

    async with run_with_simulator(bot) as sim:
        await sim.incoming_call()
        await sim.press("2")
        await until(lambda: bool(downloaded))
        assert downloaded[0] == sim.recording
        assert downloaded[0].startswith(b"RIFF")
        async with aiohttp.ClientSession() as session, session.get(locations[0]) as response:
            assert response.status == 401


async def test_a_recording_is_gone_once_its_call_ended() -> None:
    """Graph discards a recording shortly after its call ends (call-record.md: "download the
    recording promptly"): a bot that fetches it only after the call is over gets nothing
    (here at once; by default a minute after the call ends)."""
    bot, _ = answering_bot()
    results: list[models.RecordOperation] = []

    @bot.on_tone
    async def record(call: Call, event: events.ToneReceived) -> None:
        op = await call.record_response(max_record_duration=10)
        results.append(await op.wait(timeout=5))

    async with run_with_simulator(bot, recording_retention=0.0) as sim:
        call = await sim.incoming_call()
        await call.press("2")
        await until(lambda: bool(results))
        location = results[0].recording_location
        token = results[0].recording_access_token
        assert location
        assert token
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(location) as response:
                assert response.status == 200  # while the call lasts
            await call.hangup()
            await call.wait_until_ended()
            async with session.get(location) as response:
                assert response.status == 404


async def test_a_stop_tone_ends_a_recording_without_a_tone_subscription() -> None:
    """As Graph documents it (document 69): the key a recording's ``stopTones`` names ends
    it with ``stopToneDetected``; the bot needs no ``subscribeToTone`` for it."""
    bot = CallBot(app_id=APP_ID)
    reasons: list[str | None] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def record(call: Call, event: events.CallStateChanged) -> None:
        op = await call.record_response(max_record_duration=60, stop_tones=["#"])
        done = await op.wait(timeout=10)
        reasons.append(done.completion_reason)
        assert await call.download_recording(op)

    async with run_with_simulator(bot, record_duration=60.0) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("recordResponse")
        await call.press("1#")  # '1' ends nothing; with no subscription no tone is posted
        await call.settled()
        assert not call.requests_for("subscribeToTone")
        assert not [t for t in sim.traffic if "DTMF" in t.summary]
    assert reasons == ["stopToneDetected"]


async def test_prompts_and_recordings_play_one_after_another_in_order() -> None:
    """Graph queues a call's media operations ("queued to process in order"): a recording
    asked for while a prompt plays starts once the prompt has played, however short."""
    bot, _ = answering_bot()
    finished: list[str] = []

    @bot.on_tone
    async def greet_then_record(call: Call, event: events.ToneReceived) -> None:
        prompt = await call.play_prompt("https://cdn.contoso.com/welcome.wav")
        record = await call.record_response(max_record_duration=5)

        async def note(name: str, op: Any) -> None:
            await op.wait(timeout=30)
            finished.append(name)

        await asyncio.gather(note("prompt", prompt), note("record", record))

    async with run_with_simulator(bot, prompt_duration=0.3, record_duration=0.0) as sim:
        call = await sim.incoming_call()
        await call.press("1")
        await call.listen(timeout=30)
        await call.settled(timeout=30)
    assert finished == ["prompt", "record"]


async def test_a_queued_recording_is_not_ended_by_its_stop_tone_before_it_starts() -> None:
    bot, _ = answering_bot()
    ops: dict[str, Any] = {}

    @bot.on_tone
    async def greet_then_record(call: Call, event: events.ToneReceived) -> None:
        if event.digit == "1":
            ops["prompt"] = await call.play_prompt("https://cdn.contoso.com/welcome.wav")
            ops["record"] = await call.record_response(max_record_duration=5, stop_tones=["#"])

    # A prompt far longer than the test: the recording stays queued behind it.
    async with run_with_simulator(bot, prompt_duration=600) as sim:
        call = await sim.incoming_call()
        await call.press("1")
        await until(lambda: "record" in ops)
        await call.press("#")  # acknowledged: what the simulator sent before it was too
        assert not ops["prompt"].done
        assert not ops["record"].done
        await call.hangup()


async def test_a_call_is_answered_while_every_handler_slot_waits_inside_its_call() -> None:
    """A handler awaiting its own prompt holds a slot as long as it waits: with every slot
    held so, the next incoming call is still answered within Graph's 15 s."""
    bot = CallBot(app_id=APP_ID, max_concurrent_handlers=1)

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def greet(call: Call, event: events.CallStateChanged) -> None:
        prompt = await call.play_prompt("https://cdn.contoso.com/hold-music.wav")
        await prompt.wait()

    async with run_with_simulator(bot, prompt_duration=600.0) as sim:
        first = await sim.incoming_call()
        await first.wait_for_request("playPrompt")
        second = await sim.incoming_call()
        await second.wait_for_request("answer", timeout=10)
        await first.hangup()
        await second.hangup()


async def test_cancel_media_processing_fails_the_running_prompt() -> None:
    bot, _ = answering_bot()
    failures: list[OperationFailed] = []

    @bot.on_tone
    async def play_then_cancel(call: Call, event: events.ToneReceived) -> None:
        op = await call.play_prompt("https://x.example/hold.wav")
        await call.cancel_media_processing()
        try:
            await op.wait(timeout=5)
        except OperationFailed as exc:
            failures.append(exc)

    # A prompt far longer than the test: the cancel always finds it playing.
    async with run_with_simulator(bot, prompt_duration=600) as sim:
        await sim.incoming_call()
        await sim.press("1")
        await until(lambda: bool(failures))
    assert failures[0].result_info.code == 400
    assert failures[0].result_info.subcode == 8508


async def test_no_tones_before_the_bot_subscribes() -> None:
    bot, _ = answering_bot(subscribe=False)
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        # Established first: the short wait below is then only for a subscription that never comes.
        await call.wait_for_state("established")
        with pytest.raises(SimulatorError, match="subscribe_to_tone"):
            await call.press("1", timeout=0.3)
        assert not [t for t in sim.traffic if "DTMF" in t.summary]
        await call.hangup()


async def test_keys_become_tones_in_sequence() -> None:
    bot, seen = answering_bot()
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.press("12*#")
        await until(lambda: len([e for e in seen if isinstance(e, events.ToneReceived)]) == 4)
    tones = [e for e in seen if isinstance(e, events.ToneReceived)]
    assert [t.tone for t in tones] == ["tone1", "tone2", "star", "pound"]
    assert [t.sequence_id for t in tones] == [6, 7, 8, 9]  # numbered from 6, as recorded


async def test_keys_left_when_the_call_ends_during_a_press_go_nowhere() -> None:
    bot, seen = answering_bot()
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        hanging_up: list[asyncio.Task[None]] = []

        def hang_up_after_the_first_key(entry: Traffic) -> None:
            # Queued before the press sends its second key: the call ends between the two.
            if entry.kind == "notification" and entry.summary == "DTMF tone1" and not hanging_up:
                hanging_up.append(asyncio.get_running_loop().create_task(call.hangup()))

        sim.observers.append(hang_up_after_the_first_key)
        await call.press("123")
        await hanging_up[0]
        await call.wait_until_ended()
        await call.settled()
        with pytest.raises(SimulatorError, match="has ended"):
            await call.press("4")
    assert [e.tone for e in seen if isinstance(e, events.ToneReceived)] == ["tone1"]


async def test_a_notification_about_an_ended_call_says_so() -> None:
    bot, _ = answering_bot()
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("subscribeToTone")
        await call.hangup()
        with pytest.raises(SimulatorError, match=f"call {call.id} has ended: Graph posts nothing"):
            await call.notify(builders.tone(call.id, "tone5", 1))


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_transfer(outcome: str) -> None:
    bot, seen = answering_bot()

    @bot.on_tone
    async def transfer(call: Call, event: events.ToneReceived) -> None:
        await call.transfer(Target.user("agent-id", "Agent"))

    async with run_with_simulator(bot) as sim:
        sim.transfer_outcome = outcome
        call = await sim.incoming_call()
        await call.press("0")
        request = await sim.wait_for_request("transfer")
        assert request.json["transferTarget"]["identity"]["user"]["id"] == "agent-id"
        if outcome == "completed":
            await call.wait_until_ended()
            await until(lambda: "terminated" in labels(seen))
        else:
            await until(lambda: labels(seen).count("established") == 2)
    if outcome == "completed":
        assert labels(seen)[-3:] == ["transferring", "transferAccepted", "terminated"]
        ended = seen[-1]
        assert isinstance(ended, events.CallTerminated)
        assert ended.result_info is not None
        assert ended.result_info.subcode == 7015
    else:
        back = seen[-1]
        assert isinstance(back, events.CallStateChanged)
        assert back.state == "established"
        assert back.previous_state == "transferring"
        assert back.result_info is not None
        assert back.result_info.code == 500


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_a_consultative_transfer_ends_as_graph_documents_it(outcome: str) -> None:
    """Graph's consultative transfer examples (2 and 4) end otherwise than a blind one: the
    call terminated with ``terminationReason`` ``AppTransferred`` and no resultInfo
    (document 28), or back to ``established`` with 500/7700 (documents 29, 30). The
    simulator ended it as a blind one (0/7015, 500/7000): a bot telling a completed
    transfer by 7015 passed under test and took every consultative transfer live for a
    hang-up."""
    bot, seen = answering_bot()
    agent_call_id = "e5d39592-99bd-4db8-bca8-30fb894ec51d"

    @bot.on_tone
    async def transfer(call: Call, event: events.ToneReceived) -> None:
        await call.transfer(Target.user("agent-id", "Agent"), replaces_call_id=agent_call_id)

    async with run_with_simulator(bot) as sim:
        sim.transfer_outcome = outcome
        call = await sim.incoming_call()
        await call.press("0")
        request = await sim.wait_for_request("transfer")
        assert request.json["transferTarget"]["replacesCallId"] == agent_call_id
        if outcome == "completed":
            await call.wait_until_ended()
        else:
            await until(lambda: labels(seen).count("established") == 2)
        await call.settled()
    last = seen[-1]
    assert isinstance(last, events.CallStateChanged)
    if outcome == "completed":
        assert labels(seen)[-3:] == ["transferring", "transferAccepted", "terminated"]
        assert last.result_info is None
        assert last.call.termination_reason == "AppTransferred"
    else:
        assert (last.state, last.previous_state) == ("established", "transferring")
        assert last.result_info is not None
        assert (last.result_info.code, last.result_info.subcode) == (500, 7700)


async def test_a_caller_hanging_up_while_the_transfer_completes_is_no_failure() -> None:
    """The transfer's end is already on its way when the caller hangs up: the hang-up
    comes to nothing, as on a call that is over, instead of raising (the dtmf scenario
    against a bot that transfers failed this way)."""
    bot, seen = answering_bot()

    @bot.on_tone
    async def transfer(call: Call, event: events.ToneReceived) -> None:
        await call.transfer(Target.user("agent-id", "Agent"))

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        hanging_up: list[asyncio.Task[None]] = []

        def on_transferring(entry: Traffic) -> None:
            # Before Graph posts transferAccepted and the call's end, which are queued.
            if entry.kind == "notification" and entry.summary == "call transferring":
                hanging_up.append(asyncio.get_running_loop().create_task(call.hangup()))

        sim.observers.append(on_transferring)
        await call.press("0")
        await until(lambda: len(hanging_up) == 1)
        await hanging_up[0]
        await call.wait_until_ended()
    assert labels(seen)[-3:] == ["transferring", "transferAccepted", "terminated"]


async def test_a_transfer_tried_again_after_a_failure_is_heard_failing_again() -> None:
    """Graph's notifications for a second attempt are those of the first: both are news."""
    bot, seen = answering_bot()

    @bot.on_tone
    async def transfer(call: Call, event: events.ToneReceived) -> None:
        await call.transfer(Target.user("agent-id", "Agent"))

    async with run_with_simulator(bot) as sim:
        sim.transfer_outcome = "failed"
        call = await sim.incoming_call()
        for established in (2, 3):  # answered, then back after each failed attempt
            await call.press("0")
            await until(functools.partial(_counted, seen, "established", established))
        assert len(sim.requests_for("transfer")) == 2
    moves = [(e.state, e.previous_state) for e in seen if isinstance(e, events.CallStateChanged)]
    assert moves[-4:] == [("transferring", "established"), ("established", "transferring")] * 2


TransferNews = events.CallStateChanged | events.CallUpdated


def transferring_bot(*targets: str) -> tuple[CallBot, Seen, list[TransferNews], list[int]]:
    """A bot transferring the call to ``targets[0]`` when the caller presses a key, and to
    the next target each time ``on_transfer_failed`` runs, while one is left; with what
    every handler saw, what ``on_transfer_failed`` handlers saw, and Graph's refusals."""
    bot, seen = answering_bot()
    failures: list[TransferNews] = []
    refusals: list[int] = []

    async def transfer(call: Call, target: str) -> None:
        try:
            await call.transfer(Target.user(target, "Agent"))
        except GraphError as exc:
            refusals.append(exc.status)

    @bot.on_tone
    async def pressed(call: Call, event: events.ToneReceived) -> None:
        await transfer(call, targets[0])

    @bot.on_transfer_failed
    async def failed(call: Call, event: TransferNews) -> None:
        failures.append(event)
        if len(failures) < len(targets):
            await transfer(call, targets[len(failures)])

    return bot, seen, failures, refusals


def transfer_targets(sim: Simulator) -> list[str]:
    return [
        r.json["transferTarget"]["identity"]["user"]["id"] for r in sim.requests_for("transfer")
    ]


@pytest.mark.parametrize("duplicate", [False, True], ids=["posted-once", "posted-twice"])
@pytest.mark.parametrize("outcome", ["failed", "failed_in_place"])
async def test_on_transfer_failed_runs_once_whichever_way_graph_tells_the_failure(
    outcome: str, duplicate: bool
) -> None:
    """Graph tells a failed transfer by bringing the call back from ``transferring``, or by
    the update alone: a bot acting on every failure handled a transition and an update,
    keeping its own set of calls with a transfer on its way. ``on_transfer_failed`` runs
    once for either, a copy Graph sends being none; the other handlers get the very same
    delivery as before."""
    bot, seen, failures, _ = transferring_bot("agent-id")
    async with run_with_simulator(bot) as sim:
        sim.transfer_outcome = outcome
        call = await sim.incoming_call(delivery=DeliveryOptions(duplicate=duplicate))
        await call.press("0")
        await until(lambda: len(failures) == 1)
        await call.hangup()
        await call.wait_until_ended()
        await call.settled()
    (failure,) = failures
    assert failure.transfer_failed
    assert failure.result_info is not None
    assert (failure.result_info.code, failure.result_info.subcode) == (500, 7000)
    if outcome == "failed":
        assert isinstance(failure, events.CallStateChanged)
        assert (failure.state, failure.previous_state) == ("established", "transferring")
    else:
        assert isinstance(failure, events.CallUpdated)
        assert failure.state == "established"
    assert any(event is failure for event in seen)  # on(events.Event) got that delivery
    assert labels(seen)[-1] == "terminated"
    others = [e for e in seen if e is not failure and isinstance(e, TransferNews)]
    assert not any(e.transfer_failed for e in others)


@pytest.mark.parametrize("outcome", ["failed", "failed_in_place"])
async def test_on_transfer_failed_runs_for_each_transfer_that_failed(outcome: str) -> None:
    """A bot trying a second agent when the first transfer failed hears that one fail too:
    Graph words both failures alike, and each is a failure of its own."""
    bot, _, failures, _ = transferring_bot("agent-id", "other-agent-id")
    async with run_with_simulator(bot) as sim:
        sim.transfer_outcome = outcome
        call = await sim.incoming_call()
        await call.press("0")
        await until(lambda: len(failures) == 2)
        await call.hangup()
        await call.wait_until_ended()
        await call.settled()
        assert transfer_targets(sim) == ["agent-id", "other-agent-id"]
    assert len(failures) == 2
    kind = events.CallStateChanged if outcome == "failed" else events.CallUpdated
    assert all(type(failure) is kind for failure in failures)
    # Each names its own transfer's target, as the bot asked it.
    named = [failure.transfer_target for failure in failures]
    users = [t.identity.user for t in named if t is not None and t.identity is not None]
    assert [(user.id, user.display_name) for user in users if user is not None] == [
        ("agent-id", "Agent"),
        ("other-agent-id", "Agent"),
    ]


async def test_on_transfer_failed_runs_for_no_transfer_refused_or_completed() -> None:
    """A transfer Graph refused (a 4xx: ``call.transfer`` raised) brings no news, so Graph
    sending the last failure again is a repeat, not that transfer failing; a transfer
    that goes through ends the call, its ``terminated`` naming a ``resultInfo`` too."""
    bot, seen, failures, refusals = transferring_bot("agent-id")
    async with run_with_simulator(bot) as sim:
        sim.transfer_outcome = "failed"
        call = await sim.incoming_call()
        await call.press("0")
        await until(lambda: len(failures) == 1)
        sim.graph.fail_next("transfer", 403)
        await call.press("0")
        await until(lambda: refusals == [403])
        # The failure again, as Graph sent it.
        [copy] = [
            item
            for t in sim.traffic
            if t.kind == "notification"
            for item in t.body["value"]
            if "resultInfo" in (item.get("resourceData") or {})
        ]
        assert await call.notify(copy) == 202
        sim.transfer_outcome = "completed"
        await call.press("0")
        await call.wait_until_ended()
        await call.settled()
        assert len(sim.requests_for("transfer")) == 3
    assert len(failures) == 1
    after = labels(seen)[[e is failures[0] for e in seen].index(True) + 1 :]
    # The copy reached no handler: a repeat.
    assert after == ["tone:tone0", "tone:tone0", "transferring", "transferAccepted", "terminated"]
    ended = seen[-1]
    assert isinstance(ended, events.CallTerminated)
    assert ended.result_info is not None
    assert not ended.transfer_failed


@pytest.mark.parametrize("action", ["reject", "redirect"])
async def test_reject_and_redirect_end_the_call(action: str) -> None:
    bot, seen = recording_bot()

    @bot.on_incoming_call
    async def refuse(call: Call, event: events.IncomingCall) -> None:
        if action == "reject":
            await call.reject("busy")
        else:
            await call.redirect(Target.user("someone-else"))

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_until_ended()
        await until(lambda: "terminated" in labels(seen))
    assert call.states == ["incoming", "terminated"]
    assert labels(seen) == ["IncomingCall", "terminated"]
    # Graph says only that the call is gone (documents 17 and 21): no reason to read.
    ended = seen[-1]
    assert isinstance(ended, events.CallTerminated)
    assert ended.result_info is None


Posted = list[tuple[str, list[str]]]


@pytest.fixture
async def elsewhere() -> AsyncIterator[tuple[str, Posted]]:
    """Another endpoint, for a bot to name as a call's callbackUri: its base URL, and each
    post's path and query with the events it carried."""
    posted: Posted = []

    async def keep(request: web.Request) -> web.Response:
        posted.append((request.path_qs, [label(e) for e in parse_payload(await request.json())]))
        return web.Response(status=202)

    async with plain_server(keep) as base:
        yield base, posted


def posted_to(sim: Simulator) -> list[str | None]:
    return [t.url for t in sim.traffic if t.kind == "notification"]


async def test_an_answered_call_is_told_at_the_callback_uri_it_was_answered_with(
    elsewhere: tuple[str, Posted],
) -> None:
    """Graph posts what follows an answer to the callbackUri given with it (a route per
    tenant, say); the bot's own callback URL only heard the call ring."""
    base, posted = elsewhere
    route = f"{base}/calls/contoso?tenant=contoso"
    bot, _ = recording_bot()

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer(callback_uri=route)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await call.hangup()
        assert {path for path, _ in posted} == {"/calls/contoso?tenant=contoso"}
        told = [name for _, found in posted for name in found]
        # Read one by one (no sequencer): the update once media flows is another established.
        assert told == [
            "establishing",
            "established",
            "established",
            "ParticipantsUpdated",
            "terminated",
        ]
        assert call.callback_url == route
        assert posted_to(sim) == [sim.callback_url, *[route] * len(told)]


async def test_a_placed_call_is_told_at_the_callback_uri_it_was_placed_with(
    elsewhere: tuple[str, Posted],
) -> None:
    base, posted = elsewhere
    route = f"{base}/calls?route=7"
    bot, seen = recording_bot()
    async with run_with_simulator(bot) as sim:
        await bot.create_call(Target.user("user-1", "Lee Gu"), callback_uri=route)
        call = await sim.wait_for_outgoing_call()
        await call.wait_for_state("established")
        await call.hangup()
    assert [name for _, found in posted for name in found] == [
        "establishing",
        "established",
        "established",
        "ParticipantsUpdated",
        "terminated",
    ]
    assert {path for path, _ in posted} == {"/calls?route=7"}
    assert seen == []


async def test_a_redirected_call_ends_at_the_callback_uri_the_redirect_gave(
    elsewhere: tuple[str, Posted],
) -> None:
    base, posted = elsewhere
    bot, _ = recording_bot()

    @bot.on_incoming_call
    async def forward(call: Call, event: events.IncomingCall) -> None:
        await call.redirect(Target.user("someone-else"), callback_uri=f"{base}/forwarded")

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_until_ended()
    assert posted == [("/forwarded", ["terminated"])]


async def test_a_callback_uri_nobody_serves_is_a_refusal_that_names_it() -> None:
    """A bot that answers with a callbackUri it does not serve misses the rest of the call,
    as it would with Graph: the simulator says where it posted."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    route = f"http://127.0.0.1:{closed.getsockname()[1]}/api/calls"
    bot, _ = recording_bot()

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer(callback_uri=route)

    try:
        async with run_with_simulator(bot) as sim:
            await sim.incoming_call()
            await until(lambda: bool(sim.failed_deliveries))
            refused = sim.failed_deliveries[0]
    finally:
        closed.close()
    assert refused.url == route
    assert f"the bot answered nothing to a notification posted to {route}: call establishing" in (
        refused.refusal()
    )


async def test_a_connection_lost_after_a_refusal_is_not_told_as_that_refusal() -> None:
    """A callback URL that first answered 503 (draining) and then dropped every connection
    answered nothing the last time: the failed delivery does not repeat the old reason."""
    answered: list[int] = []

    async def draining_then_gone(request: web.Request) -> web.StreamResponse:
        answered.append(len(answered))
        if len(answered) == 1:
            return web.json_response({"error": "draining"}, status=503)
        assert request.transport is not None
        request.transport.close()  # the connection goes without an answer
        return web.Response(status=202)

    bot, _ = recording_bot()
    async with plain_server(draining_then_gone) as base:
        route = f"{base}/api/calls"

        @bot.on_incoming_call
        async def answer(call: Call, event: events.IncomingCall) -> None:
            await call.answer(callback_uri=route)

        async with run_with_simulator(bot) as sim:
            await sim.incoming_call()
            await until(lambda: bool(sim.failed_deliveries))
            refused = sim.failed_deliveries[0]
    assert len(answered) > 1
    assert refused.status == 0
    assert refused.refusal().startswith("the bot answered nothing to a notification posted")


def _screen_sharing(event: events.ParticipantsUpdated) -> list[tuple[str | None, str | None]]:
    """The bot's screen-sharing streams (a caller's Teams client always has one to receive)."""
    return [
        (p.display_name, stream.direction)
        for p in event.participants
        if p.info is not None and p.info.identity is not None and p.info.identity.application
        for stream in p.media_streams or []
        if stream.media_type == "videoBasedScreenSharing"
    ]


async def test_a_screen_sharing_role_change_is_told_in_the_roster() -> None:
    """Graph accepts changeScreenSharingRole (202), then posts the roster with the bot's
    screen-sharing stream: sending as a sharer (document 42), receiving as a viewer."""
    bot, seen = answering_bot(subscribe=False)

    @bot.on_state("established")
    async def share(call: Call, event: events.CallStateChanged) -> None:
        await call.change_screen_sharing_role("sharer")
        await call.change_screen_sharing_role("viewer")

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await until(lambda: len(rosters(seen)) == 3)
        requests = sim.requests_for("changeScreenSharingRole")
        assert [sim.graph.answer_to(r).status for r in requests] == [202, 202]
    first, sharing, viewing = rosters(seen)
    assert _screen_sharing(first) == []
    assert _screen_sharing(sharing) == [(BOT_IN_ROSTER, "sendOnly")]
    assert _screen_sharing(viewing) == [(BOT_IN_ROSTER, "receiveOnly")]
    me = call.roster[call.bot_participant_id]
    assert [s.media_type for s in me.media_streams or []] == ["audio", "videoBasedScreenSharing"]


async def test_bot_hanging_up_brings_terminating_then_terminated() -> None:
    bot, seen = answering_bot()

    @bot.on_tone
    async def hangup(call: Call, event: events.ToneReceived) -> None:
        await call.hangup()

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.press("9")
        await call.wait_until_ended()
        await until(lambda: "terminated" in labels(seen))
    assert call.states[-2:] == ["terminating", "terminated"]
    ended = seen[-1]
    assert isinstance(ended, events.CallTerminated)
    assert ended.result_info is not None
    assert ended.result_info.subcode == 5001


async def test_after_the_caller_hangs_up_graph_answers_404() -> None:
    bot, _seen = answering_bot()
    errors: list[GraphError] = []

    @bot.on_terminated
    async def too_late(call: Call, event: events.CallTerminated) -> None:
        try:
            await call.play_prompt("https://x.example/anyone.wav")
        except GraphError as exc:
            errors.append(exc)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await call.hangup()
        await until(lambda: bool(errors))
    assert errors[0].status == 404


async def test_graph_has_the_calls_the_simulator_posts_about_until_it_posts_their_end() -> None:
    """What the simulator posts without playing the call (a replay, a test's own post) left
    Graph's API behind: a posted termination did not end the call there, so the bot's next
    action on it was answered 2xx where Graph answers 404."""
    bot, _seen = recording_bot()

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    async with run_with_simulator(bot, drive=False) as sim:
        await sim.post(builders.notifications(builders.incoming_call("posted-call")))
        await until(lambda: any(r.action == "answer" for r, _ in sim.graph.answers))
        assert [a.status for r, a in sim.graph.answers if r.action == "answer"] == [202]
        await sim.post(builders.notifications(builders.call_terminated("posted-call")))
        with pytest.raises(CallEnded) as late:
            await bot.services.call("posted-call").keep_alive()
    assert (late.value.status, late.value.code) == (404, "8522")


async def test_a_caller_hanging_up_during_an_awaited_prompt_stops_the_handler_quietly() -> None:
    """The prompt's wait fails because the call ended: like ``CallEnded``, that is no bug
    of the handler's, so letting it escape is no handler error."""
    bot, _seen = answering_bot(subscribe=False)
    failures: list[OperationFailed] = []

    @bot.on_state("established")
    async def welcome(call: Call, event: events.CallStateChanged) -> None:
        prompt = await call.play_prompt("https://x.example/welcome.wav")
        try:
            await prompt.wait()
        except OperationFailed as exc:
            failures.append(exc)
            raise

    async with run_with_simulator(bot, prompt_duration=600.0) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("playPrompt")
        await call.hangup()
        handled = bot.metrics.sources.handled
        assert handled is not None
        await until(lambda: handled()["call_ended"] == 1)
    assert [exc.call_ended for exc in failures] == [True]
    assert handled()["handler_errors"] == 0


async def test_outgoing_calls_ring_and_are_answered_or_not() -> None:
    bot, seen = recording_bot()
    async with run_with_simulator(bot) as sim:
        sim.queue_outgoing("no_answer")
        first = await bot.create_call(Target.phone("+14255550123"))
        unanswered = await sim.wait_for_outgoing_call()
        assert unanswered.id == first.id
        await unanswered.wait_until_ended()
        second = await bot.create_call(Target.user("user-1", "Lee Gu"))
        answered = await sim.wait_for_outgoing_call()
        await answered.wait_for_state("established")
        await until(lambda: "ParticipantsUpdated" in labels(seen, second.id))
    assert labels(seen, first.id) == ["establishing", "terminated"]
    ended = next(e for e in seen if isinstance(e, events.CallTerminated))
    assert ended.result_info is not None
    assert ended.result_info.code == 408
    # As recorded from Teams (sb01, sb02): an outgoing call rings without a ringing state.
    assert labels(seen, second.id) == [
        "establishing",
        "established",
        "CallUpdated",
        "ParticipantsUpdated",
    ]


async def test_a_placed_call_can_be_awaited_until_established_or_not_answered() -> None:
    """A bot placing a call waits for the callee to pick up: ``wait_until_established``
    returns once Graph says the call is established (at once after that), and raises
    ``CallEnded`` with Graph's reason when the call ends first (and for an ended call)."""
    bot, _seen = recording_bot()
    async with run_with_simulator(bot) as sim:
        sim.queue_outgoing("busy", "answer")
        busy = await bot.create_call(Target.phone("+14255550123"))
        with pytest.raises(CallEnded) as info:
            await busy.wait_until_established(timeout=30)
        assert info.value.result_info is not None
        assert info.value.result_info.code == 486
        with pytest.raises(CallEnded):
            await busy.wait_until_established(timeout=30)  # it ended: at once
        answered = await bot.create_call(Target.user("user-1", "Lee Gu"))
        await answered.wait_until_established(timeout=30)
        assert bot.services.call(answered.id).ended is False
        await answered.wait_until_established(timeout=0.001)  # established: at once
        lifecycle = bot._running().lifecycle
        assert lifecycle._established_waiters == {}
        await answered.hangup()


async def test_the_bot_is_in_the_roster_under_the_id_graph_names_as_its_own() -> None:
    """Graph names the bot's own participant (``myParticipantId``) in an incoming call
    (documents 15, 18, 20, 22) and in a placed call's answer (Create call): a bot finding the
    caller among the participants (to put them on hold music) leaves that one out."""
    bot = CallBot(app_id=APP_ID)
    told: dict[str, str | None] = {}
    in_roster: dict[str, list[str | None]] = {}

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        told[call.key] = event.call.my_participant_id
        await call.answer()

    @bot.on_participants
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        in_roster[call.key] = [
            p.id
            for p in event.participants
            if p.info is not None
            and p.info.identity is not None
            and p.info.identity.application is not None
        ]

    async with run_with_simulator(bot) as sim:
        incoming = await sim.incoming_call()
        await incoming.wait_for_state("established")
        await incoming.settled()
        placed = await bot.create_call(Target.user("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"))
        told[placed.key] = placed.snapshot.my_participant_id if placed.snapshot else None
        outgoing = await sim.wait_for_outgoing_call()
        await outgoing.wait_for_state("established")
        await outgoing.settled()
    for key in (incoming.key, placed.key):
        assert told[key] is not None
        assert in_roster[key] == [told[key]]


async def test_a_bot_on_graph_beta_stays_on_beta_and_the_calls_it_places_ring() -> None:
    """A bot written for Graph's beta (``playPrompt``'s ``loop`` is beta's only) is served
    on the simulator's beta, not moved to v1.0 (where its loop raises ``ValueError``); the
    calls it places go ``establishing``, ``ringing``, then on, as the beta Create call page
    documents them (seed001)."""
    bot, seen = recording_bot(graph_url="https://graph.microsoft.com/beta")
    hold_music = "https://contoso.example/hold.wav"

    @bot.on_state("established")
    async def hold(call: Call, event: events.CallStateChanged) -> None:
        await call.play_prompt(hold_music, loop=True)

    async with run_with_simulator(bot) as sim:
        sim.queue_outgoing("no_answer")
        first = await bot.create_call(Target.phone("+14255550123"))
        unanswered = await sim.wait_for_outgoing_call()
        await unanswered.wait_until_ended()
        second = await bot.create_call(Target.user("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"))
        answered = await sim.wait_for_outgoing_call()
        prompt = await answered.wait_for_request("playPrompt")
        await answered.hangup()
        assert bot.settings.graph_url == sim.graph.beta_url
    assert prompt.version == "beta"
    assert prompt.json["loop"] is True
    assert prompt.json["prompts"][0]["mediaInfo"]["uri"] == hold_music
    assert labels(seen, first.id) == ["establishing", "ringing", "terminated"]
    assert labels(seen, second.id)[:3] == ["establishing", "ringing", "established"]
    assert bot.settings.graph_url == "https://graph.microsoft.com/beta"


async def test_joining_a_meeting_and_people_coming_and_going() -> None:
    bot, seen = recording_bot()
    async with run_with_simulator(bot) as sim:
        sim.meeting_attendees = ["Megan Bowen"]
        call = await bot.join_meeting(MEETING_URL)
        meeting = await sim.wait_for_outgoing_call()
        assert meeting.meeting
        await meeting.wait_for_state("established")
        alice = await meeting.join("Alice Smith")
        await meeting.leave(alice)
        await meeting.leave("Megan Bowen")
        await until(lambda: labels(seen, call.id).count("ParticipantsUpdated") == 4)
    rosters = [e for e in seen if isinstance(e, events.ParticipantsUpdated)]

    def names(found: list[Any]) -> list[str]:
        return sorted(p.display_name or "?" for p in found)

    assert names(rosters[0].joined) == [BOT_IN_ROSTER, "Megan Bowen"]
    assert names(rosters[1].joined) == ["Alice Smith"]
    assert names(rosters[2].left) == ["Alice Smith"]
    assert names(rosters[3].left) == ["Megan Bowen"]
    # Joined as the app (no application instance as its source), the bot is the
    # `application` in the roster, as document 08 has it.
    (me,) = [p for p in rosters[0].joined if p.display_name == BOT_IN_ROSTER]
    assert me.info is not None
    assert me.info.identity is not None
    assert me.info.identity.application is not None
    assert me.info.identity.application_instance is None


async def test_the_request_that_placed_a_call_is_one_of_the_call_s_requests() -> None:
    bot, _ = recording_bot()
    async with run_with_simulator(bot) as sim:
        await bot.join_meeting(MEETING_URL)
        meeting = await sim.wait_for_outgoing_call()
        (joined,) = meeting.requests_for("createCall")
        assert joined.json["meetingInfo"]["organizer"]["user"]["id"] == "o-1"
        assert await meeting.wait_for_request("createCall") is joined
        assert meeting.requests[0] is joined
        await meeting.hangup()
        placed = await bot.create_call(Target.user("u-1"))
        call = await sim.wait_for_outgoing_call()
        assert call.key == placed.key
        (placed_it,) = call.requests_for("createCall")
        assert placed_it.json["targets"][0]["identity"]["user"]["id"] == "u-1"
        await call.hangup()


async def test_the_bot_finds_itself_in_the_roster_by_its_my_participant_id() -> None:
    """Graph names the bot's own participant ``myParticipantId`` (the join's response and
    the roster of document 08 agree): the simulator's roster gives the bot that id."""
    bot, seen = answering_bot(subscribe=False)
    async with run_with_simulator(bot) as sim:
        joined = await bot.join_meeting(MEETING_URL)
        meeting = await sim.wait_for_outgoing_call()
        answered = await sim.incoming_call()
        await until(
            lambda: all(
                labels(seen, call.id).count("ParticipantsUpdated") == 1
                for call in (meeting, answered)
            )
        )
        assert joined.snapshot is not None
        mine = {
            joined.key: joined.snapshot.my_participant_id,
            answered.key: (await bot.services.call(answered.id).refresh()).my_participant_id,
        }
    rosters = [e for e in seen if isinstance(e, events.ParticipantsUpdated)]
    assert {roster.call_key for roster in rosters} == set(mine)
    for roster in rosters:
        me = [p for p in roster.participants if p.id == mine[roster.call_key]]
        assert [p.display_name for p in me] == [BOT_IN_ROSTER]


async def test_a_bot_in_a_meeting_it_joined_finds_itself_in_the_roster_in_its_handlers() -> None:
    """Graph's notifications of a call the bot placed never name the bot's participant; the
    answer to the join does, and the handlers of the call have it in its snapshot: a bot
    leaving with the last person counts everyone but itself (and hangs up)."""
    bot = CallBot(app_id=APP_ID)
    counted: list[tuple[str | None, int]] = []

    @bot.on_participants
    async def roster(call: Call, event: events.ParticipantsUpdated) -> None:
        me = call.snapshot.my_participant_id if call.snapshot is not None else None
        others = [p for p in call.roster.values() if p.id != me]
        counted.append((me, len(others)))
        if event.left and not others:
            await call.hangup()

    async with run_with_simulator(bot) as sim:
        sim.meeting_attendees = ["Megan Bowen"]
        await bot.join_meeting(MEETING_URL)
        meeting = await sim.wait_for_outgoing_call()
        await meeting.wait_for_state("established")
        await meeting.leave("Megan Bowen")
        await meeting.wait_until_ended()
    assert meeting.requests_for("deleteCall")
    # The roster posted once the join was answered: the bot is in it, and alone.
    assert counted[-1] == (meeting.bot_participant_id, 0)


async def test_a_roster_a_test_posts_is_the_call_s_roster_from_then_on() -> None:
    """Someone a test brings in with a roster of its own (a guest waiting in the lobby, as
    document 65 shows one) is in the call: Graph finds them to mute, and the simulator's next
    roster keeps them, as the bot would expect."""
    bot, seen = recording_bot()
    async with run_with_simulator(bot) as sim:
        call = await bot.join_meeting(MEETING_URL)
        meeting = await sim.wait_for_outgoing_call()
        await meeting.wait_for_state("established")
        guest = builders.participant(
            "05491616-385f-44a8-9974-18cc5f9933c1",
            display_name="Guest User",
            kind="guest",
            in_lobby=True,
        )
        await meeting.notify(builders.roster(meeting.id, [*meeting.roster.values(), guest]))
        muted = await call.participants.mute(guest.id or "")
        await muted.wait(timeout=5)
        await meeting.join("Alice Smith")
        await until(lambda: labels(seen, call.id).count("ParticipantsUpdated") == 4)
    rosters = [e for e in seen if isinstance(e, events.ParticipantsUpdated)]
    assert [p.display_name for p in rosters[1].joined] == ["Guest User"]
    assert [(p.display_name, p.is_muted) for p in rosters[2].updated] == [("Guest User", True)]
    assert [p.display_name for p in rosters[3].joined] == ["Alice Smith"]
    assert rosters[3].left == []


async def test_a_delta_roster_a_test_posts_is_numbered_on_from() -> None:
    """With delta rosters, the simulator's next delta follows the number of one a test
    posted (one numbered below would be dropped as stale), and it changes only who it names."""
    bot, seen = recording_bot()
    async with run_with_simulator(bot) as sim:
        call = await bot.join_meeting(MEETING_URL, delta_roster=True)
        meeting = await sim.wait_for_outgoing_call()
        await meeting.wait_for_state("established")
        guest = builders.participant("p-guest", display_name="Guest User", kind="guest")
        joins = builders.delta_roster(
            meeting.id, [guest], sequence_number=50, change_type="created"
        )
        await meeting.notify(joins)
        await meeting.join("Alice Smith")
        await until(lambda: labels(seen, call.id).count("ParticipantsUpdated") == 3)
        gone = builders.delta_roster(meeting.id, [guest], sequence_number=60, change_type="deleted")
        await meeting.notify(gone)
        await meeting.leave("Alice Smith")
        await until(lambda: labels(seen, call.id).count("ParticipantsUpdated") == 5)
    rosters = [e for e in seen if isinstance(e, events.ParticipantsUpdated)]
    assert [[p.display_name for p in r.joined] for r in rosters[1:]] == [
        ["Guest User"],
        ["Alice Smith"],
        [],
        [],
    ]
    assert [[p.display_name for p in r.left] for r in rosters[3:]] == [
        ["Guest User"],
        ["Alice Smith"],
    ]
    assert "p-guest" not in meeting.roster


async def test_a_request_returned_by_one_wait_is_not_returned_by_another() -> None:
    """The simulator's wait and the call's take turns over one list: each request once."""
    bot, _ = answering_bot()

    @bot.on_state("established")
    async def two_prompts(call: Call, event: events.CallStateChanged) -> None:
        await call.play_prompt("https://contoso.example/welcome.wav")
        await call.play_prompt("https://contoso.example/menu.wav")

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        first = await sim.wait_for_request("playPrompt")
        second = await call.wait_for_request("playPrompt")
        assert [r.json["prompts"][0]["mediaInfo"]["uri"] for r in (first, second)] == [
            "https://contoso.example/welcome.wav",
            "https://contoso.example/menu.wav",
        ]
        await call.hangup()


async def test_a_participant_is_found_in_the_roster_by_its_id_as_graph_wrote_it() -> None:
    bot = CallBot(app_id=APP_ID)
    found: list[bool] = []

    @bot.on_participants
    async def look_up(call: Call, event: events.ParticipantsUpdated) -> None:
        for participant in event.joined:
            assert participant.id is not None
            found.append(participant.id in call.roster)
            found.append(call.roster[participant.id.upper()] == participant)

    async with run_with_simulator(bot) as sim:
        await bot.join_meeting(MEETING_URL)
        meeting = await sim.wait_for_outgoing_call()
        await meeting.join("Alice Smith")
        await meeting.settled()
    assert found
    assert all(found)


async def test_settled_waits_for_the_handlers_of_what_was_posted() -> None:
    """A roster handler that awaits a prompt before it notes who came: right after ``join``
    (which returns on the 202) it has not noted them yet; after ``settled()`` it has."""
    bot, _seen = answering_bot()
    greeted: list[str] = []
    blocked = asyncio.Event()

    @bot.on_participants
    async def greet(call: Call, event: events.ParticipantsUpdated) -> None:
        for person in event.joined:
            identity = person.info.identity if person.info is not None else None
            name = identity.user.display_name if identity and identity.user else None
            if name:
                op = await call.play_prompt(f"https://cdn.example/hello-{len(greeted)}.wav")
                await op.wait(timeout=5)
                greeted.append(name)

    async with run_with_simulator(bot, prompt_duration=0.01) as sim:
        call = await sim.incoming_call(from_user="Adele Vance")
        await call.settled()
        assert greeted == ["Adele Vance"]
        await call.join("Alice Smith")
        await call.settled()
        assert greeted == ["Adele Vance", "Alice Smith"]
        # The answer's states, its roster and the prompts' outcomes: all handled.
        assert call.state == "established"
        await sim.settled()

        @bot.on_tone
        async def stuck(call: Call, event: events.ToneReceived) -> None:
            await blocked.wait()

        await call.press("1")
        with pytest.raises(SimulatorError, match="the bot still works on call"):
            await call.settled(timeout=0.2)
        blocked.set()
        await call.settled()


async def test_settled_waits_for_the_handlers_of_a_call_a_test_posted_itself() -> None:
    """``sim.settled()`` waits for everything posted so far: the calls a test posts about with
    ``sim.post`` too, not only those the simulator plays."""
    bot = CallBot(app_id=APP_ID)
    played: list[str] = []

    @bot.on_state("established")
    async def welcome(call: Call, event: events.CallStateChanged) -> None:
        await (await call.play_prompt("https://cdn.example/welcome.wav")).wait(timeout=5)
        played.append(call.key)

    call_id = "2b8d7a3e-5c1f-4d0a-9e6b-7f3c2a1d0e9b"
    async with run_with_simulator(bot, prompt_duration=0.01) as sim:
        for state in ("establishing", "established"):
            body = builders.notifications(builders.call_state(call_id, state))
            assert await sim.post(body, call_id=call_id) == 202
        await sim.settled()
        assert played == [call_id.replace("-", "")]


async def test_a_wait_on_a_call_the_bot_never_took_says_so() -> None:
    bot, _seen = recording_bot()  # no on_incoming_call handler: nobody answers
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        with pytest.raises(SimulatorError, match="the bot never answered, rejected or redirected"):
            await call.wait_until_ended(timeout=0.2)
        await call.hangup()


async def test_a_refused_notification_says_why_and_what_to_check(
    authority: TokenAuthority, serve: Any
) -> None:
    """A bot set up with another app id than the simulator's refuses its tokens: the error
    names the bot's reason and the settings to check."""
    server = await serve(make_bot(authority))
    async with Simulator(app_id="11111111-2222-4333-8444-555555555555") as sim:
        sim.callback_url = str(server.client.make_url("/api/calls"))
        with pytest.raises(SimulatorError) as refused:
            await sim.incoming_call()
    message = str(refused.value)
    assert "the bot answered 401 (" in message
    assert "CALLBOT_APP_ID" in message


async def test_settled_needs_the_bot_in_this_process() -> None:
    async with Simulator() as sim:
        with pytest.raises(SimulatorError, match="needs the bot in this process"):
            await sim.settled()


async def test_mute_and_invite_change_the_roster() -> None:
    bot, seen = answering_bot()

    @bot.on_tone
    async def mute_and_invite(call: Call, event: events.ToneReceived) -> None:
        await call.mute()
        op = await call.participants.invite(Target.user("user-2", "Lee Gu"))
        await op.wait(timeout=5)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.press("3")
        await until(
            lambda: len(call.roster) == 3 and labels(seen).count("ParticipantsUpdated") >= 3
        )
        await call.settled()  # the invitation's outcome handled, and its handler returned
    bot_participant = call.roster[call.bot_participant_id]
    assert bot_participant.is_muted is True
    last = [e for e in seen if isinstance(e, events.ParticipantsUpdated)][-1]
    assert [p.info.identity.user.display_name for p in last.joined] == ["Lee Gu"]  # type: ignore[union-attr]


async def test_an_invitation_can_be_made_to_fail() -> None:
    """``sim.invite_outcome = "failed"``: the invitation's operation fails (the simulator's
    own 408: Graph documents no failed invitation), and nobody joins the roster."""
    bot, seen = answering_bot()
    outcomes: list[tuple[str, int | None]] = []

    @bot.on_tone
    async def invite(call: Call, event: events.ToneReceived) -> None:
        op = await call.participants.invite(Target.user("user-2", "Lee Gu"))
        try:
            await op.wait(timeout=30)
            outcomes.append(("completed", None))
        except OperationFailed as exc:
            outcomes.append(("failed", exc.result_info.code if exc.result_info else None))

    async with run_with_simulator(bot) as sim:
        sim.invite_outcome = "failed"
        call = await sim.incoming_call()
        await call.press("3")
        await until(lambda: bool(outcomes))
        await call.hangup()
        await sim.settled()
    assert outcomes == [("failed", 408)]
    assert len(call.roster) == 2  # the caller and the bot
    rosters = [e for e in seen if isinstance(e, events.ParticipantsUpdated)]
    assert all(not roster.left and len(roster.joined) <= 2 for roster in rosters)


async def test_waiting_for_a_request_that_never_comes_says_what_came() -> None:
    bot, _ = answering_bot()
    async with run_with_simulator(bot) as sim:
        await sim.incoming_call()
        await sim.wait_for_request("answer")  # what the message below names
        with pytest.raises(SimulatorError, match=r"no 'transfer' request.*'answer'"):
            await sim.wait_for_request("transfer", timeout=0.3)


async def test_a_wait_that_times_out_names_the_handlers_that_raised() -> None:
    """A request the bot never sent because its handler raised first: the error says which
    handler raised, not only what never came."""
    bot, _ = answering_bot(subscribe=False)

    @bot.on_state("established")
    async def route(call: Call, event: events.CallStateChanged) -> None:
        await call.transfer("+14255550101")  # a phone number needs Target.phone: ValueError

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.settled()
        with pytest.raises(SimulatorError) as waited:
            await call.wait_for_request("transfer", timeout=0.1)
        assert f"handlers raised: route on CallStateChanged of call {call.id}" in str(waited.value)
        await call.hangup()


async def test_each_wait_returns_the_next_request() -> None:
    bot, _ = answering_bot()
    async with run_with_simulator(bot) as sim:
        first = await sim.incoming_call()
        second = await sim.incoming_call()
        one = await sim.wait_for_request("answer")
        two = await sim.wait_for_request("answer")
        assert {one.call_id, two.call_id} == {first.id, second.id}
        # Returned once, whichever wait took it: the call has no answer left to return.
        with pytest.raises(SimulatorError, match="sent no 'answer' request"):
            await second.wait_for_request("answer", timeout=0.1)


async def test_the_bot_is_restored_after_the_simulator() -> None:
    class OwnCredential:
        async def get_token(self, *scopes: str) -> AccessToken:
            raise AssertionError("the simulator's credential is used while simulated")

    own = OwnCredential()
    bot, _ = answering_bot(public_url="https://bot.contoso.com", tenant_id="tenant-1")
    bot.configure(credential=own)
    before = bot.settings
    async with run_with_simulator(bot) as sim:
        assert bot.settings.graph_url == sim.graph_url
        assert sim.tenant_id == "tenant-1"
        call = await sim.incoming_call()
        await call.wait_for_state("established")
    assert bot.settings == before
    assert bot._credential is own
    assert not bot.ready


async def test_a_refused_notification_is_reported() -> None:
    bot, _ = answering_bot()
    async with run_with_simulator(bot) as sim:
        sim.app_id = "someone-else"  # tokens for another audience
        with pytest.raises(SimulatorError, match="answered 401"):
            await sim.incoming_call()
        assert sim.failed_deliveries[0].status == 401


@pytest.mark.parametrize(
    ("item", "kind"),
    [
        (builders.incoming_call("c"), events.IncomingCall),
        (builders.call_state("c", "established"), events.CallStateChanged),
        (builders.call_terminated("c", code=0, subcode=7015), events.CallTerminated),
        (builders.tone("c", "tone1", 1), events.ToneReceived),
        (builders.roster("c", [builders.participant("p")]), events.ParticipantsUpdated),
        (builders.operation_update("c", "op-1"), events.OperationUpdated),
        (builders.content_sharing("c", ["s"]), events.ContentSharingUpdated),
        (
            builders.unknown("c", "/somethingNew", resource_data={"x": 1}),
            events.UnknownNotification,
        ),
    ],
)
def test_a_builder_for_every_event_kind(item: dict[str, Any], kind: type[events.Event]) -> None:
    (event,) = parse_payload(builders.notifications(item))
    assert type(event) is kind


def test_a_participant_who_left() -> None:
    gone = builders.participant("p", display_name="Lee", removed_reason="left")
    assert gone.removed_state is not None
    assert gone.removed_state.reason == "left"


def test_a_participant_of_an_unknown_kind_is_refused_naming_the_kinds() -> None:
    with pytest.raises(ValueError, match=r"'bot'.*applicationInstance.*guest.*phone.*user"):
        builders.participant("p", display_name="Notetaker", kind="bot")
    with pytest.raises(ValueError, match="'telephone'"):
        builders.incoming_call("c", caller_id="+14255550100", caller_kind="telephone")


def test_a_participant_kind_may_be_written_as_its_python_attribute() -> None:
    """``application_instance`` (the model's attribute) is the ``applicationInstance`` bot."""
    notetaker = builders.participant("p", display_name="Notetaker", kind="application_instance")
    assert notetaker.info is not None
    assert notetaker.info.identity is not None
    assert notetaker.info.identity.application_instance is not None
    assert [s.media_type for s in notetaker.media_streams or []] == ["audio"]  # a bot's one


async def test_someone_of_an_unknown_kind_joining_is_refused() -> None:
    bot, _ = recording_bot()
    async with run_with_simulator(bot) as sim:
        await bot.join_meeting(MEETING_URL)
        meeting = await sim.wait_for_outgoing_call()
        await meeting.wait_for_state("established")
        with pytest.raises(ValueError, match="'app'"):
            await meeting.join("Notetaker", kind="app")
        await meeting.join("Notetaker", kind="application")
        await meeting.hangup()
        await meeting.wait_until_ended()


@pytest.fixture
async def bare_simulator() -> AsyncIterator[Simulator]:
    async with Simulator() as sim:
        yield sim


async def test_a_simulator_without_a_bot_says_so(bare_simulator: Simulator) -> None:
    with pytest.raises(SimulatorError, match="no bot attached"):
        await bare_simulator.post(builders.notifications(builders.incoming_call("c")))
    env = bare_simulator.bot_environment(public_url="http://127.0.0.1:8080")
    assert env["CALLBOT_OPENID_CONFIG_URL"] == bare_simulator.openid_config_url
    assert env["CALLBOT_ALLOW_INSECURE_PUBLIC_URL"] == "1"


async def test_a_bot_that_asks_for_delta_rosters_gets_them() -> None:
    bot, seen = recording_bot()

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer(delta_roster=True)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call(from_user="Adele Vance")
        await call.wait_for_state("established")
        assert call.delta_roster
        await call.join("Lee Gu")
        await call.leave("Adele Vance")
        await until(lambda: len(rosters(seen)) == 3)
        names = sorted(_name(p) for p in bot.active_calls()[0].roster.values())
    first, joined, left = rosters(seen)
    assert all(r.delta for r in (first, joined, left))
    assert sorted(_name(p) for p in first.joined) == [BOT_IN_ROSTER, "Adele Vance"]
    assert [_name(p) for p in joined.joined] == ["Lee Gu"]
    assert (joined.left, joined.updated) == ([], [])
    assert [_name(p) for p in left.left] == ["Adele Vance"]
    assert names == [BOT_IN_ROSTER, "Lee Gu"]


def rosters(seen: Seen) -> list[events.ParticipantsUpdated]:
    return [e for e in seen if isinstance(e, events.ParticipantsUpdated)]


def _name(participant: models.Participant) -> str:
    return participant.display_name or "?"


async def test_a_participant_named_in_any_id_form_is_found_removed_and_muted() -> None:
    bot, seen = recording_bot()
    done: list[str] = []

    @bot.on_participants
    async def act(call: Call, event: events.ParticipantsUpdated) -> None:
        if done:
            return
        done.append("acting")
        # The roster's keys are ids as callbot compares them (no dashes): Graph takes either.
        by_name = {_name(p): key for key, p in call.roster.items()}
        lee, megan = by_name["Lee Gu"], by_name["Megan Bowen"]
        await call.participants.mute(lee)
        found = await call.participants.get(megan.upper())
        await call.participants.remove(megan)
        done.append(_name(found))

    async with run_with_simulator(bot) as sim:
        sim.meeting_attendees = ["Megan Bowen", "Lee Gu"]
        await bot.join_meeting(MEETING_URL)
        meeting = await sim.wait_for_outgoing_call()
        await until(lambda: len(rosters(seen)) >= 3)
    assert done == ["acting", "Megan Bowen"]
    left = [_name(p) for r in rosters(seen) for p in r.left]
    muted = [_name(p) for r in rosters(seen) for p in r.updated if p.is_muted]
    assert (left, muted) == (["Megan Bowen"], ["Lee Gu"])
    assert sorted(_name(p) for p in meeting.roster.values()) == [BOT_IN_ROSTER, "Lee Gu"]


async def test_a_state_is_waited_for_in_any_case_as_on_state_takes_it() -> None:
    bot, _ = answering_bot(subscribe=False)
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("Established", timeout=5)
        assert call.state == "established"


async def test_what_a_scripted_notification_says_the_simulated_call_knows_too() -> None:
    bot, seen = answering_bot(subscribe=False)
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        await call.notify(builders.call_state(call.id, "hold"))
        # Graph's reject of 2018: deleted, naming no state. The bot's parser says it ended.
        await call.notify(
            {
                "changeType": "deleted",
                "resourceUrl": f"/communications/calls/{call.id}",
                "resourceData": {"@odata.type": "#microsoft.graph.call"},
            }
        )
        await call.wait_until_ended(timeout=5)
        await call.hangup()  # over already: nothing more is posted
    assert call.states == ["incoming", "establishing", "established", "hold", "terminated"]
    assert labels(seen).count("terminated") == 1


async def test_the_simulator_posts_what_a_recorded_teams_call_posted() -> None:
    """Shapes a live Teams call was recorded with (sb06, sb15, sb16): the caller's hang-up is
    200/5002 (the simulator said 0/0), and whole rosters carry no ``sequenceNumber`` (the
    simulator numbered them, so stale whole rosters were dropped only under test)."""
    bot, seen = answering_bot(subscribe=False)
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await until(lambda: "ParticipantsUpdated" in labels(seen, call.id))
        await call.hangup()
        await call.wait_until_ended()
        await until(lambda: "terminated" in labels(seen, call.id))
        await sim.settled()
        posted = [item for t in sim.traffic if t.kind == "notification" for item in t.body["value"]]
    ended = next(e for e in seen if isinstance(e, events.CallTerminated))
    assert ended.result_info is not None
    assert (ended.result_info.code, ended.result_info.subcode) == (200, 5002)
    rosters = [item for item in posted if item["resourceUrl"].endswith("/participants")]
    assert rosters
    assert all("sequenceNumber" not in item for item in rosters)


async def test_an_incoming_call_not_taken_in_time_is_ended_by_graph() -> None:
    """Graph ends a call the bot does not answer, reject or redirect within 15 s (408/1106);
    the simulator waited for ever, so a bot too slow to answer passed its tests."""
    bot, seen = recording_bot()
    late: list[BaseException] = []
    go = asyncio.Event()

    @bot.on_incoming_call
    async def answer_too_late(call: Call, event: events.IncomingCall) -> None:
        await go.wait()
        try:
            await call.answer()
        except GraphError as exc:
            late.append(exc)

    async with run_with_simulator(bot, answer_deadline=0.2) as sim:
        call = await sim.incoming_call()
        await call.wait_until_ended()
        go.set()
        await until(lambda: bool(late))
        await until(lambda: any(isinstance(e, events.CallTerminated) for e in seen))
    ended = next(e for e in seen if isinstance(e, events.CallTerminated))
    assert ended.result_info is not None
    assert (ended.result_info.code, ended.result_info.subcode) == (408, 1106)
    assert isinstance(late[0], CallEnded)


async def test_inviting_several_people_ends_as_graph_documents_it() -> None:
    """Graph posts the end of an invitation of several participants on
    ``operations/participants`` with ``"id": null``: the simulator does too, and the
    operation still ends for the bot that sent it (by the context callbot generated). As
    Graph documents it, to a group call (the bot placed one to two people)."""
    bot, _seen = answering_bot(subscribe=False)
    done: list[Any] = []

    @bot.on_state("established")
    async def invite(call: Call, event: events.CallStateChanged) -> None:
        op = await call.participants.invite(
            Target.user("user-2", "Lee Gu"), Target.user("user-3", "Megan Bowen")
        )
        done.append((op.id, await op.wait(timeout=10)))

    async with run_with_simulator(bot) as sim:
        await bot.create_call(Target.user("user-4", "Sam"), Target.user("user-5", "Alex"))
        call = await sim.wait_for_outgoing_call()
        await until(lambda: bool(done))
        await until(lambda: len(call.roster) == 5)
        await sim.settled()
        posted = [item for t in sim.traffic if t.kind == "notification" for item in t.body["value"]]
    ((operation_id, final),) = done
    assert final.status == "completed"
    assert final.id == operation_id
    outcome = next(
        item for item in posted if item["resourceUrl"].endswith("/operations/participants")
    )
    assert outcome["resourceData"]["id"] is None


async def test_inviting_several_people_at_once_to_a_p2p_call_is_refused() -> None:
    """Graph supports inviting several participants in one request only in a group call (its
    participant-invite page; each documented invitation of several is to a group call), and
    documents no error for it: the simulator refuses one to a P2P call with its own 400,
    posting nothing, where it used to bring everyone in. Once the call grew into a meeting
    (someone invited alone joined), several at once are invited."""
    bot, _seen = answering_bot(subscribe=False)
    refused: list[GraphError] = []
    done: list[Any] = []

    @bot.on_state("established")
    async def invite(call: Call, event: events.CallStateChanged) -> None:
        two = (Target.user("user-2", "Lee Gu"), Target.user("user-3", "Megan Bowen"))
        try:
            await call.participants.invite(*two)
        except GraphError as exc:
            refused.append(exc)
        await (await call.participants.invite(Target.user("user-4", "Alex"))).wait(timeout=10)
        done.append(await (await call.participants.invite(*two)).wait(timeout=10))

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await until(lambda: bool(done))
        await until(lambda: len(call.roster) == 5)
        await call.hangup()
        await call.settled()
    [exc] = refused
    assert exc.status == 400
    assert "group call" in str(exc)
    first, alone, both = sim.graph.requests_for("invite")
    assert [sim.graph.answer_to(r).status for r in (first, alone, both)] == [400, 200, 200]
    assert len(sim.graph.operations) == 2  # none for the refused invitation
    assert done[0].status == "completed"


async def test_a_bot_naming_its_own_endpoint_by_another_loopback_name_is_told_each_move_once() -> (
    None
):
    """A bot whose callbackUri is its own endpoint spelled ``localhost`` instead of
    ``127.0.0.1`` is still the bot in this process: its dispatcher says what its handlers
    were told, and the simulator must not count each move a second time as if a bot
    elsewhere had been told it too."""
    bot, _ = recording_bot()

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        own = bot.settings.callback_url.replace("://127.0.0.1:", "://localhost:")
        await call.answer(callback_uri=own)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_state("established")
        assert call.callback_url != sim.callback_url  # the same bot, by another name
        await call.hangup()  # posted after everything before it
        await call.settled()
        assert call.states == ["incoming", "establishing", "established", "terminated"]
