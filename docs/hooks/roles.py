"""MkDocs hook: the code's docstrings name things with reST roles (``:class:`~callbot.Call```);
the API pages show just the name, as code."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|attr|func|data|mod|exc|obj):<code>(~?)([\w.]+)</code>")


def _name(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    """Drop the role prefix; ``~`` keeps the last component, as Sphinx does."""
    return _ROLE.sub(_name, html)
