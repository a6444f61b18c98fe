"""Which run of a notification's handlers is going on: first, or again after a takeover.

With a shared store, a call's notifications are run by the instance holding the
call's lease. When that instance dies or is cut off past its lease, another one
takes the call over (a new *epoch* of the lease) and runs again what was handed
to handlers but never acknowledged. The dispatcher sets :func:`current_attempt`
around each delivery's handlers, so a handler can tell a re-run::

    @bot.on_state("established")
    async def greet(call, event):
        attempt = callbot.current_attempt()
        if attempt is not None and attempt.redelivered:
            ...  # these handlers may have run before, entirely or in part

``None`` outside a handler. With the in-memory store every delivery is a first
run (``redelivered`` is false, ``epoch`` 0).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._journal import ActionJournal

__all__ = ["Attempt", "current_attempt"]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One run of a notification's handlers."""

    call_key: str
    entry: str
    """The notification's id in its call's inbox ('' for the in-memory store)."""
    epoch: int
    """The fencing epoch of the lease under which it runs (0 for the in-memory store)."""
    redelivered: bool
    """The notification was handed to handlers before, by a run that then lost the call:
    they may have run, entirely, in part, or (rarely) not at all."""
    journal: ActionJournal | None = field(default=None, compare=False, repr=False)
    """Where the Graph actions of this run's handlers are recorded (see ``_journal``)."""
    steps: list[int] = field(default_factory=lambda: [0], compare=False, repr=False)
    """How many journaled actions the handlers sent so far (a counter shared by them)."""


_current: ContextVar[Attempt | None] = ContextVar("callbot_attempt", default=None)


def current_attempt() -> Attempt | None:
    """The run whose handlers are executing now; ``None`` outside handlers."""
    return _current.get()
