"""The call handle a handler receives: the latest snapshot and every action Graph offers.

Each action sends the documented request to ``/communications/calls/{id}/...``.
Actions that start a Graph operation return an :class:`~callbot.Operation` to
await; the others return once Graph has accepted the request.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, get_args, overload
from urllib.parse import urlsplit

import structlog

from .. import models
from .._dtmf import key_list, tones_of
from .._errors import CALL_NOT_FOUND, CallEnded, GraphError
from .._ids import id_key, path_segment
from . import _digits
from ._client import GraphResponse
from ._operations import Operation
from ._values import (
    MediaInfoLike,
    Modality,
    PromptLike,
    RecordingStatus,
    RejectReason,
    RoutingMode,
    RoutingPolicy,
    ScreenSharingRole,
    TargetLike,
    ToneName,
    dump,
    graph_values,
    invitation_json,
    media_info_json,
    participant_info_json,
    prompt_json,
    prompts_json,
    string_list,
)

if TYPE_CHECKING:
    from .._config import Settings
    from .._lifecycle import CallLife
    from ._client import GraphClient
    from ._operations import OperationRegistry


class CallServices(Protocol):
    """What a call handle acts through (:class:`~callbot.graph.CallServices` provides it)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def graph(self) -> GraphClient: ...
    @property
    def operations(self) -> OperationRegistry: ...
    @property
    def tones(self) -> _digits.ToneRouter: ...
    async def transfer_asked(
        self, call_id: str, target: models.InvitationParticipantInfo | None, ask: str
    ) -> None: ...
    async def transfer_refused(self, call_id: str, ask: str) -> None: ...
    def fail_operations(self, call_key: str, result_info: models.ResultInfo | None) -> None: ...
    def accepted(self, call_id: str) -> None: ...
    def gone(self, call_id: str) -> None: ...
    async def until_established(self, call_id: str, timeout: float | None) -> None: ...


__all__ = [
    "AudioRoutingGroups",
    "Call",
    "Participants",
    "call_options_json",
    "media_config_json",
]

log = structlog.get_logger("callbot.graph")

OpT = TypeVar("OpT", bound=models.CommsOperation)
T = TypeVar("T")

SETS_A_STATE = frozenset(
    {
        "keepAlive",
        "subscribeToTone",
        "mute",
        "unmute",
        "muteParticipant",
        "updateRecordingStatus",
        "changeScreenSharingRole",
        "updateAudioRoutingGroup",
    }
)
"""The requests that set a state of the call (Graph doing one twice leaves it as once): one
whose answer was lost (a 504, a connection cut once sent) is sent again."""

MediaConfigLike = models.MediaConfig | Mapping[str, Any]
CallOptionsLike = models.CallOptions | Mapping[str, Any]


def media_config_json(
    *,
    media_config: MediaConfigLike | None,
    app_hosted_media: str | None,
    prefetch: Sequence[MediaInfoLike],
    remove_from_default_audio_group: bool | None = None,
) -> dict[str, Any]:
    """The ``mediaConfig``: app-hosted with a blob, else service-hosted; or the raw
    ``media_config``, with the keyword arguments that apply to it merged over it, as
    :func:`call_options_json` merges its flags.

    With ``media_config``, ``remove_from_default_audio_group`` is set over the config's own
    ``removeFromDefaultAudioGroup`` (every media config has it), and ``prefetch`` is added
    after the media the config pre-fetches already, when it is a
    ``serviceHostedMediaConfig``. ``prefetch`` with any other config, or ``app_hosted_media``
    with a ``media_config`` (two configs), raises ``ValueError`` naming both arguments: either
    would be dropped.
    """
    body: dict[str, Any]
    if media_config is not None:
        if app_hosted_media is not None:
            raise ValueError(
                "app_hosted_media= and media_config= are two media configs: give one "
                "(an appHostedMediaConfig's blob goes in media_config's blob)"
            )
        body = dump(media_config)
        if prefetch:
            if models.type_name(body) != "servicehostedmediaconfig":
                raise ValueError(
                    "prefetch= is for service-hosted media: media_config= is "
                    f"{body.get('@odata.type', 'untyped')!s}, not a serviceHostedMediaConfig"
                )
            given = body.get("preFetchMedia") or []
            body["preFetchMedia"] = [*given, *(media_info_json(p) for p in prefetch)]
    elif app_hosted_media is not None:
        if prefetch:
            raise ValueError("prefetch is for service-hosted media; app-hosted media has a blob")
        body = {"@odata.type": "#microsoft.graph.appHostedMediaConfig", "blob": app_hosted_media}
    else:
        body = {"@odata.type": "#microsoft.graph.serviceHostedMediaConfig"}
        if prefetch:
            body["preFetchMedia"] = [media_info_json(p) for p in prefetch]
    if remove_from_default_audio_group is not None:
        body["removeFromDefaultAudioGroup"] = remove_from_default_audio_group
    return body


