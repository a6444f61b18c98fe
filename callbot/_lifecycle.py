"""The one owner of every call's life: its phase, its end, when it is forgotten, and
the timers that follow it (the answer-deadline warning and the keep-alive).

The sequencer tells it, in delivery order, each state a call moves into
(:meth:`Lifecycle.enter`); everything else asks it. Nothing else decides that
a call has ended or may be forgotten: those who keep something per call
(operation waits, the sequencer's record, a shared store) subscribe with
:meth:`Lifecycle.when_ended` and :meth:`Lifecycle.when_forgotten`, and a shared store
keeps a call's keys while Graph accepts its keep-alives (:meth:`Lifecycle.when_kept_alive`).

A call's timers live in one heap under one event-loop timer, so a call costs
no task and no timer of its own while it waits.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from ._clock import loop_time
from ._errors import CallEnded
from ._ids import id_key, tenant_key
from ._log import RateLimitedLog, get_logger
from .models import CALL_LIFECYCLE, InvitationParticipantInfo, ResultInfo

__all__ = [
    "LIVE_PHASE",
    "PENDING_LET_GO",
    "CallLife",
    "KeepAliveResult",
    "Lifecycle",
    "phase_of_state",
]

log = get_logger("callbot.lifecycle")

_PHASES: Final = {state: phase for phase, states in enumerate(CALL_LIFECYCLE) for state in states}
LIVE_PHASE: Final = _PHASES["established"]
_ESTABLISHING: Final = _PHASES["establishing"]
"""The phase of an established call (and of the states it moves between)."""
_ANSWER_DEADLINE = 15.0
# How long, and for how many calls, an ended call is remembered after it is forgotten: a
# notification Graph retries or sends late must not start it over (a shared store keeps its
# dedupe as long).
ENDED_MEMORY: Final = 600.0
_MAX_ENDED: Final = 50_000
PENDING_LET_GO: Final = frozenset({"never_established", "unproven", "too_many_pending_calls"})
"""The reasons :meth:`Lifecycle.when_forgotten` gives for a call let go while pending."""
KEEP_ALIVE_LIMIT: Final = 45 * 60.0
"""Graph ends a call it had no keep-alive for within this long (408/8537)."""
KEEP_ALIVE_RETRY: Final = 60.0
"""How soon a keep-alive that failed (Graph unreachable, 5xx) is tried again."""


def phase_of_state(state: str) -> int:
    """A state's lifecycle phase; a state Graph adds later belongs to a live call."""
    return _PHASES.get(state, LIVE_PHASE)


class KeepAliveResult(Enum):
    """What a keep-alive request found."""

    OK = "ok"
    FAILED = "failed"
    """Graph could not be reached or refused for another reason: try again later."""
    GONE = "gone"
    """Graph no longer knows the call (404): no termination will come for it."""


SendKeepAlive = Callable[[str], Awaitable[KeepAliveResult]]


@dataclass(slots=True, eq=False)
class CallLife:
    """One call's life as this process knows it (read it; :class:`Lifecycle` writes it)."""

    call_id: str
    phase: int = -1
    """Index into :data:`callbot.models.CALL_LIFECYCLE`; -1 before any state."""
    state: str | None = None
    ended: bool = False
    result_info: ResultInfo | None = None
    """Why the call ended, when Graph said."""
    graph_forgot: bool = False
    """Graph answered a keep-alive 404: the call ended there, and its termination may still
    be on its way."""
    keep_alive_loop: int = 0
    """The keep-alive loop that may send for the call (0: none); its end stops it, so a timer
    or an answer of an earlier loop sends and starts nothing."""
    transfer_targets: list[InvitationParticipantInfo | None] = field(default_factory=list)
    """The target of each transfer the bot asked Graph for on this call, first asked first
    (less those Graph refused): a failure worded as the one before it is news once another
    transfer was asked since, and names the target of the first whose failure was not told.
    ``None`` for one asked by a release that did not keep targets, and in place of one whose
    failure was told (it is named once; what a call keeps stays small however often it
    transfers)."""
    last_ask: str | None = None
    """What names the transfer asked last while it is counted (``TransferAsked.ask``): a
    refusal naming another ask does not withdraw it."""
    withdrawn: str | None = None
    """An ask withdrawn before it was counted (the store's answer to it was lost, and the
    refusal overtook it): counted never, should it come still."""
    tenant_id: str | None = None
    """The tenant the call was first seen with (its :func:`tenant_key`): the call belongs to it."""
    proven: bool = False
    """Graph accepted a request of the bot's own on the call (its answer, the request placing
    it, a keep-alive, any action): the call is real, not an id a sender invented. Until then it
    is pending, whatever state its notifications claim."""
    key: str = field(init=False)
    """The call id in the form ids are compared in."""

    def __post_init__(self) -> None:
        self.key = id_key(self.call_id)

    @property
    def transfers(self) -> int:
        """How many transfers the bot asked on this call (less those Graph refused)."""
        return len(self.transfer_targets)

    @property
    def keeping_alive(self) -> bool:
        """Whether keep-alives are sent for the call."""
        return self.keep_alive_loop != 0

    @property
    def established(self) -> bool:
        """Established (or in a state a live call moves between), and not ended."""
        return self.phase == LIVE_PHASE and not self.ended

    @property
    def pending(self) -> bool:
        """Not known to be a real call past ringing: no state past ringing yet, or none of the
        bot's own requests on it accepted by Graph (an id a sender may have invented)."""
        return self.phase < _ESTABLISHING or not self.proven

    @property
    def terminated(self) -> bool:
        """Its end was delivered here (or Graph no longer knows it), not only told by another
        instance: what comes after it is a straggler."""
        return self.ended and self.state == "terminated"


