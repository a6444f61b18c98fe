"""The documentation site's sources: every setting documented, every page reachable, every
fragment of code, variable and command a page shows real.

CI builds the site itself with ``mkdocs build --strict``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

import callbot
import callbot.testing
from callbot import Settings
from callbot._settings_doc import settings_descriptions, settings_table
from callbot.cli import build_parser

from .support.snippets import (
    ROOT,
    callbot_commands,
    files_in,
    fragments_in,
    pages,
    pages_with_files,
)


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


# What a fragment takes from the code around it: a name in capitals is a prompt's URL or
# an id (a str); the others are declared or imported thus.
_AROUND_A_FRAGMENT = {
    "bot": "bot: CallBot",
    "call": "call: Call",
    "log": "log: logging.Logger",
    "DIRECTORY": "DIRECTORY: dict[str, str]",
    "check_key": "check_key: Callable[[web.Request], None]",
    "meeting": "meeting: SimulatedCall",
    "attendance": "attendance: set[str]",
    "sim": "sim: Simulator",
    "ivr": "from callbot.samples.ivr import bot as ivr",
    "notifier": "from callbot.samples.notifier import bot as notifier",
}


def _fragment_module(source: str) -> str:
    """A module mypy can check: the fragment is the body of an ``async def``, so that it may
    await and return, with what it takes from the code around it declared first."""
    body = textwrap.indent(source, "    ")
    tree = ast.parse(f"async def _fragment():\n{body}")
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assigned = {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
    }
    around = [
        _AROUND_A_FRAGMENT.get(name, f"{name}: str")
        for name in sorted(used - assigned)
        if name in _AROUND_A_FRAGMENT or name.isupper()
    ]
    imports = ["import logging", "from collections.abc import Callable", "from aiohttp import web"]
    imports += ["from callbot import *", "from callbot.testing import SimulatedCall, Simulator"]
    return "\n".join([*imports, *around, "async def _fragment() -> None:", body])


def _mypy(directory: Path, cache: Path) -> list[str]:
    """mypy's error lines for the modules in ``directory``, against this tree's callbot."""
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    options = ["--check-untyped-defs", "--no-error-summary", "--cache-dir", str(cache)]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *options, "--config-file", "", "."],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if ": error: " in line]


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy-cache")


@pytest.mark.parametrize(
    "page",
    [page for page in pages() if fragments_in(page)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_fragment_of_a_bot_type_checks(page: Path, tmp_path: Path, mypy_cache: Path) -> None:
    """A fragment no test runs is checked by mypy against the API; a line ending in
    ``# error: MESSAGE ...`` shows a mistake, and mypy must find it there."""
    expected: dict[str, str] = {}
    for line, source in fragments_in(page):
        name = f"fragment_{line}.py"
        (tmp_path / name).write_text(_fragment_module(source), encoding="utf-8")
        for number, text in enumerate(_fragment_module(source).splitlines(), 1):
            if "  # error: " in text:
                expected[f"{name}:{number}"] = text.split("  # error: ")[1].removesuffix(" ...")
    errors = _mypy(tmp_path, mypy_cache)
    shown = {error.split(": error: ")[0]: error.split(": error: ")[1] for error in errors}
    for where, message in expected.items():
        assert shown.pop(where, "").startswith(message), f"{where}: mypy does not say {message}"
    assert not shown, f"{page.relative_to(ROOT)}, fragment_LINE.py:\n" + "\n".join(errors)


@pytest.mark.parametrize("page", pages_with_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_a_page_shows_type_checks(page: Path, tmp_path: Path, mypy_cache: Path) -> None:
    """The files test_documented_projects runs, checked by mypy too: a branch their tests do
    not take, or an annotation, is as wrong for a reader who copies it."""
    for name, source in files_in(page).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source, encoding="utf-8")
    assert _mypy(tmp_path, mypy_cache) == []


def _options(parser: argparse.ArgumentParser) -> tuple[set[str], dict[str, set[str]]]:
    commands: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                commands[name] = set(command._option_string_actions)
    return set(parser._option_string_actions), commands


def test_every_callbot_command_a_page_shows_exists_with_its_options() -> None:
    top, commands = _options(build_parser())
    checked = 0
    for page in pages():
        for command in callbot_commands(page):
            words = command.split()
            first = words[0].rstrip(",")
            if first.startswith("-"):
                known = top
            elif first.isupper():  # `callbot COMMAND --help`: any command
                known = set.intersection(*commands.values())
            else:
                assert first in commands, f"{page.relative_to(ROOT)}: callbot {command}"
                known = commands[first]
            flags = re.findall(r"(?<![\w-])--?[a-z][\w-]*", command)
            unknown = [flag for flag in flags if flag not in known]
            assert unknown == [], f"{page.relative_to(ROOT)}: callbot {command}"
            checked += 1
    assert checked > 40


