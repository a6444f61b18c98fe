"""Printing simulator traffic for people (rich or plain text) or programs (JSON lines)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, TextIO

from ._ids import id_key
from ._log import printable
from .testing._simulator import Traffic

__all__ = ["FORMATS", "TrafficPrinter", "choose_format"]

FORMATS = ("auto", "rich", "plain", "json")

_WHO = {
    "notification": "Graph -> bot",
    "request": "bot -> Graph",
    "caller": "caller",
    "handler": "bot handler",
}
_STYLE = {"notification": "cyan", "request": "magenta", "caller": "yellow", "handler": "green"}


def choose_format(requested: str, stream: TextIO) -> str:
    """``rich`` or ``plain`` on a terminal (rich when installed), ``json`` otherwise."""
    if requested != "auto":
        if requested == "rich" and not _have_rich():
            return "plain"
        return requested
    if not stream.isatty():
        return "json"
    return "rich" if _have_rich() else "plain"


def _have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _short(call_id: str | None) -> str:
    # One call shows as one id, whichever form (case, dashes) a line got it in.
    return id_key(call_id)[:8] if call_id else "-"


def _status(entry: Traffic) -> str:
    if entry.status is None:
        return ""
    if entry.redirected_to is not None:
        return f"({entry.status} to {entry.redirected_to})"
    return f"({entry.status})" if entry.status else "(no answer)"


def _silence_stdout() -> None:
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class TrafficPrinter:
    """Prints each :class:`Traffic` entry as it happens, and notes between them."""

    def __init__(self, stream: TextIO | None = None, *, fmt: str = "auto") -> None:
        self.stream = stream or sys.stdout
        self.format = choose_format(fmt, self.stream)
        self._console: Any = None
        if self.format == "rich":
            from rich.console import Console

            class _Console(Console):
                def on_broken_pipe(self) -> None:
                    # Rich would exit; the calls still run to their end, unseen.
                    _silence_stdout()

            self._console = _Console(file=self.stream, highlight=False, soft_wrap=True)

    def __call__(self, entry: Traffic) -> None:
        """Print one entry (usable as a simulator observer)."""
        if self.format == "json":
            record = entry.as_dict()
            record.pop("body", None)
            self._json(record)
            return
        who = _WHO.get(entry.kind, entry.kind)
        status = _status(entry)
        # A caller's name or Graph's message is theirs: never a sequence the terminal runs.
        summary = printable(entry.summary)
        if self._console is not None:
            from rich.text import Text

            line = Text()
            line.append(f"{entry.at:7.3f}  ", style="dim")
            line.append(f"{who:<13}", style=_STYLE.get(entry.kind, ""))
            line.append(f" {_short(entry.call_id):<9}", style="dim")
            line.append(f" {summary}")
            if status:
                failed = entry.status is not None and not 200 <= entry.status < 300
                failed = failed and entry.redirected_to is None
                line.append(f" {status}", style="bold red" if failed else "green")
            self._print(line)
            return
        text = f"{entry.at:7.3f}  {who:<13} {_short(entry.call_id):<9} {summary}"
        self._plain(f"{text} {status}".rstrip())

    def note(self, text: str) -> None:
        """A line of narration (a heading in the human formats)."""
        if self.format == "json":
            self._json({"kind": "note", "summary": text})
            return
        text = printable(text)
        if self._console is not None:
            self._print("")
            self._print(text, style="bold", markup=False)
        else:
            self._plain("")
            self._plain(f"== {text}")

    def detail(self, text: str) -> None:
        """A secondary line (settings, hints); left out of JSON output."""
        if self.format == "json":
            return
        text = printable(text)
        if self._console is not None:
            self._print(text, style="dim", markup=False)
        else:
            self._plain(text)

    def _print(self, *objects: Any, **options: Any) -> None:
        self._console.print(*objects, **options)

    def _json(self, record: dict[str, Any]) -> None:
        self._write(json.dumps(record, default=str) + "\n")

    def _plain(self, text: str) -> None:
        self._write(text + "\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            # The reader went away (``| head``): keep running, print nothing more.
            self.stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the printer
            if self._console is not None:
                self._console.file = self.stream
            _silence_stdout()
