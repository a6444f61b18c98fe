"""The ``callbot`` command as a person runs it: ordinary mistakes get one clear line."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import callbot
from callbot._log import configure_logging, context_variable
from callbot.cli import build_parser

BOT_MODULE = """
import logging

from callbot import CallBot

logging.getLogger("mybot").info("mybot loaded")
logging.getLogger("mybot").debug("mybot details")
bot = CallBot.from_env()
"""


def callbot_environment(**env: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    environ.update(
        {
            "CALLBOT_OPENID_CONFIG_URL": "https://keys.invalid/openid",
            "CALLBOT_GRAPH_URL": "https://graph.invalid/v1.0",
            "CALLBOT_AUTHORITY_URL": "https://login.invalid",
            **env,
        }
    )
    return environ


def run_callbot(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callbot", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=callbot_environment(**env),
        check=False,
    )


def assert_one_clear_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("callbot: ")
    assert expected in last


def test_version(tmp_path: Path) -> None:
    result = run_callbot("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"callbot {callbot.__version__}"


def test_a_module_that_does_not_exist(tmp_path: Path) -> None:
    result = run_callbot("run", "nosuch:bot", cwd=tmp_path, CALLBOT_APP_ID="x")
    assert_one_clear_line(result, "cannot import 'nosuch'")


def test_a_handler_named_instead_of_the_bot(tmp_path: Path) -> None:
    (tmp_path / "mybot.py").write_text(
        BOT_MODULE + "\n\n@bot.on_incoming_call\nasync def answer(call, event):\n"
        "    await call.answer()\n"
    )
    result = run_callbot("run", "mybot:answer", cwd=tmp_path, CALLBOT_APP_ID="x")
    assert_one_clear_line(result, "mybot:answer is an async function (a handler?)")


@pytest.mark.parametrize(
    "target", ["mybot.py:bot", "./mybot.py:bot", ".mybot:bot", "bots/mybot.py"]
)
def test_a_file_named_instead_of_a_module_says_which_module(tmp_path: Path, target: str) -> None:
    """A relative name (``./mybot.py``, ``.mybot``) was a TypeError traceback from importlib."""
    (tmp_path / "mybot.py").write_text(BOT_MODULE)
    result = run_callbot("run", target, cwd=tmp_path, CALLBOT_APP_ID="x")
    assert_one_clear_line(result, f"got {target!r}: name the module as Python imports it")
    assert "mybot:bot" in result.stderr


def test_a_function_that_needs_arguments_named_as_the_bot_is_one_clear_line(tmp_path: Path) -> None:
    """It was a TypeError traceback from inside callbot, as if callbot had a bug."""
    (tmp_path / "mybot.py").write_text(BOT_MODULE + "\n\ndef make(settings):\n    return bot\n")
    result = run_callbot("run", "mybot:make", cwd=tmp_path, CALLBOT_APP_ID="x")
    assert_one_clear_line(result, "mybot:make takes arguments (settings)")


def test_a_missing_dependency_inside_the_bot_is_not_hidden(tmp_path: Path) -> None:
    (tmp_path / "brokenbot.py").write_text("import nosuchdependency\n")
    result = run_callbot("run", "brokenbot:bot", cwd=tmp_path, CALLBOT_APP_ID="x")
    assert result.returncode != 0
    assert "nosuchdependency" in result.stderr
    assert "Traceback" in result.stderr


def test_a_recording_that_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / "mybot.py").write_text(BOT_MODULE)
    result = run_callbot("replay", "missing.jsonl", "--bot", "mybot:bot", cwd=tmp_path)
    assert_one_clear_line(result, "cannot replay 'missing.jsonl': no such file")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda path: path.mkdir(), "cannot replay 'calls.jsonl': it is a directory"),
        (lambda path: path.write_bytes(b""), "calls.jsonl holds no notifications"),
        (lambda path: path.write_bytes(b"\n \n"), "calls.jsonl holds no notifications"),
    ],
    ids=["directory", "empty", "blank"],
)
def test_a_recording_that_is_no_recording_is_one_clear_line(
    tmp_path: Path, make: Any, expected: str
) -> None:
    """A directory was said not to exist; an empty file exited 1, as a replay that failed."""
    (tmp_path / "mybot.py").write_text(BOT_MODULE)
    make(tmp_path / "calls.jsonl")
    result = run_callbot("replay", "calls.jsonl", "--bot", "mybot:bot", cwd=tmp_path)
    assert_one_clear_line(result, expected)


def test_a_replay_leaves_the_recording_the_environment_names_alone(tmp_path: Path) -> None:
    """With CALLBOT_RECORD_PATH still set from recording, as the guides do it, each replay of
    the file appended what it replayed to it: twice as long every time."""
    (tmp_path / "mybot.py").write_text(BOT_MODULE)
    recording = tmp_path / "calls.jsonl"
    incoming = {
        "changeType": "created",
        "resourceUrl": "/communications/calls/c1",
        "resourceData": {"@odata.type": "#microsoft.graph.call", "state": "incoming"},
    }
    recording.write_text(json.dumps({"value": [incoming]}) + "\n", encoding="utf-8")
    before = recording.read_bytes()
    result = run_callbot(
        "replay",
        "calls.jsonl",
        "--bot",
        "mybot:bot",
        "--speed",
        "0",
        cwd=tmp_path,
        CALLBOT_APP_ID="x",
        CALLBOT_RECORD_PATH="calls.jsonl",
    )
    assert result.returncode == 0, result.stderr
    assert recording.read_bytes() == before


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


def test_a_port_in_use_after_the_bot_started(tmp_path: Path, busy_port: int) -> None:
    (tmp_path / "mybot.py").write_text(BOT_MODULE)
    result = run_callbot(
        "run",
        "mybot:bot",
        "--port",
        str(busy_port),
        cwd=tmp_path,
        CALLBOT_APP_ID="x",
        CALLBOT_LOG_FORMAT="json",
    )
    assert_one_clear_line(result, f"cannot listen on 127.0.0.1:{busy_port}")
    assert "bot_started" in result.stderr


def test_a_port_in_use_on_every_address_names_it_as_a_url_would(tmp_path: Path) -> None:
    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack sockets here")
    # An IPv4 listener is enough to take the port from a bot on every address.
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        (tmp_path / "mybot.py").write_text(BOT_MODULE)
        result = run_callbot(
            "run",
            "mybot:bot",
            "--host",
            "::",
            "--port",
            str(port),
            cwd=tmp_path,
            CALLBOT_APP_ID="x",
        )
    assert_one_clear_line(result, f"cannot listen on [::]:{port}")


def test_an_address_not_this_machines_names_the_host_option(tmp_path: Path) -> None:
    """The hint said to choose another port, which would fail the same way."""
    (tmp_path / "mybot.py").write_text(BOT_MODULE)
    result = run_callbot(
        "run", "mybot:bot", "--host", "192.0.2.1", cwd=tmp_path, CALLBOT_APP_ID="x"
    )
    assert_one_clear_line(result, "cannot listen on 192.0.2.1:8080: ")
    assert result.stderr.strip().endswith("(choose another with --host or CALLBOT_HOST)")


CODE_BOT_MODULE = """
from callbot import CallBot