_WARN, _KEEP_ALIVE, _FORGET, _FORGET_PENDING = range(4)


class _Tied:
    """The tenants keeping one same number of keys, by the numbers they were given when they
    started keeping: ``first`` is a heap of them, where a number no longer among them is let
    go once on top."""

    __slots__ = ("first", "members")

    def __init__(self) -> None:
        self.members: set[int] = set()
        self.first: list[int] = []

    def add(self, number: int) -> None:
        self.members.add(number)
        heapq.heappush(self.first, number)
        self._compact()

    def discard(self, number: int) -> None:
        self.members.discard(number)
        self._compact()

    def earliest(self) -> int:
        while self.first[0] not in self.members:
            heapq.heappop(self.first)
        return self.first[0]

    def _compact(self) -> None:
        # Rebuilt once mostly numbers let go: each rebuild drops more than it makes.
        if len(self.first) > 2 * len(self.members) + 8:
            self.first = list(self.members)
            heapq.heapify(self.first)


class _ByTenant:
    """Call keys kept oldest first, each with when it was kept and its tenant. Past a bound,
    the tenant keeping the most gives up its oldest (the one adding, when tied; else the one
    that has been keeping calls the longest without a break): a tenant whose token invents
    calls pushes out only its own, and leaves another tenant at least as many as it keeps
    itself (with k such tenants, a share of the bound over k + 1)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._of: dict[str | None, OrderedDict[str, None]] = {}
        # Tenants by how many keys they keep, and the most any keeps (a count moves by one at a
        # time, and so does the most): who gives up a key is found without looking at every tenant.
        self._keeping: dict[int, _Tied] = {}
        self._most = 0
        # Each tenant keeping keys, numbered in the order it started: the first wins a tie.
        self._number: dict[str | None, int] = {}
        self._tenant: dict[int, str | None] = {}
        self._numbers = itertools.count()

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, key: str) -> bool:
        return key in self._kept

    def get(self, key: str) -> tuple[float, str | None] | None:
        return self._kept.get(key)

    def add(self, key: str, when: float, tenant: str | None) -> None:
        self.pop(key)
        self._kept[key] = (when, tenant)
        own = self._of.setdefault(tenant, OrderedDict())
        own[key] = None
        self._counted(tenant, len(own) - 1)

    def pop(self, key: str) -> tuple[float, str | None] | None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            own = self._of[kept[1]]
            del own[key]
            if not own:
                del self._of[kept[1]]  # only tenants keeping calls compete for the most
            self._counted(kept[1], len(own) + 1)
        return kept

    def bind(self, key: str, tenant: str) -> None:
        """Count a key kept for no tenant as ``tenant``'s from now on, in its place in line."""
        kept = self._kept.get(key)
        if kept is None or kept[1] is not None:
            return
        when = kept[0]
        self._kept[key] = (when, tenant)
        unbound = self._of[None]
        del unbound[key]
        if not unbound:
            del self._of[None]
        self._counted(None, len(unbound) + 1)
        own = self._of.setdefault(tenant, OrderedDict())
        # Back in age order by moving only the keys kept after it, not sorting a flood's worth.
        after = list(itertools.takewhile(lambda k: self._kept[k][0] > when, reversed(own)))
        own[key] = None
        for later in reversed(after):
            own.move_to_end(later)
        self._counted(tenant, len(own) - 1)

    def _counted(self, tenant: str | None, was: int) -> None:
        """Move ``tenant``, which kept ``was`` keys, among the tenants keeping as many as now."""
        own = self._of.get(tenant)
        now = len(own) if own is not None else 0
        keeping = self._keeping
        if was:
            number = self._number[tenant]
            tied = keeping[was]
            if len(tied.members) == 1:
                del keeping[was]
                if self._most == was:
                    self._most = now  # a count moves by one: the most moves with it
                if now and now not in keeping:
                    keeping[now] = tied  # alone before and after: its group moves with it
                    return
            else:
                tied.discard(number)
        else:
            number = next(self._numbers)
            self._number[tenant] = number
            self._tenant[number] = tenant
        if not now:
            del self._number[tenant], self._tenant[number]
            return
        if now not in keeping:
            keeping[now] = _Tied()
        keeping[now].add(number)
        if now > self._most:
            self._most = now

    def over(self, adding: str | None) -> str | None:
        """Past the bound, the key to give up as ``adding``'s was kept; else ``None``."""
        if len(self._kept) <= self.limit:
            return None
        own = self._of.get(adding)
        if own is None or len(own) != self._most:
            own = self._of[self._tenant[self._keeping[self._most].earliest()]]
        return next(iter(own))

    def expire(self, before: float) -> None:
        """Give up every key kept before ``before``."""
        while self._kept:
            key, (when, _) = next(iter(self._kept.items()))
            if when >= before:
                return
            self.pop(key)


