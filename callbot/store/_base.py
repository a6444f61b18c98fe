"""The store interface, and choosing a store from the settings."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from .. import events
from .._sequencing import CallRecord, OwnFact, Sequencer

__all__ = ["Outcomes", "Store"]


class Outcomes(Protocol):
    """Outcomes handlers may be waiting for, told at once whichever instance accepted
    them (``CallServices`` provides it). A call's end goes to the lifecycle."""

    def on_operation(self, event: events.OperationUpdated) -> None: ...
    def on_tone(self, event: events.ToneReceived) -> None: ...


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
