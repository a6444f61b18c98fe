"""``callbot demo`` as a person runs it: a subprocess, no account, no network, exit 0."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from typing import Any

import pytest


def demo_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    # Whatever a developer has configured must not reach the demo: it needs nothing.
    env.update(
        {
            "CALLBOT_APP_ID": "not-the-demo-bot",
            "CALLBOT_GRAPH_URL": "https://graph.invalid/v1.0",
            "CALLBOT_OPENID_CONFIG_URL": "https://keys.invalid/openid",
            "CALLBOT_AUTHORITY_URL": "https://login.invalid",
        }
    )
    return env


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callbot", "demo", "--pace", "0.05", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=demo_environment(),
        check=False,
    )


def test_demo_plays_whole_calls_and_exits_0_printing_json_lines_to_a_pipe() -> None:
    result = run_demo()
    assert result.returncode == 0, result.stderr
    lines: list[dict[str, Any]] = [json.loads(line) for line in result.stdout.splitlines()]
    summaries = [line["summary"] for line in lines]
    assert summaries[0].startswith("callbot demo")
    assert summaries[-1].startswith("demo finished: 3 calls")

    notifications = [line for line in lines if line["kind"] == "notification"]
    assert notifications
    assert all(line["status"] == 202 for line in notifications)
    posted = [line["summary"] for line in notifications]
    for expected in (
        "incoming call from Adele Vance",
        "call establishing",
        "call established",
        "playPrompt operation completed",
        "DTMF tone7",
        "DTMF tone1",
        "call transferring",
        "call transferAccepted",
        "call terminated (code 0/7015 GracefulTransferCompleted)",
        "DTMF tone2",
        "call terminating",
        "call terminated (code 200/5002 The conversation has ended. DiagCode: 0#5002.@)",
    ):
        assert expected in posted, expected

    actions = [line["action"] for line in lines if line["kind"] == "request"]
    for expected in (
        "token",
        "answer",
        "subscribeToTone",
        "playPrompt",
        "transfer",
        "recordResponse",
        "recording",
        "deleteCall",
    ):
        assert expected in actions, expected
    # In order: the call rings, the bot answers, then Graph connects it.
    first_call = [s for s in summaries if s in ("incoming call from Adele Vance", "answer")]
    assert first_call[:2] == ["incoming call from Adele Vance", "answer"]
    assert posted.index("call establishing") < posted.index("call established")
    callers = [line["summary"] for line in lines if line["kind"] == "caller"]
    assert callers == [
        "Adele Vance presses 7",
        "Adele Vance presses 1",
        "+14255550100 presses 2",
        "Lee Gu hangs up",
    ]


def test_each_call_is_printed_whole_before_the_next_one_is_announced() -> None:
    result = run_demo()
    assert result.returncode == 0, result.stderr
    lines: list[dict[str, Any]] = [json.loads(line) for line in result.stdout.splitlines()]
    announced = [i for i, line in enumerate(lines) if line["summary"].startswith("Call ")]
    assert len(announced) == 3
    ends = [*announced[1:], len(lines)]
    for number, (start, end) in enumerate(zip(announced, ends, strict=True), 1):
        ids = {line.get("call_id") for line in lines[start + 1 : end]} - {None}
        assert len(ids) == 1, f"call {number}'s section shows calls {ids}"


def test_demo_in_plain_text_reads_like_a_call() -> None:
    result = run_demo("--format", "plain")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "== Call 1: Adele Vance calls" in out
    assert "Graph -> bot" in out
    assert "bot -> Graph" in out
    assert "transfer to Agent (202)" in out
    assert "demo finished" in out
    assert "{" not in out


def test_demo_on_a_terminal_is_for_people() -> None:
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "callbot", "demo", "--pace", "0.05"],
        stdout=terminal,
        stderr=subprocess.PIPE,
        env=demo_environment(),
    )
    os.close(terminal)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the demo closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.wait(timeout=30) == 0
    assert process.stderr is not None
    process.stderr.close()
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert "Graph -> bot" in shown
    assert "demo finished" in shown
    assert '{"kind"' not in shown


@pytest.mark.parametrize(
    "moment",
    ["Adele Vance presses 7", "+14255550100 presses 2"],
    ids=["in-the-menu", "recording-a-voicemail"],
)
def test_ctrl_c_hangs_up_the_calls_and_ends_without_errors(moment: str) -> None:
    # A newcomer's Ctrl-C: the callers hang up, the bot's handlers end, nothing is abandoned.
    process = subprocess.Popen(
        [sys.executable, "-m", "callbot", "demo", "--pace", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=demo_environment(),
    )
    assert process.stdout is not None
    shown: list[dict[str, Any]] = []
    for line in process.stdout:  # the demo ends by itself (its waits are bounded) if never seen
        shown.append(json.loads(line))
        if shown[-1]["summary"] == moment:
            process.send_signal(signal.SIGINT)
            break
    else:
        raise AssertionError(f"the demo never showed {moment!r}")
    rest, errors = process.communicate(timeout=60)
    shown += [json.loads(line) for line in rest.splitlines()]
    assert process.returncode == 130
    assert errors == "callbot: interrupted\n"
    summaries = [line["summary"] for line in shown]
    assert not [s for s in summaries if "abandoned" in s], summaries
    assert "demo finished" not in " ".join(summaries)
    assert "interrupted: the callers hang up, then the bot stops" in summaries
    # Whatever the calls were doing when the signal came, each one started has ended.
    started = {line["call_id"] for line in shown if line["summary"].startswith("incoming call")}
    ended = {line["call_id"] for line in shown if line["summary"].startswith("call terminated")}
    assert started, summaries
    assert started == ended, summaries


def test_the_commands_are_listed_in_the_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "callbot", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    for command in ("demo", "simulate", "replay"):
        assert command in result.stdout
