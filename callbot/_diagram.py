"""Calls drawn as Mermaid sequence diagrams (they render on GitHub and in the docs).

A :class:`SequenceDiagram` watches the simulator's traffic (it is an observer,
like the printer) and writes one diagram per call: the caller's actions, each
notification Graph posted and the bot's answer to it, the handlers it ran, each
request the bot sent to Graph with Graph's answer, and how each operation ended.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from pathlib import Path

from ._ids import id_key
from .testing._simulator import Traffic

__all__ = ["SequenceDiagram", "mermaid"]

_ARROWS = {
    "caller": ("Caller", "Graph", "->>"),
    "notification": ("Graph", "Bot", "->>"),
    "request": ("Bot", "Graph", "->>"),
}
_UNSAFE = re.compile(r"[;#<>\n\r]")


def _text(text: str) -> str:
    """Message text Mermaid reads as text (``;`` ends a statement, ``#`` starts an entity)."""
    return _UNSAFE.sub(lambda m: {"#": "#35;", "<": "#lt;", ">": "#gt;"}.get(m[0], " "), text)


def _status(entry: Traffic) -> str:
    if entry.status is None:
        return ""
    return f" ({entry.status})" if entry.status else " (no answer)"


def mermaid(entries: Iterable[Traffic]) -> str:
    """One ``sequenceDiagram`` for these entries (usually one call's)."""
    lines = [
        "sequenceDiagram",
        "    participant Caller",
        "    participant Graph as Microsoft Graph",
        "    participant Bot as bot",
    ]
    for entry in entries:
        if entry.kind == "handler":
            lines.append(f"    Note over Bot: {_text(entry.summary)}")
            continue
        arrow = _ARROWS.get(entry.kind)
        if arrow is None:
            continue
        source, target, line = arrow
        refused = entry.kind == "notification" and entry.status not in (None, 202)
        lines.append(f"    {source}{line}{target}: {_text(entry.summary)}{_status(entry)}")
        if entry.redirected_to is not None:
            lines.append(f"    Note over Bot: sent to {_text(entry.redirected_to)}")
        elif refused:
            lines.append(f"    Note over Bot: refused: {entry.status or 'no answer'}")
    return "\n".join(lines) + "\n"


class SequenceDiagram:
    """Collects traffic as it happens; :meth:`markdown` draws one diagram per call."""

    def __init__(self) -> None:
        self.entries: list[Traffic] = []

    def __call__(self, entry: Traffic) -> None:
        if entry.call_id is not None:
            self.entries.append(entry)

    def calls(self) -> list[str]:
        """Call ids in the order they first appeared, each in the form it first appeared in."""
        return list(self._by_call())

    def _by_call(self) -> dict[str, list[Traffic]]:
        """Each call's entries, by the id it first appeared with: one call whatever form a
        later entry wrote its id in (Graph's paths write it upper case without dashes)."""
        named: dict[str, str] = {}
        calls: dict[str, list[Traffic]] = {}
        for entry in self.entries:
            if entry.call_id is None:
                continue
            first = named.setdefault(id_key(entry.call_id), entry.call_id)
            calls.setdefault(first, []).append(entry)
        return calls

    def markdown(self, title: str = "Calls") -> str:
        """A Markdown page: a heading and a Mermaid block per call."""
        parts = [f"# {title}\n"]
        for number, (call_id, entries) in enumerate(self._by_call().items(), start=1):
            # Any character an id takes stays text: a backtick would end a code span.
            shown = html.escape(call_id).replace("`", "&#96;")
            parts.append(
                f"\n## Call {number}: <code>{shown}</code>\n\n```mermaid\n{mermaid(entries)}```\n"
            )
        return "".join(parts)

    def write(self, path: str | Path, title: str = "Calls") -> None:
        """Write :meth:`markdown` to ``path``."""
        Path(path).write_text(self.markdown(title), encoding="utf-8")
