"""CallServices: everything on the Graph side of a bot, for the dispatcher and for bot code.

It owns the Graph client (session, token, retries), makes call handles, and
keeps the operations awaiting their outcome. When a call's keep-alive is due
or a call has ended is decided by the lifecycle (``callbot._lifecycle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from pydantic import BaseModel

from .. import models
from .._config import Settings
from .._errors import GraphError, StoreUnavailable
from .._ids import clipped, id_key
from .._lifecycle import CallLife, KeepAliveResult
from .._sequencing import OwnFact, Placed, TransferAsked, TransferRefused
from ..events import OperationUpdated, ToneReceived
from ._call import (
    Call,
    CallOptionsLike,
    MediaConfigLike,
    call_options_json,
    media_config_json,
    on_beta,
)
from ._client import GraphClient
from ._credentials import AsyncTokenCredential
from ._digits import ToneRouter
from ._http import RetryPolicy
from ._meetings import Meeting, parse_join_url
from ._operations import OperationRegistry
from ._values import (
    MediaInfoLike,
    Modality,
    TargetLike,
    dump,
    graph_values,
    invitation_json,
    participant_info_json,
)

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle

__all__ = ["CallServices"]

log = structlog.get_logger("callbot.graph")
# What the call misses when the store cannot take the fact of its placing.
_NOT_KEPT = "the call's tenant is the one its first notification's token proves"
_NOR_MINE = ", and its handlers will not see snapshot.my_participant_id"

ChatInfoLike = models.ChatInfo | Mapping[str, Any]
MeetingInfoLike = models.MeetingInfo | Mapping[str, Any]


class CallServices:
    """The Graph side of a bot: call handles, Graph requests, operations.

    ``credential`` overrides the credential built from the settings (client
    secret or certificate); any azure-identity style async credential works.
    ``retry`` bounds retries of throttled or failed requests. ``lifecycle``,
    when given, is where handles read whether their call has ended, and ends
    of calls fail the operations still awaited on them.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        credential: AsyncTokenCredential | None = None,
        retry: RetryPolicy | None = None,
        scope: str | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.settings = settings
        self.graph = GraphClient(settings, credential=credential, retry=retry, scope=scope)
        """The Graph client, also for requests callbot does not model."""
        # An outcome and the call's end may arrive swapped: one window apart at most.
        self.operations = OperationRegistry(end_grace=settings.reorder_window)
        """Operations awaiting their outcome."""
        self.tones = ToneRouter(settings.reorder_window)
        """Tones for handlers collecting digits (``call.collect_digits``)."""
        self._lifecycle = lifecycle
        # The scenario ids of calls this bot placed (others derive theirs from the call id).
        self._scenarios: dict[str, str] = {}
        self._note: Callable[[OwnFact], Awaitable[None]] | None = None
        self._started = False
        self._prefetch: asyncio.Task[None] | None = None
        if lifecycle is not None:
            lifecycle.when_ended(self.fail_operations)
            lifecycle.when_forgotten(self._forget_scenario)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session and fetch the app token early (a failure is only logged).

        Fetching the token now keeps it off the first answer's 15-second budget.
        """
        if self._started:
            return
        self._started = True
        self.graph.open()
        # Now, not at the first recording download: mid-call, in a handler.
        self.graph.load_recording_ca()
        if _repeats_callback_path(self.settings):
            # A common slip: the webhook's whole URL where its base belongs.
            log.warning(
                "public_url_ends_in_callback_path",
                callback_url=self.settings.callback_url,
                detail="public_url is the base URL callback_path is added to "
                "(CALLBOT_PUBLIC_URL, CALLBOT_CALLBACK_PATH)",
            )
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
        if self.settings.tenant_id and self.graph.has_credentials:
            # Builds the credential: an unreadable certificate is a configuration error now,
            # not a warning followed by a ready bot that can answer no call.
            _ = self.graph.tokens
        # In the background: a token endpoint that does not answer must not keep the bot
        # from listening (liveness probes) or from obeying SIGTERM.
        self._prefetch = asyncio.get_running_loop().create_task(self._prefetch_token())

    async def _prefetch_token(self) -> None:
        try:
            await self.graph.token()
        except GraphError:
            pass  # the token cache wrote its one line (graph_token_failed or _refused)
        except Exception as exc:
            log.warning("graph_token_prefetch_failed", error=str(exc) or type(exc).__name__)

    async def close(self) -> None:
        """Fail pending waits, close the session: call handles then raise ``RuntimeError``
        until :meth:`start` (a session they built would be closed by no one)."""
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None and not prefetch.done():
            prefetch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prefetch
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

    def _forget_scenario(self, call_key: str, reason: str) -> None:
        self._scenarios.pop(call_key, None)

    def note_with(self, note: Callable[[OwnFact], Awaitable[None]]) -> None:
        """Await ``note(fact)`` for what the bot itself knows of a call and Graph's
        notifications of it never say: the bot's own participant id in a call it placed, a
        transfer about to be asked (the store keeps it in line with the call's
        notifications, for whichever instance runs the call)."""
        self._note = note

    async def transfer_asked(
        self,
        call_id: str,
        target: models.InvitationParticipantInfo | None = None,
        ask: str | None = None,
    ) -> None:
        """The bot is about to ask Graph to transfer the call to ``target`` (the ask named
        ``ask``): counted for the call's run (through the store, else by the lifecycle), its
        failure to name ``target``, or ``StoreUnavailable`` is raised, the ask withdrawn."""
        if self._note is None:
            if self._lifecycle is not None:
                self._lifecycle.transfer_asked(call_id, target, ask)
            return
        try:
            await self._note(TransferAsked(call_id, target, ask))
        except StoreUnavailable:
            if ask is not None:
                # The store may have kept it though its answer was lost: not sent, so no
                # news of it will come, nor may a later transfer's failure name it.
                await self.transfer_refused(call_id, ask)
            raise

    async def transfer_refused(self, call_id: str, ask: str | None = None) -> None:
        """Graph refused the transfer just asked (``ask``), or it was not sent: no news of it
        will come, so the call's run stops waiting for it (a failure of the call now is not
        that transfer's). Logged, not raised, when the store cannot take it: then its wait
        ends with the window."""
        if self._note is None:
            return  # no run of the call waits for its news: nothing to settle
        try:
            await self._note(TransferRefused(call_id, ask))
        except StoreUnavailable as exc:
            log.warning("transfer_refusal_not_kept", call_id=call_id, error=str(exc))

    def accepted(self, call_id: str) -> None:
        """Graph accepted a request of the bot's own on the call: the call is real, no id a
        sender invented (the lifecycle keeps it as a live call once past ringing)."""
        if self._lifecycle is not None:
            self._lifecycle.prove(call_id)

    def gone(self, call_id: str) -> None:
        """Graph answered a request on the call that it does not have the call (``8522``):
        the lifecycle ends it, as for a keep-alive answered 404."""
        life = self._lifecycle.get(call_id) if self._lifecycle is not None else None
        # Only a call Graph accepted a request on: an id a sender invented stays pending,
        # within the bound on pending calls.
        if self._lifecycle is not None and life is not None and life.proven and not life.ended:
            self._lifecycle.gone(call_id)

    async def until_established(self, call_id: str, timeout: float | None) -> None:
        """See :meth:`Call.wait_until_established` (the lifecycle knows the call's states)."""
        if self._lifecycle is None:
            raise RuntimeError("waiting for a call's state needs the bot running (bot.services)")
        await self._lifecycle.until_established(call_id, timeout)

    # -- handles ------------------------------------------------------------------

    def call(
        self,
        call_id: str,
        *,
        snapshot: models.Call | None = None,
        roster: Mapping[str, models.Participant] | None = None,
        life: CallLife | None = None,
    ) -> Call:
        """A handle of a call (handles of one call compare equal, whatever the id's form);
        ``life`` is the call's, when the caller has it at hand."""
        if life is None and self._lifecycle is not None:
            life = self._lifecycle.get(call_id)
        key = life.key if life is not None else id_key(call_id)
        return Call(
            call_id,
            services=self,
            snapshot=snapshot,
            roster=roster,
            life=life,
            scenario_id=self._scenarios.get(key),
        )

    # -- what the rest of the bot tells (never raises) ------------------------------

    async def keep_alive(self, call_id: str) -> KeepAliveResult:
        """Send a call's keep-alive; ``GONE`` when Graph no longer knows the call."""
        try:
            await self.call(call_id).keep_alive()
        except GraphError as exc:
            # Logged once already, as every failed request is (or as the token fetch was).
            return KeepAliveResult.GONE if exc.status == 404 else KeepAliveResult.FAILED
        return KeepAliveResult.OK

    def fail_operations(self, call_key: str, result_info: models.ResultInfo | None) -> None:
        """The call ended: fail the operations still awaited on it."""
        try:
            key = id_key(call_key)
            self.tones.on_ended(key)
            failed = self.operations.fail_call(key, result_info)
            if failed:
                log.info("graph_operations_failed_call_ended", call_key=call_key, count=failed)
        except Exception:
            log.exception("call_end_cleanup_failed", call_key=call_key)

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
                status=clipped(event.status),
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
        modalities: Sequence[Modality] = ("audio",),
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

        Media is service-hosted (``prefetch`` media to cache) unless ``app_hosted_media``
        (the media platform's blob) or ``media_config`` is given;
        ``remove_from_default_audio_group`` and ``prefetch`` are merged into a
        ``media_config`` they apply to (``prefetch`` into a service-hosted one; with another
        it raises ``ValueError``, as ``app_hosted_media`` with ``media_config`` does). A
        target or the ``source`` may be a model a handler holds (an incoming call's
        ``source``, a participant's ``info``, the bot's own identity in an incoming call's
        ``targets[0]``): each is sent as the type Graph declares there. ``modalities`` as
        :meth:`Call.answer <callbot.Call.answer>` takes them. ``extra`` adds raw ``call``
        properties. Returns the call's handle, with the created call as its snapshot. The
        bot's own participant id that Graph's answer names (``my_participant_id``, which the
        call's notifications never carry) is in the snapshot of the call's handlers too,
        from the next notification on. From that answer on, the call is the bot's
        ``tenant_id``'s: a notification naming it under another tenant's token is refused,
        though Graph has posted nothing of it yet.
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
        body["requestedModalities"] = graph_values(
            models.Modality, modalities, "modalities", beta=on_beta(self.settings.graph_url)
        )
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
        self._scenarios[id_key(call_id)] = scenario_id
        try:
            snapshot = response.model(models.Call)
        except GraphError as exc:
            # Graph made the call: the bot keeps its handle (to hang up, at least).
            log.warning("call_created_unreadable", call_id=call_id, error=exc.message)
            snapshot = models.Call(id=call_id)
        # Known to the lifecycle from now on (its tenant bound by the fact noted below), so
        # the handle returned sees the call end, as handlers' handles do.
        life = self._lifecycle.life(call_id) if self._lifecycle is not None else None
        self.accepted(call_id)
        mine = snapshot.my_participant_id or None
        # Graph placed it in the tenant the bot's token acts in: it refuses a request naming
        # another (7505, "Request authorization tenant mismatch"). A credential given in code
        # acts in a tenant of its own, and a domain name is no tenant id a token proves: the
        # call is bound by its first notification then.
        tenant = self.graph.acting_tenant
        if self._note is not None:
            # Noted even with neither: whichever instance runs the call learns it is real.
            try:
                await self._note(Placed(call_id, mine, tenant))
            except StoreUnavailable as exc:
                # Graph made the call: the handle is returned all the same.
                log.warning(
                    "placed_call_not_kept",
                    call_id=call_id,
                    error=str(exc),
                    detail=_NOT_KEPT + (_NOR_MINE if mine else ""),
                )
        handle = self.call(call_id, snapshot=snapshot, life=life)
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
        modalities: Sequence[Modality] = ("audio",),
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
            "/communications/calls/logTeleconferenceDeviceQuality",
            json={"quality": body},
        )


def _repeats_callback_path(settings: Settings) -> bool:
    """Whether ``public_url``'s path already ends in ``callback_path``, which Graph's
    callbackUri then names twice."""
    path = settings.callback_path.rstrip("/")
    if not settings.public_url or not path:
        return False
    return urlsplit(settings.public_url).path.rstrip("/").endswith(path)


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
