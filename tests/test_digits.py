"""call.collect_digits and call.menu against the simulator: keys reach a handler that waits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from callbot import Call, CallBot, CallEnded, Settings, events
from callbot._journal import Attempt, _current
from callbot._parse import parse_payload
from callbot._sequencing import notification_digest
from callbot.graph import CallServices
from callbot.graph._digits import ToneListener, ToneRouter
from callbot.testing import DeliveryOptions, run_with_simulator
from callbot.testing import builders as b

from .conftest import APP_ID, until

MENU = "https://contoso.example/menu.wav"
AGAIN = "https://contoso.example/again.wav"


def answering_bot(settings: Settings | None = None) -> CallBot:
    """A bot that answers every call."""
    bot = CallBot(settings or Settings(app_id=APP_ID))

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    return bot


def collecting_bot(
    *, settings: Settings | None = None, **options: Any
) -> tuple[CallBot, list[Any]]:
    """A bot that answers, collects digits once connected and keeps what it got."""
    bot = answering_bot(settings)
    results: list[Any] = []

    @bot.on_state("established")
    async def collect(call: Call, event: events.CallStateChanged) -> None:
        try:
            results.append(await call.collect_digits(**options))
        except CallEnded as exc:
            results.append(exc)

    return bot, results


async def test_keys_until_the_finish_key_while_the_handler_waits() -> None:
    bot, results = collecting_bot(prompt=MENU, max_digits=6, finish_on="#", timeout=5)
    async with run_with_simulator(bot, prompt_duration=0.05) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("playPrompt")
        await call.press("42#9")
        await until(lambda: bool(results))
        assert results == ["42"]
        assert len(call.requests_for("subscribeToTone")) == 1
        await call.hangup()


async def test_max_digits_ends_collection_and_a_key_stops_the_prompt() -> None:
    bot, results = collecting_bot(prompt=MENU, max_digits=3, timeout=5)
    # The prompt plays long enough for the key to come during it.
    async with run_with_simulator(bot, prompt_duration=5.0) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("playPrompt")
        await call.press("1234")
        await until(lambda: bool(results))
        assert results == ["123"]
        assert call.requests_for("cancelMediaProcessing")
        await call.hangup()


async def test_no_key_within_the_timeout_gives_an_empty_string() -> None:
    bot, results = collecting_bot(prompt=MENU, timeout=0.05)
    async with run_with_simulator(bot, prompt_duration=0.01) as sim:
        call = await sim.incoming_call()
        await until(lambda: bool(results))
        assert results == [""]
        await call.hangup()


async def test_digits_come_in_sequence_order_and_once() -> None:
    bot, results = collecting_bot(max_digits=3, timeout=5)
    delivery = DeliveryOptions(out_of_order=True, duplicate=True)
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call(delivery=delivery)
        await call.wait_for_request("subscribeToTone")
        await call.press("987")
        await until(lambda: bool(results))
        assert results == ["987"]
        await call.hangup()


async def test_the_caller_hanging_up_raises_call_ended_in_the_waiting_handler() -> None:
    bot, results = collecting_bot(prompt=MENU, timeout=30)
    async with run_with_simulator(bot, prompt_duration=0.01) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("playPrompt")
        await call.hangup()
        await until(lambda: bool(results))
        assert isinstance(results[0], CallEnded)


async def test_tones_still_reach_on_tone_handlers() -> None:
    bot, results = collecting_bot(max_digits=2, timeout=5)
    seen: list[str] = []

    @bot.on_tone
    async def record(call: Call, event: events.ToneReceived) -> None:
        seen.append(event.digit)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.press("5*")
        await until(lambda: seen == ["5", "*"])
        assert results == ["5*"]
        await call.hangup()


def menu_bot(**options: Any) -> tuple[CallBot, list[Any]]:
    bot = answering_bot()
    chosen: list[Any] = []

    @bot.on_state("established")
    async def main_menu(call: Call, event: events.CallStateChanged) -> None:
        chosen.append(await call.menu(MENU, {"1": "sales", "2": "support"}, **options))

    return bot, chosen


async def test_a_menu_returns_the_chosen_option() -> None:
    bot, chosen = menu_bot()
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.press("2")
        await until(lambda: bool(chosen))
        assert chosen == ["support"]
        await call.hangup()


async def test_a_wrong_key_plays_the_invalid_prompt_and_the_menu_again() -> None:
    bot, chosen = menu_bot(invalid_prompt=AGAIN, retries=1)
    async with run_with_simulator(bot, prompt_duration=0.01) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("playPrompt")
        await call.press("7")
        again = await call.wait_for_request("playPrompt")
        assert again.json["prompts"][0]["mediaInfo"]["uri"] == AGAIN
        menu = await call.wait_for_request("playPrompt")
        assert menu.json["prompts"][0]["mediaInfo"]["uri"] == MENU
        await call.press("1")
        await until(lambda: bool(chosen))
        assert chosen == ["sales"]
        await call.hangup()


async def test_a_key_during_the_invalid_choice_prompt_answers_the_menu() -> None:
    bot, chosen = menu_bot(invalid_prompt=AGAIN, retries=1)
    async with run_with_simulator(bot, prompt_duration=5.0) as sim:
        call = await sim.incoming_call()
        await call.press("7")
        await call.wait_for_request("playPrompt")  # the menu
        await call.wait_for_request("playPrompt")  # the invalid-choice prompt, 5 s long
        await call.press("2")
        await until(lambda: bool(chosen))
        assert chosen == ["support"]
        # The menu is not played over a key already pressed; both prompts were cut short.
        assert len(call.requests_for("playPrompt")) == 2
        assert len(call.requests_for("cancelMediaProcessing")) == 2
        await call.hangup()


async def test_a_hook_flash_is_no_digit() -> None:
    """Graph's ``tone`` enum has ``flash`` (a phone's hook flash) beside the keypad keys
    (schema: tone member 16): pressed amid a PIN it is none of its digits (collected as
    "12flash"), and pressed during a menu it neither stops the prompt nor is a wrong choice."""
    bot, results = collecting_bot(max_digits=4, timeout=5)
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.press(["tone1", "tone2", "flash", "tone3", "tone4"])
        await until(lambda: bool(results))
        assert results == ["1234"]
        await call.hangup()
    bot, chosen = menu_bot(retries=0)
    async with run_with_simulator(bot, prompt_duration=5.0) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("playPrompt")
        await call.press(["flash", "tone2"])
        await until(lambda: bool(chosen))
        assert chosen == ["support"]
        assert len(call.requests_for("cancelMediaProcessing")) == 1
        await call.hangup()


async def test_the_caller_presses_only_tones_graph_names() -> None:
    """The simulated caller's tone names are checked as ``send_dtmf_tones`` checks them: one
    Graph has not (``tone11``) raises, one in another case is sent in Graph's spelling."""
    bot, results = collecting_bot(max_digits=1, timeout=5)
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        with pytest.raises(ValueError, match=r"^tones='tone11' is not one of 'tone0', 'tone1'"):
            await call.press(["tone11"])  # type: ignore[list-item]
        await call.press(["Tone7"])  # type: ignore[list-item]
        await until(lambda: bool(results))
        assert results == ["7"]
        await call.hangup()