bot = CallBot(app_id="x", host="0.0.0.0", port={port})
"""


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound, never listening."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


def test_ctrl_c_while_simulate_waits_for_the_bot_is_one_line(
    tmp_path: Path, closed_port: int
) -> None:
    """Ctrl-C in a command that does not serve a bot (simulate, replay, demo, a bot module
    still importing) was a KeyboardInterrupt traceback."""
    url = f"http://127.0.0.1:{closed_port}/api/calls"
    ports = ["--keys-port", "0", "--graph-port", "0"]
    with subprocess.Popen(
        [sys.executable, "-m", "callbot", "simulate", url, "dtmf", "--app-id", "x", *ports],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=callbot_environment(),
    ) as process:
        assert process.stderr is not None
        said = [process.stderr.readline()]
        while said[-1] and not said[-1].startswith("Waiting for the bot"):
            said.append(process.stderr.readline())
        assert said[-1], said
        process.send_signal(signal.SIGINT)
        rest = process.stderr.read()
        status = process.wait(timeout=60)
    assert status == 130
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1] == "callbot: interrupted"


def test_callbot_run_listens_where_the_environment_says_for_a_bot_built_in_code(
    tmp_path: Path, busy_port: int
) -> None:
    # A container image sets CALLBOT_HOST and CALLBOT_PORT; the bot's code names other ones.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        (tmp_path / "mybot.py").write_text(CODE_BOT_MODULE.format(port=other.getsockname()[1]))
        result = run_callbot(
            "run",
            "mybot:bot",
            cwd=tmp_path,
            CALLBOT_HOST="127.0.0.1",
            CALLBOT_PORT=str(busy_port),
            CALLBOT_LOG_FORMAT="json",
        )
    assert_one_clear_line(result, f"cannot listen on 127.0.0.1:{busy_port}")


def test_a_port_in_the_environment_that_is_not_a_number_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "mybot.py").write_text(CODE_BOT_MODULE.format(port=8080))
    result = run_callbot("run", "mybot:bot", cwd=tmp_path, CALLBOT_PORT="eighty")
    assert_one_clear_line(result, "CALLBOT_PORT: cannot read 'eighty' as int")


def _run_bot_module(tmp_path: Path, busy_port: int, **env: str) -> subprocess.CompletedProcess[str]:
    """``callbot run`` of a bot module on a port already taken: it checks its settings,
    logs its start, then stops at once."""
    (tmp_path / "mybot.py").write_text(BOT_MODULE)
    return run_callbot(
        "run", "mybot:bot", "--port", str(busy_port), cwd=tmp_path, CALLBOT_APP_ID="x", **env
    )


def _logged_by_run(tmp_path: Path, busy_port: int, **env: str) -> list[dict[str, Any]]:
    """The JSON log lines of :func:`_run_bot_module`."""
    result = _run_bot_module(tmp_path, busy_port, CALLBOT_LOG_FORMAT="json", **env)
    return [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]


def test_a_bot_that_cannot_act_says_so_loudly(tmp_path: Path, busy_port: int) -> None:
    lines = _logged_by_run(tmp_path, busy_port)
    warning = next(line for line in lines if line["event"] == "bot_cannot_act")
    assert warning["level"] == "warning"
    assert "CALLBOT_TENANT_ID" in warning["missing"]


def test_a_record_path_that_cannot_be_written_stops_the_bot_at_start(
    tmp_path: Path, busy_port: int
) -> None:
    """It was logged once at the first call (``recording_failed``), and nothing recorded."""
    result = _run_bot_module(tmp_path, busy_port, CALLBOT_RECORD_PATH=str(tmp_path))
    assert_one_clear_line(result, f"cannot write record_path {tmp_path}: Is a directory")
    assert "(CALLBOT_RECORD_PATH)" in result.stderr


@pytest.mark.parametrize("ca_file", ["missing.pem", ".", "mybot.py"])
def test_a_recording_ca_file_that_cannot_be_read_stops_the_bot_at_start(
    tmp_path: Path, busy_port: int, ca_file: str
) -> None:
    """It was read at the first recording download: the handler raised, mid-call."""
    result = _run_bot_module(tmp_path, busy_port, CALLBOT_RECORDING_CA_FILE=ca_file)
    assert_one_clear_line(result, f"cannot read recording_ca_file {ca_file}: ")
    assert result.stderr.strip().endswith("(CALLBOT_RECORDING_CA_FILE)")


def test_a_public_url_that_ends_in_the_callback_path_is_warned_about(
    tmp_path: Path, busy_port: int
) -> None:
    """Graph was told to post to .../api/calls/api/calls, and only a 404 line said so, once
    the first call came."""
    lines = _logged_by_run(
        tmp_path, busy_port, CALLBOT_PUBLIC_URL="https://bot.example.com/api/calls/"
    )
    [warning] = [line for line in lines if line["event"] == "public_url_ends_in_callback_path"]
    assert warning["level"] == "warning"
    assert warning["callback_url"] == "https://bot.example.com/api/calls/api/calls"


def test_stdlib_logging_shows_under_callbot_run(tmp_path: Path, busy_port: int) -> None:
    lines = _logged_by_run(tmp_path, busy_port, CALLBOT_LOG_LEVEL="info")
    loaded = [line for line in lines if line["event"] == "mybot loaded"]
    assert loaded
    assert loaded[0]["level"] == "info"
    assert loaded[0]["logger"] == "mybot"
    assert "timestamp" in loaded[0]
    assert not [line for line in lines if line["event"] == "mybot details"]


def test_python_warnings_under_callbot_run_are_json_lines_too(
    tmp_path: Path, busy_port: int
) -> None:
    """A coroutine a bot forgot to await made Python write its warning as two raw lines in
    the middle of the JSON ones, which a log shipper reads as two malformed events."""
    (tmp_path / "mybot.py").write_text(
        "from callbot import CallBot\n"
        "async def greet() -> None: ...\n"
        "greet()  # never awaited\n"
        "bot = CallBot.from_env()\n"
    )
    result = run_callbot(
        "run",
        "mybot:bot",
        "--port",
        str(busy_port),
        cwd=tmp_path,
        CALLBOT_APP_ID="x",
        CALLBOT_LOG_FORMAT="json",
    )
    *logged, last = result.stderr.strip().splitlines()
    assert last.startswith("callbot: cannot listen"), result.stderr
    lines = [json.loads(line) for line in logged]
    assert all(isinstance(line, dict) for line in lines), result.stderr
    [warning] = [line for line in lines if line.get("logger") == "py.warnings"]
    assert "coroutine 'greet' was never awaited" in warning["event"]
    assert warning["level"] == "warning"


def test_a_bot_serving_itself_logs_as_its_settings_say(tmp_path: Path, busy_port: int) -> None:
    # `python bot.py` (bot.run() or bot.serve()), as the meeting and notifier samples do.
    (tmp_path / "selfserved.py").write_text(
        "import logging\n"
        "from callbot import CallBot\n"
        "bot = CallBot(app_id='x', log_format='json', log_level='warning',\n"
        f"              openid_config_url='https://keys.invalid/openid', port={busy_port})\n"
        "try:\n"
        "    bot.run()\n"
        "except OSError:\n"
        "    logging.getLogger('mybot').warning('port taken')\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    result = subprocess.run(
        [sys.executable, "selfserved.py"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=environ,
        check=False,
    )
    lines = result.stderr.strip().splitlines()
    assert lines, result.stderr
    assert all(line.startswith("{") for line in lines), result.stderr
    events = [json.loads(line)["event"] for line in lines]
    assert "bot_cannot_act" in events
    assert "port taken" in events
    assert "bot_started" not in events  # info, below the bot's level


def test_sample_writes_a_sample_that_passes_its_tests(tmp_path: Path) -> None:
    result = run_callbot("sample", "ivr", "my_ivr", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "my_ivr").iterdir()) == [
        "README.md",
        "SAMPLES.md",
        "__init__.py",
        "bot.py",
        "test_ivr.py",
    ]
    # The sample's README links to the common steps, which come with it.
    readme = (tmp_path / "my_ivr" / "README.md").read_text(encoding="utf-8")
    assert "](SAMPLES.md" in readme
    assert "../" not in readme
    again = run_callbot("sample", "ivr", "my_ivr", cwd=tmp_path)
    assert_one_clear_line(again, "not empty")


@pytest.mark.parametrize(
    ("directory", "expected"),
    [
        ("notes.txt", "notes.txt is a file: choose a new directory"),
        ("notes.txt/ivr", "Not a directory"),
    ],
)
def test_sample_where_no_directory_can_be_is_one_clear_line(
    tmp_path: Path, directory: str, expected: str
) -> None:
    (tmp_path / "notes.txt").write_text("mine\n", encoding="utf-8")
    result = run_callbot("sample", "ivr", directory, cwd=tmp_path)
    assert_one_clear_line(result, expected)
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine\n"


@pytest.mark.parametrize("directory", ["my-ivr", "2024_ivr", "class", "ivr/my-ivr"])
def test_sample_refuses_a_directory_its_tests_cannot_import(tmp_path: Path, directory: str) -> None:
    """The tests import the bot from their own folder (``from . import bot``): pytest names
    the folder as a package, so a name that is no Python identifier would fail them all."""
    result = run_callbot("sample", "ivr", directory, cwd=tmp_path)
    assert_one_clear_line(result, "not a Python package name")
    assert not (tmp_path / directory).exists()


@pytest.mark.parametrize("directory", ["callbot", "json", "aiohttp"])
def test_sample_refuses_a_directory_named_as_a_module_python_has(
    tmp_path: Path, directory: str
) -> None:
    """pytest imports the folder's tests as DIRECTORY.test_ivr: a module of that name already
    imported (callbot itself, the standard library's) leaves them nothing to import."""
    result = run_callbot("sample", "ivr", directory, cwd=tmp_path)
    assert_one_clear_line(result, f"'{directory}' is the name of a module Python already has")
    assert not (tmp_path / directory).exists()


def test_sample_written_into_the_current_directory_is_named_by_it(tmp_path: Path) -> None:
    (tmp_path / "my-ivr").mkdir()
    refused = run_callbot("sample", "ivr", ".", cwd=tmp_path / "my-ivr")
    assert_one_clear_line(refused, "not a Python package name")
    (tmp_path / "my_ivr").mkdir()
    written = run_callbot("sample", "ivr", ".", cwd=tmp_path / "my_ivr")
    assert written.returncode == 0, written.stderr


def test_sample_next_steps_name_a_directory_given_with_a_slash_once(tmp_path: Path) -> None:
    result = run_callbot("sample", "ivr", "my_ivr/", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "//" not in result.stdout
    assert "for real: my_ivr/README.md" in result.stdout


@pytest.mark.parametrize("name", ["ivr", "meeting", "notifier"])
def test_sample_next_steps_name_the_command_its_readme_gives(tmp_path: Path, name: str) -> None:
    result = run_callbot("sample", name, "mine", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    readme = (tmp_path / "mine" / "README.md").read_text(encoding="utf-8")
    hint = next(line for line in result.stdout.splitlines() if "cd mine && " in line)
    command = hint.split("cd mine && ", 1)[1].split("  #", 1)[0].strip()
    # The words before any placeholder are what the README runs in the sample's folder.
    assert command.split("<", 1)[0].rstrip(' "') in readme, (command, name)


@pytest.mark.usefixtures("logging_restored")
def test_stdlib_lines_carry_the_bound_call_id_and_honour_the_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "warning")
    configure_logging("json", "debug")  # configuring again replaces, never doubles
    log = logging.getLogger("handlers")
    with structlog.contextvars.bound_contextvars(call_id="call-1"):
        log.debug("pressed %s", "1")
    lines: list[dict[str, Any]] = [
        json.loads(line) for line in capsys.readouterr().err.splitlines()
    ]
    assert len(lines) == 1
    assert lines[0]["event"] == "pressed 1"
    assert lines[0]["call_id"] == "call-1"
    assert lines[0]["level"] == "debug"


@pytest.mark.usefixtures("logging_restored")
def test_a_context_variable_set_binds_its_key_for_lines_of_that_context(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info")
    variable = context_variable("call_id")
    assert structlog.contextvars.get_contextvars() == {}  # made, nothing left bound
    log = structlog.get_logger("handlers")

    def in_a_run() -> None:
        variable.set("call-2")
        log.info("answered")

    contextvars.copy_context().run(in_a_run)
    log.info("outside")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["event"], line.get("call_id")) for line in lines] == [
        ("answered", "call-2"),
        ("outside", None),
    ]
    assert context_variable("call_id") is variable  # one variable per key, as structlog keeps


@pytest.mark.usefixtures("logging_restored")
def test_console_lines_escape_what_stderr_cannot_encode(monkeypatch: pytest.MonkeyPatch) -> None:
    # A pipe or a file opened strictly, as a service manager may give a bot.
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("console", "debug")
    structlog.get_logger("callbot.graph").info("graph_operation_started", operation_id="\udc00")
    logging.getLogger("handlers").warning("caller named %s", "caf\u00e9 \ud83d")
    stream.flush()
    assert isinstance(stream.buffer, io.BytesIO)
    text = stream.buffer.getvalue().decode("utf-8")
    assert "graph_operation_started" in text
    assert "\\udc00" in text
    assert "caller named caf\u00e9 \\ud83d" in text


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.usefixtures("logging_restored")
@pytest.mark.parametrize(
    ("stream", "no_color", "coloured"),
    [(io.StringIO, None, False), (_Terminal, None, True), (_Terminal, "1", False)],
    ids=["file", "terminal", "terminal-NO_COLOR"],
)
def test_console_lines_are_coloured_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, stream: type[io.StringIO], no_color: str | None, coloured: bool
) -> None:
    """``CALLBOT_LOG_FORMAT=console`` with stderr sent to a file wrote colour codes into it."""
    out = stream()
    monkeypatch.setattr(sys, "stderr", out)
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    configure_logging("console", "info")
    structlog.get_logger("callbot.bot").info("bot_started", callback_path="/api/calls")
    text = out.getvalue()
    assert "bot_started" in text
    assert ("\x1b[" in text) is coloured


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:abc/0",
        "redis://127.0.0.1:99999/0",
        "redis://127.0.0.1:6379/0?socket_timeout=abc",
        "redis+sentinel://127.0.0.1:2637x/mymaster",
        "redis+sentinel://127.0.0.1:26379/mymaster/x",
    ],
)
def test_a_malformed_store_url_is_one_clear_line(tmp_path: Path, url: str) -> None:
    (tmp_path / "mybot.py").write_text(BOT_MODULE)
    result = run_callbot(
        "run", "mybot:bot", "--port", "0", cwd=tmp_path, CALLBOT_APP_ID="x", CALLBOT_STORE=url
    )
    assert_one_clear_line(result, "CALLBOT_STORE")


