"""The README and the docs, followed to the letter in a project of one's own.

Each page that shows files (Python blocks starting with ``# bot.py``,
``# conftest.py``, ``# test_bot.py``) is written to a fresh directory outside
the repository, with no pytest configuration, and its tests run there with
warnings as errors. ``CALLBOT_DOCS_PYTHON`` names the interpreter to use (CI
points it at a fresh virtual environment with the built wheel installed);
by default it is the one running these tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .support.snippets import ROOT, files_in, pages_with_files

PYTHON = os.environ.get("CALLBOT_DOCS_PYTHON", sys.executable)


def test_the_readme_shows_a_bot_and_its_tests() -> None:
    assert {"bot.py", "conftest.py", "test_bot.py"} <= set(files_in(ROOT / "README.md"))


@pytest.mark.parametrize("page", pages_with_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_documented_project_passes_its_tests(page: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    for name, source in files_in(page).items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(source, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLBOT_", "PYTEST"))}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-W", "error", "-p", "no:cacheprovider"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
    # The bot module also imports on its own, as `callbot run bot:bot` would, and so does
    # every other module the page shows (a `main.py` run as a script, say).
    modules = [
        name.removesuffix(".py").replace("/", ".")
        for name in files_in(page)
        if not name.rpartition("/")[2].startswith(("test_", "conftest"))
    ]
    assert modules
    script = "".join(f"import {module}\n" for module in modules)
    if "bot" in modules:
        script += "print(type(bot.bot).__name__)\n"
    imported = subprocess.run(
        [PYTHON, "-c", script],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    if "bot" in modules:
        assert imported.stdout.strip() == "CallBot", imported.stderr