async def test_a_menu_without_an_answer_gives_none_after_its_retries() -> None:
    bot, chosen = menu_bot(retries=2, timeout=0.05)
    async with run_with_simulator(bot, prompt_duration=0.01) as sim:
        call = await sim.incoming_call()
        await until(lambda: bool(chosen))
        assert chosen == [None]
        assert len(call.requests_for("playPrompt")) == 3
        await call.hangup()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_digits": 0}, "max_digits"),
        ({"finish_on": "x"}, "finish_on"),
        ({"timeout": 0}, "timeout"),
    ],
)
async def test_bad_arguments_are_refused_before_anything_is_sent(
    options: dict[str, Any], message: str
) -> None:
    bot, _ = collecting_bot(**options)
    errors: list[BaseException] = []

    @bot.on_error
    async def keep(call: Call, event: events.Event, exc: BaseException) -> None:
        errors.append(exc)

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await until(lambda: bool(errors))
        assert isinstance(errors[0], ValueError)
        assert message in str(errors[0])
        assert not call.requests_for("subscribeToTone")
        await call.hangup()


async def test_a_collection_takes_each_tone_once_however_often_it_is_told() -> None:
    """A shared store tells every copy of a tone to every instance; the digits must not
    repeat, nor may a copy of a tone told before a collection opened reach it."""
    (first,) = parse_payload(b.notifications(b.tone("c", "tone4", 1)))
    (again,) = parse_payload(b.notifications({**b.tone("c", "tone4", 1), "changeType": "Updated"}))
    (second,) = parse_payload(b.notifications(b.tone("c", "tone2", 2)))
    router = ToneRouter()
    with router.listen("c") as listener:
        for event in (first, again, second, first):
            assert isinstance(event, events.ToneReceived)
            router.on_tone(event)
        assert [await listener.next(timeout=0), await listener.next(timeout=0)] == ["4", "2"]
        assert not listener.pending()
    with router.listen("c") as later:
        for event in (again, second):
            assert isinstance(event, events.ToneReceived)
            router.on_tone(event)
        assert not later.pending()


