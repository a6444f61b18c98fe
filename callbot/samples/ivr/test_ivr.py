"""The IVR against the Graph simulator, through callbot's pytest plugin."""

from __future__ import annotations

from pathlib import Path

import pytest

from callbot import CallBot
from callbot.testing import DeliveryOptions, SimulatedCall, Simulator

from . import bot as ivr


@pytest.fixture
def callbot_bot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CallBot:
    monkeypatch.setattr(ivr, "VOICEMAIL_DIR", tmp_path)
    return ivr.bot


async def test_answers_and_plays_the_menu(sim: Simulator) -> None:
    call = await sim.incoming_call(from_user="Adele Vance")
    await call.wait_for_state("established")
    prompt = await call.wait_for_request("playPrompt")
    assert prompt.json["prompts"][0]["mediaInfo"]["uri"] == ivr.WELCOME
    assert call.requests_for("subscribeToTone")
    await call.hangup()


async def test_pressing_1_transfers_to_the_agent(sim: Simulator) -> None:
    call = await sim.incoming_call(from_user="Adele Vance")
    await call.press("1")
    transfer = await sim.wait_for_request("transfer")
    assert transfer.json["transferTarget"]["identity"]["user"]["id"] == ivr.AGENT_USER_ID
    await call.wait_until_ended()
    assert call.states[-3:] == ["transferring", "transferAccepted", "terminated"]


async def test_pressing_2_takes_a_voicemail(sim: Simulator, tmp_path: Path) -> None:
    call = await sim.incoming_call(from_phone="+14255550100")
    await call.press("2")
    record = await call.wait_for_request("recordResponse")
    assert record.json["playBeep"] is True
    await call.wait_until_ended()
    assert (tmp_path / f"{call.id}.wav").read_bytes() == sim.recording
    assert call.requests_for("deleteCall")


def _uris(call: SimulatedCall) -> list[str]:
    return [r.json["prompts"][0]["mediaInfo"]["uri"] for r in call.requests_for("playPrompt")]


async def test_other_keys_repeat_the_menu(sim: Simulator) -> None:
    call = await sim.incoming_call()
    await call.wait_for_request("playPrompt")
    await call.press("9")
    invalid = await call.wait_for_request("playPrompt")
    again = await call.wait_for_request("playPrompt")
    assert [
        invalid.json["prompts"][0]["mediaInfo"]["uri"],
        again.json["prompts"][0]["mediaInfo"]["uri"],
    ] == [ivr.INVALID_CHOICE, ivr.WELCOME]
    await call.press("1")
    assert await call.wait_for_request("transfer")
    await call.wait_until_ended()


async def test_silence_plays_the_menu_three_times_then_goodbye(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ivr, "MENU_TIMEOUT", 0.1)
    call = await sim.incoming_call()
    await call.wait_until_ended(timeout=30)
    assert _uris(call).count(ivr.WELCOME) == 3
    assert _uris(call)[-1] == ivr.GOODBYE
    assert not call.requests_for("transfer")


async def test_a_caller_hanging_up_during_the_menu_is_no_error(sim: Simulator) -> None:
    call = await sim.incoming_call()
    await call.wait_for_request("playPrompt")
    await call.hangup()
    assert not call.requests_for("transfer")


@pytest.mark.parametrize("outcome", ["failed", "failed_in_place"])
async def test_a_failed_transfer_falls_back_to_voicemail(sim: Simulator, outcome: str) -> None:
    """Back from ``transferring``, or told by an update alone: the caller goes to the
    voicemail, once."""
    sim.transfer_outcome = outcome
    call = await sim.incoming_call()
    await call.press("1")
    await call.wait_for_request("transfer")
    record = await call.wait_for_request("recordResponse")
    assert record.json["prompts"][0]["mediaInfo"]["uri"] == ivr.AGENT_UNAVAILABLE
    await call.wait_until_ended()
    assert len(call.requests_for("recordResponse")) == 1
    assert _uris(call).count(ivr.WELCOME) == 1  # the menu did not start over


async def test_survives_notifications_out_of_order_and_twice(sim: Simulator) -> None:
    call = await sim.incoming_call(delivery=DeliveryOptions(out_of_order=True, duplicate=True))
    await call.press("1")
    assert await sim.wait_for_request("transfer")
    await call.wait_until_ended()
    assert _uris(call) == [ivr.WELCOME, ivr.TRANSFERRING]
