"""The in-memory store: one process, no setup, nothing survives a restart."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from .. import events
from .._config import Settings
from .._sequencing import CallRecord, Delivery, Sequencer
from ._base import StoreHooks

__all__ = ["MemoryStore"]


class MemoryStore:
    """Keeps every call's record in this process; accepted events go straight to the sequencer.

    This is the default and the fast path: ``ingest`` is the sequencer's
    synchronous ``accept``, so what it accepts is queued before the 202.
    """

    def __init__(
        self, deliver: Callable[[Delivery], None], *, settings: Settings, hooks: StoreHooks
    ) -> None:
        self.sequencer = Sequencer(
            deliver,
            reorder_window=settings.reorder_window,
            termination_grace=settings.termination_grace,
            on_ended=hooks.on_ended,
            on_operation=hooks.on_operation,
            on_tone=hooks.on_tone,
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
        """Hand each event to the sequencer (deliver, hold or drop it)."""
        accept = self.sequencer.accept
        for event in batch:
            accept(event)

    def active_records(self) -> list[CallRecord]:
        """Records of the calls that have not ended."""
        return self.sequencer.active_records()

    async def forget(self, call_key: str) -> None:
        """Drop the call's record; a late notification of it starts a new one."""
        self.sequencer.evict(call_key)

    async def drain(self, timeout: float) -> None:
        """Held events go now: on shutdown nothing waits for a window."""
        self.sequencer.release_all()

    async def close(self) -> None:
        """Cancel the sequencer's timers."""
        self.sequencer.close()
