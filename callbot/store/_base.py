"""The store interface, and choosing a store from the settings."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from .. import events
from .._lifecycle import LIVE_PHASE, Lifecycle, phase_of_state
from .._sequencing import CallRecord, OwnFact, Sequencer

__all__ = ["Outcomes", "Store", "tell_waiting", "waited_for"]


class Outcomes(Protocol):
    """Outcomes handlers may be waiting for, told at once whichever instance accepted
    them (``CallServices`` provides it). A call's end goes to the lifecycle."""

    def on_operation(self, event: events.OperationUpdated) -> None: ...
    def on_tone(self, event: events.ToneReceived) -> None: ...


_WAITED_FOR = (events.OperationUpdated, events.ToneReceived, events.CallTerminated)


def waited_for(event: events.Event) -> bool:
    """Whether a running handler may be waiting for ``event``: an operation's outcome
    (``op.wait()``), a tone (``collect_digits``), the call's end, or the call live
    (``Call.wait_until_established`` returns for any state a live call moves between)."""
    if isinstance(event, _WAITED_FOR):
        return True
    return isinstance(event, events.CallStateChanged) and phase_of_state(event.state) == LIVE_PHASE


def tell_waiting(event: events.Event, lifecycle: Lifecycle, outcomes: Outcomes) -> None:
    """Resolve what waits on this process for ``event``, accepted but not delivered here (by
    another instance, or refused while draining): the one list of what :func:`waited_for`
    names and who is told of each. The caller has checked the event's tenant."""
    if isinstance(event, events.OperationUpdated):
        outcomes.on_operation(event)
    elif isinstance(event, events.ToneReceived):
        outcomes.on_tone(event)
    elif isinstance(event, events.CallTerminated):
        lifecycle.end(event.call_id, event.result_info)
    elif waited_for(event):
        lifecycle.told_established(event.call_id, event.tenant_id)


class Store(Protocol):
    """Where accepted notifications wait for their handlers, and what is kept of each call.

    The receiver hands every authenticated, parsed batch to :meth:`ingest`
    before it answers 202: when ``ingest`` returns, the batch is kept (in
    memory, or in Redis for every instance to see); when it raises
    :class:`~callbot.StoreUnavailable`, nothing was accepted and the receiver
    answers 503 so that Graph retries. Either way one set of ordering rules,
    the :class:`~callbot._sequencing.Sequencer`, decides what each call's
    handlers see.
    """

    @property
    def sequencer(self) -> Sequencer:
        """The ordering rules this process applies to the calls it runs."""
        ...

    @property
    def reachable(self) -> bool:
        """Whether the store answered lately (``/readyz`` fails while it does not)."""
        ...

    @property
    def counts(self) -> Counter[str]:
        """Sequencing outcomes so far: delivered, held, duplicate, stale, after_end, ..."""
        ...

    async def start(self) -> None:
        """Connect, and take up what was kept of the calls that are still going on."""
        ...

    async def ingest(self, batch: Sequence[events.Event]) -> None:
        """Keep a batch for its handlers, or raise ``StoreUnavailable``; raise
        ``MalformedNotification`` (``tenant_mismatch``) when notifications name a call first
        seen with another tenant (those only: the batch's others are kept)."""
        ...

    async def note(self, fact: OwnFact) -> None:
        """Keep what the bot itself knows of a call and no notification says (the bot's own
        participant id Graph's answer to the request placing it named, a transfer about to be
        asked), for the call's sequencer, in line with the call's notifications: it counts
        for those accepted after it, on whichever instance runs the call. Or raise
        ``StoreUnavailable``: then nothing was kept."""
        ...

    def known(self, call_key: str) -> CallRecord | None:
        """What is kept of a call (its snapshot and roster), if anything."""
        ...

    def elsewhere(self) -> list[CallRecord]:
        """Calls other instances run that reached a state and have not ended (a shared
        store), else none."""
        ...

    async def drain(self, timeout: float, stop_waiting: asyncio.Event | None = None) -> None:
        """Stop taking on work (on shutdown), waiting at most ``timeout`` seconds, and no
        longer once ``stop_waiting`` is set.

        What is kept is left for others or released.
        """
        ...

    async def close(self) -> None:
        """Release timers, tasks and connections."""
        ...
