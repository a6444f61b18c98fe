"""Digit collection and menus: prompts, tone subscription and tones routed to a waiting handler.

One call's handlers run one at a time, so a ``ToneReceived`` event queued for
the call cannot reach a handler that is itself waiting for digits. Tones are
therefore routed here when the bot *accepts* them (``Sequencer(on_tone=...)``,
after duplicates are dropped), the way operation outcomes resolve ``op.wait()``;
they are still delivered to ``@bot.on_tone`` handlers afterwards, in order.
The router passes a call's tones on in Graph's ``sequenceId`` order (:class:`_ToneOrder`),
by the rule the sequencer orders them by for handlers.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import itertools
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog

from .. import events, models
from .._clock import timer_at
from .._dtmf import digit_of, key_of, keys_of
from .._errors import CallEnded, OperationFailed
from .._journal import ActionJournal, Attempt, journaled_attempt
from .._sequencing import (
    MAX_WAITING_TONES,
    TONES_UNORDERED,
    RecentDigests,
    notification_digest,
    tone_after,
    tone_waits,
)
from ._operations import Operation
from ._values import PromptLike


class DigitCall(Protocol):
    """What collecting digits needs of a call (a :class:`~callbot.Call` has it)."""

    @property
    def id(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def ended(self) -> bool: ...
    async def subscribe_to_tone(self) -> Any: ...
    async def cancel_media_processing(self) -> Any: ...
    async def play_prompt(
        self, prompts: PromptLike | Sequence[PromptLike]
    ) -> Operation[models.PlayPromptOperation]: ...


__all__ = ["MAX_PROMPT_WAIT", "ToneListener", "ToneRouter", "collect_digits", "menu"]

log = structlog.get_logger("callbot.graph")

T = TypeVar("T")

MAX_PROMPT_WAIT = 300.0
"""How long a collection waits for Graph to report its prompt finished before its
``timeout`` starts anyway, in seconds: a lost ``playPrompt`` outcome must not leave a caller
who presses nothing waiting until the call ends. A longer prompt still plays (a key stops it)."""


class ToneListener:
    """The tones of one call, from when it was opened, in the order its router passes them
    on (Graph's ``sequence_id`` order)."""

    def __init__(
        self,
        call_key: str,
        after_full: Callable[[int, frozenset[str]], None] | None = None,
    ) -> None:
        self.call_key = call_key
        self._tones: deque[events.ToneReceived] = deque()
        self._after_full = after_full
        self._last_taken: int | None = None  # Graph's sequence_id of the last key taken
        self._changed = asyncio.Event()
        self.ended = False

    def put(self, event: events.ToneReceived) -> None:
        """A tone was passed on for the call (once, in order: its router sees to both)."""
        if key_of(event.tone) is None:
            return  # a hook flash is no digit: it neither counts, ends, nor stops the prompt
        self._tones.append(event)
        self._changed.set()

    def end(self) -> None:
        """The call ended: whoever waits gets :class:`~callbot.CallEnded`."""
        self.ended = True
        self._changed.set()

    def pending(self) -> bool:
        """Whether a tone is waiting to be taken."""
        return bool(self._tones)

    def untaken(self) -> list[events.ToneReceived]:
        """The tones passed on and not taken, in order."""
        return list(self._tones)

    def put_before(self, earlier: Sequence[events.ToneReceived]) -> None:
        """Tones pressed before those passed on so far (a re-run hears what its earlier
        run heard): ahead of them, or in Graph's ``sequence_id`` order where each has one."""
        tones = [*(tone for tone in earlier if key_of(tone.tone) is not None), *self._tones]
        if all(tone.sequence_id is not None for tone in tones):
            tones.sort(key=lambda tone: tone.sequence_id or 0)
        self._tones = deque(tones)
        self._changed.set()

    async def next(self, timeout: float | None) -> str | None:
        """The next key pressed, or ``None`` after ``timeout`` seconds without one."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._tones:
            if self.ended:
                raise _call_ended(self.call_key)
            self._changed.clear()
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return None
        tone = self._tones.popleft()
        self._last_taken = tone.sequence_id
        return digit_of(tone.tone)

    def full(self, finish: frozenset[str]) -> None:
        """A collection stopped at ``max_digits``: the caller may still press the key that
        would have ended it ("1234#" for four digits). That key, right after the last one
        taken, ends that collection and no other: dropped here, or when it comes."""
        if not finish or self._last_taken is None:
            return  # without Graph's sequence_id, no key can be told to come right after
        expected = self._last_taken + 1
        if self._tones and self._tones[0].sequence_id == expected:
            if digit_of(self._tones[0].tone) in finish:
                self._tones.popleft()
            return
        if self._after_full is not None:
            self._after_full(expected, finish)

    async def changed(self) -> None:
        """Return when a tone arrives or the call ends."""
        if self._tones or self.ended:
            return
        self._changed.clear()
        await self._changed.wait()


class _ToneOrder:
    """One call's tones in Graph's ``sequenceId`` order, by the sequencer's rule
    (:func:`~callbot._sequencing.tone_waits`): a tone whose predecessor has not come waits
    for it, each for at most the reorder window from when it came. The router keeps its own
    count because it is told each tone when it is accepted, by any instance, before the
    sequencer orders it."""

    def __init__(self) -> None:
        self.expected: int | None = None
        """The ``sequenceId`` after the last tone passed on."""
        self.waiting: list[tuple[int, int, float, events.ToneReceived]] = []
        """Tones waiting for a predecessor: (``sequenceId``, arrival, when it came in loop
        time, tone), sorted."""
        self.timer: asyncio.TimerHandle | None = None
        self._arrivals = itertools.count()

    def arrive(self, event: events.ToneReceived) -> list[events.ToneReceived]:
        """The tones that may go now that ``event`` came, in order."""
        sequence = event.sequence_id
        if sequence is not None and tone_waits(sequence, self.expected):
            came = asyncio.get_running_loop().time()
            bisect.insort(self.waiting, (sequence, next(self._arrivals), came, event))
            return []
        return [event, *self.passed(sequence)]

    def passed(self, sequence: int | None) -> list[events.ToneReceived]:
        """The waiting tones that may go, in order, once the tone numbered ``sequence``
        was passed on."""
        self.expected = tone_after(sequence, self.expected)
        ready = []
        while self.waiting and not tone_waits(self.waiting[0][0], self.expected):
            waited, _, _, tone = self.waiting.pop(0)
            self.expected = tone_after(waited, self.expected)
            ready.append(tone)
        return ready

    def release(self, *, skipped: bool = False) -> list[events.ToneReceived]:
        """Every waiting tone, in order: its predecessor is not coming (or no longer matters).
        ``skipped``: the window closed on them, and the call's tones go on unordered
        (:data:`~callbot._sequencing.TONES_UNORDERED`)."""
        waiting, self.waiting = self.waiting, []
        if waiting:
            self.expected = tone_after(waiting[-1][0], self.expected)
            if skipped:
                self.expected = TONES_UNORDERED
        self.stop()
        return [tone for _, _, _, tone in waiting]

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class ToneRouter:
    """Hands each accepted tone to the listeners open on its call, in ``sequenceId`` order
    (a tone waits at most ``reorder_window`` seconds for its predecessor)."""

    def __init__(self, reorder_window: float = 1.0) -> None:
        self._window = reorder_window
        self._listeners: dict[str, list[ToneListener]] = {}
        self._subscribed: set[str] = set()
        # Per call: the sequence_id of a key that would end a collection already full, if
        # it is one of these keys (ToneListener.full); kept until the next full collection
        # or the call's end, so that neither a copy nor a key overtaking it undoes it.
        self._finishing: dict[str, tuple[int, frozenset[str]]] = {}
        # Per call collecting digits: the tones told so far. A shared store tells every
        # copy of a tone, and one told before a collection opened must not reach it.
        self._told: dict[str, RecentDigests] = {}
        self._order: dict[str, _ToneOrder] = {}

    def on_tone(self, event: events.ToneReceived) -> None:
        """A tone was accepted (called by the sequencer, before handlers see it)."""
        key = event.call_key
        listeners = self._listeners.get(key)
        if key not in self._subscribed and (
            not listeners or all(listener.ended for listener in listeners)
        ):
            # No digits are collected on this call, or it ended (on_ended forgot it: a tone
            # told after that must neither reach a collection nor be kept for ever).
            return
        told = self._told.get(key)
        if told is None:
            # As many as the sequencer recognises a copy among.
            told = self._told[key] = RecentDigests()
        if not told.add(notification_digest(event)):
            return
        order = self._order.get(key)
        if order is None:
            order = self._order[key] = _ToneOrder()
        for tone in order.arrive(event):
            self._pass_on(key, tone)
        if len(order.waiting) > MAX_WAITING_TONES:
            # No caller presses this many keys within a window: a flood waits for nothing.
            self._release(key, "too_many_waiting")
        else:
            self._keep_time(key, order)

    def _keep_time(self, call_key: str, order: _ToneOrder) -> None:
        """Set the call's timer for the first waiting tone's window to close (none waiting:
        no timer). A tone released then skips a number, and the rest go with it, unordered."""
        if not order.waiting:
            order.stop()
            return
        deadline = min(came for _, _, came, _ in order.waiting) + self._window
        order.timer = timer_at(order.timer, deadline, self._release, call_key, "window_closed")

    def _release(self, call_key: str, why: str) -> None:
        order = self._order.get(call_key)
        tones = order.release(skipped=why == "window_closed") if order is not None else []
        if tones:
            log.info(
                "tones_released_without_predecessor",
                call_key=call_key,
                count=len(tones),
                reason=why,
            )
        for tone in tones:
            self._pass_on(call_key, tone)

    def _pass_on(self, call_key: str, event: events.ToneReceived) -> None:
        finishing = self._finishing.get(call_key)
        expected, keys = finishing if finishing is not None else (None, frozenset[str]())
        if event.sequence_id == expected and digit_of(event.tone) in keys:
            return  # it ended a collection that had all its digits already
        for listener in self._listeners.get(call_key, ()):
            listener.put(event)

    def _expect_finish(self, call_key: str, sequence_id: int, keys: frozenset[str]) -> None:
        self._finishing[call_key] = (sequence_id, keys)

    def on_ended(self, call_key: str) -> None:
        """The call ended: pass on the tones still waiting for a predecessor, wake its
        listeners and forget its subscription."""
        self._release(call_key, "call_ended")
        self._order.pop(call_key, None)
        self._subscribed.discard(call_key)
        self._finishing.pop(call_key, None)
        self._told.pop(call_key, None)
        for listener in self._listeners.get(call_key, ()):
            listener.end()

    @contextlib.contextmanager
    def listen(self, call_key: str) -> Iterator[ToneListener]:
        """Receive the call's tones while the ``with`` block runs."""
        listener = ToneListener(call_key, functools.partial(self._expect_finish, call_key))
        self._listeners.setdefault(call_key, []).append(listener)
        try:
            yield listener
        finally:
            listeners = self._listeners.get(call_key, [])
            if listener in listeners:
                listeners.remove(listener)
            if not listeners:
                self._listeners.pop(call_key, None)

    async def opened(self, call_key: str) -> _Collection | None:
        """A collection of the call opened (its listener just added) in a handler run with a
        journal: its place there. A first run notes which tone came last before it opened;
        a re-run finds what the first run's collection noted, or returned."""
        attempt = journaled_attempt()
        if attempt is None or attempt.journal is None or attempt.call_key != call_key:
            return None
        journal = attempt.journal
        told = self._told.get(call_key)
        last = told.last() if told else None
        after = last.hex() if last else ""
        attempt.collections[0] += 1
        # Numbered apart (-1, -2, ...): the actions' steps stay those a run without it numbered.
        collection = _Collection(attempt, journal, -attempt.collections[0], after)
        found = await journal.recall(attempt, collection.step) if attempt.redelivered else None
        if found is not None and found.get("path") == _COLLECTION:
            # The first run opened it: what came after its last tone then, it heard.
            collection.after, collection.heard = str(found.get("after", "")), True
            collection.returned = found if "steps" in found else None
            return collection
        await journal.record(attempt, collection.step, collection.outcome())
        return collection

    def replay(self, collection: _Collection) -> str | None:
        """What the first run's collection returned, as it left the call's tones: subscribed,
        a finish key after its last key still expected. Its Graph actions are not sent."""
        returned, attempt = collection.returned or {}, collection.attempt
        self._subscribed.add(attempt.call_key)
        finishing = returned.get("finish")
        if finishing:
            self._finishing[attempt.call_key] = (int(finishing[0]), frozenset(finishing[1]))
        attempt.steps[0] = max(attempt.steps[0], int(returned["steps"]))
        keys = returned.get("keys")
        log.info("digits_replayed", call_key=attempt.call_key, step=collection.step)
        return None if keys is None else str(keys)

    async def closed(self, collection: _Collection | None, keys: str | None) -> None:
        """The collection returned ``keys`` (``None``: a menu without a choice): a re-run
        returns them without collecting again, nor sending its Graph actions again."""
        if collection is None:
            return
        finishing = self._finishing.get(collection.attempt.call_key)
        finish = None if finishing is None else [finishing[0], "".join(sorted(finishing[1]))]
        steps = collection.attempt.steps[0]
        outcome = collection.outcome(keys=keys, steps=steps, finish=finish)
        await collection.journal.record(collection.attempt, collection.step, outcome)

    async def hear_earlier(
        self, call_key: str, listener: ToneListener, collection: _Collection | None
    ) -> None:
        """In a handler run again after a takeover, give ``listener`` first the tones its
        first run's collection heard: those accepted after the tone that came last before it
        opened (read back from the call's inbox). A collection its first run never opened
        collects from when it starts, as a first run's does."""
        if collection is None or not collection.heard:
            return
        attempt = collection.attempt
        tones = await collection.journal.tones_after(attempt)
        if listener.ended:
            return  # the call ended meanwhile: nothing is collected on it
        digests = [notification_digest(tone) for tone in tones]
        marker = bytes.fromhex(collection.after) if collection.after else None
        start = digests.index(marker) + 1 if marker in digests else 0
        # Told live since the listener opened (accepted after the takeover): not twice.
        live = {notification_digest(tone) for tone in listener.untaken()}
        told = self._told.setdefault(call_key, RecentDigests())
        expected, keys = self._finishing.get(call_key, (None, frozenset[str]()))
        earlier: list[events.ToneReceived] = []
        seen: set[bytes] = set()
        for number, (tone, digest) in enumerate(zip(tones, digests, strict=True)):
            if digest in seen:
                continue  # a copy, in the inbox twice
            seen.add(digest)
            told.add(digest)  # a copy told later is not news
            finishes = tone.sequence_id == expected and digit_of(tone.tone) in keys
            if number >= start and digest not in live and not finishes:
                earlier.append(tone)
        if not earlier:
            return
        log.info("tones_heard_again", call_key=call_key, count=len(earlier), entry=attempt.entry)
        listener.put_before(earlier)
        order = self._order.get(call_key)
        if order is None:
            order = self._order[call_key] = _ToneOrder()
        numbers = [tone.sequence_id for tone in earlier if tone.sequence_id is not None]
        for tone in order.passed(max(numbers)) if numbers else ():
            self._pass_on(call_key, tone)  # a live tone that waited for one of them
        self._keep_time(call_key, order)

    @contextlib.contextmanager
    def subscribing(self, call_key: str) -> Iterator[None]:
        """While the call's tones are asked for (by the bot, or for a collection): the call is
        subscribed from the start, so that its end, told before Graph answers, forgets it for
        good; not if asking fails."""
        asked_before = call_key in self._subscribed
        self._subscribed.add(call_key)
        try:
            yield
        except BaseException:
            if not asked_before:
                self._subscribed.discard(call_key)
            raise

    async def ensure_subscribed(self, call: DigitCall) -> None:
        """Ask Graph for the call's tones once (later calls return at once)."""
        if call.key in self._subscribed:
            return
        with self.subscribing(call.key):
            await call.subscribe_to_tone()


_COLLECTION = "digits"
"""A collection's path in its run's journal (Graph actions are recorded under URLs)."""


@dataclass(slots=True)
class _Collection:
    """One collection of digits in a handler run's journal (``callbot._journal``)."""

    attempt: Attempt
    journal: ActionJournal
    step: int
    after: str
    """The digest (hex) of the tone told last before the first run's collection opened."""
    heard: bool = False
    """Whether the first run opened it (a re-run hears what it heard)."""
    returned: dict[str, Any] | None = None
    """What the first run's collection returned, if it did."""

    def outcome(self, **returned: Any) -> dict[str, Any]:
        return {"path": _COLLECTION, "after": self.after, **returned}


def _call_ended(call_key: str) -> CallEnded:
    return CallEnded(404, "callEnded", f"call {call_key} ended while collecting digits")


async def _stop_prompt(call: DigitCall, prompt: Operation[Any] | None) -> None:
    """Barge-in: the caller pressed a key, so the rest of the prompt is not played."""
    if prompt is None or prompt.done:
        return
    try:
        await call.cancel_media_processing()
    except CallEnded:
        raise
    except Exception as exc:  # the prompt may have just ended; collecting goes on
        log.debug("prompt_cancel_failed", call_id=call.id, error=repr(exc))


async def _first_key(listener: ToneListener, prompt: Operation[Any]) -> None:
    """Wait until the prompt ends or a key is pressed, whichever comes first, or at most
    :data:`MAX_PROMPT_WAIT` seconds (its outcome may be lost)."""
    played = asyncio.ensure_future(prompt.wait())
    pressed = asyncio.ensure_future(listener.changed())
    try:
        done, _ = await asyncio.wait(
            {played, pressed}, timeout=MAX_PROMPT_WAIT, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for task in (played, pressed):
            task.cancel()
        results = await asyncio.gather(played, pressed, return_exceptions=True)
    if not done:
        log.warning(
            "prompt_outcome_not_told_collecting_anyway",
            call_key=listener.call_key,
            operation_id=prompt.id,
            waited=MAX_PROMPT_WAIT,
        )
    failure = results[0]
    if isinstance(failure, OperationFailed) and not listener.ended:
        log.info("prompt_failed_collecting_anyway", call_key=listener.call_key, error=str(failure))


def _check(max_digits: int, finish_on: str | None, timeout: float) -> set[str]:
    if max_digits < 1:
        raise ValueError("max_digits must be at least 1")
    try:
        finish = set(keys_of(finish_on or ""))
    except ValueError as exc:
        raise ValueError(f"finish_on: {exc}") from None
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    return finish


async def _collect(
    call: DigitCall,
    listener: ToneListener,
    prompt: PromptLike | Sequence[PromptLike] | None,
    *,
    max_digits: int,
    finish: set[str],
    timeout: float,
    typed_ahead: bool = False,
) -> str:
    playing: Operation[Any] | None = None
    # Keys typed during a menu's invalid-choice prompt answer already: no prompt over them.
    if prompt is not None and not (typed_ahead and listener.pending()):
        playing = await call.play_prompt(prompt)
        await _first_key(listener, playing)
    digits = ""
    while len(digits) < max_digits:
        key = await listener.next(timeout)
        if key is None:
            break
        if not digits:
            await _stop_prompt(call, playing)
        if key in finish:
            break
        digits += key
    else:
        listener.full(frozenset(finish))
    log.info("digits_collected", call_id=call.id, count=len(digits))
    return digits


async def collect_digits(
    call: DigitCall,
    router: ToneRouter,
    prompt: PromptLike | Sequence[PromptLike] | None = None,
    *,
    max_digits: int = 1,
    finish_on: str | None = "#",
    timeout: float = 5.0,
) -> str:
    """Play ``prompt`` and collect the keys the caller presses (see ``Call.collect_digits``)."""
    finish = _check(max_digits, finish_on, timeout)
    if call.ended:
        raise _call_ended(call.key)
    with router.listen(call.key) as listener:
        collection = await router.opened(call.key)
        if collection is not None and collection.returned is not None:
            return router.replay(collection) or ""
        await router.ensure_subscribed(call)
        await router.hear_earlier(call.key, listener, collection)
        digits = await _collect(
            call, listener, prompt, max_digits=max_digits, finish=finish, timeout=timeout
        )
        await router.closed(collection, digits)
        return digits


def _choices(options: Mapping[str, T]) -> dict[str, T]:
    """The options by the keys that pick them, read as pressed keys are ("a" is key A); an
    option that no caller can pick (no key, or the same keys as another) raises."""
    choices: dict[str, T] = {}
    for written, value in options.items():
        try:
            keys = keys_of(written)
        except ValueError as exc:
            raise ValueError(f"a menu option: {exc}") from None
        if not keys:
            # The caller's silence (no key within the timeout) would pick it.
            raise ValueError(f"a menu option: {written!r} has no key")
        if keys in choices:
            raise ValueError(f"menu options: two of them are the keys {keys!r}")
        choices[keys] = value
    return choices


async def menu(
    call: DigitCall,
    router: ToneRouter,
    prompt: PromptLike | Sequence[PromptLike],
    options: Mapping[str, T],
    *,
    retries: int = 2,
    invalid_prompt: PromptLike | Sequence[PromptLike] | None = None,
    timeout: float = 5.0,
) -> T | None:
    """Play a menu until the caller picks an option (see ``Call.menu``)."""
    if not options:
        raise ValueError("a menu needs at least one option")
    if retries < 0:
        raise ValueError("retries must not be negative")
    wrong = [keys for keys in options if not isinstance(keys, str)]
    if wrong:
        raise TypeError(f"menu options are keys as strings, e.g. {{'1': ...}}; got {wrong[0]!r}")
    choices = _choices(options)
    longest = max(len(key) for key in choices)
    # One-key menus answer on the first key; longer keys end with "#" or the timeout.
    finish_on = "#" if longest > 1 else None
    for keys in choices:
        if finish_on is not None and finish_on in keys:
            raise ValueError(
                f"a menu option: {keys!r} can never be chosen: '#' ends keys in a menu with"
                " options longer than one key"
            )
    finish = _check(longest, finish_on, timeout)
    if call.ended:
        raise _call_ended(call.key)
    # One listener for every try: keys pressed during the invalid-choice prompt count.
    with router.listen(call.key) as listener:
        collection = await router.opened(call.key)
        if collection is not None and collection.returned is not None:
            chosen = router.replay(collection)
            return None if chosen is None else choices.get(chosen)
        await router.ensure_subscribed(call)
        await router.hear_earlier(call.key, listener, collection)
        for attempt in range(retries + 1):
            keys = await _collect(
                call,
                listener,
                prompt,
                max_digits=longest,
                finish=finish,
                timeout=timeout,
                typed_ahead=attempt > 0,
            )
            if keys in choices:
                await router.closed(collection, keys)
                return choices[keys]
            log.info("menu_no_match", call_id=call.id, attempt=attempt + 1, pressed=bool(keys))
            if invalid_prompt is not None and attempt < retries:
                sorry = await call.play_prompt(invalid_prompt)
                await _first_key(listener, sorry)
                if listener.pending():
                    await _stop_prompt(call, sorry)
        await router.closed(collection, None)
        return None