def call_options_json(
    odata_type: str,
    *,
    call_options: CallOptionsLike | None,
    content_sharing_notifications: bool | None = None,
    delta_roster: bool | None = None,
    interactive_roster: bool | None = None,
    hide_bot_after_escalation: bool | None = None,
) -> dict[str, Any] | None:
    """The ``callOptions`` from keyword flags (merged over a raw value when both are given)."""
    body: dict[str, Any] = dump(call_options) if call_options is not None else {}
    for key, value in (
        ("isContentSharingNotificationEnabled", content_sharing_notifications),
        ("isDeltaRosterEnabled", delta_roster),
        ("isInteractiveRosterEnabled", interactive_roster),
        ("hideBotAfterEscalation", hide_bot_after_escalation),
    ):
        if value is not None:
            body[key] = value
    if not body:
        return None
    body.setdefault("@odata.type", odata_type)
    return body


async def _download_to_file(
    graph: GraphClient, location: str, token: str, path: Path, call_id: str
) -> int:
    # Checked before the file is opened: a refused location leaves whatever ``path`` held.
    graph.check_recording_url(location, call_id=call_id)
    # Each write runs in a thread: a file write can block the event loop.
    file = await asyncio.to_thread(path.open, "wb")
    try:

        async def write(chunk: bytes) -> None:
            await asyncio.to_thread(file.write, chunk)

        size = await graph.download(location, bearer=token, write=write, call_id=call_id)
    except BaseException:
        await asyncio.to_thread(file.close)
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise
    await asyncio.to_thread(file.close)
    return size


def scenario_of(call_id: str) -> str:
    """The ``scenario-id`` of a call the bot did not place: the same in every process."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "callbot:call:" + id_key(call_id)))


class Roster(Mapping[str, models.Participant]):
    """A call's participants by id: looked up by an id in any form Graph writes it
    (``participant.id`` as it came, upper case, without dashes); kept in the form the
    ids are compared in (lower case, no dashes)."""

    __slots__ = ("_by_key",)

    def __init__(self, by_key: Mapping[str, models.Participant]) -> None:
        self._by_key = by_key

    def __getitem__(self, participant_id: str) -> models.Participant:
        found = self._by_key.get(participant_id)
        if found is None:
            found = self._by_key.get(id_key(participant_id))
        if found is None:
            raise KeyError(participant_id)
        return found

    def __contains__(self, participant_id: object) -> bool:
        if not isinstance(participant_id, str):
            return False
        return participant_id in self._by_key or id_key(participant_id) in self._by_key

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def __repr__(self) -> str:
        return f"Roster({dict(self._by_key)!r})"


def on_beta(graph_url: str) -> bool:
    """Whether ``graph_url`` is Graph's beta endpoint (``.../beta``)."""
    return urlsplit(graph_url).path.rstrip("/").lower().endswith("/beta")