def tone_event(tone: str, sequence: int, call_id: str = "c") -> events.ToneReceived:
    (event,) = parse_payload(b.notifications(b.tone(call_id, tone, sequence)))
    assert isinstance(event, events.ToneReceived)
    return event


async def test_the_finish_key_after_a_full_collection_ends_that_one_only() -> None:
    """Four digits, the caller pressing 1234#: the collection stops at the fourth key, and
    the "#" after it ends that collection, not the next (already waiting, or opened later)."""
    router = ToneRouter()
    with router.listen("c") as listener:
        for sequence, tone in enumerate(["tone1", "tone2", "pound", "tone3"], start=1):
            router.on_tone(tone_event(tone, sequence))
        assert [await listener.next(timeout=0) for _ in range(2)] == ["1", "2"]
        listener.full(frozenset("#"))  # the "#" was there already
        assert await listener.next(timeout=0) == "3"
        listener.full(frozenset("#"))  # the next key has not come yet
    with router.listen("c") as following:
        router.on_tone(tone_event("pound", 5))
        router.on_tone(tone_event("pound", 6))  # a "#" of its own
        router.on_tone(tone_event("tone7", 7))
        assert [await following.next(timeout=0) for _ in range(2)] == ["#", "7"]
        assert not following.pending()
    with router.listen("c") as listener:
        for sequence, tone in enumerate(["tone1", "tone2", "tone9"], start=8):
            router.on_tone(tone_event(tone, sequence))
        assert [await listener.next(timeout=0) for _ in range(2)] == ["1", "2"]
        listener.full(frozenset("#"))  # another key came next: it is the caller's next
        assert await listener.next(timeout=0) == "9"


async def test_the_finish_key_after_a_full_collection_ends_it_however_it_arrives() -> None:
    """Its copy (a shared store tells every copy) and a later key overtaking it (tones may
    arrive out of order) still leave the next collection the caller's own keys."""
    router = ToneRouter()
    with router.listen("c") as first:
        for sequence, tone in enumerate(["tone1", "tone2", "tone3", "tone4"], start=1):
            router.on_tone(tone_event(tone, sequence))
        assert [await first.next(timeout=0) for _ in range(4)] == list("1234")
        first.full(frozenset("#"))  # the "#" has not come yet
    with router.listen("c") as following:
        router.on_tone(tone_event("tone5", 6))  # overtakes the "#"
        router.on_tone(tone_event("pound", 5))
        router.on_tone(tone_event("pound", 5))  # told again
        assert await following.next(timeout=0) == "5"
        assert not following.pending()


