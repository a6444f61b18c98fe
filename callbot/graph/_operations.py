"""Awaitable Graph operations, and matching Graph's operation notifications to them.

An action such as ``playPrompt`` answers with an operation (``running``); Graph
later posts its outcome to the callback. The registry pairs each outcome with
the :class:`Operation` that started it, by operation id (compared with
:func:`callbot._ids.id_key`), and only within the call the notification names:
an outcome posted under another call is ignored. An outcome that arrives before
the action's own response is kept briefly, and settles the operation only if
the response names the same id. ``clientContext`` alone matches only an
operation whose id Graph never named.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
from pydantic import ValidationError

from .. import models
from .._clock import loop_time
from .._errors import OperationFailed
from .._ids import id_key
from .._log import RateLimitedLog
from .._sequencing import json_size
from ..events import OperationUpdated
from ..models._common import canonical_operation_status
from ..models._operations import is_settled

__all__ = ["RECENT_OUTCOME_BYTES", "Operation", "OperationRegistry"]

log = structlog.get_logger("callbot.graph")

OpT = TypeVar("OpT", bound=models.CommsOperation)

RECENT_OUTCOME_BYTES = 1024 * 1024
"""What the outcomes kept while no operation matches them take at most, in bytes of JSON
as Graph sent them (the newest is kept whatever its size): Graph's take well under 1 KB, so
the count (``recent_limit``) bounds them first; a message megabytes long does not."""


class Operation(Generic[OpT]):
    """A Graph operation started by a call action (a prompt, a recording, a mute, ...).

    ``await op.wait(timeout=...)`` (or simply ``await op``) returns the final typed
    operation once Graph reports ``completed``, raises
    :class:`~callbot.OperationFailed` when it reports ``failed`` or the call ends
    first, and ``TimeoutError`` after ``timeout`` seconds (the operation keeps
    running; wait again if you like).
    """

    def __init__(
        self,
        *,
        call_id: str,
        action: str,
        client_context: str,
        kind: type[OpT],
        context_generated: bool = False,
    ) -> None:
        self.call_id = call_id
        """The call the operation belongs to."""
        self.action = action
        """The Graph action that started it (``playPrompt``, ``recordResponse``, ...)."""
        self.client_context = client_context
        """The ``clientContext`` sent with the action (generated when not given)."""
        self.context_generated = context_generated
        """Whether callbot generated ``client_context``: a random value no one else knows."""
        self.id: str | None = None
        """Graph's operation id, known once the action has answered."""
        self.status: str = "notStarted"
        """``notStarted``, ``running``, ``completed`` or ``failed`` (lower-case first letter)."""
        self.result: OpT | None = None
        """The latest typed operation Graph sent (the final one once done)."""
        self._kind = kind
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._error: OperationFailed | None = None

    def __repr__(self) -> str:
        return (
            f"<Operation {self.action} id={self.id!r} status={self.status!r} "
            f"call_id={self.call_id!r}>"
        )

    @property
    def call_key(self) -> str:
        """The call id in its compared form."""
        return id_key(self.call_id)

    @property
    def done(self) -> bool:
        """Whether the outcome is known (completed, failed, or the call ended)."""
        return self._future.done()

    @property
    def failed(self) -> bool:
        """Whether the operation failed (or the call ended before it completed)."""
        return self._error is not None

    @property
    def result_info(self) -> models.ResultInfo | None:
        """The operation's ``resultInfo`` (or the call's, when the call ended first)."""
        if self._error is not None:
            info: Any = self._error.result_info
            return info if isinstance(info, models.ResultInfo) else None
        return self.result.result_info if self.result is not None else None

    async def wait(self, timeout: float | None = None) -> OpT:
        """Wait for the outcome: the final operation, or :class:`~callbot.OperationFailed`."""
        if not self._future.done():
            # shield: a timed-out wait must not cancel the operation's outcome
            await asyncio.wait_for(asyncio.shield(self._future), timeout)
        if self._error is not None:
            raise self._error
        assert self.result is not None
        return self.result

    def __await__(self) -> Generator[Any, None, OpT]:
        return self.wait().__await__()

    # -- driven by the registry ----------------------------------------------------

    def _coerce(self, operation: models.CommsOperation) -> OpT:
        if isinstance(operation, self._kind):
            return operation
        try:
            return self._kind.model_validate(operation.model_dump(by_alias=True, exclude_none=True))
        except ValidationError:
            # keep what Graph sent; its type just is not the one the action promised
            return operation  # type: ignore[return-value]

    def _update(self, operation: models.CommsOperation, status: str | None) -> None:
        if self.done:
            return
        if operation.id and self.id is None:
            self.id = operation.id
        elif not operation.id and self.id is not None:
            # An outcome naming no id (an invitation's) is still this operation's.
            operation = operation.model_copy(update={"id": self.id})
        self.result = self._coerce(operation)
        if status:
            # Graph has written "Running": a known status keeps its documented spelling.
            self.status = canonical_operation_status(status)

    def _finish(
        self,
        operation: models.CommsOperation,
        status: str,
        result_info: models.ResultInfo | None,
    ) -> None:
        if self.done:
            return
        self._update(operation, status)
        if self.status == "failed":
            self._error = OperationFailed(self.result, result_info or operation.result_info)
        self._future.set_result(None)

    def _abort(self, result_info: Any, *, call_ended: bool) -> None:
        if self.done:
            return
        self.status = "failed"
        self._error = OperationFailed(self.result, result_info, call_ended=call_ended)
        self._future.set_result(None)


