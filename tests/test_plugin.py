"""The pytest plugin, used the way a bot author uses it: a project of their own, a test run."""

from __future__ import annotations

import pytest

from .support.snippets import ROOT, files_in

pytest_plugins = ["pytester"]

BOT = """
import asyncio

from callbot import CallBot, events
from callbot.graph import Target

bot = CallBot.from_env()


@bot.on_incoming_call
async def answer(call, event):
    await call.answer()


@bot.on_state("established")
async def menu(call, event):
    await call.subscribe_to_tone()
    await call.play_prompt("https://contoso.example/menu.wav")


@bot.on_tone
async def choose(call, event):
    if event.tone == "tone1":
        await call.transfer(Target.user("agent-id", "Agent"))
    elif event.tone == "tone9":
        raise RuntimeError("nobody thought of 9")
    elif event.tone == "tone5":
        await asyncio.Event().wait()  # waits for something that never comes
"""

CONFTEST = """
import pytest

from mybot import bot


@pytest.fixture
def callbot_bot():
    return bot
"""

TESTS = """
import pytest


@pytest.mark.asyncio
async def test_caller_reaches_an_agent(sim):
    call = await sim.incoming_call(from_user="Adele Vance")
    await sim.press("1")
    transfer = await sim.wait_for_request("transfer")
    assert transfer.json["transferTarget"]["identity"]["user"]["id"] == "agent-id"
    await call.wait_until_ended()


@pytest.mark.asyncio
async def test_caller_hangs_up(sim):
    await sim.incoming_call()
    prompt = await sim.wait_for_request("playPrompt")
    assert prompt.json["prompts"][0]["mediaInfo"]["uri"].endswith("menu.wav")
    await sim.hangup()


@pytest.mark.asyncio
async def test_a_handler_that_raises_fails_the_test(sim):
    await sim.incoming_call()
    await sim.press("9")
    await sim.hangup()


@pytest.mark.asyncio
async def test_a_test_that_leaves_a_handler_running_fails(sim):
    await sim.incoming_call()
    await sim.press("5")


@pytest.mark.asyncio
async def test_options_reach_the_simulator(callbot_simulator):
    assert callbot_simulator.prompt_duration == 0.01
"""


@pytest.fixture
def bot_project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A throwaway project with a bot module, its conftest, and tests (no callbot config)."""
    pytester.makepyfile(mybot=BOT)
    pytester.makeconftest(
        CONFTEST
        + """

@pytest.fixture
def callbot_simulator_options():
    return {"prompt_duration": 0.01}
"""
    )
    pytester.makepyfile(test_mybot=TESTS)
    return pytester


def test_a_bot_author_tests_their_bot_with_the_installed_plugin(
    bot_project: pytest.Pytester,
) -> None:
    result = bot_project.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    # The teardowns of the test whose handler raised and of the test that left a handler
    # running are errors; the test bodies passed.
    result.assert_outcomes(passed=5, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*test_a_handler_that_raises_fails_the_test*",
            "*the bot misbehaved during the test*",
            "*1 handler run(s) raised*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*test_a_test_that_leaves_a_handler_running_fails*",
            # The tone, and the prompt's completion too if it came before the test ended.
            "*notification(s) still waited for or ran in their handlers when the test ended*",
        ]
    )


def test_strictness_can_be_turned_off(bot_project: pytest.Pytester) -> None:
    bot_project.makeconftest(
        CONFTEST
        + """

@pytest.fixture
def callbot_strict():
    return False


@pytest.fixture
def callbot_simulator_options():
    return {"prompt_duration": 0.01}
"""
    )
    result = bot_project.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=5)


def test_forgetting_the_bot_fixture_says_what_to_write(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_nobot="""
import pytest


@pytest.mark.asyncio
async def test_needs_a_bot(sim):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*define a `callbot_bot` fixture*"])


def test_the_plugin_is_registered_as_an_entry_point() -> None:
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="pytest11") if ep.name == "callbot"]
    assert [ep.value for ep in found] == ["callbot.testing.plugin"]


HANDLED_BOT = """
from callbot import CallBot

bot = CallBot.from_env()
taken = []


@bot.on_incoming_call
async def answer(call, event):
    await call.answer()


@bot.on_state("established")
async def menu(call, event):
    await call.subscribe_to_tone()
    raise LookupError("no menu configured")


@bot.on_error
async def take(call, event, exc):
    taken.append(type(exc).__name__)
"""

HANDLED_TESTS = """
from callbot.testing import builders
from mybot import taken


async def test_an_error_on_error_took_is_not_a_failure(sim):
    call = await sim.incoming_call()
    await call.wait_for_request("subscribeToTone")
    await call.hangup()
    assert taken == ["LookupError"]


async def test_a_refusal_the_test_posted_and_expected_is_not_a_failure(sim):
    call = await sim.incoming_call()
    tone = builders.notifications(builders.tone(call.id, "tone5", 7))
    assert await sim.post(tone, tenant_id="0b1f4c5e-7a2d-4e3b-9c8d-112233445566") == 403
    await call.hangup()
"""


def test_errors_taken_by_on_error_do_not_fail_a_strict_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(mybot=HANDLED_BOT)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mybot=HANDLED_TESTS)
    # No asyncio mode, no mark, no loop scope: the plugin arranges them; no warning either.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", timeout=120)
    result.assert_outcomes(passed=2)


STARTING_BOT = """
import os

from callbot import CallBot

bot = CallBot.from_env()
tried = []


@bot.on_started
async def join_at_start(bot):
    tried.append(os.environ["MEETING_URL"])
    if os.environ["MEETING_URL"] == "none":
        raise LookupError("no meeting to join")
    await bot.join_meeting(os.environ["MEETING_URL"])
"""

