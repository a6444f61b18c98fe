"""Graph's quirks in the simulator: a bot sees the same events with them as without."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from callbot import Call, CallBot, events, models
from callbot.graph import Target
from callbot.testing import DeliveryOptions, Simulator, builders, run_with_simulator

from .conftest import APP_ID, until

PLAIN = DeliveryOptions()
QUIRKS = [
    pytest.param(DeliveryOptions(out_of_order=True), id="out_of_order"),
    pytest.param(DeliveryOptions(duplicate=True), id="duplicate"),
    pytest.param(DeliveryOptions(resource_only=True), id="resource_only"),
    pytest.param(DeliveryOptions(compact_ids=True), id="compact_ids"),
    pytest.param(DeliveryOptions(first_tone_sequence=1), id="first_tone_sequence"),
    pytest.param(DeliveryOptions.realistic(), id="realistic"),
]


def label(event: events.Event) -> str:
    if isinstance(event, events.ToneReceived):
        return f"tone:{event.tone}"
    if isinstance(event, events.CallStateChanged):
        return f"{event.previous_state}->{event.state}"
    if isinstance(event, events.OperationUpdated):
        return f"operation:{event.status}"
    if isinstance(event, events.ParticipantsUpdated):
        return f"roster:+{len(event.joined)}-{len(event.left)}"
    if isinstance(event, events.CallUpdated):
        return "updated:" + ",".join(sorted(event.changed))
    return type(event).__name__


def recording_bot() -> tuple[CallBot, list[str]]:
    bot = CallBot(app_id=APP_ID)
    seen: list[str] = []

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        seen.append(label(event))

    return bot, seen


async def answered_call_with_a_prompt(delivery: DeliveryOptions) -> tuple[list[str], Any]:
    """Someone calls, the bot answers and plays a prompt on a key, the caller hangs up."""
    bot, seen = recording_bot()
    outcomes: list[str] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def subscribe(call: Call, event: events.CallStateChanged) -> None:
        await call.subscribe_to_tone()

    @bot.on_tone
    async def play(call: Call, event: events.ToneReceived) -> None:
        op = await call.play_prompt(["https://x.example/a.wav"])
        outcomes.append(str((await op.wait(timeout=5)).status))

    async with run_with_simulator(bot, delivery=delivery) as sim:
        call = await sim.incoming_call(from_user="Adele Vance")
        await call.press("1")
        await until(lambda: bool(outcomes))
        await call.hangup()
        await until(lambda: "established->terminated" in seen)
        await sim.settled()
        posted = [t.body for t in sim.traffic if t.kind == "notification"]
    return [*seen, *outcomes], posted


async def placed_call_into_a_meeting(delivery: DeliveryOptions) -> tuple[list[str], Any]:
    """The bot places a call, someone joins and leaves, the bot hangs up."""
    bot, seen = recording_bot()
    async with run_with_simulator(bot, delivery=delivery) as sim:
        placed = await bot.create_call(Target.user("user-1", "Lee Gu"))
        call = await sim.wait_for_outgoing_call()
        await call.wait_for_state("established")
        await until(lambda: "roster:+2-0" in seen)
        who = await call.join("Alice Smith")
        await call.leave(who)
        await until(lambda: "roster:+0-1" in seen)
        await placed.hangup()
        await call.wait_until_ended()
        await until(lambda: "terminating->terminated" in seen)
        await sim.settled()
        posted = [t.body for t in sim.traffic if t.kind == "notification"]
    return seen, posted


def items(posted: list[Any]) -> list[dict[str, Any]]:
    return [item for body in posted for item in body["value"]]


@pytest.mark.parametrize("quirks", QUIRKS)
async def test_an_answered_call_sees_the_same_events_with_graphs_quirks(
    quirks: DeliveryOptions,
) -> None:
    plain, _ = await answered_call_with_a_prompt(PLAIN)
    quirky, posted = await answered_call_with_a_prompt(quirks)
    assert quirky == plain
    assert plain[:4] == [
        "IncomingCall",
        "incoming->establishing",
        "establishing->established",
        "updated:co_organizers,media_state,meeting_capability",
    ]
    assert "operation:completed" in plain
    if quirks.resource_only:
        assert all("resourceUrl" not in item for item in items(posted))


@pytest.mark.parametrize("quirks", QUIRKS)
async def test_a_placed_call_sees_the_same_events_with_graphs_quirks(
    quirks: DeliveryOptions,
) -> None:
    plain, _ = await placed_call_into_a_meeting(PLAIN)
    quirky, _ = await placed_call_into_a_meeting(quirks)
    assert quirky == plain
    assert "established->terminating" in plain


async def test_by_default_items_carry_resource_resource_url_and_a_chain_id_but_tones() -> None:
    _, posted = await answered_call_with_a_prompt(PLAIN)
    for item in items(posted):
        url = item["resourceUrl"]
        assert url.startswith("/communications/calls/")
        assert item["resource"] == "/app/calls/" + url.removeprefix("/communications/calls/")
    data = [item.get("resourceData") for item in items(posted)]
    calls = [d for d in data if isinstance(d, dict) and d["@odata.type"] == "#microsoft.graph.call"]
    # A tone carries none, as recorded (sb04).
    chains = {d["callChainId"] for d in calls if "toneInfo" not in d}
    assert len(chains) == 1
    assert all("callChainId" not in d for d in calls if "toneInfo" in d)
    played = next(
        d
        for d in data
        if isinstance(d, dict) and d["@odata.type"] == "#microsoft.graph.playPromptOperation"
    )
    assert played["completionReason"] == "completedSuccessfully"


async def test_compact_ids_write_the_paths_ids_upper_case_without_dashes() -> None:
    _, posted = await answered_call_with_a_prompt(DeliveryOptions(compact_ids=True))
    paths = [item["resourceUrl"] for item in items(posted)]
    operation = next(p for p in paths if "/operations/" in p)
    for path in (paths[0], operation):
        ids = path.removeprefix("/communications/calls/").split("/")[::2]
        assert all(i == i.upper() and "-" not in i and len(i) == 32 for i in ids)


async def digits_collected(delivery: DeliveryOptions) -> tuple[list[str], list[int | None]]:
    """A caller keys a number and then a menu choice; what the bot collected, and the
    tones' sequence ids as posted."""
    bot = CallBot(app_id=APP_ID)
    collected: list[str] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def ask(call: Call, event: events.CallStateChanged) -> None:
        collected.append(await call.collect_digits(max_digits=4, timeout=10))
        collected.append(await call.collect_digits(max_digits=1, timeout=10))

    async with run_with_simulator(bot, delivery=delivery) as sim:
        call = await sim.incoming_call(from_user="Adele Vance")
        await call.press("2468")
        await call.press("9")
        await until(lambda: len(collected) == 2)
        await call.hangup()
        await sim.settled()
        posted = [t.body for t in sim.traffic if t.kind == "notification"]
    sequence = [
        item["resourceData"]["toneInfo"].get("sequenceId")
        for item in items(posted)
        if "toneInfo" in (item.get("resourceData") or {})
    ]
    return collected, sequence


