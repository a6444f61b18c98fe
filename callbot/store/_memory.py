"""The in-memory store: one process, no setup, nothing survives a restart."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence

from .. import events
from .._config import Settings
from .._lifecycle import Lifecycle
from .._sequencing import CallRecord, Delivery, OwnFact, Sequencer
from ._base import Outcomes, tell_waiting

__all__ = ["MemoryStore"]


class MemoryStore:
    """Accepted events go straight to the sequencer in this process.

    This is the default and the fast path: ``ingest`` is the sequencer's
    synchronous ``accept``, so what it accepts is queued before the 202.
    """

    def __init__(
        self,
        deliver: Callable[[Delivery], None],
        *,
        settings: Settings,
        lifecycle: Lifecycle,
        outcomes: Outcomes,
        full: Callable[[str], bool] | None = None,
    ) -> None:
        # Whether a call's deliveries not yet done refuse more (the dispatcher's backlog).
        self._full = full
        self._lifecycle = lifecycle
        self._outcomes = outcomes
        self.sequencer = Sequencer(
            deliver,
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
        self.sequencer.accept_batch(batch, None if self._full is None else self._refuses)

    def _refuses(self, event: events.Event, call_key: str) -> bool:
        """Whether the call's backlog is full; if so, what a running handler of it may wait
        for in ``event`` (the outcome of its prompt) is told all the same, as while draining:
        the handler holding the backlog up goes on. (Its tenant was checked.)"""
        assert self._full is not None
        if not self._full(call_key):
            return False
        tell_waiting(event, self._lifecycle, self._outcomes)
        return True

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
        """Nothing is kept past the process."""
        self.sequencer.close()
