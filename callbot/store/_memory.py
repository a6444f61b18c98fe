"""The in-memory store: one process, no setup, nothing survives a restart."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence

from .. import events
from .._config import Settings
from .._lifecycle import Lifecycle
from .._sequencing import CallRecord, Delivery, OwnFact, Sequencer, backlog_full
from ._base import Outcomes, tell_waiting

__all__ = ["MemoryStore"]


class MemoryStore:
    """Accepted events go straight to the sequencer in this process.

    This is the default and the fast path: ``ingest`` is the sequencer's
    synchronous ``accept``, so what it accepts is queued before the 202. ``submit(delivery,
    done)`` hands a delivery to its handlers and tells ``done(delivery)`` once they finished
    (``Dispatcher.submit``): the store counts each call's backlog by it.
    """

    def __init__(
        self,
        submit: Callable[[Delivery, Callable[[Delivery], None]], None],
        *,
        settings: Settings,
        lifecycle: Lifecycle,
        outcomes: Outcomes,
    ) -> None:
        self._submit = submit
        self._backlogs: dict[str, list[int]] = {}
        """Per call with any: how many deliveries were handed on whose handlers have not
        finished, and what they take in bytes (``Delivery.size``): :func:`backlog_full`'s."""
        self._lifecycle = lifecycle
        self._outcomes = outcomes
        self.sequencer = Sequencer(
            self._deliver,
            lifecycle,
            reorder_window=settings.reorder_window,
            max_roster=settings.max_roster_size,
            on_operation=outcomes.on_operation,
            on_tone=outcomes.on_tone,
        )

    @property
    def reachable(self) -> bool:
        """Always: memory does not go away."""
        return True

    @property
    def counts(self) -> Counter[str]:
        """The sequencer's outcomes."""
        return self.sequencer.counts

    async def start(self) -> None:
        """Nothing to connect to."""

    async def ingest(self, batch: Sequence[events.Event]) -> None:
        """Hand each event to the sequencer (deliver, hold or drop it); then raise
        ``MalformedNotification`` if some named a call of another tenant, or a call whose
        backlog is full (those only are refused, as in a shared store)."""
        self.sequencer.accept_batch(batch, self._refuses)

    def _refuses(self, event: events.Event, call_key: str) -> bool:
        """Whether the call's backlog is full; if so, what a running handler of it may wait
        for in ``event`` (the outcome of its prompt) is told all the same, as while draining:
        the handler holding the backlog up goes on. (Its tenant was checked.)"""
        backlog = self._backlogs.get(call_key)
        if backlog is None or not backlog_full(backlog[0], backlog[1]):
            return False
        tell_waiting(event, self._lifecycle, self._outcomes)
        return True

    def backlog(self, call_key: str) -> tuple[int, int]:
        """How many deliveries of the call were handed to its handlers and not finished, and
        what they take in bytes (what held in the window is not counted: it is in memory)."""
        backlog = self._backlogs.get(call_key)
        return (0, 0) if backlog is None else (backlog[0], backlog[1])

    def _deliver(self, delivery: Delivery) -> None:
        key = delivery.life.key
        backlog = self._backlogs.get(key)
        if backlog is None:
            self._backlogs[key] = [1, delivery.size]
        else:
            backlog[0] += 1
            backlog[1] += delivery.size
        # Counted first: ``done`` may be told at once (no handler wants it).
        self._submit(delivery, self._done)

    def _done(self, delivery: Delivery) -> None:
        key = delivery.life.key
        backlog = self._backlogs[key]
        if backlog[0] == 1:
            del self._backlogs[key]  # a call with nothing in flight costs nothing
        else:
            backlog[0] -= 1
            backlog[1] -= delivery.size

    async def note(self, fact: OwnFact) -> None:
        """The sequencer takes it in at once, in line with what was accepted so far."""
        self.sequencer.note(fact)

    def known(self, call_key: str) -> CallRecord | None:
        """The sequencer's record of the call."""
        return self.sequencer.record(call_key)

    def elsewhere(self) -> list[CallRecord]:
        """None: this process is the only one."""
        return []

    async def drain(self, timeout: float, stop_waiting: asyncio.Event | None = None) -> None:
        """Held events go now: on shutdown nothing waits for a window."""
        self.sequencer.release_all()

    async def close(self) -> None:
        """Nothing is kept past the process (deliveries abandoned at shutdown included)."""
        self.sequencer.close()
        self._backlogs.clear()
