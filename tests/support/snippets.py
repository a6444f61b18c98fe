"""Code a page of the documentation shows: Python blocks whose first line names the file,
Python fragments that do not, and the ``callbot`` commands in its text."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["ROOT", "callbot_commands", "files_in", "fragments_in", "pages", "pages_with_files"]

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"^```python\n# (?P<name>[\w/]+\.py)\n(?P<body>.*?)^```$", re.M | re.S)
_PYTHON = re.compile(r"^```python\n(?P<body>.*?)^```$", re.M | re.S)
_FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.M | re.S)
# `callbot run ...` or `python -m callbot run ...`, up to a comment or the end of the code.
_COMMAND = re.compile(r"(?:^|&& )(?:\S*/)?(?:python3? -m )?callbot (?P<args>[-\w].*?)(?:\s+#.*)?$")


def pages() -> list[Path]:
    """README.md, the other Markdown a reader follows, and the documentation pages."""
    others = [
        "SECURITY.md",
        "deploy/README.md",
        "benchmarks/README.md",
        "callbot/samples/README.md",
    ]
    samples = sorted((ROOT / "callbot/samples").glob("*/README.md"))
    return [
        ROOT / "README.md",
        *(ROOT / name for name in others),
        *samples,
        *sorted((ROOT / "docs").rglob("*.md")),
    ]


def files_in(page: Path) -> dict[str, str]:
    """``{"bot.py": source, ...}`` from the page's blocks that start with ``# NAME.py``."""
    files: dict[str, str] = {}
    for match in _BLOCK.finditer(page.read_text(encoding="utf-8")):
        name = match["name"]
        if name in files:
            raise AssertionError(f"{page.name} shows {name} twice")
        files[name] = match["body"]
    return files


def fragments_in(page: Path) -> list[tuple[int, str]]:
    """``(line, source)`` of the page's Python blocks that name no file: parts of a bot."""
    text = page.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, match.start()) + 2, match["body"])
        for match in _PYTHON.finditer(text)
        if not _BLOCK.match(text, match.start())
    ]


def pages_with_files() -> list[Path]:
    """README.md and the documentation pages that show a project's files."""
    shown = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [page for page in shown if files_in(page)]


def callbot_commands(page: Path) -> list[str]:
    """The arguments of every ``callbot`` command the page shows, in a shell block or in
    inline code (which may wrap over lines)."""
    text = page.read_text(encoding="utf-8")
    lines: list[str] = []
    for fence in _FENCE.finditer(text):
        if fence["lang"] in ("", "console", "sh", "bash"):
            lines += fence["body"].splitlines()
    prose = _FENCE.sub("", text)
    lines += [code.replace("\n", " ") for code in re.findall(r"`([^`]+)`", prose)]
    return [match["args"].strip() for line in lines if (match := _COMMAND.search(line))]
