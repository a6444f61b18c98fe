"""Handler registry and per-call workers.

Each call with work to do has one worker task that runs its deliveries one
after another, so one call's handlers never overlap; workers of different
calls run concurrently, at most ``max_concurrent`` handler runs at a time. A
worker exists only while its call has queued work, so idle calls cost no task.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import traceback
import types
import typing
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from . import events
from ._affinity import DeploymentChooser
from ._callables import calls_a_coroutine, handler_name, is_an_object
from ._clock import loop_time, wait_all
from ._counts import Counts
from ._errors import CallEnded, OperationFailed
from ._journal import Attempt, RunSuperseded
from ._journal import _current as _current_attempt
from ._log import RateLimitedLog, context_variable, get_logger
from ._sequencing import Delivery

if TYPE_CHECKING:
    from .graph import Call

__all__ = [
    "Dispatcher",
    "ErrorHandler",
    "Handler",
    "HandlerRegistry",
    "StartedHook",
    "is_handler_error",
    "refuse_coroutine_returned",
    "require_delivered",
    "require_parameters",
]

log = get_logger("callbot.dispatch")
# The call_id every line of a handler run carries.
_LOGGED_CALL_ID = context_variable("call_id")

E = TypeVar("E", bound=events.Event)
Handler = Callable[["Call", E], Awaitable[None]]
"""``async def handler(call, event) -> None``: ``Handler[events.ToneReceived]`` takes a tone."""
ErrorHandler = Callable[["Call", events.Event, BaseException], Awaitable[None]]
"""``async def on_error(call, event, exc) -> None``."""
StartedHook = Callable[[Any], Awaitable[None]]
"""``async def hook(bot) -> None``, run once the bot serves (``CallBot.on_started``)."""
Done = Callable[[Delivery], None]
HandlerWatcher = Callable[[str, events.Event, str], None]
"""``watch(handler_name, event, outcome)``: see :meth:`callbot.CallBot.watch_handlers`."""


@dataclass(frozen=True, slots=True)
class _Registration:
    event_type: type[events.Event]
    handler: Handler[Any]
    matches: Callable[[events.Event], bool] | None
    name: str


_Matched = tuple[_Registration, BaseException | None]
"""A registration that applies to an event, with what its ``matches`` raised, if it did."""


class HandlerRegistry:
    """Handlers by event type, kept in registration order."""

    def __init__(self) -> None:
        self._registrations: list[_Registration] = []
        self._error_handlers: list[ErrorHandler] = []
        self.started: list[StartedHook] = []
        """Run once the bot serves, each in a task of its own (``CallBot.on_started``)."""
        self.watchers: list[HandlerWatcher] = []
        """Told of every handler run once it finished (the testing kit draws them)."""
        self.deployment_chooser: DeploymentChooser | None = None
        """Where a new call should run (``CallBot.choose_deployment``); ``None``: here."""
        # Per event type: its registrations, and whether any of them has a ``matches`` filter.
        self._cache: dict[type[events.Event], tuple[tuple[_Matched, ...], bool]] = {}

    def add(
        self,
        event_type: type[events.Event],
        handler: Handler[Any],
        matches: Callable[[events.Event], bool] | None = None,
        *,
        annotation_judged: bool = True,
    ) -> None:
        """Register ``handler`` for ``event_type`` and its subclasses. ``annotation_judged``:
        refuse a handler whose ``event`` is annotated with classes ``event_type`` is none of
        (as mypy does)."""
        _require_coroutine(handler)
        require_parameters(handler, "call, event")
        if matches is not None:
            _require_filter(matches)
        if not (isinstance(event_type, type) and issubclass(event_type, events.Event)):
            raise TypeError(f"{event_type!r} is not an event class from callbot.events")
        require_delivered(event_type)
        if annotation_judged:
            _require_event_annotation(handler, event_type)
        name = handler_name(handler)
        self._registrations.append(_Registration(event_type, handler, matches, name))
        self._cache.clear()

    def add_error_handler(self, handler: ErrorHandler) -> None:
        """Register a handler for exceptions raised by other handlers."""
        _require_coroutine(handler)
        require_parameters(handler, "call, event, exc")
        self._error_handlers.append(handler)

    def add_started(self, hook: StartedHook) -> None:
        """Register a hook run once the bot serves."""
        _require_coroutine(hook)
        require_parameters(hook, "bot")
        self.started.append(hook)

    def wants(self, event_type: type[events.Event]) -> bool:
        """Whether any handler is registered for events of ``event_type``."""
        return bool(self._by_type(event_type)[0])

    def _by_type(self, event_type: type[events.Event]) -> tuple[tuple[_Matched, ...], bool]:
        cached = self._cache.get(event_type)
        if cached is None:
            by_type = [r for r in self._registrations if issubclass(event_type, r.event_type)]
            matched = tuple((r, None) for r in by_type)
            cached = self._cache[event_type] = (matched, any(r.matches for r in by_type))
        return cached

    def matching(self, event: events.Event) -> Sequence[_Matched]:
        """The registrations that apply to ``event``, in registration order, each with what
        its ``matches`` raised (``None`` when it matched): a failing filter is its own
        handler's error, and the event's other handlers still run."""
        by_type, filtered = self._by_type(type(event))
        if not filtered:
            return by_type  # the cached list itself: nothing to build per delivery
        found: list[_Matched] = []
        for registration, _ in by_type:
            try:
                if registration.matches is None or registration.matches(event):
                    found.append((registration, None))
            except BaseException as exc:
                if not is_handler_error(exc):
                    raise
                found.append((registration, exc))
        return found

    @property
    def error_handlers(self) -> list[ErrorHandler]:
        """Registered error handlers, in registration order."""
        return list(self._error_handlers)


async def _still_held(attempt: Attempt) -> bool:
    """Whether a handler of this run may start: a run that lost its call (its process was
    paused or its loop blocked past the lease) starts nothing more."""
    journal = attempt.journal
    return journal is None or await journal.admits(attempt)


_DELIVERED: frozenset[type[events.Event]] = frozenset(
    getattr(events, name) for name in events.__all__
)
"""The event classes callbot delivers (a subclass of one that a bot defines is never made)."""


def require_delivered(event_type: type[events.Event]) -> None:
    """Refuse an event class callbot never delivers: its handlers would never run."""
    if event_type not in _DELIVERED:
        raise TypeError(
            f"{event_type.__name__!r} is no event callbot delivers: register for one of "
            f"callbot.events ({', '.join(events.__all__)}), narrowed with matches="
        )


def is_handler_error(exc: BaseException) -> bool:
    """Whether ``exc``, escaping a handler (or its filter, an error handler, a started
    hook), is that handler's error: anything but KeyboardInterrupt and SystemExit (the
    process stops, as asyncio lets them through) and the cancellation of its run when the
    bot stops. A BaseException of the handler's own would otherwise kill its call's worker."""
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return False
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is None or not task.cancelling()
    return True


def refuse_coroutine_returned(name: str, returned: object) -> None:
    """Raise if a handler returned a coroutine: an action whose ``await`` was forgotten
    (``return call.hangup()``) would never be sent, and say so only when collected."""
    if inspect.iscoroutine(returned):
        returned.close()
        raise TypeError(
            f"{name!r} returned {returned!r} without awaiting it, so it never ran: "
            "await it in the handler (await call.hangup())"
        )


def _require_coroutine(handler: Any) -> None:
    if not calls_a_coroutine(handler):
        what = repr(handler_name(handler) if callable(handler) else handler)
        if isinstance(handler, type) and calls_a_coroutine(handler.__call__):
            # The class of a handler object: calling it would make an object, not run it.
            short = handler.__qualname__.rpartition(".")[2]
            raise TypeError(f"{what} is a class: register an object of it ({short}())")
        raise TypeError(
            f"{what} must be an 'async def' function, or an object whose "
            "class defines 'async def __call__'"
        )


def _require_event_annotation(handler: Any, event_type: type[events.Event]) -> None:
    # What mypy refuses, for a bot it does not check: the handler would fail on the first
    # attribute it read. An annotation that cannot be read here (a name defined later) is
    # judged by nobody but mypy.
    try:
        signature = inspect.signature(handler, follow_wrapped=False, eval_str=True)
    except Exception:
        return
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) < 2 or positional[1].annotation is inspect.Parameter.empty:
        return
    annotation = positional[1].annotation
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    accepted = typing.get_args(annotation) if union else (annotation,)
    if typing.Any in accepted:
        return  # a class since Python 3.11, yet it takes every event, as for mypy
    try:
        if not all(isinstance(a, type) for a in accepted) or issubclass(event_type, accepted):
            return
    except TypeError:  # a class no class can be checked against (a Protocol)
        return
    taken = " | ".join(a.__name__ for a in accepted)
    raise TypeError(
        f"{handler_name(handler)!r} takes an event of {taken}, and is registered for "
        f"{event_type.__name__}: annotate event: events.{event_type.__name__} "
        "(or a base class)"
    )


def _require_filter(matches: Any) -> None:
    # Called in the run with the event alone: an async one's coroutine would always be true.
    if not callable(matches) or calls_a_coroutine(matches):
        what = repr(handler_name(matches) if callable(matches) else matches)
        raise TypeError(
            f"matches: {what} must be a plain 'def' function deciding from the event: "
            "matches=lambda event: event.tone == 'tone1'"
        )
    require_parameters(matches, "event", define="def", returns="bool")


def require_parameters(
    handler: Any, parameters: str, *, define: str = "async def", returns: str = "None"
) -> None:
    """Refuse ``handler`` unless it can be called with ``parameters``; the error shows the
    definition it needs (``define name(parameters) -> returns``)."""
    # A handler that cannot take its arguments would fail only once a call arrives.
    try:
        # What is called, not what functools.wraps says it wraps (a decorator may add
        # arguments); an object's __call__ without self, a partial's parameters still open.
        signature = inspect.signature(handler, follow_wrapped=False)
    except (TypeError, ValueError):  # no signature to read (some callables): judged when run
        return
    try:
        signature.bind(*parameters.split(", "))
    except TypeError:
        owner, _, short = handler_name(handler).rpartition(".")
        if _a_method_in_its_class_body(handler, signature, owner):
            # A decorator in the class body gets the function: its object's method is wanted.
            raise TypeError(
                f"{handler_name(handler)!r} is a method: register the method of an object of "
                f"its class, once made ({owner.rpartition('.')[2]}().{short}), not the "
                "function in the class's body"
            ) from None
        name = "__call__(self, " if is_an_object(handler) else f"{short}("
        raise TypeError(
            f"{handler_name(handler)!r} must take ({parameters}), not {signature}: "
            f"{define} {name}{parameters}) -> {returns}"
        ) from None


def _a_method_in_its_class_body(handler: Any, signature: inspect.Signature, owner: str) -> bool:
    """Whether ``handler`` is a function defined in a class, taking ``self`` first."""
    first = next(iter(signature.parameters), None)
    return (
        first == "self"
        and inspect.isfunction(handler)
        and bool(owner)
        and not owner.endswith("<locals>")
    )


class _Slots:
    """At most ``size`` handler runs at a time, the others let in in the order they came.

    What ``asyncio.Semaphore`` does, without its cost on the usual run (a free slot): on
    Python 3.11 its ``async with`` is six calls of Python and a generator. A run takes a
    free slot itself (``free``, when nobody ``waiting``) or awaits :meth:`wait`, and gives
    it back with :meth:`give_back`. ``free`` is never above 0 while a run waits.
    """

    __slots__ = ("free", "waiting")

    def __init__(self, size: int) -> None:
        self.free = size
        self.waiting: deque[asyncio.Future[None]] = deque()

    async def wait(self) -> None:
        """Wait for a slot given back by another run."""
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self.give_back()  # handed a slot, then cancelled: it goes to the next run
            elif slot in self.waiting:
                self.waiting.remove(slot)
            raise

    def give_back(self) -> None:
        """A run is over: its slot goes to the first run still waiting, else it is free."""
        while self.waiting:
            slot = self.waiting.popleft()
            if not slot.done():  # else its run was cancelled while it waited
                slot.set_result(None)
                return
        self.free += 1


class Dispatcher:
    """Runs deliveries through the matching handlers, per call in order."""

    def __init__(
        self,
        registry: HandlerRegistry,
        handle: Callable[[Delivery], Call],
        *,
        max_concurrent: int = 256,
        observe: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self._registry = registry
        self._handle = handle
        self._slots = _Slots(max_concurrent)
        self._queues: dict[str, deque[tuple[Delivery, Done | None]]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._observe = observe
        self._idle_listeners: list[Callable[[str], None]] = []
        self._delivery_listeners: list[Callable[[events.Event], None]] = []
        # A line per handler a call's end stopped: a sender inventing calls decides how many.
        self._lines = RateLimitedLog(log)
        self.counts: Counter[str] = Counts()
        """handled (deliveries run), handler_errors, unhandled_errors (no on_error took them),
        call_ended (handlers stopped by :class:`~callbot.CallEnded`), superseded (deliveries
        whose run lost its call to another instance: not started, or their handlers stopped
        by :class:`~callbot.RunSuperseded`; once each), abandoned (still queued or running when
        the bot stopped)."""

    def busy_with(self, call_key: str) -> bool:
        """Whether deliveries of the call wait or run."""
        return call_key in self._queues

    def when_idle(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(call_key)`` each time a call has no delivery left to run (the
        testing kit waits on it); returns a function that stops it."""
        self._idle_listeners.append(listener)
        return lambda: self._idle_listeners.remove(listener)

    def when_delivered(self, listener: Callable[[events.Event], None]) -> Callable[[], None]:
        """Call ``listener(event)`` with each event handed to its call's handlers, in the order
        they get it, handlers or not (the testing kit's record of what a call was told, as the
        sequencer decided it); returns a function that stops it."""
        self._delivery_listeners.append(listener)
        return lambda: self._delivery_listeners.remove(listener)

    @property
    def queued(self) -> int:
        """Deliveries waiting or running."""
        return sum(len(q) for q in self._queues.values())

    @property
    def busy_calls(self) -> int:
        """Calls with a running worker."""
        return len(self._workers)

    def submit(self, delivery: Delivery, done: Done | None = None) -> None:
        """Queue a delivery behind its call's earlier ones; ``done(delivery)`` is told once
        all its handlers ran, at once if none would (its store acknowledges it then, and no
        longer counts it in the call's backlog)."""
        for listener in self._delivery_listeners:
            listener(delivery.event)
        key = delivery.life.key  # the event's call key: the sequencer finds the life by it
        queue = self._queues.get(key)
        if queue is None:
            if not self._registry.wants(type(delivery.event)):
                # No handler and nothing queued before it: no task, no call handle. (Only the
                # type is looked at: a handler's ``matches`` never runs inside the request.)
                self.counts["handled"] += 1
                if done is not None:
                    done(delivery)
                return
            queue = self._queues[key] = deque()
        queue.append((delivery, done))
        if key not in self._workers:
            # Keep a reference: an unreferenced task can be collected mid-flight. Unnamed: a
            # name costs as much as the rest of creating the task.
            self._workers[key] = asyncio.get_running_loop().create_task(self._work(key, queue))

    async def join(
        self, timeout: float, stop_waiting: asyncio.Event | None = None
    ) -> list[Delivery]:
        """Wait up to ``timeout`` for all work (less if ``stop_waiting`` is set meanwhile);
        cancel the rest and return it."""
        deadline = loop_time() + timeout
        while self._workers and not (stop_waiting is not None and stop_waiting.is_set()):
            remaining = deadline - loop_time()
            if remaining <= 0:
                break
            await wait_all(list(self._workers.values()), remaining, stop_waiting)
        abandoned = [d for q in self._queues.values() for d, _ in q]
        self.counts["abandoned"] += len(abandoned)
        for task in list(self._workers.values()):
            task.cancel()
        if self._workers:
            await asyncio.gather(*self._workers.values(), return_exceptions=True)
        return abandoned

    async def _work(self, key: str, queue: deque[tuple[Delivery, Done | None]]) -> None:
        try:
            while queue:
                delivery, done = queue[0]
                await self._run(delivery)
                queue.popleft()
                if done is not None:
                    done(delivery)
        finally:
            if not queue:
                self._queues.pop(key, None)
            del self._workers[key]
            if not queue:
                for listener in self._idle_listeners:
                    listener(key)

    async def _run(self, delivery: Delivery) -> None:
        event = delivery.event
        call = self._handle(delivery)
        # The worker task's context is its own: set per delivery, never reset.
        # The form the call was first seen in: every line of the call carries the same id.
        call_id = delivery.life.call_id
        _LOGGED_CALL_ID.set(call_id)
        attempt = delivery.attempt
        _current_attempt.set(attempt if attempt is not None else delivery.life.key)
        registrations = self._registry.matching(event)
        # An incoming call must be answered within 15 s: its handlers never wait for a slot
        # that handlers waiting inside their own calls (a prompt, digits) may hold for minutes.
        # (Pending incoming calls are bounded by max_pending_calls.)
        # (The exact class, as the sequencer tells events apart: isinstance costs more.)
        slots = None if type(event) is events.IncomingCall else self._slots
        if slots is not None:
            if slots.free and not slots.waiting:
                slots.free -= 1  # the usual run: a free slot, taken without a call
            else:
                await slots.wait()
        try:
            for registration, filter_failed in registrations:
                if attempt is not None and not await _still_held(attempt):
                    # Another instance took the call over: it runs this delivery again.
                    self.counts["superseded"] += 1
                    log.warning(
                        "delivery_superseded",
                        call_id=call_id,
                        handler=registration.name,
                        kind=type(event).__name__,
                        epoch=attempt.epoch,
                        detail="the call is run by another instance now; not started here",
                    )
                    break
                if filter_failed is not None:
                    # Its ``matches`` raised: that handler's error, reported in its turn.
                    self.counts["handler_errors"] += 1
                    await self._report(registration.name, call, event, filter_failed, call_id)
                    continue
                outcome = await self._run_one(
                    registration.name, registration.handler, call, event, call_id
                )
                if outcome == "superseded":
                    break  # the run lost its call: the new owner runs this delivery again
        finally:
            if slots is not None:
                slots.give_back()
        self.counts["handled"] += 1

    async def _run_one(
        self,
        name: str,
        handler: Callable[[Call, events.Event], Awaitable[object]],
        call: Call,
        event: events.Event,
        call_id: str,
    ) -> str:
        """Run one handler; its outcome (see ``CallBot.watch_handlers``)."""
        started = time.perf_counter()  # the handler's real seconds, for the metrics
        outcome = "ok"
        try:
            returned = await handler(call, event)
            if returned is not None:
                refuse_coroutine_returned(name, returned)
        except Exception as exc:
            if _stopped_by_the_end(exc, call):
                # The caller hung up while the handler acted: not a bug in the handler.
                outcome = "call_ended"
                self._lines.info("handler_stopped_call_ended", call_id=call_id, handler=name)
                self.counts["call_ended"] += 1
            elif isinstance(exc, RunSuperseded):
                # Its run lost the call to another instance, which runs this delivery again.
                outcome = "superseded"
                self._lines.info(
                    "handler_stopped_superseded",
                    call_id=call_id,
                    handler=name,
                    detail="the call is run by another instance now; its actions are sent there",
                )
                self.counts["superseded"] += 1
            else:
                outcome = "error"
                self.counts["handler_errors"] += 1
                await self._report(name, call, event, exc, call_id)
        except BaseException as exc:
            if not is_handler_error(exc):
                outcome = "abandoned"  # stopped at shutdown: neither finished nor failed
                raise
            # A cancellation (or other BaseException) of the handler's own: an error, not a stop.
            outcome = "error"
            self.counts["handler_errors"] += 1
            await self._report(name, call, event, exc, call_id)
        finally:
            if self._observe is not None:
                self._observe(name, outcome, time.perf_counter() - started)
            for watch in self._registry.watchers:
                watch(name, event, outcome)
        return outcome

    async def _report(
        self, name: str, call: Call, event: events.Event, exc: BaseException, call_id: str
    ) -> None:
        handlers = self._registry.error_handlers
        if not handlers:
            self.counts["unhandled_errors"] += 1
            log.error(
                "handler_failed",
                call_id=call_id,
                handler=name,
                kind=type(event).__name__,
                error=repr(exc),
                traceback="".join(traceback.format_exception(exc)),
            )
            return
        for on_error in handlers:
            # What it returns is looked at: an action whose await was forgotten.
            run: Callable[[Call, events.Event, BaseException], Awaitable[object]] = on_error
            try:
                returned = await run(call, event, exc)
                if returned is not None:
                    refuse_coroutine_returned(handler_name(on_error), returned)
            except BaseException as second:
                if not is_handler_error(second):
                    raise
                if isinstance(second, Exception) and _stopped_by_the_end(second, call):
                    # The caller hung up while it acted: as for any handler, not a failure.
                    self._lines.info(
                        "handler_stopped_call_ended",
                        call_id=call_id,
                        handler=handler_name(on_error),
                    )
                    self.counts["call_ended"] += 1
                    continue
                self.counts["unhandled_errors"] += 1
                log.error(
                    "error_handler_failed",
                    call_id=call_id,
                    handler=name,
                    error=repr(exc),
                    error_handler_error=repr(second),
                    traceback="".join(traceback.format_exception(second)),
                )


def _stopped_by_the_end(exc: Exception, call: Call) -> bool:
    """Whether ``exc`` stopped a handler because its call ended: ``CallEnded``, or an
    operation that failed as the call ended (said so, or told just before the end, which
    has reached the call by the time the handler lets the failure escape)."""
    if isinstance(exc, CallEnded):
        return True
    return isinstance(exc, OperationFailed) and (exc.call_ended or call.ended)