class _Inbox:
    """A shared store's journal as a handler run again sees it: what its first run recorded,
    and the tones accepted after its notification, read while ``meanwhile`` (tones told
    live, the call's end) happens."""

    def __init__(self, tones: list[events.ToneReceived], meanwhile: Any = None) -> None:
        self.tones, self.meanwhile, self.reads = tones, meanwhile, 0
        self.recorded: dict[int, dict[str, Any]] = {}

    async def admits(self, attempt: Attempt) -> bool:
        return True

    async def recall(self, attempt: Attempt, step: int) -> dict[str, Any] | None:
        return self.recorded.get(step)

    async def record(self, attempt: Attempt, step: int, outcome: dict[str, Any]) -> None:
        self.recorded[step] = outcome

    async def tones_after(self, attempt: Attempt) -> list[events.ToneReceived]:
        self.reads += 1
        if self.meanwhile is not None:
            self.meanwhile()
        return self.tones


async def _open(router: ToneRouter, listener: ToneListener, run: Attempt) -> Any:
    """Open a collection in ``run``, as collect_digits does: its journal entry."""
    token = _current.set(run)
    try:
        collection = await router.opened("c")
        await router.hear_earlier("c", listener, collection)
        return collection
    finally:
        _current.reset(token)


async def test_a_re_run_hears_what_its_first_run_s_collection_heard_first_once_in_order() -> None:
    """The collection a handler's first run was in when its instance was lost hears, run
    again, the tones accepted after the one told last before it opened, ahead of those
    told live meanwhile, each once, in Graph's order; not that one nor any before it (no
    collection heard them). A collection its first run never opened hears none of them,
    and reads the inbox no second time."""
    tones = [tone_event("tone1", 4), tone_event("tone2", 5), tone_event("tone3", 6)]
    tones += [tone_event("tone4", 7), tone_event("tone4", 7), tone_event("tone5", 8)]
    tones += [tone_event("tone7", 10)]
    inbox = _Inbox(tones)
    first_run = ToneRouter(reorder_window=300)
    with first_run.listen("c"):
        for tone in tones[:2]:
            first_run.on_tone(tone)  # told to an earlier collection
    with first_run.listen("c") as listener:
        await _open(first_run, listener, Attempt("c", "3-0", 1, False, journal=inbox))
        first_run.on_tone(tones[2])  # the instance is lost with the collection open

    router = ToneRouter(reorder_window=300)

    def told_live() -> None:
        router.on_tone(tone_event("tone6", 9))  # told first, taken after 8
        router.on_tone(tone_event("tone7", 10))  # read from the inbox as well: once

    inbox.meanwhile = told_live
    run = Attempt("c", "3-0", 2, redelivered=True, journal=inbox)
    with router.listen("c") as listener:
        await _open(router, listener, run)
        assert [await listener.next(timeout=0) for _ in range(5)] == list("34567")
        assert not listener.pending()
    with router.listen("c") as following:
        await _open(router, following, run)
        router.on_tone(tone_event("tone4", 7))  # a copy told late
        router.on_tone(tone_event("star", 11))
        assert [await following.next(timeout=0)] == ["*"]
        assert not following.pending()
    assert inbox.reads == 1


async def test_a_re_run_returns_what_its_first_run_s_collection_returned() -> None:
    """A collection the first run finished returns, run again, what it returned, its Graph
    actions (subscribing, a prompt, its barge-in) counted as sent; a finish key pressed
    after its last key, which the first run dropped, ends no later collection."""
    inbox = _Inbox([tone_event(f"tone{n}", n) for n in range(1, 5)])
    inbox.tones += [tone_event("pound", 5), tone_event("tone6", 6)]
    inbox.recorded[-1] = {"path": "digits", "after": "", "keys": "1234", "steps": 3}
    inbox.recorded[-1]["finish"] = [5, "#"]
    inbox.recorded[-2] = {"path": "digits", "after": notification_digest(inbox.tones[3]).hex()}
    router = ToneRouter()
    run = Attempt("c", "0-1", 2, redelivered=True, journal=inbox)
    with router.listen("c") as listener:
        collection = await _open(router, listener, run)
        assert router.replay(collection) == "1234"
    assert run.steps == [3]
    with router.listen("c") as following:
        await _open(router, following, run)
        assert [await following.next(timeout=0)] == ["6"]
        assert not following.pending()