STARTING_TESTS = """
import asyncio

import pytest

from mybot import tried

JOIN_URL = (
    "https://teams.microsoft.com/l/meetup-join/19%3ameeting_abc%40thread.v2/0"
    "?context=%7b%22Tid%22%3a%22t-1%22%2c%22Oid%22%3a%22o-1%22%7d"
)


@pytest.fixture
def meeting_url(monkeypatch):
    monkeypatch.setenv("MEETING_URL", JOIN_URL)


@pytest.fixture
def no_meeting(monkeypatch):
    monkeypatch.setenv("MEETING_URL", "none")


@pytest.mark.usefixtures("meeting_url")
async def test_the_bot_joins_its_meeting_at_start(sim):
    meeting = await sim.wait_for_outgoing_call()
    created = await sim.wait_for_request("createCall")
    assert created.json["chatInfo"]["threadId"] == "19:meeting_abc@thread.v2"
    await meeting.wait_for_state("established")
    await meeting.hangup()
    await meeting.wait_until_ended()


@pytest.mark.usefixtures("no_meeting")
async def test_a_hook_that_raises_fails_the_test(sim):
    while "none" not in tried:
        await asyncio.sleep(0.01)
"""


def test_a_test_sees_what_the_bot_does_once_it_serves(pytester: pytest.Pytester) -> None:
    """The ``sim`` fixture runs the bot's ``on_started`` hooks once the bot serves it: a
    bot that joins a meeting at start is tested by waiting for the meeting call."""
    pytester.makepyfile(mybot=STARTING_BOT)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mybot=STARTING_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", timeout=120)
    # The teardown of the test whose hook raised is an error; the test body passed.
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_a_hook_that_raises_fails_the_test*",
            "*the bot misbehaved during the test*",
            "*1 handler run(s) raised*",
        ]
    )


def test_the_readme_bot_and_tests_pass_in_a_project_without_configuration(
    pytester: pytest.Pytester,
) -> None:
    files = files_in(ROOT / "README.md")
    pytester.makepyfile(**{name.removesuffix(".py"): source for name, source in files.items()})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", timeout=120)
    result.assert_outcomes(passed=2)
    assert "PytestDeprecationWarning" not in result.stdout.str()


def test_simulated_calls_stay_out_of_the_recording_the_environment_names(
    bot_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A developer keeps ``CALLBOT_RECORD_PATH`` set for the calls of their tenant: running
    the tests must not append the simulator's calls to that file (``callbot replay`` would
    play them as real ones). A test that configures a recording of its own gets it."""
    real = bot_project.path / "calls.jsonl"
    real.write_text("")
    monkeypatch.setenv("CALLBOT_RECORD_PATH", str(real))
    bot_project.makepyfile(
        test_recording="""
import json

import pytest

from mybot import bot


async def test_a_call(sim):
    call = await sim.incoming_call()
    await call.hangup()
    await call.wait_until_ended()


@pytest.fixture
def own(tmp_path):
    path = tmp_path / "own.jsonl"
    saved = bot.settings.record_path
    bot.configure(record_path=str(path))
    yield path
    bot.configure(record_path=saved)


async def test_a_recording_of_its_own(own, sim):
    call = await sim.incoming_call()
    await call.hangup()
    await call.wait_until_ended()
    await call.settled()


def test_the_own_recording_was_written(tmp_path_factory):
    written = list(tmp_path_factory.getbasetemp().glob("test_a_recording_of_its_own*/own.jsonl"))
    assert written and written[0].read_text().strip()
"""
    )
    result = bot_project.runpytest_subprocess(
        "-p", "no:cacheprovider", "test_recording.py", timeout=120
    )
    result.assert_outcomes(passed=3)
    assert real.read_text() == ""


MENU_BOT = """
from callbot import CallBot

bot = CallBot.from_env()


@bot.on_incoming_call
async def answer(call, event):
    await call.answer()


@bot.on_state("established")
async def menu(call, event):
    team = await call.menu("https://contoso.example/menu.wav", {"1": "sales"}, timeout=10)
    if team is None:
        await call.hangup()
"""

SIMULATED_TIME_TESTS = """
import asyncio

import pytest


@pytest.fixture
def callbot_simulator_options():
    return {"prompt_duration": 2.0}


@pytest.mark.looptime
async def test_the_menu_repeats_after_ten_silent_seconds(sim):
    call = await sim.incoming_call()
    await call.wait_until_ended(timeout=60)
    offered = sim.traffic[0].at
    assert 0.0 <= offered < 1.0  # the simulator started on the clock the test runs on
    menus = [t.at - offered for t in sim.traffic if t.action == "playPrompt"]
    assert menus == pytest.approx([0.0, 12.0, 24.0])


@pytest.mark.looptime
async def test_a_caller_who_chose_stays_on_the_line_for_two_hours(sim):
    call = await sim.incoming_call()
    await call.press("1")
    await asyncio.sleep(2 * 60 * 60 + 60)
    assert not call.ended
    assert len(call.requests_for("keepAlive")) == 8
    await call.hangup()
"""


def test_a_test_on_simulated_time_runs_the_simulator_and_the_bot_on_it(
    pytester: pytest.Pytester,
) -> None:
    """looptime moves the clock for the test function only: the simulator and the bot,
    started by the fixture before it, had their times on the real clock (the traffic's
    times went negative) and their timers set on one clock fired on the other."""
    pytester.makepyfile(mybot=MENU_BOT)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mybot=SIMULATED_TIME_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", timeout=120)
    result.assert_outcomes(passed=2)