URL = "http://127.0.0.1:8080/api/calls"


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        (["run", "mybot:bot"], "--port", "-1"),
        (["run", "mybot:bot"], "--port", "70000"),
        (["simulate", URL, "dtmf"], "--keys-port", "65536"),
        (["replay", "calls.jsonl", "--url", URL], "--graph-port", "-8766"),
        (["demo"], "--pace", "-1"),
        (["demo"], "--pace", "inf"),
        (["simulate", URL, "dtmf"], "--wait", "nan"),
        (["simulate", URL, "dtmf"], "--hold", "-1"),
        (["simulate", URL, "dtmf"], "--timeout", "nan"),
        (["simulate", URL, "dtmf"], "--prompt-seconds", "-0.5"),
        (["replay", "calls.jsonl", "--bot", "mybot:bot"], "--speed", "-2"),
        (["replay", "calls.jsonl", "--bot", "mybot:bot"], "--max-gap", "nan"),
        (["replay", "calls.jsonl", "--bot", "mybot:bot"], "--settle", "-inf"),
    ],
)
def test_a_port_or_a_duration_out_of_range_is_a_usage_error(
    command: list[str], option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A port past 65535 was an OverflowError traceback once the bot or the simulator
    started; a negative or NaN number of seconds waited for ever, or not at all."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command, f"{option}={value}"])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {option}: " in last
    assert value in last


@pytest.mark.parametrize(
    "url", ["notaurl", "ftp://127.0.0.1/api/calls", "http:///api/calls", "http://127.0.0.1:99999/x"]
)
@pytest.mark.parametrize("before", [["simulate"], ["replay", "calls.jsonl", "--url"]])
def test_a_callback_url_that_is_not_one_is_a_usage_error(
    url: str, before: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A URL with no http(s) scheme or no host waited for a bot at ``:///readyz``; one with a
    bad port was a ValueError traceback."""
    after = ["dtmf"] if before == ["simulate"] else []
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*before, url, *after, "--app-id", "x"])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "http://127.0.0.1:8080/api/calls" in last  # what one looks like
    assert repr(url) in last


@pytest.mark.parametrize("taken", ["--keys-port", "--graph-port"])
def test_a_simulator_port_in_use_is_one_clear_line(
    tmp_path: Path, busy_port: int, closed_port: int, taken: str
) -> None:
    ports = {"--keys-port": "0", "--graph-port": "0", taken: str(busy_port)}
    url = f"http://127.0.0.1:{closed_port}/api/calls"
    for command in (["simulate", url, "dtmf"], ["replay", "calls.jsonl", "--url", url]):
        (tmp_path / "calls.jsonl").write_text('{"value": []}\n', encoding="utf-8")
        options = [word for pair in ports.items() for word in pair]
        result = run_callbot(*command, "--app-id", "x", *options, "--wait", "0", cwd=tmp_path)
        # Python 3.13 puts "[errno 98] " before the reason: the port and the reason are what count.
        assert_one_clear_line(result, f"'127.0.0.1', {busy_port})")
        last = result.stderr.strip().splitlines()[-1]
        assert "address already in use" in last
        assert taken in last


@pytest.mark.parametrize("command", [["demo"], ["replay", "calls.jsonl", "--bot", "mybot:bot"]])
@pytest.mark.parametrize("where", [".", "no/such/folder/calls.md"])
def test_a_diagram_that_cannot_be_written_there_is_refused_before_the_run(
    command: list[str], where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder, or a file in a folder that does not exist, was an IsADirectoryError or
    FileNotFoundError traceback once every call had been played."""
    target = str(tmp_path / where)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command, "--diagram", target])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument --diagram: cannot write {target}" in last


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_a_diagram_that_fails_to_be_written_is_one_clear_line(tmp_path: Path) -> None:
    result = run_callbot(
        "demo", "--pace", "0", "--format", "json", "--diagram", "/dev/full", cwd=tmp_path
    )
    assert_one_clear_line(result, "cannot write the diagram to /dev/full: No space left on device")


