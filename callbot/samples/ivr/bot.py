"""An IVR: answer, play a welcome menu, then transfer to an agent or take a voicemail.

Callers hear "Welcome to Contoso. Press 1 to talk to an agent, press 2 to leave
a message." Pressing 1 transfers the call to the agent (``IVR_AGENT_USER_ID``);
pressing 2 records a message, saves it in ``IVR_VOICEMAIL_DIR`` and hangs up.
Another key, or none, plays the menu again (twice at most), then goodbye.
When the agent does not pick up, the caller goes to the voicemail instead.

The menu is one ``await call.menu(...)``: callbot subscribes to tones, plays
the prompt, stops it when a key is pressed and hands the key back.

Run it against Teams with ``callbot run bot:bot --tunnel ngrok``, or against the
simulator with ``pytest`` (see README.md).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import structlog

from callbot import Call, CallBot, CallEnded, OperationFailed, events

PROMPT_BASE_URL = os.environ.get("IVR_PROMPT_BASE_URL", "https://contoso.example/prompts")
WELCOME = f"{PROMPT_BASE_URL}/welcome.wav"
"""'Welcome to Contoso. Press 1 to talk to an agent, press 2 to leave a message.'"""
INVALID_CHOICE = f"{PROMPT_BASE_URL}/invalid-choice.wav"
TRANSFERRING = f"{PROMPT_BASE_URL}/transferring.wav"
AGENT_UNAVAILABLE = f"{PROMPT_BASE_URL}/agent-unavailable.wav"
"""'Nobody can take your call right now. Please leave a message after the beep.'"""
LEAVE_A_MESSAGE = f"{PROMPT_BASE_URL}/leave-a-message.wav"
GOODBYE = f"{PROMPT_BASE_URL}/goodbye.wav"

AGENT_USER_ID = os.environ.get("IVR_AGENT_USER_ID", "6e0b8a2d-5e8c-4a4f-9d1b-1f2e3d4c5b6a")
"""The Teams user (Entra object id) calls are transferred to."""
VOICEMAIL_DIR = Path(os.environ.get("IVR_VOICEMAIL_DIR", "voicemail"))
MENU_TIMEOUT = float(os.environ.get("IVR_MENU_TIMEOUT", "5"))
"""Seconds the caller has to press a key once the menu was played."""

log = structlog.get_logger("ivr")
bot = CallBot.from_env()


@bot.on_incoming_call
async def answer(call: Call, event: events.IncomingCall) -> None:
    """Answer every call, asking Graph to fetch the first prompts in advance."""
    await call.answer(prefetch=[WELCOME, GOODBYE])


@bot.on_state("established")
async def main_menu(call: Call, event: events.CallStateChanged) -> None:
    """Play the menu once connected (not when back from a failed transfer)."""
    if event.transfer_failed:
        return  # agent_unavailable takes the caller
    choice = await call.menu(
        WELCOME,
        {"1": "agent", "2": "voicemail"},
        retries=2,
        invalid_prompt=INVALID_CHOICE,
        timeout=MENU_TIMEOUT,
    )
    if choice == "agent":
        await (await call.play_prompt(TRANSFERRING)).wait(timeout=30)
        await call.transfer(AGENT_USER_ID)
    elif choice == "voicemail":
        await take_voicemail(call, greeting=LEAVE_A_MESSAGE)
    else:
        await say_goodbye(call)


@bot.on_transfer_failed
async def agent_unavailable(
    call: Call, event: events.CallStateChanged | events.CallUpdated
) -> None:
    """The agent did not pick up, however Graph told it: the caller goes to the voicemail."""
    log.info("transfer_failed", call_id=call.id, result=event.result_info)
    await take_voicemail(call, greeting=AGENT_UNAVAILABLE)


async def take_voicemail(call: Call, *, greeting: str) -> None:
    """Record a message after the beep, save it, say goodbye and hang up."""
    recording = await call.record_response(
        prompts=[greeting],
        play_beep=True,
        max_record_duration=120,
        max_silence_timeout=5,
        stop_tones=["#"],
    )
    try:
        await recording.wait(timeout=180)
    except OperationFailed as exc:
        # The caller hung up while recording, or the recording failed.
        log.info("voicemail_not_recorded", call_id=call.id, error=str(exc))
    else:
        await asyncio.to_thread(VOICEMAIL_DIR.mkdir, parents=True, exist_ok=True)
        path = VOICEMAIL_DIR / f"{call.id}.wav"
        size = await call.download_recording(recording, path)
        log.info("voicemail_saved", call_id=call.id, path=str(path), size=size)
    await say_goodbye(call)


async def say_goodbye(call: Call) -> None:
    """Play goodbye and hang up (quietly, when the caller already did)."""
    try:
        await (await call.play_prompt(GOODBYE)).wait(timeout=30)
        await call.hangup()
    except (CallEnded, OperationFailed):
        return  # the caller hung up first


@bot.on_terminated
async def ended(call: Call, event: events.CallTerminated) -> None:
    """The call is over."""
    log.info("call_ended", call_id=call.id, result=event.result_info)
