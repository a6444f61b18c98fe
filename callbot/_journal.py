"""Graph actions a re-run handler already completed are not sent again.

When an instance loses a call (killed, or cut off past its lease), the next
owner runs the handlers of the notification in hand again. Their Graph actions
would then repeat: a second ``playPrompt``, a second ``transfer``. With a shared
store, each POST a handler sends is recorded, once Graph answered it, under the
notification's inbox entry and the action's rank within the run (its *step*:
the first POST of the run is step 1, the next step 2, ...). A re-run asks the
journal before each POST: if the same step of an earlier run went to the same
path, the recorded answer is returned and nothing is sent.

It stays narrow on purpose:

* only POSTs (Graph's actions); GET, PATCH and DELETE are idempotent or reads;
  a collection of digits (``call.collect_digits``, ``call.menu``) is recorded
  too, numbered apart: a re-run returns what it returned without its prompts,
  whose number depends on when the caller pressed the keys (``graph._digits``);
* only inside a handler run by a shared store (:func:`callbot.current_attempt`
  carries the journal); the in-memory store has no re-runs;
* a step whose path differs from what was recorded (the handler took another
  branch) is sent, and recorded anew;
* an action whose answer was not recorded (the instance died while Graph
  handled it) is sent again: the journal narrows the window, it cannot close it;
* a run that has lost its call (another instance took it over) sends nothing
  more: its POSTs raise :class:`RunSuperseded` (checked against Redis when the
  run's lease may have run out, e.g. after the process was paused); the
  recording itself is fenced by the run's epoch. An action already on its way
  when the call is taken over still goes out.

Which run is going on (:class:`Attempt`).

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
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import CallbotError

if TYPE_CHECKING:
    from .events import ToneReceived

__all__ = [
    "ActionJournal",
    "Attempt",
    "RunSuperseded",
    "Step",
    "current_attempt",
    "journaled_attempt",
    "step_for",
]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One run of a notification's handlers."""

    call_key: str
    entry: str
    """The notification's id in its call's inbox ('' for the in-memory store)."""
    epoch: int
    """The fencing epoch of the lease under which it runs (0 for the in-memory store): a
    later run of the call has a larger one, even after Redis lost its data (a restart
    without persistence, a failover), as long as Redis' clock does not go back."""
    redelivered: bool
    """The notification was handed to handlers before, by a run that then lost the call:
    they may have run, entirely, in part, or (rarely) not at all."""
    journal: ActionJournal | None = field(default=None, compare=False, repr=False)
    """Where the Graph actions of this run's handlers are recorded (see ``_journal``)."""
    steps: list[int] = field(default_factory=lambda: [0], compare=False, repr=False)
    """How many journaled actions the handlers sent so far (a counter shared by them)."""
    collections: list[int] = field(default_factory=lambda: [0], compare=False, repr=False)
    """How many digit collections the handlers opened so far (journaled apart from actions)."""


_current: ContextVar[Attempt | str | None] = ContextVar("callbot_attempt", default=None)
"""The run of the handlers executing now, or, with the in-memory store, its call's key (its
first run is built only when a handler asks: most never do)."""


def current_attempt() -> Attempt | None:
    """The run whose handlers are executing now (with the in-memory store, always a first
    run: epoch 0, not redelivered); ``None`` outside handlers."""
    running = _current.get()
    if isinstance(running, str):
        return Attempt(running, "", 0, False)
    return running


def journaled_attempt() -> Attempt | None:
    """The run executing now when a store journals its actions (``None`` otherwise): what
    the Graph client and digit collections look at before each action."""
    running = _current.get()
    if isinstance(running, Attempt) and running.journal is not None:
        return running
    return None


class RunSuperseded(CallbotError):
    """This handler's run lost its call to another instance: its actions are not sent."""


class ActionJournal(Protocol):
    """What a store offers to record and recall the Graph actions of handler runs."""

    async def admits(self, attempt: Attempt) -> bool:
        """Whether the run still holds its call (asking the store when its lease may have
        run out); a run that lost it sends no further action."""
        ...

    async def recall(self, attempt: Attempt, step: int) -> dict[str, Any] | None:
        """The outcome recorded for a step of an earlier run of the same notification."""
        ...

    async def record(self, attempt: Attempt, step: int, outcome: dict[str, Any]) -> None:
        """Keep a step's outcome (refused, silently, once the run lost its call)."""
        ...

    async def tones_after(self, attempt: Attempt) -> list[ToneReceived]:
        """The tones accepted for the call after the run's notification, in the order they
        were accepted: what the caller pressed while an earlier run of it went on."""
        ...


@dataclass(frozen=True, slots=True)
class Step:
    """One journaled action of the running handler."""

    attempt: Attempt
    journal: ActionJournal
    number: int
    path: str

    async def recall(self) -> dict[str, Any] | None:
        """The outcome of this step in an earlier run, if it went to the same path."""
        if not self.attempt.redelivered:
            return None  # a first run has nothing recorded
        found = await self.journal.recall(self.attempt, self.number)
        if found is None or found.get("path") != self.path:
            return None
        return found

    async def record(self, status: int, location: str | None, body: Any) -> None:
        outcome = {"path": self.path, "status": status, "location": location, "body": body}
        await self.journal.record(self.attempt, self.number, outcome)


async def step_for(method: str, path: str) -> Step | None:
    """The journal step of a request about to be sent, or ``None`` if it is not journaled.

    Raises :class:`RunSuperseded` when the running handler's run lost its call.
    """
    if method != "POST":
        return None
    attempt = journaled_attempt()
    if attempt is None or attempt.journal is None:
        return None
    if not await attempt.journal.admits(attempt):
        raise RunSuperseded(
            f"the call {attempt.call_key} is run by another instance now; "
            "this handler's action is not sent"
        )
    attempt.steps[0] += 1
    return Step(attempt, attempt.journal, attempt.steps[0], path)
