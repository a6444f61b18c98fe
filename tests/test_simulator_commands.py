"""``callbot simulate`` and ``callbot replay``, and the recording replays read."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from callbot import Call, CallBot, CallbotError, Settings, events
from callbot._auth import Authenticator
from callbot._display import TrafficPrinter
from callbot._recording import REMOVED, read_recording, scrub
from callbot._simulate import RemoteBot, _show_setup, replay, simulate
from callbot.cli import build_parser, main
from callbot.graph import Meeting, Target
from callbot.testing import (
    Simulator,
    SimulatorError,
    TokenAuthority,
    builders,
    run_with_simulator,
)
from callbot.testing._scenarios import SCENARIOS, ScenarioOptions

from .conftest import APP_ID, until
from .test_recorded import recorded_body
from .test_simulator import answering_bot, labels, recording_bot


def quiet_printer() -> TrafficPrinter:
    return TrafficPrinter(io.StringIO(), fmt="json")


def printer_text(printer: TrafficPrinter) -> str:
    stream = printer.stream
    assert isinstance(stream, io.StringIO)
    return stream.getvalue()


def test_scrub_removes_tokens_and_secrets_only() -> None:
    item = {
        "resourceData": {
            "recordingAccessToken": "secret-1",
            "recordingLocation": "https://x/1",
            "meetingInfo": {"@odata.type": "#microsoft.graph.tokenMeetingInfo", "token": "t"},
            "list": [{"access_token": "a"}, {"id": "keep"}],
            "emptyToken": "",
            "joined": {"joinMeetingId": "2487612934", "passcode": "Xk3hQ9"},
            "link": "https://teams.microsoft.com/meet/2487612934?lang=en&p=Xk3hQ9#top",
            "other": "https://example.com/meet/room?q=p=1",
        }
    }
    assert scrub(item) == {
        "resourceData": {
            "recordingAccessToken": REMOVED,
            "recordingLocation": "https://x/1",
            "meetingInfo": {"@odata.type": "#microsoft.graph.tokenMeetingInfo", "token": REMOVED},
            "list": [{"access_token": REMOVED}, {"id": "keep"}],
            "emptyToken": "",
            "joined": {"joinMeetingId": "2487612934", "passcode": REMOVED},
            "link": f"https://teams.microsoft.com/meet/2487612934?lang=en&p={REMOVED}#top",
            "other": "https://example.com/meet/room?q=p=1",
        }
    }


@pytest.mark.parametrize(
    "meeting",
    [
        Meeting.join_id("2487612934", "Xk3hQ9secret"),
        "https://teams.microsoft.com/meet/2487612934?p=Xk3hQ9secret",  # a chat's short link
    ],
    ids=["join-id", "short-link"],
)
async def test_a_joined_meeting_s_passcode_is_not_recorded(
    tmp_path: Path, meeting: Meeting | str
) -> None:
    """Graph repeats the meeting a bot joined in the call's ``meetingInfo``: its passcode,
    which with the meeting id lets anyone join, is removed from the recording as a token
    is."""
    path = tmp_path / "calls.jsonl"
    bot = CallBot(app_id=APP_ID, record_path=str(path))

    def recorded_meeting() -> bool:
        return path.exists() and '"meetingInfo"' in path.read_text(encoding="utf-8")

    async with run_with_simulator(bot) as sim:
        await bot.join_meeting(meeting)
        joined = await sim.wait_for_outgoing_call()
        await joined.wait_for_state("established")
        await until(recorded_meeting)
    text = path.read_text(encoding="utf-8")
    assert "Xk3hQ9secret" not in text
    assert '"passcode":"[removed]"' in text


async def test_accepted_notifications_are_recorded_without_tokens_then_replayed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "incident.jsonl"
    bot, seen = answering_bot(record_path=str(path))

    @bot.on_tone
    async def voicemail(call: Call, event: events.ToneReceived) -> None:
        await (await call.record_response(max_record_duration=5)).wait(timeout=5)
        await call.hangup()

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.press("2")
        await call.wait_until_ended()
        await until(lambda: "terminated" in labels(seen))
    text = path.read_text(encoding="utf-8")
    assert "Bearer" not in text
    assert "eyJ" not in text  # no JWT of any kind
    batches = list(read_recording(path))
    assert len(batches) == len([t for t in sim.traffic if t.kind == "notification"])
    completed = [
        item["resourceData"]
        for batch in batches
        for item in batch.body["value"]
        if isinstance(item["resourceData"], dict)
        and item["resourceData"].get("@odata.type") == "#microsoft.graph.recordOperation"
    ]
    assert completed[0]["recordingAccessToken"] == REMOVED
    assert all(batch.at for batch in batches)
    assert batches[0].tenant_id == sim.tenant_id  # the incoming call names its tenant

    again, seen_again = recording_bot()
    printer = quiet_printer()
    status = await replay(path, printer=printer, bot=again, speed=0, settle=0.2)
    assert status == 0
    assert labels(seen_again) == labels(seen)
    # This bot started no recording: the recorded outcome went to no operation, and says so.
    assert "1 operation outcome(s) matched no operation the bot started" in printer_text(printer)


async def test_a_replayed_bot_gets_the_recorded_outcomes_of_its_own_operations(
    tmp_path: Path,
) -> None:
    """Replayed, the bot's actions get new ids and contexts: each recorded outcome goes to
    the operation of its kind the replayed bot started on the call, so its waits end as in
    the recording (the voicemail is recorded, then the bot hangs up)."""
    path = tmp_path / "incident.jsonl"

    def voicemail_bot(**options: Any) -> tuple[CallBot, list[events.Event], list[str]]:
        bot, seen = answering_bot(**options)
        reasons: list[str] = []

        @bot.on_tone
        async def voicemail(call: Call, event: events.ToneReceived) -> None:
            done = await (await call.record_response(max_record_duration=5)).wait(timeout=5)
            reasons.append(str(done.result_info and done.result_info.message))
            await call.hangup()

        return bot, seen, reasons

    bot, seen, reasons = voicemail_bot(record_path=str(path))
    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call()
        await call.press("2")
        await call.wait_until_ended()
        await until(lambda: "terminated" in labels(seen))
    again, seen_again, reasons_again = voicemail_bot()
    printer = quiet_printer()
    status = await replay(path, printer=printer, bot=again, speed=0, settle=10.0)
    assert status == 0
    assert reasons_again == reasons == ["Action completed, max record duration reached."]
    assert labels(seen_again) == labels(seen)
    assert "matched no operation" not in printer_text(printer)


async def test_a_recorded_outcome_naming_its_path_in_resource_only_is_told_to_the_bot(
    tmp_path: Path,
) -> None:
    """Older Graph named the path in ``resource`` only (the beta Create call page, the 2019
    playPrompt outcome): replayed, such an outcome still ends the bot's own wait."""
    names = [
        "seed001-beta-create-call-establishing.json",
        "seed001-beta-create-call-ringing.json",
        "seed001-beta-create-call-established.json",
        "gdh26-beta-call-playprompt-2019.json",
        "gdh08-beta-call-delete-2018.json",
    ]
    path = tmp_path / "legacy.jsonl"
    path.write_text("".join(json.dumps(recorded_body(name)) + "\n" for name in names))
    bot = CallBot(app_id=APP_ID)
    outcomes: list[str] = []

    @bot.on_state("established")
    async def prompt(call: Call, event: events.CallStateChanged) -> None:
        op = await call.play_prompt("https://cdn.contoso.com/hello.wav")
        outcomes.append(str((await op.wait(timeout=10)).status))

    printer = quiet_printer()
    status = await replay(path, printer=printer, bot=bot, speed=0, settle=10.0)
    assert status == 0
    assert outcomes == ["completed"]
    assert "matched no operation" not in printer_text(printer)


