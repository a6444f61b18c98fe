"""MkDocs hook: the settings page gets its table from the ``Settings`` class at build time."""

from __future__ import annotations

from typing import Any

from callbot._settings_doc import settings_table

MARKER = "<!-- settings-table -->"


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace the marker with the generated table (only the settings page has it)."""
    return markdown.replace(MARKER, settings_table()) if MARKER in markdown else markdown
