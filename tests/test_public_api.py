"""The public face is exactly what is meant, and documented."""

from __future__ import annotations

import inspect

import callbot
from callbot import events


def test_the_package_exports_exactly_the_public_names() -> None:
    assert sorted(callbot.__all__) == [
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


def test_every_event_kind_is_an_event() -> None:
    kinds = [
        events.IncomingCall,
        events.CallStateChanged,
        events.CallTerminated,
        events.ParticipantsUpdated,
        events.ToneReceived,
        events.OperationUpdated,
        events.ContentSharingUpdated,
        events.UnknownNotification,
    ]
    for kind in kinds:
        assert issubclass(kind, events.Event)
        assert kind.__name__ in events.__all__


def test_errors_form_one_hierarchy() -> None:
    for name in callbot.__all__:
        obj = getattr(callbot, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, callbot.CallbotError), name


def test_public_classes_and_methods_have_docstrings() -> None:
    missing = []
    for name in ("CallBot", "Call", "Operation", "Settings"):
        cls = getattr(callbot, name)
        if not inspect.getdoc(cls):
            missing.append(name)
        for attr, member in vars(cls).items():
            if attr.startswith("_") or not callable(member):
                continue
            if not inspect.getdoc(member):
                missing.append(f"{name}.{attr}")
    assert missing == []
