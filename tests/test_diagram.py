"""Calls drawn as Mermaid sequence diagrams, from the demo's traffic."""

from __future__ import annotations

import io
import re

import pytest

from callbot import Call, CallBot, events
from callbot._demo import run_demo
from callbot._diagram import SequenceDiagram, mermaid
from callbot.testing import DeliveryOptions, Traffic, run_with_simulator


@pytest.mark.usefixtures("logging_restored")
async def test_the_demo_draws_each_call() -> None:
    diagram = SequenceDiagram()
    assert await run_demo(io.StringIO(), fmt="json", pace=0.02, diagram=diagram) == 0
    page = diagram.markdown("callbot demo")
    blocks = re.findall(r"```mermaid\n(.*?)```", page, re.S)
    assert len(blocks) == 3
    first = blocks[0]
    assert first.startswith("sequenceDiagram\n")
    for line in (
        "Graph->>Bot: incoming call from Adele Vance (202)",
        "Bot->>Graph: answer (202)",
        "Caller->>Graph: Adele Vance presses 1",
        "Bot->>Graph: transfer to Agent (202)",
        # The handlers the bot ran, where they ran.
        "Note over Bot: answer ran on IncomingCall",
    ):
        assert line in first
    assert first.index("Graph->>Bot: incoming call") < first.index("Note over Bot: answer ran")
    # Every line is "A->>B: text" or a note over the bot, as Mermaid reads them: a ";" only
    # ends an entity code (#35; for a "#", as in Graph's "DiagCode: 0#5002").
    for block in blocks:
        for line in block.splitlines()[4:]:
            assert re.fullmatch(
                r"    ((Caller|Graph|Bot)->>(Graph|Bot)|Note over Bot): (?:[^;#\n]|#\w+;)+", line
            ), line


def test_text_mermaid_would_misread_is_escaped() -> None:
    entry = Traffic(kind="caller", at=0.0, summary="presses 1#; then <hangs up>", call_id="c")
    assert "Caller->>Graph: presses 1#35;  then #lt;hangs up#gt;" in mermaid([entry])


def test_a_refused_notification_is_marked() -> None:
    entry = Traffic(
        kind="notification", at=0.0, summary="call established", call_id="c", status=401
    )
    assert "Note over Bot: refused: 401" in mermaid([entry])


async def test_one_call_is_one_diagram_whatever_form_its_id_is_written_in() -> None:
    """Graph writes a call's id in notification paths upper case without dashes, and the
    bot's requests carry the id as its notifications wrote it: still one call."""
    bot = CallBot(app_id="0d3e0b07-0000-4000-8000-000000000001")

    @bot.on_incoming_call
    async def answer(call: Call, event: events.IncomingCall) -> None:
        await call.answer()

    diagram = SequenceDiagram()
    compact = DeliveryOptions(compact_ids=True)
    async with run_with_simulator(bot, delivery=compact, observers=[diagram]) as sim:
        call = await sim.incoming_call(from_user="Adele Vance")
        await call.wait_for_state("established")
        await call.hangup()
        await call.settled()
    assert diagram.calls() == [call.id]
    (block,) = re.findall(r"```mermaid\n(.*?)```", diagram.markdown(), re.S)
    assert "Caller->>Graph: Adele Vance hangs up" in block
    assert "Bot->>Graph: answer (202)" in block


@pytest.mark.parametrize("fmt", ["plain", "rich"])
def test_what_a_caller_or_graph_wrote_reaches_the_terminal_as_text(fmt: str) -> None:
    """A caller's display name or Graph's ``resultInfo`` message is in a notification's
    summary: replayed from a recording, its escape sequences reached the terminal as they
    were (a title set, the screen cleared). They are shown escaped, in notes and details too."""
    from callbot._display import TrafficPrinter

    out = io.StringIO()
    printer = TrafficPrinter(out, fmt=fmt)
    hostile = "Mallory\x1b]0;PWNED\x07\x1b[2J [bold]x[/bold]"
    printer(Traffic(kind="notification", at=0.0, summary=f"incoming call from {hostile}"))
    printer.note(f"Call 1: {hostile} calls")
    printer.detail(hostile)
    text = out.getvalue()
    assert "\x1b" not in text
    assert "\x07" not in text
    assert text.count("Mallory\\x1b]0;PWNED\\x07\\x1b[2J [bold]x[/bold]") == 3


def test_a_call_id_stays_text_in_its_diagram_s_heading() -> None:
    """Any character but ``/ \\ ? # %``, a space and controls is taken in a call id: a backtick
    ended the heading's code span, and what followed was the page's markup."""
    call_id = "x`<img src=x onerror=alert(1)>`"
    diagram = SequenceDiagram()
    diagram(Traffic(kind="caller", at=0.0, summary="calls", call_id=call_id))
    heading = diagram.markdown().split("```mermaid")[0]
    assert "<img" not in heading
    assert "`" not in heading
    assert "<code>x&#96;&lt;img src=x onerror=alert(1)&gt;&#96;</code>" in heading
