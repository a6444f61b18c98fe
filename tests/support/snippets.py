"""Files a page of the documentation shows: Python blocks whose first line names the file."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["ROOT", "files_in", "pages_with_files"]

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"^```python\n# (?P<name>[\w/]+\.py)\n(?P<body>.*?)^```$", re.M | re.S)


def files_in(page: Path) -> dict[str, str]:
    """``{"bot.py": source, ...}`` from the page's blocks that start with ``# NAME.py``."""
    files: dict[str, str] = {}
    for match in _BLOCK.finditer(page.read_text(encoding="utf-8")):
        name = match["name"]
        if name in files:
            raise AssertionError(f"{page.name} shows {name} twice")
        files[name] = match["body"]
    return files


def pages_with_files() -> list[Path]:
    """README.md and the documentation pages that show a project's files."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [page for page in pages if files_in(page)]