class Call:
    """A call the bot is in (or is being offered): its state, and every action on it.

    A handler's ``call`` is a handle made for its event: ``snapshot`` is the call
    as callbot knew it right after that event (merged from notifications) and
    ``roster`` the participants by id; ``ended`` is live (the call may end while
    the handler runs). Handles of one call compare equal. ``participants`` and
    ``audio_routing_groups`` act on those collections through Graph.
    """

    def __init__(
        self,
        call_id: str,
        *,
        services: CallServices,
        snapshot: models.Call | None = None,
        roster: Mapping[str, models.Participant] | None = None,
        life: CallLife | None = None,
        scenario_id: str | None = None,
    ) -> None:
        self.id = call_id
        """The call id as Graph wrote it."""
        self.snapshot = snapshot
        """The call as last seen (``None`` before any notification or response)."""
        self.roster = Roster(roster if roster is not None else {})
        """The participants last seen in a roster notification, by participant id (found
        by ``participant.id`` in any case, with or without dashes; listed lower case,
        without dashes; one Graph names by its ``@odata.id`` path alone has the id ending
        it); one Graph sent with neither (an invitee being added) is keyed by who it is."""
        self._services = services
        self._life = life
        # Made on first use: most handlers of a notification never act through them.
        self._scenario_id = scenario_id

    @property
    def scenario_id(self) -> str:
        """Sent as ``scenario-id`` with every request about this call (one per call flow)."""
        if self._scenario_id is None:
            self._scenario_id = scenario_of(self.id)
        return self._scenario_id

    @functools.cached_property
    def participants(self) -> Participants:
        """The call's participants on Graph: list, invite, mute, remove, hold music."""
        return Participants(self)

    @functools.cached_property
    def audio_routing_groups(self) -> AudioRoutingGroups:
        """The call's audio routing groups on Graph."""
        return AudioRoutingGroups(self)

    def __repr__(self) -> str:
        return f"<Call {self.id} state={self.state!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Call) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def key(self) -> str:
        """The call id in the form ids are compared in (lower case, no dashes)."""
        return id_key(self.id)

    @property
    def state(self) -> str | None:
        """``snapshot.state``: ``incoming``, ``establishing``, ``established``, ..."""
        return self.snapshot.state if self.snapshot is not None else None

    @property
    def ended(self) -> bool:
        """Whether callbot has seen the call end (now, not when the handle was made)."""
        return self._life is not None and self._life.ended

    @property
    def path(self) -> str:
        """The call's Graph path, ``/communications/calls/{id}``."""
        return "/communications/calls/" + path_segment(self.id)

    # -- plumbing -----------------------------------------------------------------

    async def _request(
        self,
        method: str,
        subpath: str = "",
        json: Any = None,
        *,
        repeatable: bool | None = None,
        item: bool = False,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> GraphResponse:
        """``item``: ``subpath`` names one participant, operation or group of the call;
        ``before_send``: see :meth:`GraphClient.request`."""
        try:
            response = await self._services.graph.request(
                method,
                self.path + subpath,
                json=json,
                scenario_id=self.scenario_id,
                call_id=self.id,
                repeatable=repeatable,
                before_send=before_send,
            )
        except GraphError as exc:
            # Graph no longer knows the call: it ended (usually the caller hung up). About one
            # item, a 404 says only that it is gone (a participant who has just left).
            # Unless its code says the call is not found: a call the bot is in ended, untold yet.
            said_gone = self._life is not None and exc.code == CALL_NOT_FOUND
            if exc.status == 404 and not isinstance(exc, CallEnded):
                if said_gone and not self.ended:
                    self._services.gone(self.id)  # its termination may still be on its way
                if self.ended or not item or said_gone:
                    raise CallEnded.from_graph_error(exc) from None
            raise
        # Graph knows the call as one of this app's: it is real, whatever state it is in.
        self._services.accepted(self.id)
        return response

    async def _operation(
        self,
        subpath: str,
        body: dict[str, Any],
        *,
        action: str,
        kind: type[OpT],
        client_context: str | None,
        item: bool = False,
    ) -> Operation[OpT]:
        context = client_context or str(uuid.uuid4())
        body["clientContext"] = context
        op = Operation(
            call_id=self.id,
            action=action,
            client_context=context,
            kind=kind,
            context_generated=client_context is None,
        )
        registry = self._services.operations
        # tracked before sending: Graph's outcome can arrive before its response does
        registry.start(op)
        try:
            response = await self._request(
                "POST", subpath, body, item=item, repeatable=action in SETS_A_STATE
            )
        except BaseException:
            registry.abandon(op)
            raise
        registry.accepted(op, response.body, response.location)
        if self._life is not None and self._life.ended and not op.done:
            # Its call's end came before Graph's answer (or before a run again whose journal
            # answered it): no end is told again, so it fails as one pending at the end does.
            self._services.fail_operations(self.key, self._life.result_info)
        log.info(
            "graph_operation_started",
            call_id=self.id,
            action=action,
            operation_id=op.id,
            status=op.status,
            client_context=context,
        )
        return op

    def _callback(self, callback_uri: str | None) -> str:
        return callback_uri or self._services.settings.callback_url

    @property
    def _beta(self) -> bool:
        """Whether requests go to Graph's beta (which takes enum members v1.0 lacks)."""
        return on_beta(self._services.settings.graph_url)

    # -- answering ----------------------------------------------------------------

    async def answer(
        self,
        *,
        modalities: Sequence[Modality] = ("audio",),
        prefetch: Sequence[MediaInfoLike] = (),
        app_hosted_media: str | None = None,
        media_config: MediaConfigLike | None = None,
        participant_capacity: int | None = None,
        content_sharing_notifications: bool | None = None,
        delta_roster: bool | None = None,
        call_options: CallOptionsLike | None = None,
        callback_uri: str | None = None,
    ) -> None:
        """Answer an incoming call (within 15 seconds of it ringing).

        Media is service-hosted unless ``app_hosted_media`` (the media platform's
        session blob) or a raw ``media_config`` is given; ``prefetch`` lists media
        Graph caches before the first prompt (added to a service-hosted ``media_config``'s;
        with any other config it raises ``ValueError``). ``modalities``: ``audio``, ``video``,
        ``videoBasedScreenSharing``, ``data`` (``unknown`` on Graph's beta). ``callback_uri``
        defaults to the bot's ``settings.callback_url``.
        """
        body: dict[str, Any] = {
            "callbackUri": self._callback(callback_uri),
            "acceptedModalities": graph_values(
                models.Modality, modalities, "modalities", beta=self._beta
            ),
            "mediaConfig": media_config_json(
                media_config=media_config, app_hosted_media=app_hosted_media, prefetch=prefetch
            ),
        }
        options = call_options_json(
            "#microsoft.graph.incomingCallOptions",
            call_options=call_options,
            content_sharing_notifications=content_sharing_notifications,
            delta_roster=delta_roster,
        )
        if options is not None:
            body["callOptions"] = options
        if participant_capacity is not None:
            body["participantCapacity"] = participant_capacity
        await self._request("POST", "/answer", body)

    async def reject(
        self, reason: RejectReason = "none", *, callback_uri: str | None = None
    ) -> None:
        """Reject an incoming call (``reason``: ``none``, ``busy`` or ``forbidden``)."""
        body: dict[str, Any] = {
            "reason": models.graph_value(models.RejectReason, reason, "reason", beta=self._beta)
        }
        if callback_uri is not None:
            body["callbackUri"] = callback_uri
        await self._request("POST", "/reject", body)

    async def redirect(
        self,
        *targets: TargetLike,
        timeout: int | None = None,
        routing_policies: Sequence[RoutingPolicy] | None = None,
        callback_uri: str | None = None,
    ) -> None:
        """Forward an incoming call; several targets ring simultaneously.

        ``timeout`` is how long (seconds) to ring; ``routing_policies`` any of ``none``,
        ``noMissedCall``, ``disableForwardingExceptPhone``, ``disableForwarding``,
        ``preferSkypeForBusiness`` (e.g. ``["disableForwarding"]``).
        """
        if not targets:
            raise ValueError("redirect needs at least one target")
        body: dict[str, Any] = {"targets": [invitation_json(t) for t in targets]}
        if timeout is not None:
            body["timeout"] = timeout
        if routing_policies is not None:
            body["routingPolicies"] = graph_values(
                models.RoutingPolicy, routing_policies, "routing_policies", beta=self._beta
            )
        if callback_uri is not None:
            body["callbackUri"] = callback_uri
        elif self._services.settings.public_url is not None:
            body["callbackUri"] = self._services.settings.callback_url
        await self._request("POST", "/redirect", body)

    # -- call control -------------------------------------------------------------

    async def transfer(
        self,
        target: TargetLike,
        *,
        replaces_call_id: str | None = None,
        transferee: TargetLike | None = None,
        client_context: str | None = None,
    ) -> None:
        """Transfer the call (blind; consultative with ``replaces_call_id``).

        ``target`` may be a caller's ``source`` or a participant's ``info`` as handlers hold
        them: it is sent as the ``invitationParticipantInfo`` Graph takes, its identity (and
        its ``participantId`` with ``replaces_call_id``). From a group call, ``transferee``
        names the participant to transfer (a :class:`~callbot.graph.Target` with
        ``participant_id=``). The outcome arrives as call
        state changes (``transferring``, ``transferAccepted``, then ``terminated``,
        or back to ``established`` with a ``resultInfo`` when it failed): nothing to
        await here. A failure Graph tells with no ``transferring`` before it comes as a
        :class:`~callbot.events.CallUpdated` with ``result_info`` instead: the call never
        left ``established``, and ``on_state("established")`` handlers do not run.
        ``on_transfer_failed`` handlers run for either, once per transfer asked. Graph
        transfers to a phone number (``Target.phone``) only from a bot with an application
        instance (a resource account with a phone number).

        The transfer is counted for the call's handlers before it is sent (a failure worded
        as the last one is then news); with the Redis store, in the call's inbox, for
        whichever instance runs the call. When Redis cannot take it, this raises
        :class:`~callbot.StoreUnavailable` and nothing is sent: no transfer was asked (an
        ask Redis kept though its answer was lost is withdrawn).
        When Graph did not act on the request (a :class:`~callbot.GraphError` whose
        ``may_have_acted`` is false: a 4xx answer, a 503 past the retry budget, Graph not
        reached), the transfer is settled: nothing waits for its news.
        """
        body: dict[str, Any] = {
            "transferTarget": invitation_json(target, replaces_call_id=replaces_call_id)
        }
        if replaces_call_id is not None:
            body["transferTarget"]["replacesCallId"] = replaces_call_id  # over the target's own
        if transferee is not None:
            body["transferee"] = participant_info_json(transferee)
        if client_context is not None:
            body["clientContext"] = client_context
        # Named by the failure of this transfer, as sent (with its replacesCallId).
        asked_target = models.InvitationParticipantInfo.model_validate(body["transferTarget"])
        ask = uuid.uuid4().hex  # what names this ask for its refusal
        asked = False

        async def count() -> None:
            # Counted before it is sent: Graph may post its failure before answering it. Not
            # when a re-run handler is answered from the journal: its first run counted it.
            nonlocal asked
            await self._services.transfer_asked(self.id, asked_target, ask)
            asked = True

        try:
            await self._request("POST", "/transfer", body, before_send=count)
        except GraphError as exc:
            if asked and not exc.may_have_acted:
                # Graph did not act on the request: no news of this transfer will come.
                await self._services.transfer_refused(self.id, ask)
            raise

    async def hangup(self) -> None:
        """Hang up: the bot leaves (``DELETE`` the call). A call Graph no longer has (the
        caller hung up first, the meeting ended) is left already: that returns too."""
        try:
            await self._request("DELETE")
        except CallEnded:
            return  # what it deletes is gone, as asked (the call ends as Graph said)

    async def wait_until_established(self, timeout: float | None = None) -> None:
        """Wait until the call is established: a call the bot placed (``bot.create_call``,
        ``bot.join_meeting``) once the callee picked up (at once if it is established).

        Raises :class:`~callbot.CallEnded` if the call ends first, or has ended (the callee
        did not pick up, declined, was busy): its ``result_info`` says why when Graph said.
        Raises ``TimeoutError`` after ``timeout`` seconds; the call goes on (hang it up if
        it should not). With the Redis store, it returns whichever instance Graph told.
        """
        await self._services.until_established(self.id, timeout)

    async def keep_alive(self) -> None:
        """Tell Graph the bot still holds the call (else it ends after 45 minutes)."""
        await self._request("POST", "/keepAlive", repeatable="keepAlive" in SETS_A_STATE)

    async def refresh(self) -> models.Call:
        """Fetch the call from Graph; the result also becomes :attr:`snapshot`."""
        response = await self._request("GET")
        snapshot = response.model(models.Call)
        self.snapshot = snapshot
        return snapshot

    async def get_operation(self, operation_id: str) -> models.CommsOperation:
        """Fetch one of the call's operations from Graph."""
        response = await self._request(
            "GET", "/operations/" + path_segment(operation_id), item=True
        )
        return response.read(models.parse_operation, "an operation")

    # -- media --------------------------------------------------------------------

    async def play_prompt(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        *,
        loop: bool | None = None,
        client_context: str | None = None,
    ) -> Operation[models.PlayPromptOperation]:
        """Play one prompt (a media URL) or several in order.

        ``loop`` repeats them until ``cancel_media_processing``: Graph's beta has it, v1.0
        does not (it would play them once), so it needs ``graph_url`` on ``/beta``.
        """
        body: dict[str, Any] = {"prompts": prompts_json(prompts)}
        if loop is not None and on_beta(self._services.settings.graph_url):
            body["loop"] = loop
        elif loop:
            raise ValueError(
                "playPrompt's loop is Graph beta's only: v1.0 plays the prompts once."
                " List the prompt again, play it again when its operation completes,"
                " or set graph_url (CALLBOT_GRAPH_URL) to https://graph.microsoft.com/beta"
            )
        return await self._operation(
            "/playPrompt",
            body,
            action="playPrompt",
            kind=models.PlayPromptOperation,
            client_context=client_context,
        )

    async def record_response(
        self,
        *,
        prompts: PromptLike | Sequence[PromptLike] = (),
        barge_in_allowed: bool | None = None,
        initial_silence_timeout: int | None = None,
        max_silence_timeout: int | None = None,
        max_record_duration: int | None = None,
        play_beep: bool | None = None,
        stop_tones: str | Sequence[str] | None = None,
        client_context: str | None = None,
    ) -> Operation[models.RecordOperation]:
        """Record a short answer from the caller (durations in seconds).

        ``stop_tones`` are the keys that end the recording, as a string (``"#*"``) or a
        list of keys (``["#", "*"]``); anything that is no key raises ``ValueError``.

        The completed :class:`~callbot.models.RecordOperation` has
        ``recording_location``; fetch it with :meth:`download_recording`.
        """
        body: dict[str, Any] = {}
        prompt_list = prompts_json(prompts) if prompts else []
        if prompt_list:
            body["prompts"] = prompt_list
        for key, value in (
            ("bargeInAllowed", barge_in_allowed),
            ("initialSilenceTimeoutInSeconds", initial_silence_timeout),
            ("maxSilenceTimeoutInSeconds", max_silence_timeout),
            ("maxRecordDurationInSeconds", max_record_duration),
            ("playBeep", play_beep),
        ):
            if value is not None:
                body[key] = value
        if stop_tones is not None:
            body["stopTones"] = key_list(stop_tones, "stop_tones")
        return await self._operation(
            "/recordResponse",
            body,
            action="recordResponse",
            kind=models.RecordOperation,
            client_context=client_context,
        )

    async def collect_digits(
        self,
        prompt: PromptLike | Sequence[PromptLike] | None = None,
        *,
        max_digits: int = 1,
        finish_on: str | None = "#",
        timeout: float = 5.0,
    ) -> str:
        """Play ``prompt`` and return the keys the caller presses (``""`` when none).

        Subscribes to tones once per call. A key pressed during the prompt stops
        it. Collecting ends after ``max_digits`` keys, on a key in ``finish_on``
        (not included; ``None``: no key ends it), or ``timeout`` seconds after the
        prompt ended or the last key: with no ``finish_on``, fewer than ``max_digits``
        keys means that timeout. Should Graph not tell the prompt's end within 5 minutes
        (its outcome lost), the timeout starts then anyway. A tone that is no key (a hook
        ``flash``) is not collected. Raises :class:`~callbot.CallEnded` when the call ends
        meanwhile.
        """
        return await _digits.collect_digits(
            self,
            self._services.tones,
            prompt,
            max_digits=max_digits,
            finish_on=finish_on,
            timeout=timeout,
        )

    async def menu(
        self,
        prompt: PromptLike | Sequence[PromptLike],
        options: Mapping[str, T],
        *,
        retries: int = 2,
        invalid_prompt: PromptLike | Sequence[PromptLike] | None = None,
        timeout: float = 5.0,
    ) -> T | None:
        """Play ``prompt`` until the caller presses one of ``options``; return its value.

        A key not in ``options``, or none within ``timeout``, plays
        ``invalid_prompt`` (when given) and the menu again, up to ``retries``
        more times; then ``None``. Keys longer than one digit end with ``#``. Option
        keys are read as pressed keys are (``"a"`` is key ``A``); one no caller can choose
        raises ``ValueError``: a character that is no key, no key at all, the same keys as
        another option, or ``#`` when options are longer than one digit. As in
        :meth:`collect_digits`, a prompt (the menu or ``invalid_prompt``) whose end Graph
        does not tell within 5 minutes is waited for no longer.
        """
        return await _digits.menu(
            self,
            self._services.tones,
            prompt,
            options,
            retries=retries,
            invalid_prompt=invalid_prompt,
            timeout=timeout,
        )

    async def cancel_media_processing(
        self, *, client_context: str | None = None
    ) -> Operation[models.CancelMediaProcessingOperation]:
        """Stop the prompt or recording in progress. Its operation then ends as Graph tells:
        ``failed`` (a recording: 400/8508, so ``wait()`` raises :class:`~callbot.OperationFailed`)
        or ``completed`` with ``completion_reason`` ``mediaOperationCanceled`` (Graph's reason
        for a prompt or tones cut short, so ``wait()`` returns)."""
        return await self._operation(
            "/cancelMediaProcessing",
            {},
            action="cancelMediaProcessing",
            kind=models.CancelMediaProcessingOperation,
            client_context=client_context,
        )

    async def subscribe_to_tone(
        self, *, client_context: str | None = None
    ) -> Operation[models.SubscribeToToneOperation]:
        """Receive the caller's DTMF tones (as ``ToneReceived`` events)."""
        # A digit collection need not ask again.
        with self._services.tones.subscribing(self.key):
            return await self._operation(
                "/subscribeToTone",
                {},
                action="subscribeToTone",
                kind=models.SubscribeToToneOperation,
                client_context=client_context,
            )

    async def send_dtmf_tones(
        self,
        tones: str | Sequence[ToneName],
        *,
        delay_between_tones_ms: int | None = None,
        client_context: str | None = None,
    ) -> Operation[models.SendDtmfTonesOperation]:
        """Send DTMF tones: a string of keys (``"123#"``) or a list of Graph tone names
        (``["tone1", "pound"]``); a key or name Graph has not raises ``ValueError``."""
        body: dict[str, Any] = {"tones": tones_of(tones, beta=self._beta)}
        if delay_between_tones_ms is not None:
            body["delayBetweenTonesMs"] = delay_between_tones_ms
        return await self._operation(
            "/sendDtmfTones",
            body,
            action="sendDtmfTones",
            kind=models.SendDtmfTonesOperation,
            client_context=client_context,
        )

    @overload
    async def download_recording(
        self, recording: Operation[Any] | models.RecordOperation | Mapping[str, Any]
    ) -> bytes: ...

    @overload
    async def download_recording(
        self,
        recording: Operation[Any] | models.RecordOperation | Mapping[str, Any],
        path: str | PathLike[str],
    ) -> int: ...

    @overload
    async def download_recording(
        self,
        recording: Operation[Any] | models.RecordOperation | Mapping[str, Any],
        *,
        writer: Callable[[bytes], Awaitable[None]],
    ) -> int: ...

    async def download_recording(
        self,
        recording: Operation[Any] | models.RecordOperation | Mapping[str, Any],
        path: str | PathLike[str] | None = None,
        *,
        writer: Callable[[bytes], Awaitable[None]] | None = None,
    ) -> bytes | int:
        """Fetch a finished recording with its ``recordingAccessToken``.

        Returns the recording; with ``path`` it is streamed to that file instead,
        and with ``writer`` (an async function taking each chunk) to the writer,
        and the number of bytes is returned. Only https URLs on
        ``recording_hosts`` are fetched, at most ``max_recording_bytes``; anything
        else raises ``ValueError``. A refused location leaves ``path`` as it was; a
        download that fails once under way removes the partly written file.
        Recordings are short-lived: download them when the record operation completes.
        """
        result: Any = recording.result if isinstance(recording, Operation) else recording
        if isinstance(result, Mapping):
            location = result.get("recordingLocation")
            token = result.get("recordingAccessToken")
        else:
            location = getattr(result, "recording_location", None)
            token = getattr(result, "recording_access_token", None)
        if not location or not token:
            if isinstance(recording, Operation) and not recording.done:
                raise ValueError(
                    f"no recording yet: the record operation is {recording.status}; "
                    "await op.wait() first"
                )
            raise ValueError("no recording: the record operation has no location or access token")
        graph = self._services.graph
        if writer is not None:
            return await graph.download(location, bearer=token, write=writer, call_id=self.id)
        if path is not None:
            return await _download_to_file(graph, location, token, Path(path), self.id)
        chunks: list[bytes] = []

        async def keep(chunk: bytes) -> None:
            chunks.append(chunk)

        await graph.download(location, bearer=token, write=keep, call_id=self.id)
        return b"".join(chunks)

    # -- self participant -----------------------------------------------------------

    async def mute(
        self, *, client_context: str | None = None
    ) -> Operation[models.MuteParticipantOperation]:
        """Mute the bot itself."""
        return await self._operation(
            "/mute",
            {},
            action="mute",
            kind=models.MuteParticipantOperation,
            client_context=client_context,
        )

    async def unmute(
        self, *, client_context: str | None = None
    ) -> Operation[models.UnmuteParticipantOperation]:
        """Unmute the bot itself."""
        return await self._operation(
            "/unmute",
            {},
            action="unmute",
            kind=models.UnmuteParticipantOperation,
            client_context=client_context,
        )

    async def change_screen_sharing_role(self, role: ScreenSharingRole) -> None:
        """Start (``sharer``) or stop (``viewer``) sharing the bot's screen."""
        await self._request(
            "POST",
            "/changeScreenSharingRole",
            {"role": models.graph_value(models.ScreenSharingRole, role, "role", beta=self._beta)},
            repeatable="changeScreenSharingRole" in SETS_A_STATE,
        )

    async def update_recording_status(
        self, status: RecordingStatus, *, client_context: str | None = None
    ) -> Operation[models.UpdateRecordingStatusOperation]:
        """Tell Teams the bot is recording (``recording``, ``notRecording`` or ``failed``,
        the statuses the request documents; another raises ``ValueError``).

        It records nothing: Graph documents it for Teams' policy-based recording, whose
        bots receive the call's media themselves (application-hosted media, through
        Microsoft's media platform, not callbot), and requires its success before a bot
        keeps any of that media. :meth:`record_response` records one answer from a caller.
        """
        return await self._operation(
            "/updateRecordingStatus",
            {
                "status": models.graph_value(
                    models.RecordingStatus,
                    status,
                    "status",
                    beta=self._beta,
                    only=get_args(RecordingStatus),
                )
            },
            action="updateRecordingStatus",
            kind=models.UpdateRecordingStatusOperation,
            client_context=client_context,
        )

    async def add_large_gallery_view(
        self, *, client_context: str | None = None
    ) -> Operation[models.AddLargeGalleryViewOperation]:
        """Add the large gallery view to the call (the bot then sees up to 49 videos)."""
        return await self._operation(
            "/addLargeGalleryView",
            {},
            action="addLargeGalleryView",
            kind=models.AddLargeGalleryViewOperation,
            client_context=client_context,
        )


class Participants:
    """A call's participants on Graph (``call.participants``)."""

    def __init__(self, call: Call) -> None:
        self._call = call

    def _path(self, participant_id: str | None = None, action: str = "") -> str:
        path = "/participants"
        if participant_id is not None:
            path += "/" + path_segment(participant_id)
        return path + action

    async def get(self, participant_id: str) -> models.Participant:
        """Fetch one participant."""
        response = await self._call._request("GET", self._path(participant_id), item=True)
        return response.model(models.Participant)

    async def invite(
        self,
        *targets: TargetLike,
        replaces_call_id: str | None = None,
        client_context: str | None = None,
    ) -> Operation[models.InviteParticipantsOperation]:
        """Invite one or more people (or bots, or phone numbers) into the call.

        ``replaces_call_id`` (for every target that does not name its own) moves
        a peer-to-peer call the bot holds with that person into this one. A participant's
        ``info`` (a ``participantInfo``) is invited by its identity; with
        ``replaces_call_id``, its ``participantId`` names whom to move out of that call (a
        participant of another meeting the bot is in).
        """
        if not targets:
            raise ValueError("invite needs at least one target")
        participants = [invitation_json(t, replaces_call_id=replaces_call_id) for t in targets]
        return await self._call._operation(
            self._path(action="/invite"),
            {"participants": participants},
            action="invite",
            kind=models.InviteParticipantsOperation,
            client_context=client_context,
        )

    async def mute(
        self, participant_id: str, *, client_context: str | None = None
    ) -> Operation[models.MuteParticipantOperation]:
        """Mute another participant."""
        return await self._call._operation(
            self._path(participant_id, "/mute"),
            {},
            action="muteParticipant",
            kind=models.MuteParticipantOperation,
            client_context=client_context,
            item=True,
        )

    async def remove(self, participant_id: str) -> None:
        """Remove a participant from the call (or cancel an invitation still ringing)."""
        await self._call._request("DELETE", self._path(participant_id), item=True)

    async def start_hold_music(
        self,
        participant_id: str,
        *,
        prompt: PromptLike | None = None,
        client_context: str | None = None,
    ) -> Operation[models.StartHoldMusicOperation]:
        """Put a participant on hold, playing ``prompt`` (Graph's default music when none)."""
        body: dict[str, Any] = {}
        if prompt is not None:
            body["customPrompt"] = prompt_json(prompt)
        return await self._call._operation(
            self._path(participant_id, "/startHoldMusic"),
            body,
            action="startHoldMusic",
            kind=models.StartHoldMusicOperation,
            client_context=client_context,
            item=True,
        )

    async def stop_hold_music(
        self, participant_id: str, *, client_context: str | None = None
    ) -> Operation[models.StopHoldMusicOperation]:
        """Take a participant off hold."""
        return await self._call._operation(
            self._path(participant_id, "/stopHoldMusic"),
            {},
            action="stopHoldMusic",
            kind=models.StopHoldMusicOperation,
            client_context=client_context,
            item=True,
        )

    async def list(self) -> builtins.list[models.Participant]:
        """Fetch the call's participants from Graph (following pages)."""
        first = await self._call._request("GET", self._path())
        pages = self._call._services.graph.pages(
            first, models.Participant, scenario_id=self._call.scenario_id, call_id=self._call.id
        )
        return [p async for p in pages]


class AudioRoutingGroups:
    """A call's audio routing groups on Graph (``call.audio_routing_groups``).

    Groups are ``models.AudioRoutingGroup``: ``id``, ``routing_mode``
    (``oneToOne``/``multicast``), ``sources`` and ``receivers`` (participant ids).
    """

    def __init__(self, call: Call) -> None:
        self._call = call

    def _routing_mode(self, routing_mode: str) -> str:
        return models.graph_value(
            models.RoutingMode, routing_mode, "routing_mode", beta=self._call._beta
        )

    def _path(self, group_id: str | None = None) -> str:
        path = "/audioRoutingGroups"
        if group_id is not None:
            path += "/" + path_segment(group_id)
        return path

    async def create(
        self,
        *,
        sources: Sequence[str],
        receivers: Sequence[str],
        routing_mode: RoutingMode = "oneToOne",
        id: str | None = None,
    ) -> models.AudioRoutingGroup:
        """Create a group routing ``sources``' audio to ``receivers`` (``routing_mode``:
        ``oneToOne`` or ``multicast``)."""
        body: dict[str, Any] = {
            "routingMode": self._routing_mode(routing_mode),
            "sources": string_list(sources, "sources"),
            "receivers": string_list(receivers, "receivers"),
        }
        if id is not None:
            body = {"id": id, **body}
        response = await self._call._request("POST", self._path(), body)
        return response.model(models.AudioRoutingGroup)

    async def get(self, group_id: str) -> models.AudioRoutingGroup:
        """Fetch one group."""
        response = await self._call._request("GET", self._path(group_id), item=True)
        return response.model(models.AudioRoutingGroup)

    async def update(
        self,
        group_id: str,
        *,
        sources: Sequence[str] | None = None,
        receivers: Sequence[str] | None = None,
        routing_mode: RoutingMode | None = None,
    ) -> models.AudioRoutingGroup:
        """Change a group's sources, receivers or routing mode."""
        body: dict[str, Any] = {}
        if routing_mode is not None:
            body["routingMode"] = self._routing_mode(routing_mode)
        if sources is not None:
            body["sources"] = string_list(sources, "sources")
        if receivers is not None:
            body["receivers"] = string_list(receivers, "receivers")
        response = await self._call._request(
            "PATCH",
            self._path(group_id),
            body,
            item=True,
            repeatable="updateAudioRoutingGroup" in SETS_A_STATE,
        )
        return response.model(models.AudioRoutingGroup)

    async def delete(self, group_id: str) -> None:
        """Delete a group."""
        await self._call._request("DELETE", self._path(group_id), item=True)

    async def list(self) -> builtins.list[models.AudioRoutingGroup]:
        """Fetch the call's groups."""
        first = await self._call._request("GET", self._path())
        pages = self._call._services.graph.pages(
            first,
            models.AudioRoutingGroup,
            scenario_id=self._call.scenario_id,
            call_id=self._call.id,
        )
        return [group async for group in pages]
