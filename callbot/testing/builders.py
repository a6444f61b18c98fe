"""Builders of the notification bodies Graph posts, one function per kind of event.

Each builder returns one notification item made from :mod:`callbot.models`
(the models the parser reads); :func:`notifications` wraps items in the
envelope Graph POSTs::

    from callbot.testing import builders as b

    body = b.notifications(
        b.incoming_call("call-1", caller_name="Adele Vance"),
        b.call_state("call-1", "establishing"),
    )

| event | builder |
| --- | --- |
| ``IncomingCall`` | :func:`incoming_call` |
| ``CallStateChanged`` | :func:`call_state` (with ``result_info`` for a failed transfer) |
| ``CallTerminated`` | :func:`call_terminated` |
| ``ToneReceived`` | :func:`tone` |
| ``ParticipantsUpdated`` | :func:`roster` of :func:`participant` |
| ``OperationUpdated`` | :func:`operation_update` |
| ``ContentSharingUpdated`` | :func:`content_sharing` |
| ``UnknownNotification`` | :func:`unknown` |
"""

from __future__ import annotations

from ._builders import (
    call_state,
    call_terminated,
    content_sharing,
    incoming_call,
    notifications,
    operation_update,
    participant,
    roster,
    tone,
    unknown,
)

__all__ = [
    "call_state",
    "call_terminated",
    "content_sharing",
    "incoming_call",
    "notifications",
    "operation_update",
    "participant",
    "roster",
    "tone",
    "unknown",
]
