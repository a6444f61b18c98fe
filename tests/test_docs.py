"""The documentation site's sources: every setting documented, every page reachable.

CI builds the site itself with ``mkdocs build --strict``.
"""

from __future__ import annotations

import ast
import dataclasses
import re

import yaml

from callbot import Settings
from callbot._settings_doc import settings_descriptions, settings_table

from .support.snippets import ROOT


def _nav_pages(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for entry in nav for page in _nav_pages(entry)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return []


def _mkdocs() -> dict[str, object]:
    # mkdocs.yml names a Python function with a !!python tag; the nav is all this reads.
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    loaded: dict[str, object] = yaml.safe_load(re.sub(r"!!python/name:\S+", "null", text))
    return loaded


def test_every_setting_has_a_row_with_a_description() -> None:
    table = settings_table()
    descriptions = settings_descriptions()
    rows = [line for line in table.splitlines() if line.startswith("| `CALLBOT_")]
    fields = dataclasses.fields(Settings)
    assert len(rows) == len(fields)
    for field, row in zip(fields, rows, strict=True):
        assert row.startswith(f"| `CALLBOT_{field.name.upper()}` | `{field.name}` |")
        assert descriptions.get(field.name), f"Settings.{field.name} has no docstring"


def test_the_settings_page_is_generated_at_build_time() -> None:
    assert "<!-- settings-table -->" in (ROOT / "docs/reference/settings.md").read_text()
    assert "docs/hooks/settings_table.py" in _mkdocs()["hooks"]  # type: ignore[operator]


def test_every_page_is_in_the_navigation() -> None:
    pages = {
        str(path.relative_to(ROOT / "docs"))
        for path in (ROOT / "docs").rglob("*.md")
        if "hooks" not in path.parts
    }
    assert pages == set(_nav_pages(_mkdocs()["nav"]))


def test_the_readme_links_the_docs_and_keeps_its_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/index.md)" in readme
    assert "CALLBOT_LOG_LEVEL" in readme
    assert "CALLBOT_LOG_FORMAT" in readme
    commands = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/callbot demo",
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && "
        ".venv/bin/python -m pytest -q",
    ]


def test_every_default_in_the_settings_table_reads_back_as_that_default() -> None:
    """A default is shown as its variable takes it (``*.microsoft.com,*.skype.com``, not a
    Python ``frozenset``): set to what the table shows, each variable gives the default."""
    fields = {field.name: field for field in dataclasses.fields(Settings)}
    checked = 0
    for row in settings_table().splitlines():
        if not row.startswith("| `CALLBOT_"):
            continue
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        variable, keyword, shown = cells[0].strip("`"), cells[1].strip("`"), cells[-1]
        if not shown:
            continue
        settings = Settings.from_env({"CALLBOT_APP_ID": "app", variable: shown.strip("`")})
        assert getattr(settings, keyword) == fields[keyword].default, variable
        checked += 1
    assert checked > 20


def _literal_refusals() -> set[tuple[int, str]]:
    """(status, reason) of every refusal the receiver and the parser spell out literally."""
    from callbot._receiver import _REFUSALS

    found: set[tuple[int, str]] = set()
    receiver = ast.parse((ROOT / "callbot/_receiver.py").read_text(encoding="utf-8"))
    parser = ast.parse((ROOT / "callbot/_parse.py").read_text(encoding="utf-8"))
    for node in ast.walk(receiver):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_refuse":
            status, _, reason = (getattr(arg, "value", None) for arg in node.args[:3])
            if isinstance(status, int) and isinstance(reason, str):
                found.add((status, reason))
    for node in ast.walk(parser):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "MalformedNotification":
            reason = getattr(node.args[0], "value", None)
            # legacy_format is answered 204 (Graph sends it again in its own format).
            if isinstance(reason, str) and reason != "legacy_format":
                found.add((_REFUSALS.get(reason, (400, ""))[0], reason))
    return found


def test_the_refusal_table_of_the_design_page_names_every_reason_in_its_status_row() -> None:
    rows: dict[int, set[str]] = {}
    for line in (ROOT / "docs/design.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 3 and cells[0][:3].isdigit():
            rows[int(cells[0][:3])] = set(re.findall(r"`(\w+)`", cells[2]))
    refusals = _literal_refusals()
    assert len(refusals) > 10
    missing = sorted((status, reason) for status, reason in refusals if reason not in rows[status])
    assert missing == [], "docs/design.md's refusal table lacks these (status, error) pairs"
