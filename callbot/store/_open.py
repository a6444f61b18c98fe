"""Choosing a store from the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._config import Settings
from .._errors import ConfigurationError
from .._lifecycle import Lifecycle
from ._base import Outcomes, Store
from ._memory import MemoryStore

if TYPE_CHECKING:
    from .._dispatch import Dispatcher

__all__ = ["open_store"]


def open_store(
    settings: Settings,
    *,
    dispatcher: Dispatcher,
    lifecycle: Lifecycle,
    outcomes: Outcomes,
) -> Store:
    """The store ``settings.store`` names: ``memory`` or a ``redis://`` URL.

    Calls' lives belong to ``lifecycle``; ``outcomes`` is told at once of every
    operation outcome and call end accepted, by any instance.
    """
    if settings.store == "memory":
        return MemoryStore(
            dispatcher.submit,
            settings=settings,
            lifecycle=lifecycle,
            outcomes=outcomes,
        )
    try:
        from ._redis import RedisStore
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            "CALLBOT_STORE is a Redis URL but the redis package is missing: install "
            "callbot's redis extra ('/path/to/callbot[redis]' from a clone) or "
            "pip install 'redis>=6.0' 'hiredis>=3.2'"
        ) from exc
    return RedisStore(
        settings.store,
        settings=settings,
        dispatcher=dispatcher,
        lifecycle=lifecycle,
        outcomes=outcomes,
    )