async def test_a_menu_run_again_returns_the_choice_its_first_run_made() -> None:
    """A menu its first run finished gives the same option again, or none if it gave none,
    without playing its prompt again."""
    call = CallServices(Settings(app_id=APP_ID)).call("c")
    inbox = _Inbox([])
    inbox.recorded[-1] = {"path": "digits", "after": "", "keys": "2", "steps": 2}
    inbox.recorded[-2] = {"path": "digits", "after": "", "keys": None, "steps": 5}
    run = Attempt("c", "0-1", 2, redelivered=True, journal=inbox)
    token = _current.set(run)
    try:
        assert await call.menu(MENU, {"1": "sales", "2": "support"}) == "support"
        assert await call.menu(MENU, {"1": "sales", "2": "support"}) is None
    finally:
        _current.reset(token)
    assert run.steps == [5]


async def test_a_re_run_whose_call_ends_while_it_reads_the_inbox_keeps_nothing_of_it() -> None:
    """The call ends while a re-run reads the keys its first run heard: the collection
    raises CallEnded, and the router keeps nothing of the call."""
    router = ToneRouter()
    inbox = _Inbox([tone_event("tone1", 1)], lambda: router.on_ended("c"))
    inbox.recorded[-1] = {"path": "digits", "after": ""}
    with router.listen("c") as listener:
        await _open(router, listener, Attempt("c", "0-1", 2, True, journal=inbox))
        with pytest.raises(CallEnded):
            await listener.next(timeout=0)
    assert (router._told, router._order) == ({}, {})


async def taken(listener: ToneListener) -> None:
    """Wait until the collection took every key passed on to it."""
    await until(lambda: not listener.pending())


async def test_a_key_overtaken_by_the_next_one_is_still_taken_first() -> None:
    """Keys numbered from 6, as in the recorded Teams call: 8 arrives before 7 while the
    collection waits, and waits for 7 (the window never closes in this test)."""
    router = ToneRouter(reorder_window=300)
    with router.listen("c") as listener:

        async def three_keys() -> list[str | None]:
            return [await listener.next(timeout=30) for _ in range(3)]

        collecting = asyncio.create_task(three_keys())
        router.on_tone(tone_event("tone1", 6))
        await taken(listener)
        router.on_tone(tone_event("tone3", 8))
        await taken(listener)
        router.on_tone(tone_event("tone2", 7))
        assert await collecting == ["1", "2", "3"]


async def test_a_key_whose_predecessor_never_comes_is_taken_when_the_window_closes() -> None:
    router = ToneRouter(reorder_window=0.05)
    with router.listen("c") as listener:
        router.on_tone(tone_event("tone1", 6))
        router.on_tone(tone_event("tone3", 8))
        router.on_tone(tone_event("tone4", 9))
        assert await listener.next(timeout=0) == "1"
        assert not listener.pending()  # 8 and 9 wait for 7
        assert [await listener.next(timeout=30) for _ in range(2)] == ["3", "4"]
        router.on_tone(tone_event("tone5", 10))  # the count goes on after them
        assert await listener.next(timeout=0) == "5"
        # A number skipped for good: the call's tones are not numbered one by one (or one
        # was lost), so the next gap waits for nothing rather than a window per key.
        router.on_tone(tone_event("tone7", 12))
        assert await listener.next(timeout=0) == "7"


@pytest.mark.looptime
async def test_a_key_waits_its_own_window_not_that_of_the_first_key_held() -> None:
    """Each key waits ``reorder_window`` from when it came: one that began to wait a tenth of
    a window before the first held key's window would have closed still waits for its
    predecessor, which comes within its own window, and the keys stay in order."""
    router = ToneRouter(reorder_window=1)
    with router.listen("c") as listener:
        router.on_tone(tone_event("tone1", 6))
        router.on_tone(tone_event("tone3", 8))  # waits for 7
        await asyncio.sleep(0.9)
        router.on_tone(tone_event("tone5", 10))  # waits for 9, from now
        await asyncio.sleep(0.05)
        router.on_tone(tone_event("tone2", 7))  # 7 and 8 go; 10 waits on
        assert [await listener.next(timeout=0) for _ in range(3)] == ["1", "2", "3"]
        await asyncio.sleep(0.5)  # past the window of 8, within that of 10
        assert not listener.pending()
        router.on_tone(tone_event("tone4", 9))
        assert [await listener.next(timeout=0) for _ in range(2)] == ["4", "5"]
        router.on_tone(tone_event("tone7", 12))  # still in order: 12 waits for 11
        assert not listener.pending()


