"""mypy refuses a handler registered for events it cannot take, and accepts every form of
handler callbot runs.

One mypy run, with the project's settings, over one file of registrations: each line marked
``# refused: NAME`` must get mypy's error naming the type variable ``NAME`` (the kind of
handler the decorator wanted), and no other line may get any error.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from mypy import api

from callbot import events

from .support.snippets import ROOT

REGISTRATIONS = '''
from __future__ import annotations

import functools
from collections.abc import Coroutine
from typing import Any, assert_type

from callbot import Call, CallBot, events

bot = CallBot(app_id="00000000-0000-0000-0000-000000000000")


async def on_incoming(call: Call, event: events.IncomingCall) -> None: ...
async def on_move(call: Call, event: events.CallStateChanged) -> None: ...
async def on_end(call: Call, event: events.CallTerminated) -> None: ...
async def on_update(call: Call, event: events.CallUpdated) -> None: ...
async def on_key(call: Call, event: events.ToneReceived) -> None: ...
async def on_roster(call: Call, event: events.ParticipantsUpdated) -> None: ...
async def on_outcome(call: Call, event: events.OperationUpdated) -> None: ...
async def on_anything(call: Call, event: events.Event) -> None: ...
async def on_transfer_news(
    call: Call, event: events.CallStateChanged | events.CallUpdated
) -> None: ...
async def on_move_or_incoming(
    call: Call, event: events.CallStateChanged | events.IncomingCall
) -> None: ...
async def with_defaults(call: Call, event: events.Event, extra: int = 0, *, k: int = 1) -> None:
    ...
async def positional(call: Call, event: events.ToneReceived, /) -> None: ...
async def any_arguments(*args: Any) -> None: ...
async def greet(greeting: str, call: Call, event: events.ToneReceived) -> None: ...
async def only_the_call(call: Call) -> None: ...
async def failed_on_a_key(call: Call, event: events.ToneReceived, exc: BaseException) -> None:
    ...
async def failed(call: Call, event: events.Event, exc: BaseException) -> None: ...
async def started(bot: CallBot) -> None: ...


class KeyCounter:
    """A handler with state: its attributes stay reachable once registered."""

    def __init__(self) -> None:
        self.pressed = 0

    async def __call__(self, call: Call, event: events.ToneReceived) -> None:
        self.pressed += 1

    async def on_key(self, call: Call, event: events.ToneReceived) -> None: ...


# Each decorator takes a handler of the class it delivers, or of a base class.
bot.on_incoming_call(on_incoming)
bot.on_incoming_call()(on_anything)
bot.on_state("established")(on_move)
bot.on_state("terminated")(on_anything)
bot.on_state("incoming", "established")(on_move_or_incoming)
bot.on_call_updated(on_update)
bot.on_call_updated()(on_update)
bot.on_tone(on_key)
bot.on_tone()(on_anything)
bot.on_participants(on_roster)
bot.on_participants()(on_roster)
bot.on_operation(on_outcome)
bot.on_operation()(on_outcome)
bot.on_terminated(on_end)
bot.on_terminated()(on_move)
bot.on_transfer_failed(on_transfer_news)
bot.on_transfer_failed()(on_anything)
bot.on(events.CallStateChanged)(on_move)
bot.on(events.CallTerminated)(on_move)
bot.on(events.Event)(on_anything)
bot.on(events.ToneReceived, matches=lambda event: event.tone == "tone1")(on_key)
bot.on_error(failed)
bot.on_error()(failed)
bot.on_started(started)

# Every form callbot runs: defaults, positional-only, *args, a partial, a bound method.
bot.on_incoming_call(with_defaults)
bot.on_tone(positional)
bot.on(events.ToneReceived)(any_arguments)
bot.on_tone(functools.partial(greet, "welcome"))
bot.on_tone(KeyCounter().on_key)

# Each hands the handler back typed as it was.
assert_type(bot.on_tone(KeyCounter()), KeyCounter).pressed
assert_type(bot.on_tone()(KeyCounter()), KeyCounter).pressed
assert_type(bot.on(events.ToneReceived)(KeyCounter()), KeyCounter).pressed


@bot.on(events.ToneReceived)
async def pressed(call: Call, event: events.ToneReceived) -> None: ...


def press(call: Call, event: events.ToneReceived) -> None:
    assert_type(pressed(call=call, event=event), Coroutine[Any, Any, None]).close()


# A handler for events it cannot take, or that cannot take (call, event).
@bot.on_tone  # refused: ToneReceivedHandler
async def pressed_or_moved(call: Call, event: events.CallStateChanged) -> None: ...


@bot.on(events.ToneReceived)  # refused: ToneReceivedHandler
async def updated(call: Call, event: events.CallUpdated) -> None: ...


@bot.on_transfer_failed  # refused: TransferFailedHandler
async def moved_back(call: Call, event: events.CallStateChanged) -> None: ...


bot.on_incoming_call(on_move)  # refused: IncomingCallHandler
bot.on_incoming_call(only_the_call)  # refused: IncomingCallHandler
bot.on_state("established")(on_key)  # refused: CallStateChangedHandler
bot.on_call_updated(on_move)  # refused: CallUpdatedHandler
bot.on_tone()(on_move)  # refused: ToneReceivedHandler
bot.on_participants(on_key)  # refused: ParticipantsUpdatedHandler
bot.on_operation(on_key)  # refused: OperationUpdatedHandler
bot.on_terminated(on_incoming)  # refused: CallTerminatedHandler
bot.on(events.CallStateChanged)(on_end)  # refused: CallStateChangedHandler
bot.on(events.Event)(on_key)  # refused: EventHandler
bot.on(events.OperationUpdated)(KeyCounter())  # refused: OperationUpdatedHandler
bot.on_error(failed_on_a_key)  # refused: ErrorHandlerT
bot.on_started(on_anything)  # refused: StartedHookT
'''


def _every_event_class() -> str:
    """A handler of each class in ``callbot.events``, registered with ``on`` for that class
    (an event class ``on`` has no overload for fails here)."""
    lines = []
    for name in events.__all__:
        lines.append(f"async def of_{name}(call: Call, event: events.{name}) -> None: ...")
        lines.append(f"bot.on(events.{name})(of_{name})")
        lines.append(f"bot.on(events.{name})(on_anything)")
    return "\n".join(lines) + "\n"


def _refused(source: str) -> dict[int, str]:
    return {
        number: match[1]
        for number, line in enumerate(source.splitlines(), start=1)
        if (match := re.search(r"# refused: (\w+)$", line))
    }


def test_mypy_refuses_a_handler_of_other_events_and_accepts_every_handler_callbot_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = textwrap.dedent(REGISTRATIONS) + _every_event_class()
    module = tmp_path / "registrations.py"
    module.write_text(source, encoding="utf-8")
    # mypy reads this checkout's callbot (the installed one may be another checkout's).
    monkeypatch.setenv("MYPYPATH", str(ROOT))
    stdout, stderr, _ = api.run(
        [
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "mypy_cache"),
            "--follow-imports",
            "silent",  # callbot's own errors are the project's mypy run's to report
            "--no-error-summary",
            "--hide-error-context",
            str(module),
        ]
    )
    assert not stderr
    errors: dict[int, list[str]] = {}
    for line in stdout.splitlines():
        found = re.match(r".*registrations\.py:(\d+): error: (.*)$", line)
        assert found, f"unexpected mypy output: {line}"
        errors.setdefault(int(found[1]), []).append(found[2])

    refused = _refused(source)
    assert len(refused) == 16
    unexpected = {n: errors[n] for n in sorted(errors.keys() - refused.keys())}
    assert not unexpected, f"mypy refused a handler callbot runs: {unexpected}"
    for number, wanted in refused.items():
        messages = errors.get(number, [])
        assert [m for m in messages if f'type variable "{wanted}"' in m], (
            f"line {number} ({source.splitlines()[number - 1].strip()}): "
            f"no error naming {wanted}, only {messages}"
        )