def test_a_recording_may_hold_bare_bodies_and_items(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [
        builders.notifications(builders.incoming_call("c1")),
        builders.call_state("c1", "established"),
        {"at": 1700000000.5, "value": [builders.tone("c1", "tone1", 1)]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    batches = list(read_recording(path))
    assert [len(b.body["value"]) for b in batches] == [1, 1, 1]
    assert batches[2].at == 1700000000.5
    path.write_text('{"nothing": 1}\n', encoding="utf-8")
    with pytest.raises(Exception, match=r"mixed.jsonl:1"):
        list(read_recording(path))


def test_a_hostile_recording_is_refused_line_by_line_and_never_pauses_for_ever(
    tmp_path: Path,
) -> None:
    """A line nested deeper than the decoder goes, or not UTF-8, escaped as RecursionError or
    UnicodeDecodeError; a NaN or infinite time made ``replay`` wait for ever before it."""
    path = tmp_path / "hostile.jsonl"
    tone = json.dumps(builders.notifications(builders.tone("c1", "tone1", 1))).encode()
    for bad, why in (
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
        (b'{"value": "\xff"}'.replace(b"\\xff", b"\xff"), "not UTF-8"),
    ):
        path.write_bytes(tone + b"\n" + bad + b"\n")
        with pytest.raises(CallbotError, match=f"hostile.jsonl:2: {why}"):
            list(read_recording(path))
    stamped = [
        {"at": at, **builders.notifications(builders.tone("c1", "tone1", n))}
        for n, at in enumerate([1.0, float("nan"), float("inf"), "1e400", 10**400, 2.0])
    ]
    path.write_text("\n".join(json.dumps(line) for line in stamped), encoding="utf-8")
    assert [batch.at for batch in read_recording(path)] == [1.0, None, None, None, None, 2.0]


def replay_bot_module(directory: Path) -> None:
    (directory / "replaybot.py").write_text(
        "from callbot import CallBot, events\n"
        "seen = []\n"
        "bot = CallBot(app_id='6c4a7c4e-2b1a-4d7e-9a53-7a1bfb4c0d11')\n"
        "@bot.on(events.Event)\n"
        "async def record(call, event):\n"
        "    seen.append(type(event).__name__)\n",
        encoding="utf-8",
    )


@pytest.mark.usefixtures("logging_restored")
def test_replay_command_posts_a_recording_into_a_bot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    replay_bot_module(tmp_path)
    recording = tmp_path / "incident.jsonl"
    batches = [
        [builders.incoming_call("c1")],
        [builders.call_state("c1", "establishing"), builders.call_state("c1", "established")],
        [builders.tone("c1", "tone1", 1)],
        [builders.call_terminated("c1")],
    ]
    recording.write_text(
        "".join(
            json.dumps({"at": 1700000000 + i, "value": b}) + "\n" for i, b in enumerate(batches)
        ),
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CALLBOT_LOG_LEVEL", "warning")
    try:
        status = main(
            [
                "replay",
                str(recording),
                "--bot",
                "replaybot:bot",
                "--speed",
                "0",
                "--format",
                "json",
                "--diagram",
                "incident.md",
            ]
        )
        assert sys.modules["replaybot"].seen == [
            "IncomingCall",
            "CallStateChanged",
            "CallStateChanged",
            "ToneReceived",
            "CallTerminated",
        ]
    finally:
        sys.modules.pop("replaybot", None)
    assert status == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    posted = [entry for entry in out if entry["kind"] == "notification"]
    assert [entry["status"] for entry in posted] == [202, 202, 202, 202]
    assert posted[0]["summary"] == "incoming call from Caller"
    # The same call, drawn: one Mermaid sequence diagram, Graph's posts and the bot's answers.
    diagram = (tmp_path / "incident.md").read_text(encoding="utf-8")
    assert diagram.count("```mermaid\nsequenceDiagram\n") == 1
    assert "Graph->>Bot: incoming call from Caller (202)" in diagram
    assert "Graph->>Bot: DTMF tone1 (202)" in diagram


def scenario_bot(settings: Settings) -> tuple[CallBot, list[events.Event]]:
    """A bot as someone would run it elsewhere: answers, listens for keys, leaves empty meetings."""
    bot = CallBot(settings)
    seen: list[events.Event] = []

    @bot.on(events.Event)
    async def record(call: Call, event: events.Event) -> None:
        seen.append(event)

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    @bot.on_state("established")
    async def listen(call: Call, event: events.CallStateChanged) -> None:
        await call.subscribe_to_tone()

    @bot.on_participants
    async def leave_when_alone(call: Call, event: events.ParticipantsUpdated) -> None:
        people = [
            p for p in event.participants if p.info and p.info.identity and p.info.identity.user
        ]
        if event.left and not people:
            await call.hangup()

    return bot, seen


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_simulate_plays_a_scenario_against_a_bot_running_elsewhere(scenario: str) -> None:
    # The bot's socket is bound before its URL is given out: no other process can take it.
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    bot_port = listening.getsockname()[1]
    remote = RemoteBot(
        url=f"http://127.0.0.1:{bot_port}/api/calls",
        app_id=APP_ID,
        tenant_id="4f6c6a2e-3b1d-4e8a-9c57-2d0b8e1f7a63",
        keys_port=0,
        graph_port=0,
        wait=10.0,
    )
    info = io.StringIO()
    out = io.StringIO()
    playing = asyncio.create_task(
        simulate(
            remote,
            scenario,
            options=ScenarioOptions(timeout=5.0, hold=0.1, keys="12"),
            printer=TrafficPrinter(out, fmt="json"),
            prompt_seconds=0.05,
            info=info,
        )
    )
    # Configure the bot the way a person would: from the variables the command printed.
    await until(lambda: "Notifications go to" in info.getvalue() or playing.done())
    environ = dict(
        line.strip().removeprefix("export ").split("=", 1)
        for line in info.getvalue().splitlines()
        if line.strip().startswith("export ")
    )
    beta = environ["CALLBOT_GRAPH_URL"].removesuffix("/v1.0") + "/beta"
    assert f"CALLBOT_GRAPH_URL={beta}, served too" in info.getvalue()  # for a bot on beta
    settings = Settings.from_env(environ)
    assert settings.port == bot_port  # CALLBOT_PORT printed: the URL's is not the default
    bot, seen = scenario_bot(settings)
    runner = web.AppRunner(bot.create_app(), access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, listening).start()
        if scenario == "outgoing-call":
            await bot.create_call(Target.user("user-1", "Lee Gu"))
        status = await asyncio.wait_for(playing, 30)
    finally:
        await runner.cleanup()
        listening.close()
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    assert status == 0, "; ".join(e["summary"] for e in entries)
    assert entries[-1]["summary"] == f"scenario {scenario} finished"
    kinds = {type(e) for e in seen}
    if scenario == "meeting-roster":
        assert events.ParticipantsUpdated in kinds
        assert any(e.get("action") == "deleteCall" for e in entries)
    elif scenario == "outgoing-call":
        assert labels(seen)[:3] == ["establishing", "established", "CallUpdated"]
        assert events.CallTerminated in kinds
    else:
        assert events.IncomingCall in kinds
        assert events.CallTerminated in kinds
    if scenario == "dtmf":
        assert [e.tone for e in seen if isinstance(e, events.ToneReceived)] == ["tone1", "tone2"]


@pytest.mark.parametrize(
    ("url", "port"),
    [
        ("http://127.0.0.1:9123/api/calls", 9123),
        ("http://127.0.0.1:8080/api/calls", None),
        ("https://bot.contoso.com/api/calls", None),
    ],
    ids=["another-port", "default-port", "no-port"],
)
async def test_simulate_names_the_port_of_a_bot_not_on_the_default_one(
    url: str, port: int | None
) -> None:
    """The variables ``callbot simulate`` prints set up a bot listening on 8080 (callbot's
    default): one at another port given in the bot's URL was told nothing of it, and
    listened where no notification came. Its ``CALLBOT_PORT`` is printed with the rest; a
    URL on 8080, or naming no port (a proxy's), needs none."""
    remote = RemoteBot(url=url, app_id=APP_ID, tenant_id="t", keys_port=0, graph_port=0)
    info = io.StringIO()
    async with Simulator(app_id=APP_ID, keys_port=0, graph_port=0) as sim:
        _show_setup(sim, remote, info)
    environ = dict(
        line.strip().removeprefix("export ").split("=", 1)
        for line in info.getvalue().splitlines()
        if line.strip().startswith("export ")
    )
    assert environ.get("CALLBOT_PORT") == (str(port) if port else None)
    assert Settings.from_env(environ).port == (port or 8080)


async def test_an_outgoing_call_cannot_be_played_blind() -> None:
    """Without the bot's createCall the simulator knows of no call to play."""
    async with Simulator() as sim:
        with pytest.raises(SimulatorError, match="cannot be blind"):
            await SCENARIOS["outgoing-call"](sim, ScenarioOptions(blind=True))


def test_simulate_needs_the_bots_app_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CALLBOT_APP_ID", raising=False)
    assert main(["simulate", "http://127.0.0.1:9/api/calls", "dtmf"]) == 2
    assert "--app-id" in capsys.readouterr().err


async def test_simulate_in_json_writes_only_json_lines_to_stdout() -> None:
    """The simulator's own log lines (here: posts the bot never answered) went to stdout in
    structlog's console format, between the JSON lines ``--format json`` promises."""

    async def ready_but_drops_callbacks(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if (await reader.readline()).startswith(b"GET /readyz "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(ready_but_drops_callbacks, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    async with server:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "callbot",
            "simulate",
            f"http://127.0.0.1:{port}/api/calls",
            "incoming-call",
            "--app-id",
            APP_ID,
            "--keys-port",
            "0",
            "--graph-port",
            "0",
            "--format",
            "json",
            env={**environ, "CALLBOT_LOG_FORMAT": "json"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    assert process.returncode == 1, err.decode()
    printed = [json.loads(line) for line in out.decode().splitlines()]
    assert all(isinstance(entry, dict) for entry in printed)
    assert printed[-1]["summary"].startswith("scenario failed: the bot answered nothing")
    logged = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert "simulator_post_failed" in [line["event"] for line in logged]


INSTANCE_ID = "7629bdce-046c-4903-86b4-a8f718277e1a"


@pytest.mark.parametrize("scenario", ["incoming-call", "dtmf", "out-of-order"])
async def test_a_scenario_with_to_instance_calls_the_application_instance(scenario: str) -> None:
    """With ``ScenarioOptions(to_instance=True)`` a scenario's caller calls the simulator's
    application instance, as a Teams user calls a bot behind a resource account (Graph's
    PSTN-incoming-call document: a user's call whose target is the instance)."""
    bot = CallBot(app_id=APP_ID)
    offered: list[events.IncomingCall] = []

    @bot.on_incoming_call
    async def offer(call: Call, event: events.IncomingCall) -> None:
        offered.append(event)

    # Blind: the scenario plays the call through without waiting for the bot to answer.
    options = ScenarioOptions(to_instance=True, hold=0.0, timeout=5.0, blind=True)
    async with run_with_simulator(bot, application_instance_id=INSTANCE_ID) as sim:
        await SCENARIOS[scenario](sim, options)
    [target] = offered[0].call.targets or []
    assert target.identity is not None
    assert target.identity.application is None
    assert target.identity.application_instance is not None
    assert target.identity.application_instance.id == INSTANCE_ID
    assert offered[0].call.source is not None
    assert offered[0].call.source.identity is not None
    assert offered[0].call.source.identity.user is not None


@pytest.mark.usefixtures("logging_restored")
def test_simulate_with_an_application_instance_has_the_caller_call_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``callbot simulate ... --application-instance-id ID`` plays the scenario on a simulator
    with that instance, its caller calling it; without the option, on one with none given,
    its caller calling the bot's app."""
    played: list[tuple[RemoteBot, ScenarioOptions]] = []

    async def playing(
        remote: RemoteBot, scenario: str, *, options: ScenarioOptions, **_: Any
    ) -> int:
        played.append((remote, options))
        return 0

    monkeypatch.setattr("callbot._simulate.simulate", playing)
    command = ["simulate", "http://127.0.0.1:9/api/calls", "dtmf", "--app-id", APP_ID]
    assert main([*command, "--application-instance-id", INSTANCE_ID]) == 0
    assert main(command) == 0
    [(given, told), (default, untold)] = played
    assert (given.application_instance_id, told.to_instance) == (INSTANCE_ID, True)
    assert (default.application_instance_id, untold.to_instance) == (None, None)


def test_command_line_shapes() -> None:
    parser = build_parser()
    args: Any = parser.parse_args(["simulate", "http://127.0.0.1:8080/api/calls", "out-of-order"])
    assert (args.scenario, args.keys_port, args.graph_port) == ("out-of-order", 8765, 8766)
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "http://127.0.0.1:8080/api/calls", "no-such-scenario"])
    with pytest.raises(SystemExit):
        parser.parse_args(["replay", "calls.jsonl"])  # needs --bot or --url
    args = parser.parse_args(["demo", "--format", "plain", "--pace", "0"])
    assert (args.format, args.pace) == ("plain", 0.0)


def test_every_option_with_a_default_names_it_in_its_help() -> None:
    """``callbot COMMAND --help`` is where an option's default is looked up (how long
    ``simulate --hold`` keeps the caller on the line, say)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    silent = []
    for name, command in commands.choices.items():
        for action in command._actions:
            has_a_default = action.nargs != 0 and action.default not in (None, argparse.SUPPRESS)
            if not action.option_strings or not has_a_default:
                continue
            if "default" not in command._get_formatter()._expand_help(action):
                silent.append(f"{name} {action.option_strings[0]}")
    assert silent == []


async def test_runs_of_the_simulator_on_one_port_sign_with_one_key(tmp_path: Path) -> None:
    """A bot configured once trusts every later run at once: a new key each run would be
    refused (401 unknown_key) until the bot's key refetch cooldown had passed."""
    key_file = tmp_path / "callbot-simulator-8765.pem"
    first = TokenAuthority(key_file=key_file)
    await first.start()
    bot_side = Authenticator(app_id=APP_ID, openid_config_url=first.openid_config_url)
    try:
        await bot_side.start()
        await bot_side.verify(f"Bearer {first.mint(audience=APP_ID)}")
        fetched = first.jwks_fetches
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        again = TokenAuthority(key_file=key_file)
        assert again.kid == first.kid
        # The keys the bot fetched from the first run verify the next run's tokens at once.
        await bot_side.verify(f"Bearer {again.mint(audience=APP_ID)}")
        assert first.jwks_fetches == fetched
    finally:
        await bot_side.close()
        await first.close()
    assert TokenAuthority(key_file=tmp_path / "another.pem").kid != first.kid
    # A key file others could have written or read is not trusted: a new key replaces it.
    key_file.chmod(0o644)
    replaced = TokenAuthority(key_file=key_file)
    assert replaced.kid != first.kid
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert TokenAuthority(key_file=key_file).kid == replaced.kid
    # Nor is one reached through a symbolic link, nor a pipe (whose open would block).
    linked = tmp_path / "linked.pem"
    linked.symlink_to(key_file)
    assert TokenAuthority(key_file=linked).kid != replaced.kid
    piped = tmp_path / "piped.pem"
    os.mkfifo(piped)
    assert TokenAuthority(key_file=piped).kid != replaced.kid
    assert sorted(os.listdir(tmp_path)) == [
        "another.pem",
        "callbot-simulator-8765.pem",
        "linked.pem",
        "piped.pem",
    ]
    assert TokenAuthority().kid != TokenAuthority().kid
    assert RemoteBot(url="", app_id=APP_ID, tenant_id="t").key_file is not None
    assert RemoteBot(url="", app_id=APP_ID, tenant_id="t", keys_port=0).key_file is None
