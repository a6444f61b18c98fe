"""Structured logging: JSON lines in production, readable lines on a terminal."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog
from structlog._config import _CONFIG

from ._clock import loop_time

__all__ = [
    "LINES_PER_SECOND",
    "RateLimitedLog",
    "configure_logging",
    "context_variable",
    "get_logger",
    "is_enabled",
]


def get_logger(name: str) -> Any:
    """A structlog logger; lines carry whatever ``call_id`` is bound in context."""
    return structlog.get_logger(name)


def context_variable(key: str) -> contextvars.ContextVar[Any]:
    """The context variable ``structlog.contextvars`` keeps ``key`` in: setting it binds
    ``key`` for every line written in the context, as ``bind_contextvars(key=...)`` does,
    without that function's loop and dict of tokens (a hot path binds once per delivery)."""
    # Bound and reset at once: the variable is made, and nothing is left bound.
    tokens = structlog.contextvars.bind_contextvars(**{key: None})
    structlog.contextvars.reset_contextvars(**tokens)
    return tokens[key].var


# Each level filter make_filtering_bound_logger builds (one class per level, created once),
# with its level.
_FILTERING: dict[Any, int] = {
    structlog.make_filtering_bound_logger(level): level
    for level in (0, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
}


LINES_PER_SECOND = 10
"""How many lines of one kind a second a sender may make callbot write, per notification item
or call it sends (a drop, a call forgotten, a property left out): past them, they are counted."""

_Kind = tuple[str, object]


class RateLimitedLog:
    """Lines whose number a sender decides (one per connection it opens, per notification item
    it posts, per call it invents): at most ``lines`` of each kind (its event and ``reason``)
    per ``interval`` seconds. Those left out are counted: the next line of the kind says how
    many (``suppressed``), or, when none comes within the interval, the last one left out is
    written as it ends, saying how many others were. A request of 200 items would otherwise
    write 200 lines."""

    def __init__(self, logger: Any, *, lines: int = LINES_PER_SECOND, interval: float = 1.0):
        self._logger = logger
        self._lines = lines
        self._interval = interval
        # kind -> (when its interval started, lines written in it)
        self._windows: dict[_Kind, tuple[float, int]] = {}
        # kind -> (lines left out, the last of them: how to write it, its event, its fields)
        self._left_out: dict[_Kind, tuple[int, Callable[..., Any], str, dict[str, Any]]] = {}

    def info(self, event: str, **fields: Any) -> None:
        """``logger.info(event, **fields)``, unless past the kind's lines for now."""
        self._write(self._logger.info, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """``logger.warning(event, **fields)``, unless past the kind's lines for now."""
        self._write(self._logger.warning, event, fields)

    def _write(self, method: Callable[..., Any], event: str, fields: dict[str, Any]) -> None:
        kind = (event, fields.get("reason"))
        now = _now()
        started, written = self._windows.get(kind, (float("-inf"), 0))
        if now - started >= self._interval:
            started, written = now, 0
        if written >= self._lines:
            count = self._left_out.get(kind, (0,))[0]
            self._left_out[kind] = (count + 1, method, event, fields)
            if count == 0:
                self._say_left_out_at(started + self._interval, kind)
            return
        self._windows[kind] = (started, written + 1)
        left_out = self._left_out.pop(kind, None)
        method(event, **fields, **({"suppressed": left_out[0]} if left_out else {}))

    def _say_left_out_at(self, when: float, kind: _Kind) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop runs (a script parsing bodies): the next line says it
            return
        # In a context of its own: not the one of the line that happened to be left out first.
        loop.call_at(when, self._say_left_out, kind, context=contextvars.Context())

    def _say_left_out(self, kind: _Kind) -> None:
        left_out = self._left_out.pop(kind, None)
        if left_out is None:
            return  # a line of the kind said it already
        count, method, event, fields = left_out
        self._windows[kind] = (_now(), 1)
        method(event, **fields, **({"suppressed": count - 1} if count > 1 else {}))


def _now() -> float:
    try:
        return loop_time()
    except RuntimeError:  # no loop runs (a script parsing bodies): the same clock's source
        return time.monotonic()


def is_enabled(level: int) -> bool:
    """Whether lines at ``level`` can pass structlog's configured level filter.

    Lets hot paths skip building a line that would be dropped. True when the
    configured wrapper is not one of structlog's level filters (it decides later).
    """
    # The live setting: get_config() would copy the whole configuration into a new dict.
    threshold = _FILTERING.get(_CONFIG.default_wrapper_class)
    return threshold is None or level >= threshold


LOG_FORMATS = ("json", "console", "auto")
"""What ``log_format`` (``CALLBOT_LOG_FORMAT``) may be."""


def level_number(level: str) -> int | None:
    """The ``logging`` level a name stands for (``debug``, ``INFO``, ...), or ``None``."""
    return logging.getLevelNamesMapping().get(level.strip().upper())


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Set up structlog, and the standard library's ``logging``, for a bot process.

    ``log_format`` is ``json``, ``console`` or ``auto`` (console on a terminal,
    JSON lines otherwise; console lines are coloured only on a terminal, and never
    with ``NO_COLOR`` set); ``level`` a level name (``debug``, ``info``, ...).
    Context bound with ``structlog.contextvars`` (such as ``call_id``) is
    merged into every line. Lines a bot writes with ``logging`` go through the
    same processors and renderer, so they look like callbot's own, and so do Python's
    warnings (a coroutine never awaited, say), as lines of the ``py.warnings`` logger.
    """
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: Any = (
        # Colour codes only for a terminal (and never under NO_COLOR): a file or a pipe of
        # console lines should read as plain text.
        _Encodable(structlog.dev.ConsoleRenderer(colors=_colours_wanted()))
        if use_console
        else structlog.processors.JSONRenderer()
    )
    numeric_level = level_number(level) or logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(shared, renderer, numeric_level)
    # Else each warning is two raw lines of stderr in the middle of the JSON ones.
    logging.captureWarnings(True)


def _colours_wanted() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty is not None and isatty()) and not os.environ.get("NO_COLOR")


class _Encodable:
    """A console renderer whose lines always encode to stderr and never hold a control
    character of the values they show: those come out escaped.

    A lone surrogate (``"\\udc00"``, valid in JSON) has no UTF-8 form, and a strict
    stream would raise in the middle of the code that logged it. A control character
    (an escape sequence in a caller's name, U+009B in a header anyone may send) would
    act on the terminal showing the line. JSON lines escape both already; console lines
    printed text as it is.
    """

    def __init__(self, renderer: Callable[..., str]) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> str:
        for key, value in event_dict.items():
            if isinstance(value, str) and not value.isprintable():
                event_dict[key] = _shown(key, value)
        line = self._renderer(logger, method_name, event_dict)
        encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
        try:
            line.encode(encoding)
        except UnicodeEncodeError:
            return line.encode(encoding, "backslashreplace").decode(encoding)
        except LookupError:
            return line.encode("ascii", "backslashreplace").decode("ascii")
        return line


# Values rendered as lines of their own (a traceback): their line breaks are the layout.
_MULTILINE = frozenset({"exception", "stack"})


def _shown(key: str, text: str) -> object:
    """A string value holding characters a terminal would not print as they are (controls,
    format characters, lone surrogates), as a console line shows it: the message and a
    traceback with those escaped, any other value as its ``repr`` (quoted, as the console
    renderer writes a value holding a space)."""
    if key == "event" or key in _MULTILINE:
        return printable(text, keep="\n" if key in _MULTILINE else "")
    return _Quoted(text)


def printable(text: str, *, keep: str = "") -> str:
    """``text`` with each character a terminal would not print as it is (a control, such as
    the escape that starts a terminal sequence, a format character, a lone surrogate)
    written as its Python escape; ``keep`` is left as it is (a line break)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == keep else repr(c)[1:-1] for c in text)


class _Quoted:
    """A string the console renderer writes as its ``repr``, as it writes any non-string."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return repr(self.text)


class _CallbotHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler configure_logging installs (found again to be replaced)."""

    def emit(self, record: logging.LogRecord) -> None:
        # Whatever stderr is now: a test runner may have swapped it since configuration.
        self.stream = sys.stderr
        super().emit(record)


def _route_stdlib_logging(shared: list[Any], renderer: Any, level: int) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = _CallbotHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _CallbotHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