async def test_keys_waiting_for_their_predecessor_are_taken_before_the_call_ends() -> None:
    router = ToneRouter(reorder_window=300)
    with router.listen("c") as listener:
        router.on_tone(tone_event("tone1", 6))
        router.on_tone(tone_event("tone3", 8))
        router.on_ended("c")
        assert [await listener.next(timeout=0) for _ in range(2)] == ["1", "3"]
        with pytest.raises(CallEnded):
            await listener.next(timeout=0)


async def test_keys_arriving_swapped_are_collected_in_graph_s_order() -> None:
    bot, results = collecting_bot(
        settings=Settings(app_id=APP_ID, reorder_window=300), max_digits=3, timeout=30
    )
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call(delivery=DeliveryOptions(first_tone_sequence=6))
        await call.press("1")  # sequenceId 6
        tones = bot._running().services.tones
        await until(lambda: bool(tones._listeners.get(call.key)))
        (listener,) = tones._listeners[call.key]
        await taken(listener)
        await call.notify(b.tone(call.id, "tone3", 8))  # overtakes 7
        await taken(listener)
        await call.notify(b.tone(call.id, "tone2", 7))
        await until(lambda: bool(results))
        assert results == ["123"]
        await call.hangup()


async def pin_then_choice(bot: CallBot, **simulator: Any) -> list[str]:
    """A PIN of four digits, then a choice of two: the caller presses "1234", and once the
    second collection waits, "#56#". Returns what the two collections gave."""
    results: list[str] = []

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def collect(call: Call, event: events.CallStateChanged) -> None:
        results.append(await call.collect_digits(max_digits=4, timeout=30))
        results.append(await call.collect_digits(max_digits=2, timeout=30))

    async with run_with_simulator(bot, **simulator) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("subscribeToTone")
        await call.press("1234")
        await until(lambda: results == ["1234"])
        tones = bot._running().services.tones
        await until(lambda: bool(tones._listeners.get(call.key)))  # the second one waits
        await call.press("#56#")
        await until(lambda: len(results) == 2)
        await call.hangup()
    return results


async def test_pressing_the_finish_key_after_a_full_collection_reaches_no_later_one() -> None:
    assert await pin_then_choice(CallBot(app_id=APP_ID)) == ["1234", "56"]


async def test_a_menu_keyed_by_numbers_says_to_key_it_by_strings() -> None:
    call = CallServices(Settings(app_id=APP_ID)).call("c")
    options: dict[Any, str] = {1: "sales", 2: "support"}
    with pytest.raises(TypeError, match=r"strings, e\.g\. \{'1': \.\.\.\}"):
        await call.menu(MENU, options)


async def test_keys_are_read_alike_whatever_their_case() -> None:
    # send_dtmf_tones("d") sends key D: finish_on and a menu's options read keys the same way.
    bot, results = collecting_bot(max_digits=6, finish_on="d", timeout=5)

    @bot.on_tone
    async def choose(call: Call, event: events.ToneReceived) -> None:
        if event.digit == "D":
            results.append(await call.menu(MENU, {"a": "first", "b ": "second"}, retries=0))

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.press("42D")
        await until(lambda: results == ["42"])
        await call.wait_for_request("playPrompt")
        await call.press("b")
        await until(lambda: len(results) == 2)
        assert results == ["42", "second"]
        await call.hangup()


