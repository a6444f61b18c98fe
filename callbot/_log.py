"""Structured logging: JSON lines in production, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog._config import _CONFIG

__all__ = ["configure_logging", "get_logger", "is_enabled"]


def get_logger(name: str) -> Any:
    """A structlog logger; lines carry whatever ``call_id`` is bound in context."""
    return structlog.get_logger(name)


# Each level filter make_filtering_bound_logger builds (one class per level, created once),
# with its level.
_FILTERING: dict[Any, int] = {
    structlog.make_filtering_bound_logger(level): level
    for level in (0, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
}


def is_enabled(level: int) -> bool:
    """Whether lines at ``level`` can pass structlog's configured level filter.

    Lets hot paths skip building a line that would be dropped. True when the
    configured wrapper is not one of structlog's level filters (it decides later).
    """
    # The live setting: get_config() would copy the whole configuration into a new dict.
    threshold = _FILTERING.get(_CONFIG.default_wrapper_class)
    return threshold is None or level >= threshold


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Set up structlog for a bot process.

    ``log_format`` is ``json``, ``console`` or ``auto`` (console on a terminal,
    JSON lines otherwise). Context bound with ``structlog.contextvars`` (such as
    ``call_id``) is merged into every line.
    """
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