# CALLBOT_* variables that are not settings: read by the tunnel discovery and the nginx site.
_OTHER_VARIABLES = {"CALLBOT_NGROK_API", "CALLBOT_DEVTUNNEL_ID", "CALLBOT_UPSTREAM"}


def test_every_callbot_variable_a_page_names_is_read() -> None:
    settings = {f"CALLBOT_{field.name.upper()}" for field in dataclasses.fields(Settings)}
    for name in _OTHER_VARIABLES:
        assert any(name in path.read_text(encoding="utf-8") for path in _readers()), name
    for page in pages():
        named = set(re.findall(r"CALLBOT_[A-Z0-9_]*[A-Z0-9]", page.read_text(encoding="utf-8")))
        unknown = named - settings - _OTHER_VARIABLES
        assert unknown == set(), f"{page.relative_to(ROOT)} names variables nothing reads"


def _readers() -> list[Path]:
    return [*(ROOT / "callbot").rglob("*.py"), *(ROOT / "deploy").rglob("*.template")]


def test_the_api_reference_shows_every_public_class_and_function() -> None:
    shown = set(re.findall(r"^::: (\S+)", (ROOT / "docs/reference/api.md").read_text(), re.M))
    missing = [
        f"{module.__name__}.{name}"
        for module in (callbot, callbot.testing)
        for name in module.__all__
        if isinstance(getattr(module, name), type) or callable(getattr(module, name))
        if f"{module.__name__}.{name}" not in shown
    ]
    assert missing == [], "docs/reference/api.md lacks these"


def test_the_readme_configuration_table_shows_each_default_as_its_variable_takes_it() -> None:
    fields = {field.name: field for field in dataclasses.fields(Settings)}
    checked = 0
    for row in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if not row.startswith("| `CALLBOT_"):
            continue
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        variables = re.findall(r"`CALLBOT_(\w+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[-1])
        assert all(name.lower() in fields for name in variables), row
        if len(defaults) != len(variables):  # "required", or no default
            continue
        for name, shown in zip(variables, defaults, strict=True):
            settings = Settings.from_env({"CALLBOT_APP_ID": "app", f"CALLBOT_{name}": shown})
            assert getattr(settings, name.lower()) == fields[name.lower()].default, row
            checked += 1
    assert checked >= 6


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces
    to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings
    }


def test_every_relative_link_outside_the_site_resolves() -> None:
    """mkdocs checks the links of docs/; README.md, SECURITY.md and the READMEs of deploy/
    and the samples are read on GitHub and in a written-out sample, where nothing does."""
    broken = []
    for page in pages():
        if page.is_relative_to(ROOT / "docs"):
            continue
        prose = re.sub(r"^```.*?^```$", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
        for link in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists() or (
                anchor and target.suffix == ".md" and anchor not in _anchors(target)
            ):
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert broken == []


def test_every_test_a_page_cites_exists() -> None:
    """A page that gives a test as evidence (SECURITY.md, scaling.md) names one that runs."""
    sources = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "callbot/samples").rglob("test_*.py")]
    defined = {name for path in sources for name in re.findall(r"def (test_\w+)", path.read_text())}
    defined |= {path.stem for path in sources}
    for page in pages():
        text = page.read_text(encoding="utf-8")
        # A test the page itself shows in a file of its own.
        shown = {
            name for found in re.findall(r"def (test_\w+)|# (test_\w+)\.py", text) for name in found
        }
        cited = set(re.findall(r"`(test_\w+)(?:\.py)?`", text))
        missing = sorted(cited - defined - shown)
        assert missing == [], f"{page.relative_to(ROOT)} cites tests that do not exist"


def test_every_variable_callbot_reads_is_on_the_site() -> None:
    """A variable that is no setting (so not in the generated table) is named on a page."""
    read = {
        name
        for path in (ROOT / "callbot").rglob("*.py")
        for name in re.findall(r"(?:get\(|\[)\"(CALLBOT_\w+)\"", path.read_text(encoding="utf-8"))
    }
    settings = {f"CALLBOT_{field.name.upper()}" for field in dataclasses.fields(Settings)}
    site = "".join(page.read_text(encoding="utf-8") for page in (ROOT / "docs").rglob("*.md"))
    assert read - settings, "found no variable beside the settings: is the pattern stale?"
    assert sorted(name for name in read - settings if name not in site) == []