@dataclass(frozen=True, slots=True)
class _Outcome:
    operation: models.CommsOperation
    status: str
    result_info: models.ResultInfo | None
    at: float
    operation_id: str | None
    """The operation id the notification named, if any."""
    size: int = 0
    """What the notification took, in bytes of JSON (counted while kept in ``_recent``)."""


@dataclass(slots=True)
class _Ending:
    """Why a call with operations still awaited ended, and whether their grace has passed."""

    why: Any
    over: bool = False


class OperationRegistry:
    """Pending operations, matched to their notifications.

    An outcome settles an operation when it names the operation's call and id. Until
    the action's response names the id, an outcome that overtook the response is
    kept, and settles the operation only if the response then names the same id;
    ``clientContext`` alone matches only an operation whose id Graph never named, or, for
    an outcome that names no id, one whose context callbot generated (no one else knows it).
    ``recent_limit``/``recent_ttl``/``recent_bytes`` bound the outcomes kept while no
    operation matches them yet. An operation of a call that ended fails ``end_grace``
    seconds later, once Graph answered its action, unless its outcome came meanwhile.
    """

    def __init__(
        self,
        *,
        recent_limit: int = 512,
        recent_ttl: float = 120.0,
        recent_bytes: int = RECENT_OUTCOME_BYTES,
        end_grace: float = 0.0,
    ) -> None:
        # Lines of outcomes that settle nothing: a sender posting 200 a request decides how many.
        self._lines = RateLimitedLog(log)
        # Operation ids are only unique per call: operation id key -> call key -> operation.
        self._by_id: dict[str, dict[str, Operation[Any]]] = {}
        self._by_context: dict[tuple[str, str], Operation[Any]] = {}
        self._by_call: dict[str, set[Operation[Any]]] = {}
        self._unanswered: set[Operation[Any]] = set()
        self._early_by_context: dict[Operation[Any], _Outcome] = {}
        # Operations of ended calls, until their outcome or their grace's end (see fail_call).
        self._ended: dict[Operation[Any], _Ending] = {}
        self._end_grace = end_grace
        self._recent: OrderedDict[tuple[str, str], _Outcome] = OrderedDict()
        self._recent_limit = recent_limit
        self._recent_ttl = recent_ttl
        self._recent_bytes = recent_bytes
        self._recent_size = 0
        self.counts: Counter[tuple[str, str]] = Counter()
        """(outcome, reason) -> count of operation notifications ignored, for metrics."""

    @property
    def pending(self) -> int:
        """How many operations are awaiting their outcome."""
        return sum(len(ops) for ops in self._by_call.values()) + len(self._ended)

    def start(self, op: Operation[Any]) -> None:
        """Track ``op`` before its action is sent, so an outcome overtaking the response is kept."""
        self._by_call.setdefault(op.call_key, set()).add(op)
        self._by_context[(op.call_key, op.client_context)] = op
        self._unanswered.add(op)

    def abandon(self, op: Operation[Any]) -> None:
        """Forget ``op``: its action failed, so no outcome will come."""
        self._forget(op)

    def accepted(self, op: Operation[Any], body: Any, location: str | None = None) -> None:
        """Record the action's response (the operation as it stands) and index it by id."""
        self._unanswered.discard(op)
        early_by_context = self._early_by_context.pop(op, None)
        ending = self._ended.get(op)
        if op.done:
            # closed while the action was on its way
            self._forget(op)
            return
        operation: models.CommsOperation | None = None
        if isinstance(body, Mapping) and body:
            try:
                operation = models.parse_operation(body)
            except ValidationError as exc:
                log.warning(
                    "graph_operation_unreadable",
                    call_id=op.call_id,
                    action=op.action,
                    error=str(exc),
                )
        op_id = operation.id if operation is not None and operation.id else None
        if op_id is None and location:
            # no body: the Location header still names the operation
            op_id = location.rstrip("/").rsplit("/", 1)[-1] or None
        if operation is None:
            operation = op._kind(id=op_id, client_context=op.client_context, status="running")
        status = operation.status or "running"
        if op_id is not None:
            op.id = op_id
            calls = self._by_id.setdefault(id_key(op_id), {})
            holder = calls.get(op.call_key)
            # cancelMediaProcessing answers with the id of the operation it cancels: that
            # operation keeps its place (its outcome is still to come), the cancel does not.
            if holder is None or holder.done:
                calls[op.call_key] = op
        if is_settled(status):
            op._finish(operation, status, operation.result_info)
            self._forget(op)
            return
        op._update(operation, status)
        # An outcome that overtook this response settles it only under the id it names, or
        # naming none, under a context callbot generated (see _match).
        early = early_by_context
        if op_id is not None:
            early = self._recent.pop(_id_key(op.call_key, op_id), None)
            if early is not None:
                self._recent_size -= early.size
            if early is None and early_by_context is not None:
                if early_by_context.operation_id:
                    # Kept with the operation too: other calls' outcomes push it out of _recent.
                    if id_key(early_by_context.operation_id) == id_key(op_id):
                        early = early_by_context
                elif op.context_generated:
                    early = early_by_context
                else:
                    self._unproven(op, op.client_context)
        if early is not None:
            self._settle(op, early)
        elif ending is not None and ending.over:
            self._fail_ended(op, ending)  # its call's grace passed while the action was on its way

    def on_event(self, event: OperationUpdated) -> bool:
        """Apply an operation notification; ``True`` when it matched a tracked operation."""
        op = self._match(event)
        status = event.status or event.operation.status or ""
        terminal = is_settled(status)
        if op is None:
            if terminal:
                self._remember(event, status)
            return False
        if op in self._unanswered:
            # Matched by context before the response named the id: kept, not applied.
            if terminal:
                self._remember(event, status)
                self._early_by_context[op] = self._outcome(event, status)
            return True
        if terminal:
            op._finish(event.operation, status, event.result_info)
            self._forget(op)
            log.debug(
                "graph_operation_done",
                call_id=op.call_id,
                action=op.action,
                operation_id=op.id,
                status=op.status,
            )
        else:
            op._update(event.operation, status)
        return True

    def fail_call(self, call_key: str, result_info: Any, *, call_ended: bool = True) -> int:
        """Fail every pending operation of a call that ended; returns how many.

        Each fails ``end_grace`` seconds after the end, and not before Graph answered its
        action, unless its outcome is accepted first: Graph posts an outcome and the call's
        end as requests of their own, which may arrive swapped, so a recording that
        completed as the caller hung up keeps its location."""
        ops = self._by_call.pop(call_key, set())
        if not call_ended:
            for op in ops:
                self._unindex(op)
                op._abort(result_info, call_ended=False)
            return len(ops)
        if not ops:
            return 0  # the usual end: nothing awaited, no timer
        ending = _Ending(result_info)
        for op in ops:
            self._ended[op] = ending  # still indexed: an outcome finds it
        if self._end_grace > 0:
            asyncio.get_running_loop().call_later(self._end_grace, self._grace_over, ending)
        else:
            self._grace_over(ending)
        return len(ops)

    def fail_all(self, result_info: Any = None) -> int:
        """Fail every pending operation (shutdown: their calls go on; those of calls that
        ended fail as ended, their grace cut short)."""
        ended = list(self._ended.items())
        for op, ending in ended:
            self._fail_ended(op, ending)
        return len(ended) + sum(
            self.fail_call(key, result_info, call_ended=False) for key in list(self._by_call)
        )

    def _grace_over(self, ending: _Ending) -> None:
        ending.over = True
        for op, of in list(self._ended.items()):
            if of is ending and op not in self._unanswered:
                self._fail_ended(op, ending)

    def _fail_ended(self, op: Operation[Any], ending: _Ending) -> None:
        self._forget(op)
        op._abort(ending.why, call_ended=True)

    # -- internals --------------------------------------------------------------

    def _match(self, event: OperationUpdated) -> Operation[Any] | None:
        if event.operation_id:
            calls = self._by_id.get(id_key(event.operation_id), {})
            op = calls.get(event.call_key)
            if op is not None:
                return op
            if calls:
                # Operation ids are only unique per call: another call's outcome is not ours.
                self.counts["dropped", "operation_of_other_call"] += 1
                self._lines.warning(
                    "graph_operation_other_call",
                    call_id=event.call_id,
                    operation_id=event.operation_id,
                    operation_call_id=next(iter(calls.values())).call_id,
                    reason="the operation belongs to another call; outcome ignored",
                )
                return None
        context = event.client_context or event.operation.client_context
        if not context:
            return None
        op = self._by_context.get((event.call_key, context))
        if op is None or op.id is None:
            return op
        if not event.operation_id:
            # Graph names no id for some outcomes (an invitation of several participants):
            # then a context only callbot and Graph know is proof, one the bot chose is not.
            if op.context_generated:
                return op
            self._unproven(op, context)
            return None
        # The id is known: the context alone proves nothing.
        if id_key(event.operation_id) == id_key(op.id):
            return op
        self.counts["dropped", "operation_id_mismatch"] += 1
        self._lines.warning(
            "graph_operation_id_mismatch",
            call_id=event.call_id,
            operation_id=event.operation_id,
            expected_operation_id=op.id,
            client_context=context,
            reason="the clientContext is another operation's; outcome ignored",
        )
        return None

    def _unproven(self, op: Operation[Any], context: str) -> None:
        self.counts["dropped", "operation_unproven"] += 1
        self._lines.warning(
            "graph_operation_unproven",
            call_id=op.call_id,
            expected_operation_id=op.id,
            client_context=context,
            reason="the outcome names no operation id and the clientContext was chosen by"
            " the bot, so anyone could name it; outcome ignored (leave client_context"
            " unset for callbot to generate one)",
        )

    def _settle(self, op: Operation[Any], outcome: _Outcome) -> None:
        op._finish(outcome.operation, outcome.status, outcome.result_info)
        self._forget(op)

    def _forget(self, op: Operation[Any]) -> None:
        ops = self._by_call.get(op.call_key)
        if ops is not None:
            ops.discard(op)
            if not ops:
                del self._by_call[op.call_key]
        self._unindex(op)

    def _unindex(self, op: Operation[Any]) -> None:
        if op.id is not None:
            calls = self._by_id.get(id_key(op.id))
            if calls is not None and calls.get(op.call_key) is op:
                del calls[op.call_key]
                if not calls:
                    del self._by_id[id_key(op.id)]
        key = (op.call_key, op.client_context)
        if self._by_context.get(key) is op:
            del self._by_context[key]
        self._unanswered.discard(op)
        self._early_by_context.pop(op, None)
        self._ended.pop(op, None)

    @staticmethod
    def _outcome(event: OperationUpdated, status: str, size: int = 0) -> _Outcome:
        return _Outcome(
            event.operation, status, event.result_info, loop_time(), event.operation_id, size
        )

    def _remember(self, event: OperationUpdated, status: str) -> None:
        if not event.operation_id:
            return  # only the id can pair it with a response still to come
        key = _id_key(event.call_key, event.operation_id)
        replaced = self._recent.pop(key, None)
        if replaced is not None:
            self._recent_size -= replaced.size
        size = json_size(event.raw)
        now = loop_time()
        while self._recent:
            oldest = next(iter(self._recent.values()))
            if (
                now - oldest.at <= self._recent_ttl
                and len(self._recent) < self._recent_limit
                and self._recent_size + size <= self._recent_bytes
            ):
                break
            self._recent_size -= self._recent.popitem(last=False)[1].size
        self._recent[key] = self._outcome(event, status, size)
        self._recent_size += size


def _id_key(call_key: str, operation_id: str) -> tuple[str, str]:
    # A pair, not a joined string: call "a:b" with operation "c" is not call "a" with "b:c".
    return call_key, id_key(operation_id)