@pytest.mark.parametrize(
    ("scenario", "option"),
    [
        ("outgoing-call", ["--blind"]),
        ("meeting-roster", ["--blind"]),
        ("incoming-call", ["--keys", "12"]),
        ("outgoing-call", ["--application-instance-id", "3e1d6b4c-0f7a-4c5e-8d2b-9a6f1c2e7b40"]),
    ],
)
def test_an_option_the_scenario_does_not_play_by_is_a_usage_error(
    tmp_path: Path, closed_port: int, scenario: str, option: list[str]
) -> None:
    """``outgoing-call --blind`` set the simulator up and then failed the run (status 1: only
    the bot's createCall names the call); ``--keys`` or an instance went ignored unsaid."""
    url = f"http://127.0.0.1:{closed_port}/api/calls"
    ports = ["--keys-port", "0", "--graph-port", "0", "--wait", "0"]
    result = run_callbot("simulate", url, scenario, *option, "--app-id", "x", *ports, cwd=tmp_path)
    assert_one_clear_line(result, f"{scenario} takes no {option[0]} (only ")
    assert result.stdout == ""  # nothing was played


def test_keys_no_keypad_has_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """They were a ValueError traceback once the call was set up and the first key due."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["simulate", URL, "dtmf", "--keys", "1x"])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("argument --keys: not a DTMF key: 'x' (use 0-9, *, #, A-D)")
    args = build_parser().parse_args(["simulate", URL, "dtmf", "--keys", "1 2#"])
    assert args.keys == "12#"


@pytest.mark.parametrize(
    ("variable", "value"), [("CALLBOT_LOG_LEVEL", "loud"), ("CALLBOT_LOG_FORMAT", "xml")]
)
def test_simulate_refuses_a_log_setting_no_bot_takes(
    tmp_path: Path, closed_port: int, variable: str, value: str
) -> None:
    """It logged as if the variable were unset, where ``callbot run`` refuses it."""
    url = f"http://127.0.0.1:{closed_port}/api/calls"
    ports = ["--keys-port", "0", "--graph-port", "0", "--wait", "0"]
    result = run_callbot(
        "simulate", url, "dtmf", "--app-id", "x", *ports, cwd=tmp_path, **{variable: value}
    )
    assert_one_clear_line(result, f"got {value!r} ({variable})")