def test_the_handler_table_names_attributes_its_events_have() -> None:
    from callbot import events

    checked = 0
    for row in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if not row.startswith("| `@bot."):
            continue
        cell = row.strip("|").split(" | ")[1]
        classes = [getattr(events, name) for name in re.findall(r"`events\.(\w+)`", cell)]
        attributes = re.findall(r"`(\w+)`", "".join(re.findall(r"\(([^)]*)\)", cell)))
        for cls in classes:
            missing = [name for name in attributes if not hasattr(cls, name)]
            missing = [name for name in missing if name not in cls.model_fields]
            assert missing == [], f"{cls.__name__} has no {missing}"
            checked += len(attributes)
    assert checked > 15


def test_every_page_that_registers_a_bot_says_how_teams_users_reach_it() -> None:
    """An Azure Bot with calling on is not enough for a Teams user to call it: the bot must
    be in a Teams app whose manifest says it takes calls."""
    registering = [page for page in pages() if "Azure Bot" in page.read_text(encoding="utf-8")]
    assert len(registering) >= 2
    missing = [
        str(page.relative_to(ROOT))
        for page in registering
        if '"supportsCalling": true' not in page.read_text(encoding="utf-8")
    ]
    assert missing == []


def test_the_hosting_page_gives_every_tunnel_command_callbot_asks_for() -> None:
    """`callbot run --tunnel devtunnel` names the commands that make a tunnel it can use;
    the page a newcomer starts a tunnel from gives them all, in the order they run."""
    source = (ROOT / "callbot/_tunnel.py").read_text(encoding="utf-8")
    asked = re.findall(r"`(devtunnel (?!show)[^`]+)`", source)
    asked = [command.replace("{port}", "8080") for command in asked]
    assert len(asked) >= 3
    page = (ROOT / "docs/guides/hosting.md").read_text(encoding="utf-8")
    console = "\n".join(re.findall(r"^```console\n(.*?)^```$", page, re.M | re.S))
    missing = [command for command in dict.fromkeys(asked) if command not in console]
    assert missing == []
    assert sorted(dict.fromkeys(asked), key=console.index) == list(dict.fromkeys(asked))


def _sample_commands() -> list[tuple[Path, list[str]]]:
    """(sample folder, arguments) of every `python bot.py ...` a sample's README runs."""
    found = []
    for readme in sorted((ROOT / "callbot/samples").glob("*/README.md")):
        text = readme.read_text(encoding="utf-8")
        for block in re.findall(r"^```console\n(.*?)^```$", text, re.M | re.S):
            for line in block.splitlines():
                if line.startswith("python bot.py "):
                    arguments = shlex.split(line.removeprefix("python bot.py "), comments=True)
                    found.append((readme.parent, arguments))
    return found


@pytest.mark.parametrize(
    ("sample", "arguments"), _sample_commands(), ids=lambda value: getattr(value, "name", "")
)
def test_every_sample_command_a_readme_gives_takes_those_arguments(
    sample: Path, arguments: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sample's own parser reads the command line, and the bot is not served."""
    parsed: list[argparse.Namespace] = []
    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(
        parser: argparse.ArgumentParser, args: None = None, namespace: None = None
    ) -> argparse.Namespace:
        parsed.append(parse_args(parser, args, namespace))  # exits 2 on what it does not take
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", ["bot.py", *arguments])
    monkeypatch.delenv("CALLBOT_APP_ID", raising=False)
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(sample / "bot.py"), run_name="__main__")
    assert exit.value.code == 0
    assert len(parsed) == 1


def test_the_sample_commands_are_found() -> None:
    assert {sample.name for sample, _ in _sample_commands()} == {"meeting", "notifier"}


def test_every_extra_a_pip_command_names_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = set(project["optional-dependencies"])
    named = {
        (page.relative_to(ROOT), extra.strip())
        for page in pages()
        for command in re.findall(r"pip install [^`\n]*", page.read_text(encoding="utf-8"))
        for extras in re.findall(r"\[([\w,\s-]+)\]", command)
        for extra in extras.split(",")
    }
    assert len(named) > 5
    assert sorted(f"{page}: [{extra}]" for page, extra in named if extra not in declared) == []
