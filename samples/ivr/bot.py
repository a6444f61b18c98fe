"""An IVR: answer, play a welcome menu, then transfer to an agent or take a voicemail.

Callers hear "Welcome to Contoso. Press 1 to talk to an agent, press 2 to leave
a message." Pressing 1 transfers the call to the agent (``IVR_AGENT_USER_ID``);
pressing 2 records a message, saves it in ``IVR_VOICEMAIL_DIR`` and hangs up.
When the agent does not pick up, the caller is offered the voicemail instead.

Run it against Teams with ``callbot run bot:bot --tunnel ngrok``, or against the
simulator with ``pytest`` (see README.md).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import structlog

from callbot import Call, CallBot, GraphError, OperationFailed, events
from callbot.graph import Target

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

log = structlog.get_logger("ivr")
bot = CallBot.from_env()

# Calls whose caller already chose; later key presses are ignored.
_chosen: set[str] = set()


@bot.on_incoming_call
async def answer(call: Call, event: events.IncomingCall) -> None:
    """Answer every call, asking Graph to fetch the first prompts in advance."""
    await call.answer(prefetch=[WELCOME, GOODBYE])


@bot.on_state("established")
async def greet(call: Call, event: events.CallStateChanged) -> None:
    """Play the menu once connected; a transfer that failed lands here again."""
    if event.previous_state == "transferring":
        log.info("transfer_failed", call_id=call.id, result=event.result_info)
        await take_voicemail(call, greeting=AGENT_UNAVAILABLE)
        return
    await call.subscribe_to_tone()
    await call.play_prompt(WELCOME)


@bot.on_tone
async def menu(call: Call, event: events.ToneReceived) -> None:
    """1: an agent, 2: voicemail, anything else: the menu again."""
    if call.key in _chosen:
        return
    if event.tone == "tone1":
        _chosen.add(call.key)
        await (await call.play_prompt(TRANSFERRING)).wait(timeout=30)
        await call.transfer(Target.user(AGENT_USER_ID, "Agent"))
    elif event.tone == "tone2":
        _chosen.add(call.key)
        await take_voicemail(call, greeting=LEAVE_A_MESSAGE)
    else:
        await call.play_prompt([INVALID_CHOICE, WELCOME])


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
        await asyncio.to_thread(VOICEMAIL_DIR.mkdir, parents=True, exist_ok=True)
        path = VOICEMAIL_DIR / f"{call.id}.wav"
        data = await call.download_recording(recording, path)
        log.info("voicemail_saved", call_id=call.id, path=str(path), size=len(data))
        await (await call.play_prompt(GOODBYE)).wait(timeout=30)
    except OperationFailed as exc:
        # The caller hung up while recording, or the recording failed.
        log.info("voicemail_not_recorded", call_id=call.id, error=str(exc))
    if not call.ended:
        try:
            await call.hangup()
        except GraphError as exc:
            if exc.status != 404:  # 404: the caller hung up first
                raise


@bot.on_terminated
async def forget(call: Call, event: events.CallTerminated) -> None:
    """The call is over: forget the caller's choice."""
    _chosen.discard(call.key)
    log.info("call_ended", call_id=call.id, result=event.result_info)
