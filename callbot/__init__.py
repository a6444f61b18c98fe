"""callbot: write Microsoft Teams / Microsoft Graph calling bots in Python.

The public face is small: ``CallBot`` to register handlers and serve,
``Call`` (the handle a handler receives), ``Operation`` (an awaitable Graph
operation), ``events`` (the typed events), ``models`` (Graph resources),
``Settings``, the errors, and ``configure_logging`` for a bot mounted in another
application.
"""

from __future__ import annotations

from . import events, models
from ._bot import CallBot
from ._config import Settings
from ._errors import (
    AuthenticationError,
    CallbotError,
    CallEnded,
    ConfigurationError,
    GraphError,
    KeysUnavailable,
    MalformedNotification,
    OperationFailed,
    StoreUnavailable,
)
from ._journal import Attempt, RunSuperseded, current_attempt
from ._log import configure_logging
from .graph import Call, Meeting, Operation, Roster, Target

__all__ = [
    "Attempt",
    "AuthenticationError",
    "Call",
    "CallBot",
    "CallEnded",
    "CallbotError",
    "ConfigurationError",
    "GraphError",
    "KeysUnavailable",
    "MalformedNotification",
    "Meeting",
    "Operation",
    "OperationFailed",
    "Roster",
    "RunSuperseded",
    "Settings",
    "StoreUnavailable",
    "Target",
    "configure_logging",
    "current_attempt",
    "events",
    "models",
]

__version__ = "0.1.0"