async def test_a_menu_option_no_caller_can_press_is_refused() -> None:
    bot = CallBot(app_id=APP_ID)
    errors: list[BaseException] = []

    @bot.on_incoming_call
    async def ask(call: Call, event: events.IncomingCall) -> None:
        try:
            await call.menu(MENU, {"1": "yes", "x": "never"})
        except ValueError as exc:
            errors.append(exc)

    async with run_with_simulator(bot) as sim:
        await sim.incoming_call()
        await until(lambda: bool(errors))
    assert "'x'" in str(errors[0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # No key at all: the caller's silence would pick it, not give None.
        ({"": "silence", "1": "yes"}, "no key"),
        ({" ": "silence", "1": "yes"}, "no key"),
        # Two options read as the same keys: one of them could never be picked.
        ({"a": "first", "A": "second"}, "'A'"),
        ({"1": "first", " 1": "second"}, "'1'"),
        # "#" ends keys longer than one: an option with it, beside a longer one, never comes.
        ({"#": "operator", "12": "sales"}, "'#'"),
        ({"1#": "one", "2": "two"}, "'1#'"),
    ],
)
async def test_a_menu_option_no_caller_can_choose_is_refused(
    options: dict[str, str], message: str
) -> None:
    bot = CallBot(app_id=APP_ID)
    errors: list[BaseException] = []

    @bot.on_incoming_call
    async def ask(call: Call, event: events.IncomingCall) -> None:
        try:
            await call.menu(MENU, options, retries=0, timeout=0.05)
        except ValueError as exc:
            errors.append(exc)
        else:
            errors.append(AssertionError("the menu ran"))

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await until(lambda: bool(errors))
        assert not call.requests_for("playPrompt")
    assert isinstance(errors[0], ValueError), errors
    assert message in str(errors[0])


async def test_a_tone_told_after_the_call_ended_reaches_no_collection_and_is_not_kept() -> None:
    """A tone right behind the call's termination (in the same request, or overtaken by
    it) is dropped by the sequencer as after the end, but the router is told at acceptance:
    the collection waiting on the ended call must get CallEnded, not the key, and the router
    must keep nothing of the call (its end was already told: nothing would drop it again)."""
    bot, results = collecting_bot(max_digits=1, timeout=30)
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("subscribeToTone")
        tones = bot._running().services.tones
        await until(lambda: bool(tones._listeners.get(call.key)))
        ending = b.notifications(b.call_terminated(call.id), b.tone(call.id, "tone1", 9))
        assert await sim.post(ending, call_id=call.id) == 202
        await until(lambda: bool(results))
        await until(lambda: not tones._listeners.get(call.key))
        assert isinstance(results[0], CallEnded), results
        assert call.key not in tones._order
        assert call.key not in tones._told


async def test_tones_waiting_for_predecessors_are_bounded_per_call() -> None:
    """A flood of tones each missing its predecessor (a token holder's, not a caller's) is
    passed on once more wait than any caller could press in a window, not kept and sorted."""
    router = ToneRouter(reorder_window=300)  # the window never closes in this test
    with router.listen("c") as listener:
        router.on_tone(tone_event("tone1", 1))
        assert await listener.next(timeout=0) == "1"
        for sequence in range(3, 3 + 2 * 200, 2):  # every other number: each waits
            router.on_tone(tone_event("tone2", sequence))
        taken = []
        while listener.pending():
            taken.append(await listener.next(timeout=0))
        assert taken == ["2"] * 129  # passed on once 129 waited
        router.on_tone(tone_event("tone3", 1000))
        assert not listener.pending()  # what comes next waits again, for one window


async def test_tones_the_bot_subscribed_to_itself_are_not_asked_for_again() -> None:
    """The guide's promise, "subscribed once per call", holds when the bot asked for the
    call's tones itself first: a collection then sends no second ``subscribeToTone``."""
    bot = answering_bot()
    results: list[str] = []

    @bot.on_state("established")
    async def collect(call: Call, event: events.CallStateChanged) -> None:
        await call.subscribe_to_tone()
        results.append(await call.collect_digits(max_digits=2, timeout=5))
        results.append(await call.collect_digits(max_digits=1, timeout=5))

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.wait_for_request("subscribeToTone")
        await call.press("123")
        await until(lambda: len(results) == 2)
        assert results == ["12", "3"]
        assert len(call.requests_for("subscribeToTone")) == 1
        await call.hangup()