@pytest.mark.parametrize("quirks", QUIRKS)
async def test_digits_are_collected_the_same_with_graphs_quirks(quirks: DeliveryOptions) -> None:
    collected, sequence = await digits_collected(quirks)
    assert collected == ["2468", "9"]
    first = quirks.first_tone_sequence
    expected = list(range(first, first + 5))
    if quirks.duplicate:
        expected = [n for n in expected for _ in (1, 2)]
    assert sequence == expected


@pytest.mark.parametrize("quirks", QUIRKS)
async def test_the_simulators_call_states_follow_the_lifecycle_with_graphs_quirks(
    quirks: DeliveryOptions,
) -> None:
    """``established`` delivered before ``establishing`` made the simulator's call go back to
    ``establishing`` (its ``state``, and the state Graph's API reported) once the bot had
    both; its states are the lifecycle's, whatever order they were delivered in."""
    bot, seen = recording_bot()

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    async with run_with_simulator(bot, delivery=quirks) as sim:
        call = await sim.incoming_call()
        await until(lambda: "establishing->established" in seen)
        assert call.state == "established"
        assert sim.graph.calls[call.key].resource["state"] == "established"
        await call.hangup()
        await call.wait_until_ended()
    assert call.states == ["incoming", "establishing", "established", "terminated"]


def state_telling_bot(**options: Any) -> tuple[CallBot, list[str]]:
    """A bot that answers nothing itself and notes each state its handlers are told."""
    bot = CallBot(**{"app_id": APP_ID, **options})
    told: list[str] = []

    @bot.on_state(*models.CALL_STATES)  # "incoming" included: the IncomingCall
    async def moved(call: Call, event: events.CallStateChanged | events.IncomingCall) -> None:
        told.append(event.state)

    return bot, told


async def test_a_state_held_for_its_predecessor_is_the_calls_once_the_handlers_are_told() -> None:
    """The simulator listed ``established`` as soon as the bot acknowledged it, while the bot
    held it for ``establishing`` and had told its handlers nothing."""
    bot, told = state_telling_bot(reorder_window=300.0)
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.notify(builders.call_state(call.id, "established"))
        assert call.states == ["incoming"]
        await call.notify(builders.call_state(call.id, "establishing"))
        await call.settled()
        assert call.states == ["incoming", "establishing", "established"]
        await call.hangup()
        await call.settled()
    assert call.states == told == ["incoming", "establishing", "established", "terminated"]


async def test_a_late_state_the_bot_drops_as_stale_is_not_one_the_call_went_through() -> None:
    """``established`` told alone once its reorder window closed, then a late ``establishing``:
    the bot drops it as stale and tells no handler, yet the simulator listed it before
    ``established`` (and the call's history in a different order than its handlers saw)."""
    bot, told = state_telling_bot(reorder_window=0.05)
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.notify(builders.call_state(call.id, "established"))
        await call.settled()  # the window closed: established was told alone
        await call.notify(builders.call_state(call.id, "establishing"))
        await call.settled()
        assert call.states == ["incoming", "established"]
        assert sim.graph.calls[call.key].resource["state"] == "established"
        await call.hangup()
        await call.settled()
    assert call.states == told == ["incoming", "established", "terminated"]


async def test_a_ringing_after_established_is_not_listed_for_a_bot_in_another_server() -> None:
    """A bot the simulator does not run: what it acknowledged goes through callbot's own
    sequencer, so a ``ringing`` after ``established`` (the beta Create call page posts one)
    is dropped as the bot drops it, not slotted in before ``established``."""
    async with Simulator(app_id=APP_ID) as sim:
        bot, told = state_telling_bot(**sim.bot_settings(public_url="https://bot.example.test"))
        server = TestServer(bot.create_app())
        await server.start_server()
        try:
            sim.callback_url = str(server.make_url("/api/calls"))
            await bot.authenticator.wait_ready(5.0)
            call = await sim.incoming_call()
            await call.notify(builders.call_state(call.id, "establishing"))
            await call.notify(builders.call_state(call.id, "established"))
            await call.notify(builders.call_state(call.id, "ringing"))
            await call.hangup()
            await until(lambda: "terminated" in told)
        finally:
            await server.close()
    assert call.states == told == ["incoming", "establishing", "established", "terminated"]
