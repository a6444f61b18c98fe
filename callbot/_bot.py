"""CallBot: configuration, handler registration, lifecycle, the aiohttp app."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, cast, overload

from aiohttp import web

from . import events
from ._affinity import DeploymentChooser, RegionAffinity
from ._auth import Authenticator
from ._callables import calls_a_coroutine, handler_name
from ._clock import loop_time, wait_all
from ._config import Settings, listen_address
from ._dispatch import (
    Dispatcher,
    ErrorHandler,
    Handler,
    HandlerRegistry,
    HandlerWatcher,
    StartedHook,
    is_handler_error,
    refuse_coroutine_returned,
    require_delivered,
    require_parameters,
)
from ._gc import tune_for_serving
from ._ids import id_key
from ._lifecycle import KeepAliveResult, Lifecycle
from ._log import configure_logging, get_logger
from ._metrics import Metrics
from ._proxy import trust_proxies
from ._receiver import Receiver
from ._recording import NotificationRecorder
from ._routes import checked_routes, reading_bodies_first
from ._sequencing import Delivery, Sequencer
from ._serving import ConnectionGuard
from .graph import Call, CallServices
from .models._common import known_call_state
from .store import Store, open_store
from .store._base import tell_waiting

__all__ = ["CallBot"]

log = get_logger("callbot")

# A decorator hands its handler back typed as it was (an object keeps its attributes), and
# mypy refuses a handler that cannot take the events the decorator delivers.
EventHandler = TypeVar("EventHandler", bound=Handler[events.Event])
IncomingCallHandler = TypeVar("IncomingCallHandler", bound=Handler[events.IncomingCall])
CallStateChangedHandler = TypeVar("CallStateChangedHandler", bound=Handler[events.CallStateChanged])
CallTerminatedHandler = TypeVar("CallTerminatedHandler", bound=Handler[events.CallTerminated])
CallUpdatedHandler = TypeVar("CallUpdatedHandler", bound=Handler[events.CallUpdated])
ToneReceivedHandler = TypeVar("ToneReceivedHandler", bound=Handler[events.ToneReceived])
TransferFailedHandler = TypeVar(
    "TransferFailedHandler", bound=Handler[events.CallStateChanged | events.CallUpdated]
)
ParticipantsUpdatedHandler = TypeVar(
    "ParticipantsUpdatedHandler", bound=Handler[events.ParticipantsUpdated]
)
OperationUpdatedHandler = TypeVar("OperationUpdatedHandler", bound=Handler[events.OperationUpdated])
ContentSharingUpdatedHandler = TypeVar(
    "ContentSharingUpdatedHandler", bound=Handler[events.ContentSharingUpdated]
)
UnknownNotificationHandler = TypeVar(
    "UnknownNotificationHandler", bound=Handler[events.UnknownNotification]
)
E = TypeVar("E", bound=events.Event)
ErrorHandlerT = TypeVar("ErrorHandlerT", bound=ErrorHandler)
DeploymentChooserT = TypeVar("DeploymentChooserT", bound=DeploymentChooser)
StartedHookT = TypeVar("StartedHookT", bound=Callable[["CallBot"], Awaitable[None]])
T = TypeVar("T")
BOT_KEY: web.AppKey[CallBot] = web.AppKey("callbot")
_ON_STARTED_BY_SERVER: web.AppKey[bool] = web.AppKey("callbot_on_started_by_server", bool)
"""Set on an app whose server runs the on_started hooks itself, once it listens."""

P = ParamSpec("P")
R = TypeVar("R")

_REQUEST_GRACE_AT_EXIT = 1.0
"""Seconds a request still in progress after the drain gets before it is cut (aiohttp
gives it that long to finish, then as long again to stop once cancelled)."""

_READY_RECHECK = 0.5
"""Seconds between two looks at the store while on_started hooks wait for the bot to be
ready (the keys have an event to wait on; the store's reachability has none)."""


def _signature_of(
    target: Callable[Concatenate[Any, P], R],
) -> Callable[[Callable[..., Any]], Callable[Concatenate[Any, P], R]]:
    """Type a delegating method with its target's parameters, so callers are checked."""

    def typed(method: Callable[..., Any]) -> Callable[Concatenate[Any, P], R]:
        return method

    return typed


def _at_once_or_decorator(
    handler: T | None, register: Callable[[T], object]
) -> T | Callable[[T], T]:
    """``@bot.on_x`` registers the handler; ``@bot.on_x()`` gives the decorator that does."""

    def decorate(handler: T) -> T:
        register(handler)
        return handler

    return decorate if handler is None else decorate(handler)


_TRANSFER_NEWS = (events.CallStateChanged, events.CallUpdated)


def _is_transfer_failure(event: events.Event) -> bool:
    # Decided by the sequencer, which counts the transfers asked: only read here.
    return isinstance(event, _TRANSFER_NEWS) and event.transfer_failed


class HandlerDecorator(Generic[E]):
    """What ``bot.on(event_type)`` gives: it registers a handler and hands it back typed as
    it was; mypy refuses a handler whose event parameter cannot take an ``event_type``."""

    def __init__(self, register: Callable[[Handler[Any]], None]) -> None:
        self._register = register

    # One overload per event class: an event class without one here is refused by mypy.
    @overload
    def __call__(self: HandlerDecorator[events.Event], handler: EventHandler) -> EventHandler: ...
    @overload
    def __call__(
        self: HandlerDecorator[events.IncomingCall], handler: IncomingCallHandler
    ) -> IncomingCallHandler: ...
    @overload
    def __call__(
        self: HandlerDecorator[events.CallStateChanged], handler: CallStateChangedHandler
    ) -> CallStateChangedHandler: ...
    @overload
    def __call__(
        self: HandlerDecorator[events.CallTerminated], handler: CallTerminatedHandler
    ) -> CallTerminatedHandler: ...
    @overload
    def __call__(
        self: HandlerDecorator[events.CallUpdated], handler: CallUpdatedHandler
    ) -> CallUpdatedHandler: ...
    @overload
    def __call__(
        self: HandlerDecorator[events.ToneReceived], handler: ToneReceivedHandler
    ) -> ToneReceivedHandler: ...
    @overload
    def __call__(
        self: HandlerDecorator[events.ParticipantsUpdated], handler: ParticipantsUpdatedHandler
    ) -> ParticipantsUpdatedHandler: ...
    @overload
    def __call__(
        self: HandlerDecorator[events.OperationUpdated], handler: OperationUpdatedHandler
    ) -> OperationUpdatedHandler: ...
    @overload
    def __call__(
        self: HandlerDecorator[events.ContentSharingUpdated], handler: ContentSharingUpdatedHandler
    ) -> ContentSharingUpdatedHandler: ...
    @overload
    def __call__(
        self: HandlerDecorator[events.UnknownNotification], handler: UnknownNotificationHandler
    ) -> UnknownNotificationHandler: ...
    def __call__(self, handler: Handler[Any]) -> Handler[Any]:
        self._register(handler)
        return handler


class _Runtime:
    """Everything a serving bot runs: built at start, discarded at stop."""

    def __init__(self, settings: Settings, registry: HandlerRegistry, credential: Any) -> None:
        s = settings
        self.settings = settings
        self.registry = registry
        self.started_hooks: dict[asyncio.Task[None], str] | None = None
        """The on_started hooks' tasks and names, once started (``None`` before)."""
        self.metrics = Metrics()
        self.lifecycle = Lifecycle(
            termination_grace=s.termination_grace,
            answer_warning_after=s.answer_warning_after,
            keep_alive_interval=s.keep_alive_interval if s.keep_alive else None,
            send_keep_alive=self._keep_alive,
            pending_ttl=s.pending_call_ttl,
            max_pending=s.max_pending_calls,
        )
        self.services = CallServices(s, credential=credential, lifecycle=self.lifecycle)
        self.authenticator = Authenticator(
            app_id=s.app_id,
            openid_config_url=s.openid_config_url,
            allowed_tenants=s.allowed_tenants,
            leeway=s.token_leeway,
            max_lifetime=s.max_token_lifetime,
            cache_bytes=s.token_cache_bytes,
            refresh_interval=s.key_refresh_interval,
            refetch_cooldown=s.key_refetch_cooldown,
        )
        self.dispatcher = Dispatcher(
            registry,
            self._handle,
            max_concurrent=s.max_concurrent_handlers,
            observe=self.metrics.observe_handler,
        )
        # settings.store picks where accepted events wait: this process, or a shared Redis.
        self.store: Store = open_store(
            s,
            dispatcher=self.dispatcher,
            lifecycle=self.lifecycle,
            outcomes=self.services,
        )
        self.sequencer: Sequencer = self.store.sequencer
        self.affinity = RegionAffinity(
            lambda: registry.deployment_chooser,
            known_here=self.knows_call,
            own_url=s.callback_url if s.public_url is not None else None,
        )
        # What the bot knows of a call that no notification says (its own participant id, a
        # transfer asked) reaches the call's run, in line with the call's notifications.
        self.services.note_with(self.store.note)
        self.receiver = Receiver(
            authenticator=self.authenticator,
            ingest=self.ingest,
            max_body_bytes=s.max_body_bytes,
            max_json_depth=s.max_json_depth,
            max_items=s.max_items_per_request,
            max_participants=s.max_roster_size,
            body_timeout=s.body_timeout,
            observe_ack=self.metrics.ack_seconds.observe,
            while_draining=self.outcomes_while_draining,
            redirect=self.affinity.location_for,
        )
        self.recorder = NotificationRecorder(s.record_path) if s.record_path else None
        sources = self.metrics.sources
        sources.notifications.append(lambda: self.receiver.counts)
        sources.notifications.append(lambda: self.services.operations.counts)
        sources.dropped = lambda: self.store.counts
        sources.handled = lambda: self.dispatcher.counts
        sources.graph = lambda: self.services.graph.stats
        sources.counters["callbot_redirects"] = (
            "Incoming calls the deployment chooser sent elsewhere (redirected), or that ran "
            "here because its choice failed (bad_location, chooser_failed)",
            "outcome",
            lambda: self.affinity.counts,
        )
        sources.gauges["callbot_active_calls"] = (
            "Calls that have not ended",
            lambda: float(sum(1 for _ in self.lifecycle.active())),
        )
        sources.gauges["callbot_known_calls"] = (
            "Calls this process keeps anything of (active, ending, or never established)",
            lambda: float(len(self.lifecycle)),
        )
        sources.gauges["callbot_pending_operations"] = (
            "Operations awaiting their outcome",
            lambda: float(self.services.pending_operations),
        )
        sources.gauges["callbot_queued_deliveries"] = (
            "Events queued or running in handlers",
            lambda: float(self.dispatcher.queued),
        )

    @property
    def ready(self) -> bool:
        return self.authenticator.ready and not self.receiver.draining and self.store.reachable

    def settled(self, call_key: str) -> bool:
        """Whether nothing of the call waits in its reorder window or for its handlers."""
        record = self.store.known(call_key)
        return not self.dispatcher.busy_with(call_key) and not (record and record.holding)

    def knows_call(self, call_id: str) -> bool:
        """Whether this deployment knows the call (runs it, ended it lately, or, with a shared
        store, another instance runs it)."""
        return self.lifecycle.knows(call_id) or self.store.known(id_key(call_id)) is not None

    def _handle(self, delivery: Delivery) -> Call:
        return self.services.call(
            delivery.event.call_id,
            snapshot=delivery.snapshot,
            roster=delivery.roster,
            life=delivery.life,
        )

    async def _keep_alive(self, call_id: str) -> KeepAliveResult:
        # The lifecycle is made before the services that send keep-alives (they subscribe to it).
        return await self.services.keep_alive(call_id)

    def outcomes_while_draining(self, batch: Sequence[events.Event]) -> None:
        """Resolve waits of running handlers from a batch refused because of draining."""
        for event in batch:
            life = self.lifecycle.get(event.call_id)
            if (
                life is None
                or life.tenant_id is None
                or self.lifecycle.belongs_elsewhere(event.call_id, event.tenant_id)
            ):
                # Refused anyway; and another tenant's token proves nothing about this call.
                # A call whose tenant is not known here (a shared store: another instance runs
                # it) is not acted on either: its own instance tells this one what it accepts.
                continue
            tell_waiting(event, self.lifecycle, self.services)

    async def ingest(self, batch: Sequence[events.Event]) -> None:
        await self.store.ingest(batch)
        if self.recorder is not None:
            self.recorder.write(batch)

    async def start(self) -> None:
        if self.recorder is not None:
            self.recorder.open()
        await self.authenticator.start()
        await self.services.start()
        await self.store.start()
        log.info(
            "bot_started",
            callback_path=self.settings.callback_path,
            keys_loaded=self.authenticator.ready,
        )

    def run_started_hooks(self, bot: CallBot) -> None:
        """Start each on_started hook in a task of its own, once per run of the bot."""
        if self.started_hooks is not None or self.receiver.draining:
            return
        loop = asyncio.get_running_loop()
        self.started_hooks = {
            loop.create_task(self._run_started(hook, bot)): handler_name(hook)
            for hook in self.registry.started
        }

    async def until_ready(self) -> None:
        """Return once the bot is ready: keys loaded, store reachable, not draining."""
        while not self.ready:
            if not self.authenticator.ready:
                await self.authenticator.wait_ready(_READY_RECHECK)
            else:
                await asyncio.sleep(_READY_RECHECK)

    async def _run_started(self, hook: StartedHook, bot: CallBot) -> None:
        await self.until_ready()
        run: Callable[[CallBot], Awaitable[object]] = hook  # what it returns is looked at
        try:
            returned = await run(bot)
            if returned is not None:
                refuse_coroutine_returned(handler_name(hook), returned)
        except BaseException as exc:
            if not is_handler_error(exc):
                raise  # the bot stops
            # A cancellation (or other BaseException) of the hook's own: an error, not a stop.
            self._started_hook_failed(handler_name(hook), exc)

    def _started_hook_failed(self, name: str, exc: BaseException) -> None:
        # No call, no event: no on_error handler can take it.
        self.dispatcher.counts["handler_errors"] += 1
        self.dispatcher.counts["unhandled_errors"] += 1
        log.error(
            "handler_failed",
            handler=name,
            kind="on_started",
            error=repr(exc),
            traceback="".join(traceback.format_exception(exc)),
        )

    async def drain(self, stop_waiting: asyncio.Event | None = None) -> None:
        if self.receiver.draining:
            return
        self.receiver.draining = True
        log.info("draining", timeout=self.settings.shutdown_timeout)
        # One deadline for the whole drain, so the store's wait and the handlers' share it.
        deadline = loop_time() + self.settings.shutdown_timeout
        # Started hooks stop at once (a hook may loop for as long as the bot runs); each has
        # what is left of the drain to finish once cancelled.
        hooks, self.started_hooks = self.started_hooks or {}, {}
        for task in hooks:
            task.cancel()
        await self.store.drain(self.settings.shutdown_timeout, stop_waiting)
        abandoned = await self.dispatcher.join(max(0.0, deadline - loop_time()), stop_waiting)
        await wait_all(hooks, max(0.0, deadline - loop_time()), stop_waiting)
        if not all(task.done() for task in hooks):
            await asyncio.sleep(0)  # a hurried drain: a hook cancelled just now stops at its turn
        for task, name in hooks.items():
            if not task.done():
                log.error(
                    "started_hook_abandoned",
                    handler=name,
                    reason="still running when the drain ended, though cancelled as it began",
                )
        hurried = stop_waiting is not None and stop_waiting.is_set()
        for delivery in abandoned:
            log.error(
                "notification_abandoned",
                call_id=delivery.life.call_id,
                kind=type(delivery.event).__name__,
                reason="shutdown hurried by a second signal before handlers finished"
                if hurried
                else "handlers did not finish before the shutdown deadline",
            )

    async def stop(self) -> None:
        await self.drain()
        await self.store.close()
        await self.lifecycle.close()
        await self.services.close()
        await self.authenticator.close()
        if self.recorder is not None:
            self.recorder.close()
        log.info("bot_stopped")


class CallBot:
    """A calling bot: register handlers with decorators, then serve it.

    >>> bot = CallBot.from_env()
    >>> @bot.on_incoming_call
    ... async def answer(call: Call, event: events.IncomingCall) -> None:
    ...     await call.answer()

    A decorator that takes nothing but the handler may be written with or without
    parentheses: ``@bot.on_incoming_call`` and ``@bot.on_incoming_call()`` are the same.

    Serve it with ``callbot run module:bot`` or mount ``bot.create_app()``.
    The bot itself is a definition (settings and handlers); what runs is built
    when it starts and discarded when it stops, so it can be served again.
    """

    def __init__(
        self, settings: Settings | None = None, *, credential: Any = None, **options: Any
    ) -> None:
        """Configure from a ``Settings`` object or keyword arguments (see ``Settings``)."""
        if settings is not None and options:
            raise TypeError("pass either settings or keyword options, not both")
        self._settings = settings if settings is not None else Settings(**options)
        self._credential = credential
        self._registry = HandlerRegistry()
        self._routes: list[web.AbstractRouteDef] = []
        self._runtime: _Runtime | None = None

    @classmethod
    def from_env(cls, *, credential: Any = None, **overrides: Any) -> CallBot:
        """Configure from ``CALLBOT_*`` environment variables; keyword arguments win."""
        return cls(Settings.from_env(**overrides), credential=credential)

    @property
    def settings(self) -> Settings:
        """The bot's settings (change them with ``configure`` while it is not running)."""
        return self._settings

    def configure(self, *, credential: Any = None, **changes: Any) -> None:
        """Change settings (and the outbound credential) before the bot starts."""
        if self._runtime is not None:
            raise RuntimeError("configure() is only possible while the bot is not running")
        self._settings = self._settings.replace(**changes)
        if credential is not None:
            self._credential = credential

    def _running(self) -> _Runtime:
        if self._runtime is None:
            raise RuntimeError("the bot is not running: serve it, or start its app, first")
        return self._runtime

    @property
    def services(self) -> CallServices:
        """The Graph side of the running bot (calls, operations, tokens)."""
        return self._running().services

    @property
    def receiver(self) -> Receiver:
        """The running bot's callback endpoint (its ``counts`` say what it refused)."""
        return self._running().receiver

    @property
    def metrics(self) -> Metrics:
        """The running bot's metrics."""
        return self._running().metrics

    @property
    def authenticator(self) -> Authenticator:
        """The running bot's inbound token checker."""
        return self._running().authenticator

    # -- registration -------------------------------------------------------------

    def _adding(self, event_type: type[events.Event]) -> Callable[[Handler[Any]], None]:
        return lambda handler: self._registry.add(event_type, handler)

    def on(
        self, event_type: type[E], *, matches: Callable[[E], bool] | None = None
    ) -> HandlerDecorator[E]:
        """Run the decorated handler for every event of ``event_type`` (or a subclass).

        ``@bot.on(events.Event)`` sees everything. ``matches`` narrows further. The handler's
        ``event`` parameter takes ``event_type`` or a base class of it (mypy checks it).
        """
        if not (isinstance(event_type, type) and issubclass(event_type, events.Event)):
            # @bot.on written without its event class would hand over the handler itself.
            what = repr(handler_name(event_type) if callable(event_type) else event_type)
            raise TypeError(
                f"on takes an event class from callbot.events, not {what}: "
                "@bot.on(events.CallUpdated)"
            )
        require_delivered(event_type)
        # The registry hands ``matches`` only events of ``event_type``.
        filtered = cast("Callable[[events.Event], bool] | None", matches)
        return HandlerDecorator(lambda handler: self._registry.add(event_type, handler, filtered))

    @overload
    def on_incoming_call(self, handler: IncomingCallHandler) -> IncomingCallHandler: ...
    @overload
    def on_incoming_call(self) -> Callable[[IncomingCallHandler], IncomingCallHandler]: ...
    def on_incoming_call(self, handler: Handler[Any] | None = None) -> object:
        """Run for each incoming call (answer, reject or redirect it within 15 s)."""
        return _at_once_or_decorator(handler, self._adding(events.IncomingCall))

    def on_state(
        self, *states: str
    ) -> Callable[[CallStateChangedHandler], CallStateChangedHandler]:
        """Run when a call moves into one of ``states`` (``"established"``, ...).

        Runs on the transition, once: a notification that repeats the state the
        call is already in is a :class:`~callbot.events.CallUpdated` (see
        :meth:`on_call_updated`). A call may enter a state again (``established`` after
        a failed transfer, or after ``hold``): the handler runs each time, and
        ``event.previous_state`` says where the call comes from. ``states`` are from
        :data:`callbot.models.CALL_STATES`, in any case; a state Graph adds later reaches
        ``on(events.CallStateChanged)``.
        A call enters ``incoming`` as an :class:`~callbot.events.IncomingCall` (with
        ``state`` ``"incoming"`` and ``previous_state`` ``None``, as a move would have):
        ``on_state("incoming")`` runs with that event (annotate the handler's ``event``
        ``events.CallStateChanged | events.IncomingCall`` for mypy to check both).
        """
        if not states:
            raise TypeError("on_state needs at least one state, e.g. on_state('established')")
        if not all(isinstance(state, str) for state in states):
            # @bot.on_state written without its states hands over the handler itself.
            raise TypeError("on_state takes the states to run on: @bot.on_state('established')")
        wanted = frozenset(known_call_state(s) for s in states)

        def register(handler: CallStateChangedHandler) -> CallStateChangedHandler:
            self._registry.add(
                events.CallStateChanged,
                handler,
                lambda e: isinstance(e, events.CallStateChanged) and e.state in wanted,
            )
            if "incoming" in wanted:
                # The move into "incoming" is the IncomingCall, not a CallStateChanged (which
                # it reads as, so its handler may be annotated for either, as for mypy).
                self._registry.add(events.IncomingCall, handler, annotation_judged=False)
            return handler

        return register

    @overload
    def on_call_updated(self, handler: CallUpdatedHandler) -> CallUpdatedHandler: ...
    @overload
    def on_call_updated(self) -> Callable[[CallUpdatedHandler], CallUpdatedHandler]: ...
    def on_call_updated(self, handler: Handler[Any] | None = None) -> object:
        """Run when Graph repeats the call's state to add content (media state, chat or
        meeting info, transcription, ...); ``event.changed`` names what changed."""
        return _at_once_or_decorator(handler, self._adding(events.CallUpdated))

    @overload
    def on_transfer_failed(self, handler: TransferFailedHandler) -> TransferFailedHandler: ...
    @overload
    def on_transfer_failed(self) -> Callable[[TransferFailedHandler], TransferFailedHandler]: ...
    def on_transfer_failed(self, handler: Handler[Any] | None = None) -> object:
        """Run once for each transfer the bot asked for (``call.transfer``) that failed,
        however Graph told it; ``event.result_info`` says why (``None`` in Graph's 2019
        shape, which brings the call back from ``transferring`` without one), and
        ``event.transfer_target`` names the target of the transfer that failed, as the bot
        asked it (an :class:`~callbot.models.InvitationParticipantInfo`).

        Graph tells a failure by bringing the call back to ``established`` after
        ``transferring`` (the event is a :class:`~callbot.events.CallStateChanged`, and
        ``on_state("established")`` handlers run with it too), or by an update alone, with
        no ``transferring`` first (a :class:`~callbot.events.CallUpdated`, after
        ``reorder_window``). Either way the event's ``transfer_failed`` is set: callbot
        keeps the transfers asked, so a copy of a failure is no second one, and a transfer
        Graph refused outright (``call.transfer`` raised a :class:`~callbot.GraphError`) or
        completed (the call ends: ``on_terminated``) has none. Transfers fail first asked
        first, each naming its own target: a bot trying one target after another needs no
        list of its own.

        >>> @bot.on_transfer_failed
        ... async def try_voicemail(
        ...     call: Call, event: events.CallStateChanged | events.CallUpdated
        ... ) -> None:
        ...     target = event.transfer_target  # whom the transfer that failed went to
        ...     identity = target.identity if target is not None else None
        ...     if identity is None or identity.user is None or identity.user.id != VOICEMAIL:
        ...         await call.transfer(VOICEMAIL)
        """

        def register(handler: Handler[Any]) -> None:
            for event_type in _TRANSFER_NEWS:
                self._registry.add(event_type, handler, _is_transfer_failure)

        return _at_once_or_decorator(handler, register)

    @overload
    def on_tone(self, handler: ToneReceivedHandler) -> ToneReceivedHandler: ...
    @overload
    def on_tone(self) -> Callable[[ToneReceivedHandler], ToneReceivedHandler]: ...
    def on_tone(self, handler: Handler[Any] | None = None) -> object:
        """Run for each DTMF tone the caller presses (after ``call.subscribe_to_tone()``)."""
        return _at_once_or_decorator(handler, self._adding(events.ToneReceived))

    @overload
    def on_participants(
        self, handler: ParticipantsUpdatedHandler
    ) -> ParticipantsUpdatedHandler: ...
    @overload
    def on_participants(
        self,
    ) -> Callable[[ParticipantsUpdatedHandler], ParticipantsUpdatedHandler]: ...
    def on_participants(self, handler: Handler[Any] | None = None) -> object:
        """Run when the roster changes; the event lists who joined, left or changed."""
        return _at_once_or_decorator(handler, self._adding(events.ParticipantsUpdated))

    @overload
    def on_operation(self, handler: OperationUpdatedHandler) -> OperationUpdatedHandler: ...
    @overload
    def on_operation(self) -> Callable[[OperationUpdatedHandler], OperationUpdatedHandler]: ...
    def on_operation(self, handler: Handler[Any] | None = None) -> object:
        """Run when Graph reports an operation's progress or outcome."""
        return _at_once_or_decorator(handler, self._adding(events.OperationUpdated))

    @overload
    def on_terminated(self, handler: CallTerminatedHandler) -> CallTerminatedHandler: ...
    @overload
    def on_terminated(self) -> Callable[[CallTerminatedHandler], CallTerminatedHandler]: ...
    def on_terminated(self, handler: Handler[Any] | None = None) -> object:
        """Run once when a call has ended; ``event.result_info`` says why."""
        return _at_once_or_decorator(handler, self._adding(events.CallTerminated))

    def watch_handlers(self, watcher: HandlerWatcher) -> Callable[[], None]:
        """Call ``watcher(handler_name, event, outcome)`` after every handler run (tools
        such as the simulator's diagrams use it); returns a function that stops it. The
        outcome (also the label of ``callbot_handler_seconds``) is ``ok``, ``error``,
        ``call_ended`` (it stopped on the call's end), ``superseded`` (it stopped as its run
        lost the call to another instance: ``RunSuperseded``) or ``abandoned`` (stopped at
        shutdown)."""
        self._registry.watchers.append(watcher)
        return lambda: self._registry.watchers.remove(watcher)

    @overload
    def on_error(self, handler: ErrorHandlerT) -> ErrorHandlerT: ...
    @overload
    def on_error(self) -> Callable[[ErrorHandlerT], ErrorHandlerT]: ...
    def on_error(
        self, handler: ErrorHandlerT | None = None
    ) -> ErrorHandlerT | Callable[[ErrorHandlerT], ErrorHandlerT]:
        """Run with ``(call, event, exc)`` when a handler raises.

        ``exc`` may be an :class:`asyncio.CancelledError` a handler let escape of its own
        (not a cancellation at shutdown), or another ``BaseException`` of its own, so it is
        a ``BaseException``: annotated ``Exception``, the handler is refused by mypy. Only
        ``KeyboardInterrupt`` and ``SystemExit`` are no handler's error: they stop the
        process, as asyncio lets them.
        """
        return _at_once_or_decorator(handler, self._registry.add_error_handler)

    @overload
    def on_started(self, hook: StartedHookT) -> StartedHookT: ...
    @overload
    def on_started(self) -> Callable[[StartedHookT], StartedHookT]: ...
    def on_started(
        self, hook: StartedHookT | None = None
    ) -> StartedHookT | Callable[[StartedHookT], StartedHookT]:
        """Run ``hook(bot)`` once the bot serves and is ready: to join a meeting, or place a
        call, when the bot starts.

        It runs once per start, in a task of its own (it never holds the start up), when
        the bot is ready (signing keys loaded, store reachable) and:

        * served with ``serve()`` (``callbot run``, ``bot.run()``): its port accepts
          connections;
        * served by the testing kit (``run_with_simulator``, the ``sim`` fixture): it
          serves the simulator, so a test can ``await sim.wait_for_outgoing_call()``;
        * mounted, or run by another server (``create_app()``): its app has started the bot
          (aiohttp's startup). aiohttp opens the server's port once the whole application
          has started, so the hook may begin a moment before the port accepts connections.

        A bare ``await bot.start()`` serves nothing and runs no hook. An exception is logged
        as ``handler_failed`` (``kind`` ``on_started``; there is no call for an ``on_error``
        handler) and the bot keeps serving. When the bot stops, a hook still running is
        cancelled as the drain begins, and has what is left of ``shutdown_timeout`` to
        finish. A hook registered while the bot runs waits for its next start.

        >>> @bot.on_started
        ... async def join_the_standup(bot: CallBot) -> None:
        ...     await bot.join_meeting(STANDUP_URL)
        """
        return _at_once_or_decorator(hook, self._registry.add_started)

    @overload
    def choose_deployment(self, chooser: DeploymentChooserT) -> DeploymentChooserT: ...
    @overload
    def choose_deployment(self) -> Callable[[DeploymentChooserT], DeploymentChooserT]: ...
    def choose_deployment(
        self, chooser: DeploymentChooserT | None = None
    ) -> DeploymentChooserT | Callable[[DeploymentChooserT], DeploymentChooserT]:
        """Send a new call to the deployment of this bot that should run it (region affinity).

        ``chooser(event)`` gets each call's incoming-call notification (the
        :class:`~callbot.events.IncomingCall`) once its request is authenticated, and
        returns the callback URL of the deployment that should run the call, such as
        ``"https://bot-eu.contoso.com/api/calls"``, or ``None`` to run it here. The bot then
        answers Graph ``302 Found`` with that URL as ``Location``, and Graph posts the
        call's notifications there: nothing of the call is kept here, and no handler runs
        here for it.

        It runs inside the request, before the answer, so it must be fast and do no I/O:
        a plain ``def`` deciding from the event (``event.tenant_id``, the caller in
        ``event.call.source``, ``event.raw``) and what the process already holds in memory.

        Only a request that is one new call's incoming-call notification is asked about;
        any other request (a later notification, or one carrying something else beside the
        incoming call) is accepted here, as is a call this deployment already knows. This
        bot's own callback URL means here. A URL that is not absolute ``https`` (plain
        ``http`` only for 127.0.0.1, localhost or ::1) or has a control character, and an
        exception from ``chooser``, are logged (``deployment_choice_failed``) and the call
        runs here. ``callbot_redirects_total{outcome}`` counts them.

        >>> EU = "https://bot-eu.contoso.com/api/calls"
        >>> @bot.choose_deployment
        ... def by_tenant(event: events.IncomingCall) -> str | None:
        ...     return EU if event.tenant_id in EU_TENANTS else None
        """
        return _at_once_or_decorator(chooser, self._set_deployment_chooser)

    def _set_deployment_chooser(self, chooser: DeploymentChooser) -> None:
        if calls_a_coroutine(chooser) or not callable(chooser):
            raise TypeError(
                f"{handler_name(chooser)!r} must be a plain 'def' function: "
                "it runs inside the request, before Graph gets its answer"
            )
        require_parameters(chooser, "event", define="def", returns="str | None")
        if self._registry.deployment_chooser is not None:
            raise ValueError(
                "the bot already has a deployment chooser "
                f"({handler_name(self._registry.deployment_chooser)})"
            )
        self._registry.deployment_chooser = chooser

    # -- acting -------------------------------------------------------------------

    @_signature_of(CallServices.create_call)
    async def create_call(self, *args: Any, **kwargs: Any) -> Call:
        """Place an outgoing call or join a group call (see ``CallServices.create_call``)."""
        return await self.services.create_call(*args, **kwargs)

    @_signature_of(CallServices.join_meeting)
    async def join_meeting(self, *args: Any, **kwargs: Any) -> Call:
        """Join a Teams meeting (see ``CallServices.join_meeting``)."""
        return await self.services.join_meeting(*args, **kwargs)

    async def log_device_quality(self, *args: Any, **kwargs: Any) -> None:
        """Report teleconference device quality (see ``CallServices.log_device_quality``)."""
        await self.services.log_device_quality(*args, **kwargs)

    def active_calls(self) -> list[Call]:
        """Handles of the calls that have not ended (with a shared store, of every instance:
        calls run elsewhere appear within a few seconds)."""
        runtime = self._running()
        calls = []
        for life in runtime.lifecycle.active():
            record = runtime.store.known(life.key)
            snapshot = record.snapshot if record is not None else None
            roster = record.roster if record is not None else None
            calls.append(runtime.services.call(life.call_id, snapshot=snapshot, roster=roster))
        here = {call.key for call in calls}
        for record in runtime.store.elsewhere():
            known = runtime.lifecycle.get(record.call_id)
            if record.life.key not in here and (known is None or not known.ended):
                calls.append(
                    runtime.services.call(
                        record.call_id, snapshot=record.snapshot, roster=record.roster
                    )
                )
        return calls

    # -- serving ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Running, keys loaded, and not draining."""
        return self._runtime is not None and self._runtime.ready

    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        """Serve ``routes`` of your own beside the callback, on the bot's port: aiohttp route
        definitions, as a ``web.RouteTableDef`` or ``web.post(path, handler)`` give them.

        Every app ``create_app()`` builds has them, so ``callbot run``, ``serve()``, a
        mounted app and the testing kit all serve them. A handler gets the request once its
        body is read, within the callback's ``body_timeout`` and ``max_body_bytes`` (else
        ``408``, or aiohttp's ``413``): ``await request.json()``, ``text()``, ``read()`` and
        ``post()`` give it (``request.content`` has nothing left to stream). It reaches the
        bot as the module's other code does (``bot``, or a closure in a function that makes
        the bot).

        These requests are not callbacks: no token is checked. The port is public (Graph
        calls it), so a route that acts (joins a meeting, places a call) must check who asks
        itself, with a secret of its own, say.

        Raises ``ValueError`` for a route that would take requests for one of the bot's own
        paths (the callback path, ``/healthz``, ``/readyz``, ``/metrics``), what aiohttp
        raises for a route it refuses, and ``RuntimeError`` while the bot runs. An app
        ``create_app()`` built before does not get routes added after.

        >>> routes = web.RouteTableDef()
        >>> @routes.post("/join")
        ... async def join(request: web.Request) -> web.Response:
        ...     check_secret(request)
        ...     call = await bot.join_meeting((await request.json())["joinUrl"])
        ...     return web.json_response({"callId": call.id})
        >>> bot.add_routes(routes)
        """
        if isinstance(routes, web.AbstractRouteDef):
            raise TypeError("add_routes takes a list of route definitions: [web.post(...)]")
        if self._runtime is not None:
            raise RuntimeError("add_routes() is only possible while the bot is not running")
        self._routes = checked_routes([*self._routes, *routes], self._settings.callback_path)

    def create_app(self) -> web.Application:
        """The aiohttp application: the callback route, ``/healthz``, ``/readyz``, ``/metrics``,
        and the routes given to :meth:`add_routes`.

        Mount it in an existing app with ``app.add_subapp(prefix, bot.create_app())``.
        Run as the root application, it reads every request body as sent, routes added to
        it included (aiohttp inflates no ``Content-Encoding``); mounted, the root app's
        ``handler_args`` decide, so give it ``{"auto_decompress": False}`` for aiohttp not
        to inflate a compressed body the callback refuses (415) while it drains it.
        """
        # Checked again: the callback path may have changed since (configure).
        routes = checked_routes(self._routes, self._settings.callback_path)
        app = web.Application(
            client_max_size=self._settings.max_body_bytes,
            handler_args=self._connection_options(),
        )
        app[BOT_KEY] = self
        # Forwarded headers are read only from trusted proxies, and only for logging.
        trust_proxies(app, self._settings.trusted_proxies)
        app.router.add_post(self._settings.callback_path, self._callback)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        # After the bot's own routes, which no route of the author's may match.
        app.add_routes(
            reading_bodies_first(
                routes,
                lambda: self._settings.body_timeout,
                lambda: self._settings.max_body_bytes,
            )
        )
        app.cleanup_ctx.append(self._lifespan)
        return app

    def _app_for_own_server(self) -> web.Application:
        """``create_app()``, for a server that calls :meth:`_serving_started` once it listens."""
        app = self.create_app()
        app[_ON_STARTED_BY_SERVER] = True
        return app

    def _serving_started(self) -> None:
        """The bot's server listens: run the on_started hooks (once per run)."""
        self._running().run_started_hooks(self)

    def _connection_options(self) -> dict[str, Any]:
        # aiohttp's keep-alive timeout also applies to a connection that never sends a request
        # (since aiohttp 3.14.4, hence callbot's floor).
        return {
            "keepalive_timeout": self._settings.idle_timeout,
            # aiohttp would inflate a stranger's body, unchecked, for the 10 s it drains a refusal.
            "auto_decompress": False,
        }

    async def _lifespan(self, app: web.Application) -> AsyncIterator[None]:
        await self.start()
        if not app.get(_ON_STARTED_BY_SERVER, False):
            # Mounted, or run by a server of someone else's: no later moment is told.
            self._serving_started()
        yield
        await self.stop()

    async def start(self) -> None:
        """Check settings, then load signing keys and the outbound token."""
        if self._runtime is not None:
            return
        self._settings.check()
        runtime = _Runtime(self._settings, self._registry, self._credential)
        self._runtime = runtime
        try:
            await runtime.start()
        except BaseException:
            self._runtime = None
            await runtime.stop()
            raise

    async def drain(self) -> None:
        """Refuse new callbacks (readyz fails), then let running handlers finish."""
        if self._runtime is not None:
            await self._runtime.drain()

    async def stop(self) -> None:
        """Drain, then close every connection and timer."""
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await runtime.stop()

    def run(self, host: str | None = None, port: int | None = None) -> None:
        """Serve until SIGINT or SIGTERM (blocking)."""
        asyncio.run(self.serve(host, port))

    async def serve(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Serve until ``stop`` is set, or SIGINT/SIGTERM; then drain and close.

        A SIGINT/SIGTERM during the drain (a second Ctrl-C) ends it at once: handlers
        still running are cancelled and logged as abandoned, as at ``shutdown_timeout``.
        Any other one while stopping (a third, or one while the bot closes after the
        drain) is logged as ``shutdown_signal_ignored`` and changes nothing: the bot
        stops as it would have. Once ``serve`` returns, SIGINT and SIGTERM go to the
        handlers the process had before it again: the application's own (set with
        ``signal.signal`` or added to the loop), ``asyncio.run``'s for Ctrl-C, or Python's
        defaults.

        Logging follows ``log_format`` and ``log_level`` from here on, the standard
        library's ``logging`` included (a bot mounted with ``create_app()`` keeps the
        application's own logging).
        """
        # serve() owns the process, so the bot's settings decide how it logs.
        configure_logging(self._settings.log_format, self._settings.log_level)
        # [::1], as a URL writes it, is the address ::1 to a socket.
        host = listen_address(host or self._settings.host)
        port = self._settings.port if port is None else port
        stop = stop or asyncio.Event()
        stop_waiting = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = _StopSignals(stop, stop_waiting)
        signals.install()
        # serve() owns the process, so it may tune the collector for many live calls.
        tune_for_serving()
        runner = web.AppRunner(
            self._app_for_own_server(),
            handle_signals=False,
            access_log=None,
            # After the drain only a slow request is left (Graph retries it): cut it, or it
            # would hold the exit past the orchestrator's grace period (aiohttp waits 60 s).
            shutdown_timeout=_REQUEST_GRACE_AT_EXIT,
        )
        guard = ConnectionGuard(
            header_timeout=self._settings.header_timeout,
            max_connections=self._settings.max_connections,
        )
        guard.check_descriptor_limit()
        previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(
            guard.exception_handler(previous_handler or _default_exception_handler)
        )
        listener: asyncio.Server | None = None
        try:
            await runner.setup()
            self._watch_connections(guard)
            assert runner.server is not None
            factory = guard.protocol_factory(
                runner.server, access_log=None, **self._connection_options()
            )
            listener = await _listen(loop, factory, host, port)
            # The port bound, not the one asked for: with port 0 the system picks it.
            bound = listener.sockets[0].getsockname()[1]
            log.info("listening", host=host, port=bound, callback_path=self._settings.callback_path)
            self._serving_started()
            await stop.wait()
            log.info("shutdown_requested")
            # Drain while still listening, so probes see readyz fail before the exit.
            if self._runtime is not None:
                await self._runtime.drain(stop_waiting)
        finally:
            # Closing the store and the sessions takes a moment too: no signal may cut it short.
            signals.closing()
            try:
                if listener is not None:
                    listener.close()
                await runner.cleanup()
                loop.set_exception_handler(previous_handler)
            finally:
                signals.restore()

    def _watch_connections(self, guard: ConnectionGuard) -> None:
        sources = self._running().metrics.sources
        sources.counters["callbot_connections_closed"] = (
            "Inbound connections closed, or requests refused before any handler ran, by reason",
            "reason",
            lambda: guard.closed,
        )
        sources.gauges["callbot_open_connections"] = (
            "Inbound connections open now",
            lambda: float(guard.open_connections),
        )

    async def _callback(self, request: web.Request) -> web.StreamResponse:
        runtime = self._runtime
        if runtime is None:
            return web.json_response(
                {"error": "not_running", "detail": "bot not started"},
                status=503,
                headers={"Retry-After": "1"},
            )
        return await runtime.receiver.handle(request)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        runtime = self._runtime
        checks = {
            "running": runtime is not None,
            "keys_loaded": runtime is not None and runtime.authenticator.ready,
            "draining": runtime is not None and runtime.receiver.draining,
            "store_reachable": runtime is not None and runtime.store.reachable,
        }
        ready = self.ready
        return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self._runtime.metrics.render() if self._runtime is not None else b""
        return web.Response(
            body=body,
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )


async def _listen(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
) -> asyncio.Server:
    """Listen on ``host``; ``::`` takes IPv4 clients too, as it does in most servers."""
    try:
        every_ipv6_address = ipaddress.ip_address(host) == ipaddress.IPv6Address("::")
    except ValueError:
        every_ipv6_address = False
    if every_ipv6_address and socket.has_dualstack_ipv6():
        # asyncio makes an IPv6 socket IPv6-only: probes and proxies on 127.0.0.1 got nothing.
        sock = socket.create_server(
            ("::", port), family=socket.AF_INET6, backlog=1024, dualstack_ipv6=True
        )
        try:
            return await loop.create_server(factory, sock=sock, backlog=1024)
        except BaseException:
            sock.close()
            raise
    return await loop.create_server(factory, host, port, backlog=1024)


def _default_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    loop.default_exception_handler(context)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopSignals:
    """SIGINT and SIGTERM from the start of ``serve`` to its end.

    The first stops the bot, a second during the drain hurries it, and any other (a
    third, or one while the bot closes after the drain) writes one line and changes
    nothing: none finds Python's default handler (a ``KeyboardInterrupt`` traceback, or
    for SIGTERM the end of the process) before ``serve`` returns. The loop handles them
    throughout; while the bot closes, each is also noted as it arrives, so that ``serve``
    logs at its end any that the loop had no turn to handle. Then the handlers the
    process had before ``serve`` get them again, those the application added to the
    event loop (``loop.add_signal_handler``) included.
    """

    def __init__(self, stop: asyncio.Event, stop_waiting: asyncio.Event) -> None:
        self._stop = stop
        self._stop_waiting = stop_waiting
        self._loop = asyncio.get_running_loop()
        self._previous = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
        # Adding the bot's handlers to the loop replaces any the application added there.
        self._previous_on_loop = {
            signum: handle
            for signum in _STOP_SIGNALS
            if (handle := _loop_signal_handler(self._loop, signum)) is not None
        }
        self._closing = False
        self._noted: list[signal.Signals] = []

    def install(self) -> None:
        for signum in _STOP_SIGNALS:
            self._loop.add_signal_handler(signum, self.received, signum)

    def received(self, signum: signal.Signals) -> None:
        if self._closing:
            if signum in self._noted:
                self._noted.remove(signum)
            log.info(
                "shutdown_signal_ignored",
                signal=signum.name,
                detail="already closing: the bot exits once its connections, store and "
                "Graph sessions are closed",
            )
        elif not self._stop.is_set():
            self._stop.set()
        elif not self._stop_waiting.is_set():
            # Already stopping (a second Ctrl-C): whoever sent it will not wait it out.
            self._stop_waiting.set()
            log.warning(
                "shutdown_hurried",
                signal=signum.name,
                detail="handlers still running are stopped now, not at the deadline",
            )
        else:
            log.info(
                "shutdown_signal_ignored",
                signal=signum.name,
                detail="the drain is already hurried: the bot closes once its handlers stop",
            )

    def closing(self) -> None:
        """The drain is over: from here to :meth:`restore`, a signal is only logged."""
        self._closing = True
        for signum in _STOP_SIGNALS:
            # Only Python's side of the handler changes: the loop keeps its own, no gap.
            signal.signal(signum, self._note)

    def restore(self) -> None:
        """Give the signals back the handlers they had before ``serve``; log those noted
        that the loop did not handle."""
        for signum, handler in self._previous.items():
            on_loop = self._previous_on_loop.get(signum)
            if on_loop is not None:
                # Replaces the bot's in one step (no moment without one); the handle runs its
                # callback as the loop ran it, with its arguments, in its context.
                self._loop.add_signal_handler(signum, on_loop._run)
                continue
            self._loop.remove_signal_handler(signum)
            # None: a handler installed by C code, which Python cannot put back.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        noted, self._noted = self._noted, []
        for signum in noted:
            self.received(signum)

    def _note(self, signum: int, frame: object) -> None:
        # Runs between two bytecodes of the main thread, maybe inside a log write: no I/O.
        self._noted.append(signal.Signals(signum))


def _loop_signal_handler(loop: asyncio.AbstractEventLoop, signum: int) -> asyncio.Handle | None:
    """The handler added to ``loop`` for ``signum``, if any. asyncio gives no public way to
    read it: its own loops keep them in ``_signal_handlers`` (another loop's are not found,
    and are lost as before)."""
    handlers = getattr(loop, "_signal_handlers", None)
    handle = handlers.get(signum) if isinstance(handlers, dict) else None
    return handle if isinstance(handle, asyncio.Handle) and not handle.cancelled() else None