class Lifecycle:
    """Every call's :class:`CallLife`, and the decisions about it.

    ``send_keep_alive`` is called with a call id when its keep-alive is due
    (``None``: no keep-alives). Times are seconds; ``pending_ttl`` and
    ``max_pending`` bound *pending* calls (:attr:`CallLife.pending`: never seen past
    ringing the bot, or never proven real by Graph accepting a request of the bot's own on
    it: ids a sender may have invented), which are forgotten after that long, oldest first
    past the bound. A call that reached ``established`` unproven (after a restart of a bot
    without a shared store) is sent a keep-alive when its time is up instead: accepted, it
    is proven and kept.
    """

    def __init__(
        self,
        *,
        termination_grace: float,
        answer_warning_after: float = 10.0,
        keep_alive_interval: float | None = None,
        send_keep_alive: SendKeepAlive | None = None,
        pending_ttl: float = 300.0,
        max_pending: int = 2_000,
    ) -> None:
        self._grace = termination_grace
        self._warn_after = answer_warning_after
        self._keep_alive_interval = keep_alive_interval if send_keep_alive is not None else None
        self._send_keep_alive = send_keep_alive
        self._pending_ttl = pending_ttl
        self._lives: dict[str, CallLife] = {}
        # Pending calls, with the tenant first seen with each.
        self._pending = _ByTenant(max_pending)
        # Calls forgotten after their end, remembered ENDED_MEMORY with their tenant.
        self._ended = _ByTenant(_MAX_ENDED)
        # Calls of a tenant forgotten before their end (a pending call let go): kept apart,
        # so that invented calls never push an ended one out of its memory.
        self._bound = _ByTenant(_MAX_ENDED)
        self._heap: list[tuple[float, int, int, CallLife]] = []
        self._heap_kept = 0  # timers left by the last sweep of forgotten calls' timers
        self._order = itertools.count(1)  # 0 is no timer's: a call kept alive by none
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._ended_listeners: list[Callable[[str, ResultInfo | None], None]] = []
        # Per call: who waits for it to be established (Call.wait_until_established).
        self._established_waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Calls a shared store told established (any instance may run them), until they end:
        # a wait started after that returns at once, as for a call established here.
        self._established_elsewhere = _ByTenant(_MAX_ENDED)
        self._forgotten_listeners: list[Callable[[str, str], None]] = []
        self._kept_alive_listeners: list[Callable[[str], None]] = []
        self._delivering: Callable[[str], bool] = lambda call_key: False
        self._kept_here: Callable[[str], bool] = lambda call_key: True
        self._keeper_spread = 0.0
        # Lines of each call: a sender inventing 200 calls a request decides how many.
        self._lines = RateLimitedLog(log)

    # -- who is told -------------------------------------------------------------------

    def when_ended(self, listener: Callable[[str, ResultInfo | None], None]) -> None:
        """Call ``listener(call_key, result_info)`` once, at the moment a call ends."""
        self._ended_listeners.append(listener)

    def when_forgotten(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(call_key, reason)`` when a call is forgotten: ``grace_over``
        (it ended a while ago), ``gone`` (Graph no longer knows it),
        ``never_established``, ``unproven`` (past ringing, but no request of the bot's own on
        it was ever accepted) or ``too_many_pending_calls``."""
        self._forgotten_listeners.append(listener)

    def when_kept_alive(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(call_key)`` each time Graph accepts a keep-alive of a call: it goes
        on, however long since its last notification."""
        self._kept_alive_listeners.append(listener)

    def keep_while(self, delivering: Callable[[str], bool]) -> None:
        """A call whose end another instance told is not forgotten while
        ``delivering(call_key)``: this process still delivers what came before the end."""
        self._delivering = delivering

    def keep_alive_where(self, kept_here: Callable[[str], bool], *, spread: float = 0.0) -> None:
        """Send a call's keep-alives only while ``kept_here(call_key)``: a shared store has one
        instance keep each call alive (by default, every established call is kept alive here).
        Tell :meth:`keeper_changed` when the answer for a call changes; a call taken up is sent
        its first keep-alive at a random moment within ``spread`` seconds."""
        self._kept_here = kept_here
        self._keeper_spread = spread

    def keeper_changed(self, call_key: str) -> None:
        """Whether this process keeps the call alive changed (see :meth:`keep_alive_where`).
        Kept here from now on, an established call is sent a keep-alive soon, not an interval
        later: the last keeper's may be an interval old, and it may have stopped before sending
        the next. Soon is spread out: an instance taking up the calls of one that stopped would
        send thousands at once. A call kept alive here already keeps its loop (told again, or
        its proving keep-alive on its way): it is sent no other."""
        life = self._lives.get(call_key)
        if life is None:
            return
        if not self._kept_here(call_key):
            life.keep_alive_loop = 0
        elif life.established and not life.keeping_alive and self._keep_alive_interval is not None:
            delay = self._keeper_spread * random.random()
            life.keep_alive_loop = self._schedule(delay, _KEEP_ALIVE, life)

    # -- reading ------------------------------------------------------------------------

    def get(self, call_id: str) -> CallLife | None:
        """A known call's life (whatever the id's case or dashes)."""
        return self._lives.get(id_key(call_id))

    def __len__(self) -> int:
        return len(self._lives)

    def named(self, call_id: str) -> str:
        """The id a call's log lines carry: the form it was first seen in, whatever form a
        later notification wrote it in (so one grep finds all of a call's lines)."""
        life = self._lives.get(id_key(call_id))
        return life.call_id if life is not None else call_id

    def knows(self, call_id: str) -> bool:
        """Whether the call is known here: going on, pending, or forgotten within
        :data:`ENDED_MEMORY` (ended, let go while pending, or let go while still its
        tenant's)."""
        key = id_key(call_id)
        return (
            key in self._lives
            or self._recall(self._ended, key) is not None
            or self._recall(self._bound, key) is not None
        )

    def belongs_elsewhere(self, call_id: str, tenant_id: str | None) -> bool:
        """Whether a known call (or one that ended within :data:`ENDED_MEMORY`) belongs to
        another tenant than ``tenant_id``: a token proves its tenant, not that the call named
        is that tenant's."""
        return self.key_belongs_elsewhere(id_key(call_id), tenant_id)

    def key_belongs_elsewhere(self, key: str, tenant_id: str | None) -> bool:
        """:meth:`belongs_elsewhere` of the call whose :func:`id_key` is ``key``."""
        life = self._lives.get(key)
        if life is not None:
            bound = life.tenant_id
        else:
            # Forgotten, but still its tenant's (as long as a shared store would know).
            forgotten = self._recall(self._ended, key) or self._recall(self._bound, key)
            bound = forgotten[1] if forgotten is not None else None
        return (
            bound is not None
            and tenant_id is not None
            and bound != tenant_id  # the usual token writes its tenant as the key is
            and bound != tenant_key(tenant_id)
        )

    def active(self) -> Iterator[CallLife]:
        """The calls that reached a state and have not ended."""
        return (life for life in self._lives.values() if life.phase >= 0 and not life.ended)

    # -- what the sequencer tells -------------------------------------------------------

    def life(self, call_id: str, tenant_id: str | None = None) -> CallLife:
        """The life of a call, known from now on if it was not (a call with no state yet,
        or, if it ended within :data:`ENDED_MEMORY`, an ended one again); a new call is
        ``tenant_id``'s, unless a forgotten one of that id is still bound to its tenant."""
        return self._life(call_id, tenant_id, pending=True)

    def _life(self, call_id: str, tenant_id: str | None, *, pending: bool) -> CallLife:
        """:meth:`life`; a new call counts against the pending bound only if ``pending``."""
        key = id_key(call_id)
        life = self._lives.get(key)
        ended = self._ended_lately(key) if life is None else None
        if ended is not None:
            # Still its tenant's: another tenant's token cannot take the ended call over.
            life = self._lives[key] = CallLife(
                call_id,
                phase=_PHASES["terminated"],
                state="terminated",
                ended=True,
                tenant_id=ended[1],
            )
            self._schedule(self._grace, _FORGET, life)
        elif life is None:
            bound = self._bound.pop(key)
            if bound is not None and bound[1] is not None:
                tenant_id = bound[1]
            elif tenant_id is not None:
                tenant_id = tenant_key(tenant_id)
            life = self._lives[key] = CallLife(call_id, tenant_id=tenant_id)
            if pending:
                self._pending.add(key, loop_time(), tenant_id)
                self._schedule(self._pending_ttl, _FORGET_PENDING, life)
                while (let_go := self._pending.over(tenant_id)) is not None:
                    self._forget(let_go, "too_many_pending_calls")
        return life

    def prove(self, call_id: str) -> None:
        """Graph accepted a request of the bot's own on the call: it is real, and no longer
        pending once past ringing (see :attr:`CallLife.proven`)."""
        life = self._lives.get(id_key(call_id))
        if life is None or life.proven:
            return
        life.proven = True
        if not life.pending:
            self._pending.pop(life.key)

    def transfer_asked(
        self,
        call_id: str,
        target: InvitationParticipantInfo | None = None,
        ask: str | None = None,
    ) -> None:
        """The bot asked Graph to transfer the call to ``target`` (its outcome, even worded
        as the last one, is news); ``ask`` names the ask."""
        life = self._lives.get(id_key(call_id))
        if life is not None and (ask is None or ask != life.withdrawn):
            life.transfer_targets.append(target)
            life.last_ask = ask

    def transfer_refused(self, call_id: str, ask: str | None = None) -> bool:
        """Graph refused the transfer the bot asked last, or the bot withdrew it unsent (the
        ask ``ask``, when named): no news of it will come, so it is no longer counted, nor
        its target named. ``False`` when no count changed: none counted, or the last is
        another ask (``ask`` is then never counted: a store may take it after the refusal)."""
        life = self._lives.get(id_key(call_id))
        if life is None:
            return False
        if ask is not None and ask != life.last_ask:
            life.withdrawn = ask
            return False
        if not life.transfer_targets:
            return False
        life.transfer_targets.pop()
        life.last_ask = None  # a refusal follows its own ask: the one before is not refused
        return True

    @staticmethod
    def transfer_failed(life: CallLife, index: int) -> InvitationParticipantInfo | None:
        """The target of the call's ``index``-th transfer (from 0), whose failure is told
        now: named this once, then no longer kept (still counted)."""
        target, life.transfer_targets[index] = life.transfer_targets[index], None
        return target

    def bind(self, life: CallLife, tenant_id: str) -> None:
        """The call is ``tenant_id``'s from now on, if it was nobody's yet (a call first known
        without a tenant: taken over from a shared store, ended by another instance)."""
        if life.tenant_id is not None:
            return
        life.tenant_id = tenant_key(tenant_id)
        self._pending.bind(life.key, life.tenant_id)

    def enter(
        self, life: CallLife, state: str, result_info: ResultInfo | None = None
    ) -> tuple[bool, str | None]:
        """The call is now in ``state``: ``(True, previous)`` on a transition,
        ``(False, state)`` when it was already in it (an update of the state).

        ``result_info`` says why, for ``terminated``."""
        previous = life.state
        if state == previous:
            return False, previous
        life.phase = max(life.phase, phase_of_state(state))
        life.state = state
        if not life.pending:
            self._pending.pop(life.key)
        if state == "incoming" and self._warn_after > 0:
            self._schedule(self._warn_after, _WARN, life)
        elif life.phase == LIVE_PHASE and not life.keeping_alive:
            self._start_keep_alive(life)
        elif state == "terminated":
            self.end(life.call_id, result_info)
        if self._established_waiters and life.established:
            self._wake(life.key, None)
        return True, previous

    def live_by_tone(self, life: CallLife) -> None:
        """The call, of which no state was delivered here, is live: Graph sends tones only on
        an established call (a process started after the call did knows it by them alone).
        It is kept alive, and no longer pending once proven; its state stays unknown, so a
        state delivered later is a transition still."""
        if life.ended or life.phase >= LIVE_PHASE:
            return
        life.phase = LIVE_PHASE
        if not life.pending:
            self._pending.pop(life.key)
        if not life.keeping_alive:
            self._start_keep_alive(life)

    def told_established(self, call_id: str, tenant_id: str | None) -> None:
        """The call's ``established`` was accepted but is not delivered here (another
        instance runs the call, or this one refused it while draining): who waits for it here
        goes on (whoever runs the call delivers it in order), now or later."""
        key = id_key(call_id)
        life = self._lives.get(key)
        if (life is not None and life.ended) or self._ended_lately(key) is not None:
            return  # a copy sent late: the call's end was told first
        if life is not None and life.proven:
            self._pending.pop(key)  # past ringing, wherever it runs (unproven: still pending)
        tenant = tenant_key(tenant_id) if tenant_id is not None else None
        self._established_elsewhere.add(key, loop_time(), tenant)
        while (let_go := self._established_elsewhere.over(tenant)) is not None:
            self._established_elsewhere.pop(let_go)
        if self._established_waiters:
            self._wake(key, None)

    async def until_established(self, call_id: str, timeout: float | None = None) -> None:
        """Return once the call is established (at once if it is). Raises
        :class:`~callbot.CallEnded` if it ends first (or has ended), ``TimeoutError`` after
        ``timeout`` seconds."""
        key = id_key(call_id)
        life = self._lives.get(key)
        if life is not None and life.established:
            return
        if (life is not None and life.ended) or self._ended_lately(key) is not None:
            raise _never_established(call_id, life.result_info if life is not None else None)
        if key in self._established_elsewhere:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._established_waiters.setdefault(key, []).append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        finally:
            waiting = self._established_waiters.get(key)
            if waiting is not None and waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del self._established_waiters[key]

    def _wake(self, key: str, ended: CallEnded | None) -> None:
        for waiter in self._established_waiters.pop(key, ()):
            if waiter.done():
                continue
            if ended is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(ended)

    def end(self, call_id: str, result_info: ResultInfo | None) -> None:
        """The call ended: its termination was delivered here, or accepted by another
        instance (its ``state`` stays the last one delivered here)."""
        life = self.life(call_id)
        if life.ended:
            return
        life.ended = True
        life.result_info = result_info if result_info is not None else life.result_info
        life.keep_alive_loop = 0
        self._pending.pop(life.key)
        self._established_elsewhere.pop(life.key)
        if self._established_waiters:
            self._wake(life.key, _never_established(life.call_id, life.result_info))
        for listener in self._ended_listeners:
            try:
                listener(life.key, life.result_info)
            except Exception:
                log.exception("call_end_listener_failed", call_id=life.call_id)
        self._schedule(self._grace, _FORGET, life)

    def gone(self, call_id: str) -> None:
        """Graph no longer knows the call: it has ended. Graph says so as soon as the call
        ends, so its termination may still be on its way: delivered if it comes within the
        grace, after which none will, and the call is forgotten as ``gone``."""
        life = self.life(call_id)
        life.graph_forgot = True
        self.end(call_id, None)

    def adopt(
        self, call_id: str, *, phase: int, state: str | None, ended: bool, proven: bool = False
    ) -> CallLife:
        """Continue a call from the state a shared store holds (after a restart, a takeover,
        or a failover that lost later checkpoints): that state, not what this process saw
        before, is where the call's next run starts, even when it is an earlier one. A proof
        known here or stored (``proven``) stays: Graph's acceptance is never taken back."""
        # One stored proven past ringing is real: never counted against the pending bound.
        life = self._life(call_id, None, pending=phase < _ESTABLISHING or not proven)
        life.phase = phase
        life.state = state
        life.proven = life.proven or proven
        if not life.pending:
            self._pending.pop(life.key)
        if ended:
            self.end(call_id, None)
            return life
        if life.ended:
            # The run goes through the call's end again, and the end is told again then.
            life.ended = False
            life.result_info = None
            life.graph_forgot = False
        if life.established and not life.keeping_alive:
            self._start_keep_alive(life)  # unless another instance keeps it alive
        elif not life.established:
            life.keep_alive_loop = 0
        if self._established_waiters and life.established:
            self._wake(life.key, None)
        return life

    def start_over(self, call_key: str) -> None:
        """Continue a call from no state, whatever this process saw of it before (its end
        included): a shared store holds nothing of it, and its run starts from there."""
        self._ended.pop(call_key)
        self._bound.pop(call_key)
        life = self._lives.get(call_key)
        if life is not None:
            self.adopt(life.call_id, phase=-1, state=None, ended=False)

    # -- running --------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every timer and keep-alive in flight."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()
        self._heap_kept = 0
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for life in self._lives.values():
            life.keep_alive_loop = 0

    # -- internals ------------------------------------------------------------------------

    def _forget(self, key: str, why: str) -> None:
        life = self._lives.pop(key, None)
        self._pending.pop(key)
        if life is None:
            return
        life.keep_alive_loop = 0
        if life.terminated:
            self._remember(self._ended, key, life.tenant_id)
        elif life.tenant_id is not None or why in PENDING_LET_GO:
            # Its end, if told, is still to be delivered: a new life of it must take it. Let
            # go while pending, it is known as let go here, whosever it is (see knows).
            self._remember(self._bound, key, life.tenant_id)
        if why != "grace_over":
            self._lines.info("call_forgotten", call_id=life.call_id, reason=why)
        for listener in self._forgotten_listeners:
            try:
                listener(key, why)
            except Exception:
                log.exception("call_forget_listener_failed", call_id=life.call_id)

    @staticmethod
    def _remember(memory: _ByTenant, key: str, tenant_id: str | None) -> None:
        now = loop_time()
        memory.add(key, now, tenant_id)
        memory.expire(now - ENDED_MEMORY)
        while (let_go := memory.over(tenant_id)) is not None:
            memory.pop(let_go)

    @staticmethod
    def _recall(memory: _ByTenant, key: str) -> tuple[float, str | None] | None:
        """When the call was forgotten and its tenant, if within :data:`ENDED_MEMORY`."""
        kept = memory.get(key)
        if kept is None:
            return None
        if kept[0] < loop_time() - ENDED_MEMORY:
            memory.pop(key)
            return None
        return kept

    def _ended_lately(self, key: str) -> tuple[float, str | None] | None:
        """When the call ended and its tenant, if it ended within :data:`ENDED_MEMORY`."""
        return self._recall(self._ended, key)

    def _start_keep_alive(self, life: CallLife, *, after_failure: bool = False) -> None:
        """The one way a keep-alive is scheduled: entering a live state, a takeover, and
        the answer to the last one all come here."""
        if self._keep_alive_interval is None or life.ended:
            return  # an ended call is never kept alive, whatever delivered a state late
        # Another instance keeps it alive; the one proving or ending it, if it failed, is
        # tried again wherever it was sent (see _FORGET_PENDING).
        if not self._kept_here(life.key) and not (after_failure and life.pending):
            life.keep_alive_loop = 0
            return
        interval = self._keep_alive_interval
        # Graph ends a call with no keep-alive for 45 minutes: a failed one is tried again
        # soon, not a whole interval later (two failures at 15 minutes would reach it).
        delay = min(interval, KEEP_ALIVE_RETRY) if after_failure else interval
        life.keep_alive_loop = self._schedule(delay, _KEEP_ALIVE, life)

    def _schedule(self, delay: float, kind: int, life: CallLife) -> int:
        """Run ``kind`` for ``life`` in ``delay`` seconds; return the timer's number."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        number = next(self._order)
        heapq.heappush(self._heap, (due, number, kind, life))
        if len(self._heap) > 2 * self._heap_kept + 1024:
            # Timers of forgotten calls would keep them in memory until due: drop them, once
            # the heap has doubled since the last time, so that a timer costs O(1) on average.
            lives = self._lives
            self._heap = [entry for entry in self._heap if lives.get(entry[3].key) is entry[3]]
            heapq.heapify(self._heap)
            self._heap_kept = len(self._heap)
        if self._timer is None or due < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = due
            self._timer = loop.call_at(due, self._run_due)
        return number

    def _run_due(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._heap and self._heap[0][0] <= now:
            _, number, kind, life = heapq.heappop(self._heap)
            try:
                self._due(kind, life, number)
            except Exception:
                log.exception("call_timer_failed", call_id=life.call_id)
        if self._heap and self._timer is None:
            self._timer_at = self._heap[0][0]
            self._timer = loop.call_at(self._timer_at, self._run_due)

    def _due(self, kind: int, life: CallLife, number: int) -> None:
        # A timer whose call was forgotten, or has moved on, does nothing.
        if self._lives.get(life.key) is not life:
            return
        if kind == _FORGET:
            if not life.ended:
                return  # a run took the call back from its end
            if not life.terminated and self._delivering(life.key):
                # Its end was told, and the states before it are still being delivered here.
                self._schedule(self._grace, _FORGET, life)
            elif life.graph_forgot and not life.terminated:
                life.state = "terminated"  # as good as delivered: none came, none will
                self._forget(life.key, "gone")
            else:
                self._forget(life.key, "grace_over")
        elif kind == _FORGET_PENDING:
            if life.key in self._established_elsewhere and life.proven:
                # Established where another instance runs it: kept until told its end.
                self._pending.pop(life.key)
            elif life.ended or not life.pending:
                pass
            elif life.phase < _ESTABLISHING:
                self._forget(life.key, "never_established")
            elif life.established and self._keep_alive_interval is not None:
                # Established unproven (the bot restarted mid-call, or an invented id): a
                # keep-alive now proves it (accepted) or ends it (404); it stays pending till.
                # Sent wherever the call is known, kept alive here or not: each instance
                # decides for itself whether to let it go.
                life.keep_alive_loop = self._schedule(0.0, _KEEP_ALIVE, life)
            else:
                self._forget(life.key, "unproven")
        elif kind == _WARN:
            if life.state == "incoming" and not life.ended:
                self._lines.warning(
                    "incoming_call_not_answered",
                    call_id=life.call_id,
                    waited=self._warn_after,
                    deadline=_ANSWER_DEADLINE,
                    detail="answer, reject or redirect within 15 seconds or Graph drops the call",
                )
        elif kind == _KEEP_ALIVE and life.keep_alive_loop == number:
            task = asyncio.get_running_loop().create_task(
                self._keep_alive(life, number), name=f"callbot-keepalive-{life.key}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _keep_alive(self, life: CallLife, number: int) -> None:
        assert self._send_keep_alive is not None
        try:
            result = await self._send_keep_alive(life.call_id)
        except Exception as exc:
            self._lines.warning("keep_alive_failed", call_id=life.call_id, error=repr(exc))
            result = KeepAliveResult.FAILED
        if result is KeepAliveResult.GONE:
            # Said even when the request has ended the call already (Graph no longer has it).
            self._lines.info("keep_alive_call_gone", call_id=life.call_id)
        if self._lives.get(life.key) is not life or life.keep_alive_loop != number:
            return  # the call ended (or was taken back since, with a loop of its own)
        if result is KeepAliveResult.GONE:
            self.gone(life.call_id)
            return
        if result is KeepAliveResult.OK:
            for listener in self._kept_alive_listeners:
                try:
                    listener(life.key)
                except Exception:
                    log.exception("call_keep_alive_listener_failed", call_id=life.call_id)
        self._start_keep_alive(life, after_failure=result is KeepAliveResult.FAILED)


def _never_established(call_id: str, result_info: ResultInfo | None) -> CallEnded:
    """What a wait for a call to be established raises when it ended first (the callee did
    not pick up, declined, was busy, or the call was hung up): ``result_info`` says why."""
    why = ""
    if result_info is not None:
        why = f" ({result_info.code}/{result_info.subcode}: {result_info.message or ''})"
    ended = CallEnded(404, "callEnded", f"call {call_id} ended{why}: it will not be established")
    ended.result_info = result_info
    return ended
