"""CallServices: everything on the Graph side of a bot, for the dispatcher and for bot code.

It owns the Graph client (session, token, retries), the call handles (one per
call), the operations awaiting their outcome, each established call's
keep-alive loop, and the watch on the 15-second answer deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import structlog
from pydantic import BaseModel

from .. import models
from .._config import Settings
from .._errors import GraphError
from .._ids import id_key
from ..events import OperationUpdated, ToneReceived
from ._call import (
    Call,
    CallOptionsLike,
    MediaConfigLike,
    call_options_json,
    media_config_json,
)
from ._client import GraphClient
from ._credentials import AsyncTokenCredential
from ._digits import ToneRouter
from ._http import RetryPolicy
from ._meetings import Meeting, parse_join_url
from ._operations import OperationRegistry
from ._values import MediaInfoLike, TargetLike, dump, invitation_json, participant_info_json

__all__ = ["CallServices"]

log = structlog.get_logger("callbot.graph")

ANSWER_DEADLINE = 15.0
"""Seconds Graph gives a bot to answer, reject or redirect an incoming call."""

ChatInfoLike = models.ChatInfo | Mapping[str, Any]
MeetingInfoLike = models.MeetingInfo | Mapping[str, Any]


class CallServices:
    """The Graph side of a bot: call handles, Graph requests, operations, keep-alives.

    ``credential`` overrides the credential built from the settings (client
    secret or certificate); any azure-identity style async credential works.
    ``retry`` bounds retries of throttled or failed requests.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        credential: AsyncTokenCredential | None = None,
        retry: RetryPolicy | None = None,
        scope: str | None = None,
    ) -> None:
        self.settings = settings
        self.graph = GraphClient(settings, credential=credential, retry=retry, scope=scope)
        """The Graph client, also for requests callbot does not model."""
        self.operations = OperationRegistry()
        self.tones = ToneRouter()
        """Tones for handlers collecting digits (``call.collect_digits``)."""
        """Operations awaiting their outcome."""
        self._calls: dict[str, Call] = {}
        # A call's keep-alive is a timer while it waits and a short task while it sends.
        self._keep_alives: dict[str, asyncio.TimerHandle | asyncio.Task[None]] = {}
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        self._forget_timers: dict[str, asyncio.TimerHandle] = {}
        self._started = False
        self.on_call_gone: Callable[[str], Awaitable[None]] | None = None
        """Awaited with a call's key when Graph no longer knows the call (keep-alive 404)."""

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session and fetch the app token early (a failure is only logged).

        Fetching the token now keeps it off the first answer's 15-second budget.
        """
        if self._started:
            return
        self._started = True
        _ = self.graph.session
        missing = _missing_for_acting(self.settings, self.graph.has_credentials)
        if missing:
            # Loud: such a bot accepts callbacks but cannot answer or act on any call.
            log.warning(
                "bot_cannot_act",
                detail="calls will arrive but cannot be answered or acted on",
                missing=missing,
            )
            if not self.graph.has_credentials:
                return
        try:
            await self.graph.token()
        except Exception as exc:
            log.warning("graph_token_prefetch_failed", error=str(exc) or type(exc).__name__)

    async def close(self) -> None:
        """Stop keep-alives and timers, fail pending waits, close the session."""
        pending = list(self._keep_alives.values())
        self._keep_alives.clear()
        for pending_one in pending:
            pending_one.cancel()
        for pending_one in pending:
            if isinstance(pending_one, asyncio.Task):
                with contextlib.suppress(asyncio.CancelledError):
                    await pending_one
        for timer in (*self._deadlines.values(), *self._forget_timers.values()):
            timer.cancel()
        self._deadlines.clear()
        self._forget_timers.clear()
        self.operations.fail_all(None)
        await self.graph.close()
        self._started = False

    async def __aenter__(self) -> CallServices:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def pending_operations(self) -> int:
        """How many operations are awaiting their outcome (for metrics)."""
        return self.operations.pending

    # -- handles ------------------------------------------------------------------

    def call(self, call_id: str) -> Call:
        """The handle of a call (one handle per call, whatever the id's case or dashes)."""
        key = id_key(call_id)
        handle = self._calls.get(key)
        if handle is None:
            handle = Call(call_id, services=self)
            # a call that ended before its first handle was asked for is still ended
            handle._ended = key in self._forget_timers
            self._calls[key] = handle
        return handle

    def _adopt(self, call_id: str, scenario_id: str) -> Call:
        handle = Call(call_id, services=self, scenario_id=scenario_id)
        self._calls[handle.key] = handle
        return handle

    # -- hooks the dispatcher calls (they never raise) ------------------------------

    def on_incoming(self, call: Call) -> None:
        """An incoming call is ringing: warn if nobody answers it in time."""
        try:
            if call._responded or call.key in self._deadlines:
                return
            delay = self.settings.answer_warning_after
            loop = asyncio.get_running_loop()
            self._deadlines[call.key] = loop.call_later(delay, self._warn_unanswered, call)
        except Exception:
            log.exception("answer_deadline_watch_failed", call_id=getattr(call, "id", None))

    def _responded(self, call: Call) -> None:
        call._responded = True
        timer = self._deadlines.pop(call.key, None)
        if timer is not None:
            timer.cancel()

    def _warn_unanswered(self, call: Call) -> None:
        self._deadlines.pop(call.key, None)
        if call._responded or call.ended:
            return
        log.warning(
            "incoming_call_not_answered",
            call_id=call.id,
            waited=self.settings.answer_warning_after,
            deadline=ANSWER_DEADLINE,
            detail="answer, reject or redirect within 15 seconds or Graph drops the call",
        )

    def on_established(self, call: Call) -> None:
        """The call is established: start its keep-alive loop (once, when enabled)."""
        try:
            if not self.settings.keep_alive or call.ended or call.key in self._keep_alives:
                return
            self._schedule_keep_alive(call)
        except Exception:
            log.exception("keep_alive_start_failed", call_id=getattr(call, "id", None))

    def is_keeping_alive(self, call_id: str) -> bool:
        """Whether the keep-alive loop of a call is running."""
        return id_key(call_id) in self._keep_alives

    def _schedule_keep_alive(self, call: Call) -> None:
        # A timer per call costs a fraction of a sleeping task's memory.
        loop = asyncio.get_running_loop()
        self._keep_alives[call.key] = loop.call_later(
            self.settings.keep_alive_interval, self._keep_alive_due, call
        )

    def _keep_alive_due(self, call: Call) -> None:
        task = asyncio.get_running_loop().create_task(
            self._keep_alive_once(call), name=f"callbot-keepalive-{call.key}"
        )
        self._keep_alives[call.key] = task

    async def _keep_alive_once(self, call: Call) -> None:
        key = call.key
        again = False
        try:
            await call.keep_alive()
            again = True
        except GraphError as exc:
            if exc.status == 404:
                log.info("keep_alive_call_gone", call_id=call.id)
                # No termination will come for a call Graph has forgotten: end it here
                # (leaving this task out of the keep-alives that on_ended cancels).
                if self._keep_alives.get(key) is asyncio.current_task():
                    del self._keep_alives[key]
                self.on_ended(key, None)
                if self.on_call_gone is not None:
                    await self.on_call_gone(key)
            else:
                again = True
                log.warning(
                    "keep_alive_failed",
                    call_id=call.id,
                    status=exc.status,
                    code=exc.code,
                    error=exc.message,
                )
        except Exception as exc:
            again = True
            log.warning("keep_alive_failed", call_id=call.id, error=repr(exc))
        finally:
            # Only the current keep-alive of a live call goes on; a stopped one is already gone.
            if self._keep_alives.get(key) is asyncio.current_task():
                if again:
                    self._schedule_keep_alive(call)
                else:
                    del self._keep_alives[key]

    def on_ended(self, call_key: str, result_info: models.ResultInfo | None) -> None:
        """The call ended: stop its keep-alive and deadline watch, fail its pending waits."""
        try:
            key = id_key(call_key)
            handle = self._calls.get(key)
            if handle is not None:
                handle._ended = True
            keep_alive = self._keep_alives.pop(key, None)
            if keep_alive is not None:
                keep_alive.cancel()
            timer = self._deadlines.pop(key, None)
            if timer is not None:
                timer.cancel()
            self.tones.on_ended(key)
            failed = self.operations.fail_call(key, result_info)
            if failed:
                log.info("graph_operations_failed_call_ended", call_key=key, count=failed)
            if key not in self._forget_timers:
                # the dispatcher releases the handle after the last handler; this is a backstop
                # for when it does not, timed like the sequencer's own forgetting of the call
                loop = asyncio.get_running_loop()
                self._forget_timers[key] = loop.call_later(
                    self.settings.termination_grace, self.release, key
                )
        except Exception:
            log.exception("call_end_cleanup_failed", call_key=call_key)

    def release(self, call_key: str) -> None:
        """Forget an ended call's handle (its handlers are done)."""
        key = id_key(call_key)
        timer = self._forget_timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._calls.pop(key, None)

    def on_tone(self, event: ToneReceived) -> None:
        """A tone was accepted: hand it to a handler collecting digits, at once."""
        try:
            self.tones.on_tone(event)
        except Exception:
            log.exception("tone_routing_failed", call_id=getattr(event, "call_id", None))

    def on_operation(self, event: OperationUpdated) -> None:
        """An operation notification arrived: resolve whoever waits for it, at once."""
        try:
            matched = self.operations.on_event(event)
            log.debug(
                "graph_operation_notification",
                call_id=event.call_id,
                operation_id=event.operation_id,
                status=event.status,
                matched=matched,
            )
        except Exception:
            log.exception("graph_operation_match_failed", call_id=getattr(event, "call_id", None))

    # -- placing calls ------------------------------------------------------------

    async def create_call(
        self,
        *targets: TargetLike,
        source: TargetLike | None = None,
        meeting: Meeting | str | None = None,
        chat_info: ChatInfoLike | None = None,
        meeting_info: MeetingInfoLike | None = None,
        tenant_id: str | None = None,
        subject: str | None = None,
        modalities: Sequence[str] = ("audio",),
        prefetch: Sequence[MediaInfoLike] = (),
        app_hosted_media: str | None = None,
        media_config: MediaConfigLike | None = None,
        remove_from_default_audio_group: bool | None = None,
        content_sharing_notifications: bool | None = None,
        delta_roster: bool | None = None,
        interactive_roster: bool | None = None,
        hide_bot_after_escalation: bool | None = None,
        call_options: CallOptionsLike | None = None,
        callback_uri: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Call:
        """Place a call: to one target (peer-to-peer), several (a group call), or a meeting.

        * a user: ``create_call(Target.user(id))``;
        * a phone number: ``create_call(Target.phone("+1..."),
          source=Target.application_instance(instance_id), tenant_id=...)`` (the
          bot's application instance must have a phone number);
        * a group call: several targets; a meeting: see :meth:`join_meeting`.

        Media is service-hosted (``prefetch`` media to cache) unless
        ``app_hosted_media`` (the media platform's blob) or ``media_config`` is
        given. ``extra`` adds raw ``call`` properties. Returns the call's handle,
        with the created call as its snapshot.
        """
        body: dict[str, Any] = {
            "@odata.type": "#microsoft.graph.call",
            "callbackUri": callback_uri or self.settings.callback_url,
        }
        if source is not None:
            body["source"] = participant_info_json(source)
        if targets:
            body["targets"] = [invitation_json(t) for t in targets]
        if subject is not None:
            body["subject"] = subject
        body["requestedModalities"] = list(modalities)
        body["mediaConfig"] = media_config_json(
            media_config=media_config,
            app_hosted_media=app_hosted_media,
            prefetch=prefetch,
            remove_from_default_audio_group=remove_from_default_audio_group,
        )
        options = call_options_json(
            "#microsoft.graph.outgoingCallOptions",
            call_options=call_options,
            content_sharing_notifications=content_sharing_notifications,
            delta_roster=delta_roster,
            interactive_roster=interactive_roster,
            hide_bot_after_escalation=hide_bot_after_escalation,
        )
        if options is not None:
            body["callOptions"] = options
        if isinstance(meeting, str):
            meeting = parse_join_url(meeting)
        if meeting is not None:
            chat = meeting.chat_info_json()
            if chat is not None:
                body["chatInfo"] = chat
            body["meetingInfo"] = meeting.meeting_info_json()
            tenant_id = tenant_id or meeting.tenant_id
        if chat_info is not None:
            body["chatInfo"] = dump(chat_info)
        if meeting_info is not None:
            body["meetingInfo"] = dump(meeting_info)
        if tenant_id is not None:
            body["tenantId"] = tenant_id
        if extra:
            body.update(extra)
        if "targets" not in body and "meetingInfo" not in body:
            raise ValueError("create_call needs a target or a meeting")

        scenario_id = str(uuid.uuid4())
        response = await self.graph.request(
            "POST", "/communications/calls", json=body, scenario_id=scenario_id
        )
        payload = response.body if isinstance(response.body, Mapping) else {}
        call_id = payload.get("id")
        if not isinstance(call_id, str) or not call_id:
            location = response.location or ""
            call_id = location.rstrip("/").rsplit("/", 1)[-1]
        if not call_id:
            raise GraphError(
                response.status,
                "invalid_response",
                "the created call has no id",
                method="POST",
                url=self.graph.url("/communications/calls"),
                request_id=response.request_id,
                client_request_id=response.client_request_id,
                body=payload,
            )
        handle = self._adopt(call_id, scenario_id)
        handle._set_snapshot(models.Call.model_validate(payload))
        log.info(
            "call_created",
            call_id=call_id,
            scenario_id=scenario_id,
            state=handle.state,
            request_id=response.request_id,
        )
        return handle

    async def join_meeting(
        self,
        meeting: Meeting | str | None = None,
        *,
        chat_info: ChatInfoLike | None = None,
        meeting_info: MeetingInfoLike | None = None,
        source: TargetLike | None = None,
        tenant_id: str | None = None,
        subject: str | None = None,
        modalities: Sequence[str] = ("audio",),
        prefetch: Sequence[MediaInfoLike] = (),
        app_hosted_media: str | None = None,
        media_config: MediaConfigLike | None = None,
        content_sharing_notifications: bool | None = None,
        delta_roster: bool | None = None,
        interactive_roster: bool | None = None,
        hide_bot_after_escalation: bool | None = None,
        call_options: CallOptionsLike | None = None,
        callback_uri: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Call:
        """Join a Teams meeting.

        ``meeting`` is a Teams join URL, or a :class:`Meeting`
        (``Meeting.thread(...)`` for scheduled, private chat, channel and Meet
        Now meetings; ``Meeting.join_id(id, passcode)``; ``Meeting.from_token``);
        or give the raw ``chat_info`` and ``meeting_info``. ``source`` joins as
        someone else (``Target.guest(...)`` to join as a guest).
        """
        if meeting is None and meeting_info is None:
            raise ValueError("join_meeting needs a join URL, a Meeting, or meeting_info")
        return await self.create_call(
            source=source,
            meeting=meeting,
            chat_info=chat_info,
            meeting_info=meeting_info,
            tenant_id=tenant_id,
            subject=subject,
            modalities=modalities,
            prefetch=prefetch,
            app_hosted_media=app_hosted_media,
            media_config=media_config,
            content_sharing_notifications=content_sharing_notifications,
            delta_roster=delta_roster,
            interactive_roster=interactive_roster,
            hide_bot_after_escalation=hide_bot_after_escalation,
            call_options=call_options,
            callback_uri=callback_uri,
            extra=extra,
        )

    async def log_device_quality(
        self,
        quality: Mapping[str, Any] | BaseModel | None = None,
        *,
        call_chain_id: str | None = None,
        participant_id: str | None = None,
        media_leg_id: str | None = None,
        device_name: str | None = None,
        device_description: str | None = None,
        media_quality_list: Sequence[Mapping[str, Any] | BaseModel] = (),
        **extra: Any,
    ) -> None:
        """Report a teleconference device's media quality (``logTeleconferenceDeviceQuality``).

        Give the raw ``quality`` object, or its properties as keywords (further
        properties as camelCase ``extra`` keywords).
        """
        body: dict[str, Any] = dump(quality) if quality is not None else {}
        for key, value in (
            ("callChainId", call_chain_id),
            ("participantId", participant_id),
            ("mediaLegId", media_leg_id),
            ("deviceName", device_name),
            ("deviceDescription", device_description),
        ):
            if value is not None:
                body[key] = value
        if media_quality_list:
            body["mediaQualityList"] = [dump(q) for q in media_quality_list]
        body.update(extra)
        await self.graph.request(
            "POST",
            "/communications/calls/" + quote("logTeleconferenceDeviceQuality", safe=""),
            json={"quality": body},
        )


def _missing_for_acting(settings: Settings, has_credentials: bool) -> list[str]:
    """The settings a bot still needs before it can call Graph, by variable name."""
    missing = []
    if not has_credentials:
        missing.append("CALLBOT_APP_SECRET or CALLBOT_CERTIFICATE_PATH")
    if not settings.tenant_id:
        missing.append("CALLBOT_TENANT_ID")
    if not settings.public_url:
        missing.append("CALLBOT_PUBLIC_URL")
    return missing
