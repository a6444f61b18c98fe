"""A Microsoft Graph simulator: Graph's calling API plus the notifications Graph would post.

:class:`Simulator` plays Microsoft's side of a call on 127.0.0.1. It serves an
OpenID configuration and signing keys (a :class:`TokenAuthority`), answers the
token endpoint and the ``/communications/calls`` API (a :class:`FakeGraph`),
and drives each call the way Graph does, by POSTing signed notifications to
the ``callbackUri`` the bot gave for the call (placing, answering, rejecting or
redirecting it), else to the bot's callback URL. A bot answering ``302 Found`` (see
``CallBot.choose_deployment``) has the notification posted again to its ``Location``,
and the call's later notifications go there too:

* ``answer``            -> ``establishing``, ``established``, then the roster;
* ``reject``/``redirect`` -> the call deleted (``terminated``; no state after a reject);
* ``transfer``          -> ``transferring``, ``transferAccepted``, ``terminated`` (7015),
  or back to ``established`` with code 500 when :attr:`Simulator.transfer_outcome`
  is ``"failed"`` (a consultative one: ``terminationReason`` ``AppTransferred``, or 7700),
  or that ``established`` alone, no ``transferring`` first, when it is
  ``"failed_in_place"``;
* ``playPrompt``        -> the operation's ``completed`` once the prompts would have played
  (on beta, with ``loop: true``, never: it plays until ``cancelMediaProcessing``);
* ``recordResponse``    -> ``completed`` with a ``recordingLocation`` the simulator
  serves (only with the ``recordingAccessToken``);
* ``cancelMediaProcessing`` -> the running prompt or recording ``failed`` (8508);
* ``subscribeToTone``   -> from then on, tones the caller presses are sent;
* ``sendDtmfTones``, ``invite``, hold music, ... -> their operation's ``completed``;
* ``mute``/``unmute``, ``invite``, removing a participant -> a roster update;
* ``changeScreenSharingRole`` -> a roster update with the bot's screen-sharing stream;
* ``DELETE`` the call   -> ``terminating``, ``terminated`` (5001);
* ``createCall``/joining a meeting -> ``establishing``, ``established``, the roster
  (or, for a callee who does not pick up, ``terminated`` with 408, see
  :meth:`Simulator.queue_outgoing`); a call placed through Graph's beta ``ringing``
  after ``establishing``.

An action the call's state does not take is refused (``409``, the simulator's own status:
Graph documents none): ``answer``, ``reject`` or ``redirect`` of a call no longer
``incoming``, and an action on a call in progress (``playPrompt``, ``mute``, ``transfer``,
...) before it is ``established``.

A scripted caller (:class:`SimulatedCall`) calls in, presses keys, joins and
leaves a meeting's roster, and hangs up. Every notification and every request
is kept in :attr:`Simulator.traffic` and shown to :attr:`Simulator.observers`.

Example::

    async with run_with_simulator(bot) as sim:
        call = await sim.incoming_call(from_user="Adele Vance")
        await call.press("1")
        assert await sim.wait_for_request("transfer")
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import re
import socket
import time
import uuid
import wave
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp import web

from .. import events, models
from .._clock import loop_time
from .._config import Settings
from .._dtmf import TONE_OF_DIGIT, digit_of, tones_of
from .._errors import MalformedNotification
from .._ids import id_key
from .._lifecycle import KEEP_ALIVE_LIMIT, Lifecycle
from .._log import get_logger
from .._parse import parse_payload
from .._sequencing import Sequencer
from ..graph import AccessToken
from ..graph._call import on_beta
from ..graph._values import ToneName
from ..models._common import known_call_state
from ..models._operations import is_settled
from . import builders as build
from ._fake_graph import (
    RECORDING_RETENTION,
    FakeGraph,
    FakeResponse,
    RecordedRequest,
    known_action,
)
from ._tokens import TEST_TENANT_ID, TokenAuthority

if TYPE_CHECKING:
    from .._bot import CallBot

__all__ = [
    "DEFAULT_APP_ID",
    "DeliveryOptions",
    "SimulatedCall",
    "Simulator",
    "SimulatorError",
    "Traffic",
    "run_with_simulator",
]

log = get_logger("callbot.simulator")

DEFAULT_APP_ID = "5a8a7b1e-6c1d-4f0e-9b2a-3d4c5e6f7a8b"
"""The app id the simulator's tokens are minted for when the bot has none."""

KEY_TONES = TONE_OF_DIGIT
"""Keypad keys and the Graph tone names Graph sends for them (callbot's one map)."""

OUTGOING_OUTCOMES: dict[str, tuple[int, int, str] | None] = {
    "answer": None,
    "no_answer": (408, 0, "The callee did not answer."),
    "busy": (486, 0, "The callee is busy."),
    "decline": (603, 0, "The callee declined the call."),
    "unavailable": (480, 0, "The callee is not available."),
}
"""What a callee does with a call the bot places, and the ``resultInfo`` Graph ends it with."""

GRAPH_USER_AGENT = "Microsoft-Skype/3.0,(Calling/1.0)"
"""The ``User-Agent`` of Graph's callbacks (every captured request has it)."""

ONLY_ONE_LEFT = (
    "This conversation has ended as only one participant was remaining in the conversation.. "
    "DiagCode: 0#5010.@"
)
"""How Teams ended a group call once only one participant was left in it (200/5010, sb17)."""

MAX_REDIRECTS = 5
"""How many ``302 Found`` in a row the simulator follows for one notification (a loop ends)."""

_MEDIA_ACTIONS = frozenset({"playPrompt", "recordResponse"})
# Graph's pages: answer, reject ("doesn't end existing calls that have already been
# answered") and redirect ("an incoming call that hasn't been answered or rejected yet").
_ON_AN_INCOMING_CALL = frozenset({"answer", "reject", "redirect"})
# Actions on a call in progress ("transfer an active call", "invite ... to the active call"):
# none before the call is established.
_ON_A_CONNECTED_CALL = frozenset(
    {
        "playPrompt",
        "recordResponse",
        "cancelMediaProcessing",
        "subscribeToTone",
        "sendDtmfTones",
        "mute",
        "unmute",
        "transfer",
        "updateRecordingStatus",
        "changeScreenSharingRole",
        "addLargeGalleryView",
        "invite",
        "muteParticipant",
        "startHoldMusic",
        "stopHoldMusic",
    }
)
_NOT_CONNECTED_YET = frozenset({"incoming", "establishing", "ringing"})
_OK = 200
_CANCELED = {"code": 400, "subcode": 8508, "message": "Action failed, the operation was cancelled."}
_DONE = {"code": 200, "subcode": 0, "message": "Action completed successfully."}
# The simulator's own: Graph documents no failed invitation.
_INVITE_FAILED = {"code": 408, "subcode": 0, "message": "The invitee did not answer."}
_CALLS = "/communications/calls/"
_CALL_TYPE = "#microsoft.graph.call"
_LEGACY_CALLS = "/app/calls/"
_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


class SimulatorError(Exception):
    """Something a simulated call expected did not happen (a timeout, a refused notification)."""


@dataclass(frozen=True, kw_only=True)
class DeliveryOptions:
    """Graph's quirks to post notifications with, to test a bot against them.

    ``out_of_order`` posts ``established`` before ``establishing``; ``duplicate``
    posts every notification twice; ``resource_only`` names each item's
    resource only the older way (``resource``: ``/app/calls/...``, no
    ``resourceUrl``); ``compact_ids`` writes the ids in resource paths upper
    case without dashes (as Graph writes some, unlike its responses);
    ``first_tone_sequence`` is the ``sequenceId`` of a call's first tone: 6, as the
    first key pressed in a recorded Teams call carried (sb04), by default; 1 numbers
    them as Graph's docs show one (document 33); ``delay``
    waits that many seconds before each notification. :meth:`realistic` turns
    every quirk on.
    """

    out_of_order: bool = False
    duplicate: bool = False
    resource_only: bool = False
    compact_ids: bool = False
    first_tone_sequence: int = 6
    delay: float = 0.0

    @classmethod
    def realistic(cls, *, delay: float = 0.0) -> DeliveryOptions:
        """Every quirk at once: swapped, repeated, ``resource`` only, compact ids; tones
        numbered from 6, as recorded."""
        return cls(
            out_of_order=True,
            duplicate=True,
            resource_only=True,
            compact_ids=True,
            first_tone_sequence=6,
            delay=delay,
        )


_NOT_POSTED = "not posted: the call had ended"
"""The reason given for a notification a call's outbox dropped (Graph says nothing more
about an ended call); no bot's answer carries it."""


class _CallOver(SimulatorError):
    """A notification was not posted because its call had ended."""


_REFUSAL_HINTS = {
    0: " (is the bot served there?)",
    401: (
        " (is the bot's CALLBOT_APP_ID the simulator's app id, and its"
        " CALLBOT_OPENID_CONFIG_URL the simulator's?)"
    ),
    302: " (a redirect without a Location, or one redirect too many: a loop?)",
    403: " (does the bot allow the simulator's tenant, CALLBOT_ALLOWED_TENANTS?)",
}


@dataclass(frozen=True, kw_only=True)
class Traffic:
    """One thing that happened between the bot and the simulated Graph.

    ``kind`` is ``"notification"`` (Graph to bot; ``status`` is the bot's
    answer), ``"request"`` (bot to Graph; ``status`` is Graph's answer),
    ``"caller"`` (what the scripted caller did) or ``"handler"`` (a handler of a
    bot served with :func:`run_with_simulator` ran). ``at`` is seconds since the
    simulator started, on the event loop's clock (simulated time in a test on looptime).
    """

    kind: str
    at: float
    summary: str
    call_id: str | None = None
    method: str | None = None
    path: str | None = None
    action: str | None = None
    status: int | None = None
    body: Any = None
    sent_by_post: bool | None = None
    """``True`` for a notification sent with :meth:`Simulator.post`: its status went back to
    whoever posted it (not one of :attr:`Simulator.failed_deliveries`)."""
    reason: str | None = None
    """Why the bot refused a notification, as its answer said (``bad_audience``, ...)."""
    url: str | None = None
    """Where a notification was posted (the call's ``callbackUri``, else the bot's)."""
    redirected_to: str | None = None
    """Where the bot's ``302 Found`` sent a notification on (region affinity): the simulator
    posted it there next, and posts the call's later notifications there (the call runs at
    that deployment from then on)."""

    def refusal(self) -> str:
        """The bot's answer to a notification it refused, with what to check."""
        return _refusal(self.status, self.reason, self.summary, self.url)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``None`` fields left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(kw_only=True)
class _Outgoing:
    """A notification waiting in a call's outbox."""

    items: list[dict[str, Any]]
    delay: float = 0.0
    done: asyncio.Future[tuple[int, str | None]] | None = None
    """Told the bot's answer: its status, and the reason it gave for a refusal."""


def silent_wav(seconds: float = 0.5, rate: int = 8000) -> bytes:
    """A WAV file of silence (what a simulated recording contains)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * int(seconds * rate))
    return buffer.getvalue()


def _identity_name(info: Any) -> str | None:
    """The display name (else the id) of the first identity in a participant info dict."""
    if not isinstance(info, Mapping):
        return None
    identity = info.get("identity", info)
    if not isinstance(identity, Mapping):
        return None
    for key, value in identity.items():
        if key.startswith("@") or not isinstance(value, Mapping):
            continue
        name = value.get("displayName") or value.get("id")
        if isinstance(name, str) and name:
            return name
    return None


def _identity_kind_and_id(info: Any) -> tuple[str, str, str | None]:
    if isinstance(info, Mapping):
        identity = info.get("identity", info)
        if isinstance(identity, Mapping):
            for key, value in identity.items():
                if key.startswith("@") or not isinstance(value, Mapping):
                    continue
                return key, str(value.get("id") or uuid.uuid4()), value.get("displayName")
    return "user", str(uuid.uuid4()), None


def _identity_tenant(info: Any) -> str | None:
    """The tenant a target or an invitee names for its identity (someone of another tenant)."""
    if isinstance(info, Mapping):
        identity = info.get("identity", info)
        if isinstance(identity, Mapping):
            for key, value in identity.items():
                if not key.startswith("@") and isinstance(value, Mapping):
                    tenant = value.get("tenantId")
                    return tenant if isinstance(tenant, str) and tenant else None
    return None


def _token_meeting_info(app_id: str, chain_id: str, tenant_id: str) -> dict[str, Any]:
    """The ``tokenMeetingInfo`` Teams names a group call's meeting by (recorded sb17): a
    signed token, for a day, with the claims the recorded one has (its ``activityId`` the
    call's ``callChainId``); signed by nobody here, and its conversation on no real host."""

    def part(value: bytes) -> str:
        return base64.urlsafe_b64encode(value).rstrip(b"=").decode("ascii")

    issued = int(time.time())  # a token's validity: the wall clock
    claims = {
        "appId": app_id,
        "conversationController": f"https://conv.simulator.invalid/conv/{uuid.uuid4().hex}",
        "activityId": chain_id,
        "http://schemas.microsoft.com/identity/claims/tenantid": tenant_id,
        "nbf": issued,
        "exp": issued + 24 * 3600,
        "iss": "https://api.botframework.com",
        "aud": "https://api.botframework.com",
    }
    header = {"alg": "RS256", "typ": "JWT"}
    token = ".".join(
        part(piece)
        for piece in (json.dumps(header).encode(), json.dumps(claims).encode(), uuid.uuid4().bytes)
    )
    return {"@odata.type": "#microsoft.graph.tokenMeetingInfo", "token": token}


def _refusal(status: int | None, reason: str | None, summary: str, url: str | None) -> str:
    said = f"{status or 'nothing'}" + (f" ({reason})" if reason else "")
    where = f" posted to {url}" if url else ""
    hint = _REFUSAL_HINTS.get(status or 0, "")
    return f"the bot answered {said} to a notification{where}: {summary}{hint}"


def _refusal_reason(status: int, answer: bytes) -> str | None:
    """The ``error`` a bot's refusal names (callbot's answers carry one), if any."""
    if status < 400:
        return None
    try:
        body = json.loads(answer)
    except ValueError:
        return None
    reason = body.get("error") if isinstance(body, dict) else None
    return reason if isinstance(reason, str) else None


def _participant_name(participant: models.Participant) -> str:
    identity = participant.info.identity if participant.info is not None else None
    if identity is not None:
        for kind in ("user", "phone", "application", "guest", "application_instance"):
            value = getattr(identity, kind, None)
            if value is not None:
                return str(value.display_name or value.id or kind)
    return participant.id or "someone"


def describe_notification(body: Any) -> str:
    """A one-line, human description of a notification body (for logs and the demo)."""
    try:
        found = parse_payload(body)
    except MalformedNotification as exc:
        return f"malformed notification ({exc.reason})"
    return "; ".join(_describe_event(event) for event in found)


def _describe_event(event: events.Event) -> str:
    if isinstance(event, events.IncomingCall):
        source = event.call.source
        who = _identity_name(source.model_dump(by_alias=True)) if source is not None else None
        return f"incoming call from {who or 'someone'}"
    if isinstance(event, events.CallTerminated):
        info = event.result_info
        if info is None:
            return "call terminated"
        reason = f" {info.message}" if info.message else ""
        return f"call terminated (code {info.code}/{info.subcode}{reason})"
    if isinstance(event, events.CallStateChanged):
        info = event.result_info
        if info is not None and info.code not in (None, 0, 200):
            return f"call {event.state} (code {info.code}/{info.subcode} {info.message or ''})"
        media = event.call.media_state
        if media is not None and media.audio is not None:
            return f"call {event.state} (audio {media.audio})"
        return f"call {event.state}"
    if isinstance(event, events.ToneReceived):
        return f"DTMF {event.tone}"
    if isinstance(event, events.ParticipantsUpdated):
        names = ", ".join(_participant_name(p) for p in event.participants) or "nobody"
        return f"roster: {names}"
    if isinstance(event, events.OperationUpdated):
        raw_type = event.operation.odata_type or "#microsoft.graph.operation"
        kind = raw_type.rsplit(".", 1)[-1].removesuffix("Operation")
        extra = ""
        location = getattr(event.operation, "recording_location", None)
        if location:
            extra = f", recording at {location}"
        return f"{kind} operation {event.status}{extra}"
    if isinstance(event, events.ContentSharingUpdated):
        return f"content sharing {event.change_type}"
    return f"notification {event.change_type} {event.resource_url}"


def _describe_request(request: RecordedRequest) -> str:
    body = request.json if isinstance(request.json, Mapping) else {}
    action = request.action
    if action == "token":
        return "app token request (client credentials)"
    if action == "playPrompt":
        uris = [
            str(p.get("mediaInfo", {}).get("uri", "?")).rsplit("/", 1)[-1]
            for p in body.get("prompts", [])
            if isinstance(p, Mapping)
        ]
        return "playPrompt " + ", ".join(uris)
    if action == "transfer":
        return f"transfer to {_identity_name(body.get('transferTarget')) or 'someone'}"
    if action == "redirect":
        names = [_identity_name(t) or "someone" for t in body.get("targets", [])]
        return "redirect to " + ", ".join(names)
    if action == "createCall":
        if body.get("meetingInfo") is not None:
            return "join meeting"
        names = [_identity_name(t) or "someone" for t in body.get("targets", [])]
        return "place call to " + ", ".join(names)
    if action == "deleteCall":
        return "hang up"
    if action == "recording":
        return "download recording"
    if action == "sendDtmfTones":
        return "sendDtmfTones " + " ".join(str(t) for t in body.get("tones", []))
    if action == "reject":
        return f"reject ({body.get('reason', 'none')})"
    return action


class SimulatedCall:
    """One call as the simulator plays it: Graph's notifications and the far end's actions.

    Notifications of one call are posted one after another, in order, each
    after the bot acknowledged the one before (as Graph does).
    """

    def __init__(
        self,
        simulator: Simulator,
        call_id: str,
        *,
        direction: str,
        remote: models.Participant | None,
        delivery: DeliveryOptions,
        meeting: bool = False,
    ) -> None:
        self.id = call_id
        """The call id (as Graph writes it)."""
        self.direction = direction
        """``incoming`` (someone called the bot) or ``outgoing`` (the bot placed it)."""
        self.meeting = meeting
        """Whether the bot joined a meeting with this call."""
        self.group = False
        """Whether the bot placed this call to several targets at once (a group call)."""
        self.remote = remote
        """The caller (incoming calls) or the first callee (outgoing calls)."""
        self.delivery = delivery
        """How this call's notifications arrive."""
        self.states: list[str] = []
        """The states the bot's handlers were told the call moved to, in the order they were
        told: what the bot's sequencer delivered (a repeat of the state the call is in is an
        update, a late earlier state is stale, neither is a move). A bot in another process
        cannot be watched: what it acknowledged goes through callbot's own sequencer (with
        the default settings) instead."""
        self.subscribed_to_tones = False
        """Whether the bot called ``subscribeToTone`` (Graph sends no tones before)."""
        self.ended = False
        """Whether the bot's handlers have been told the call terminated."""
        self.roster: dict[str, models.Participant] = {}
        """The participants, by participant id, as last posted (or about to be)."""
        known = simulator.graph.calls.get(id_key(call_id))
        mine = known.resource.get("myParticipantId") if known is not None else None
        self.bot_participant_id = mine if isinstance(mine, str) and mine else str(uuid.uuid4())
        """The bot's own participant id in the roster: the call's ``myParticipantId`` on
        Graph, as Graph documents it (a joined meeting's response and roster, documents 08)."""
        chain = known.resource.get("callChainId") if known is not None else None
        self.chain_id = chain if isinstance(chain, str) and chain else str(uuid.uuid4())
        """The call's ``callChainId``, on every call notification but a tone (as Teams sends
        it), and on Graph's copy of the call (the answer to ``create_call``, ``GET``)."""
        if known is not None:
            known.resource["myParticipantId"] = self.bot_participant_id
            known.resource["callChainId"] = self.chain_id
        self.delta_roster = False
        """Whether rosters are sent as deltas (the bot asked for ``isDeltaRosterEnabled``)."""
        self._sim = simulator
        self._placed_by: RecordedRequest | None = None  # the bot's createCall, no call id in it
        self._tone_sequence = delivery.first_tone_sequence - 1
        self._roster_sequence = 0
        self._next_source_id = 1  # each media stream in the call has a sourceId of its own
        # The meeting Teams makes of a group call (named at its end) or of a P2P call someone
        # is invited to (named as it is escalated): made once.
        self._group_meeting: dict[str, Any] | None = None
        self._media: dict[str, str] = {}  # prompts and recordings playing or queued: id -> kind
        self._media_waiting: deque[tuple[str, float | None, Callable[[], None]]] = deque()
        self._media_playing: str | None = None
        # Running recordings that a key ends (recordResponse's stopTones): id -> the keys.
        self._stop_keys: dict[str, frozenset[str]] = {}
        self._queue: asyncio.Queue[_Outgoing] = asyncio.Queue()
        self._unposted = 0  # notifications queued or being posted
        self._timers: set[asyncio.Task[None]] = set()
        self._keep_alive_deadline: asyncio.Task[None] | None = None
        self._worker = asyncio.get_running_loop().create_task(
            self._run(), name=f"callbot-sim-call-{id_key(call_id)[:8]}"
        )

    def __repr__(self) -> str:
        return f"<SimulatedCall {self.id} {self.direction} state={self.state!r}>"

    # -- what the test looks at ------------------------------------------------------

    @property
    def key(self) -> str:
        """The call id in its compared form (lower case, no dashes)."""
        return id_key(self.id)

    @property
    def state(self) -> str | None:
        """The last call state the bot's handlers were told (``None`` before any)."""
        return self.states[-1] if self.states else None

    @property
    def callback_url(self) -> str | None:
        """Where Graph posts this call's notifications (see :meth:`Simulator.callback_url_for`)."""
        return self._sim.callback_url_for(self.id)

    @property
    def remote_name(self) -> str:
        """The caller's or callee's display name."""
        return _participant_name(self.remote) if self.remote is not None else "caller"

    @property
    def requests(self) -> list[RecordedRequest]:
        """The bot's Graph requests about this call, in order: the ``createCall`` that placed
        it (or joined a meeting) first, for a call the bot placed."""
        return [r for r in self._sim.graph.requests if self._about(r)]

    def _about(self, request: RecordedRequest) -> bool:
        if request is self._placed_by:
            return True
        return request.call_id is not None and id_key(request.call_id) == self.key

    def requests_for(self, action: str) -> list[RecordedRequest]:
        """The bot's requests about this call for one action (``playPrompt``, ...)."""
        action = known_action(action)
        return [r for r in self.requests if r.action == action]

    async def wait_for_request(self, action: str, timeout: float = 5.0) -> RecordedRequest:
        """The bot's next request about this call for ``action`` (see ``Simulator``'s)."""
        return await self._sim.wait_for_request(action, call=self, timeout=timeout)

    async def wait_for_state(self, state: str, timeout: float = 5.0) -> None:
        """Wait until the bot has acknowledged the call reaching ``state`` (in any case, as
        ``on_state`` takes it)."""
        state = known_call_state(state)
        await self._sim._until(
            lambda: state in self.states,
            timeout,
            lambda: f"call {self.id} did not reach {state!r} (states so far: {self.states})",
        )

    async def wait_for_answer(self, timeout: float = 15.0) -> str:
        """Wait until the bot answered, rejected or redirected the call; returns which.

        Graph gives a bot 15 seconds to do so.
        """
        responses = ("answer", "reject", "redirect")

        def response() -> str | None:
            return next((r.action for r in self.requests if r.action in responses), None)

        await self._sim._until(
            lambda: response() is not None,
            timeout,
            lambda: (
                f"the bot did not answer, reject or redirect call {self.id} within {timeout} s "
                "(are its Graph requests reaching the simulator? CALLBOT_GRAPH_URL)"
            ),
        )
        return response() or ""

    async def listen(self, timeout: float = 10.0) -> None:
        """The far end listens until the prompts and recordings playing now have finished."""
        await self._sim._until(
            lambda: self.ended or not self._media,
            timeout,
            lambda: f"call {self.id} still plays media after {timeout} s",
        )

    async def settled(self, timeout: float = 5.0) -> None:
        """Wait until the bot has run its handlers for everything posted about this call so
        far: nothing left to post, held in the reorder window, queued or running. A handler
        awaiting an operation runs until its outcome came; an outcome still to come of one
        nobody awaits (a prompt playing) is not waited for (:meth:`listen` is). Needs the
        bot in this process (:func:`run_with_simulator`, the ``sim`` fixture)."""
        self._sim._in_process_bot()
        await self._sim._until(
            lambda: self._settled,
            timeout,
            lambda: f"the bot still works on call {self.id} after {timeout} s",
        )

    @property
    def _settled(self) -> bool:
        """Nothing left to post about the call, and nothing of it left in the bot."""
        return not self._unposted and self._sim._bot_settled(self.key)

    def _why_not(self) -> str:
        """A hint for a wait that timed out on a call the bot never took."""
        if self.direction == "incoming" and not any(
            self.requests_for(action) for action in ("answer", "reject", "redirect")
        ):
            return (
                "; the bot never answered, rejected or redirected it (is a handler registered "
                "with @bot.on_incoming_call, and do its Graph requests reach the simulator?)"
            )
        return ""

    async def wait_until_ended(self, timeout: float = 5.0) -> None:
        """Wait until the bot has been told the call terminated."""
        await self._sim._until(
            lambda: self.ended,
            timeout,
            lambda: f"call {self.id} did not end (states so far: {self.states})" + self._why_not(),
        )

    # -- what the far end does -------------------------------------------------------

    async def press(self, keys: str | Sequence[ToneName], *, timeout: float = 5.0) -> None:
        """Press keypad keys (``"1"``, ``"123#"``) or send Graph tone names (``["tone1"]``); a
        key or tone name Graph has not raises ``ValueError``.

        Waits (up to ``timeout``) until the call is established and the bot has
        subscribed to tones, because Graph sends no tone before that; then posts
        one tone notification per key, each acknowledged before the next. A key that
        is a stop tone of a running recording ends it (``stopToneDetected``), with no
        subscription needed. Keys left when the call ends meanwhile (the bot hung up
        after the keys it wanted) go nowhere; pressing on a call that has ended raises.
        """
        tones = tones_of(keys, beta=True)  # the far end presses what either version names
        await self._sim._until(
            lambda: (
                self.ended
                or self._media_playing in self._stop_keys
                or (self.subscribed_to_tones and "established" in self.states)
            ),
            timeout,
            lambda: (
                f"cannot press {keys!r} on call {self.id}: "
                + (
                    "the bot never subscribed to tones (call.subscribe_to_tone()); "
                    "Graph sends no DTMF before that"
                    if "established" in self.states
                    else f"the call is not established (states so far: {self.states})"
                )
            ),
        )
        if self.ended:
            raise SimulatorError(f"cannot press {keys!r}: call {self.id} has ended")
        label = keys if isinstance(keys, str) else " ".join(keys)
        self._sim._record(
            Traffic(
                kind="caller",
                at=self._sim._now(),
                call_id=self.id,
                summary=f"{self.remote_name} presses {label}",
            )
        )
        for tone in tones:
            self._stopped_recording(digit_of(tone))
            if not self.subscribed_to_tones:
                continue  # Graph tells a bot of tones only once it subscribed
            self._tone_sequence += 1
            try:
                await self._send(build.tone(self.id, tone, self._tone_sequence))
            except _CallOver:
                return  # the call ended between two keys (the bot hung up): the rest go nowhere

    def _stopped_recording(self, key: str) -> None:
        """End the recordings ``key`` is a stop tone of, as Graph does (document 69: the
        recording completes with ``stopToneDetected``)."""
        # Only the one playing: a recording queued behind a prompt has not started yet.
        stopped = [
            op for op, keys in self._stop_keys.items() if key in keys and op == self._media_playing
        ]
        for operation_id in stopped:
            del self._stop_keys[operation_id]
            if self._media.pop(operation_id, None) is None:
                continue
            self._media_ended(operation_id)
            location, token = self._sim.graph.add_recording(self._sim.recording, call_id=self.id)
            self._enqueue(
                self._operation_item(
                    operation_id,
                    "completed",
                    None,
                    {
                        "recordingLocation": location,
                        "recordingAccessToken": token,
                        "completionReason": "stopToneDetected",
                    },
                )
            )

    async def hangup(
        self,
        *,
        code: int = 200,
        subcode: int = 5002,
        message: str = "The conversation has ended. DiagCode: 0#5002.@",
    ) -> None:
        """The far end hangs up: the bot is told the call terminated, with the resultInfo a
        live Teams call was recorded with (200/5002; the bot hanging up gets 200/5001).

        Nothing happens when the call is already over (or ending: the bot hung up, or a
        transfer's end is queued before this one).
        """
        if self.ended:
            return
        if self._ended_on_graph:
            # Graph is already ending the call: its last notification is on its way.
            await self.wait_until_ended(5.0 + 4 * self.delivery.delay)
            return
        self._sim._record(
            Traffic(
                kind="caller",
                at=self._sim._now(),
                call_id=self.id,
                summary=f"{self.remote_name} hangs up",
            )
        )
        self._end_on_graph()
        try:
            await self._send(
                build.call_terminated(self.id, code=code, subcode=subcode, message=message),
            )
        except _CallOver:
            return  # a completed transfer ended the call first: its end was queued ahead

    async def join(
        self, display_name: str, *, user_id: str | None = None, kind: str = "user"
    ) -> str:
        """Someone joins the call (a meeting): the bot gets the new roster. Returns their id.

        ``kind`` is their identity's in Graph's ``identitySet``: ``user``, ``phone``,
        ``guest``, ``application`` or ``applicationInstance`` (another bot), ...
        """
        kind = build._identity_kind(kind)  # before anything happens: a typo names no one
        participant_id = str(uuid.uuid4())
        self.roster[participant_id] = self._participant(
            participant_id,
            user_id=user_id or str(uuid.uuid5(uuid.NAMESPACE_URL, display_name)),
            display_name=display_name,
            kind=kind,
        )
        self._sim._record(
            Traffic(
                kind="caller",
                at=self._sim._now(),
                call_id=self.id,
                summary=f"{display_name} joins",
            )
        )
        await self._send(self._roster_item([self.roster[participant_id]], "created"))
        return participant_id

    async def leave(self, who: str) -> None:
        """Someone (a participant id or display name) leaves: the bot gets the new roster.
        The last one but the bot to leave a group call the bot placed ends it, as Teams does
        (200/5010)."""
        participant_id = self._find(who)
        gone = self.roster.pop(participant_id)
        name = _participant_name(gone)
        self._sim._record(
            Traffic(kind="caller", at=self._sim._now(), call_id=self.id, summary=f"{name} leaves")
        )
        await self._send(self._roster_item([gone], "deleted"))
        ending = self._ended_if_alone()
        if ending is not None:
            await ending

    async def establish(self) -> None:
        """Post ``establishing``, ``established`` and the roster as if the bot had answered.

        For scenarios against a bot whose Graph requests do not reach the simulator.
        """
        self._established()
        await self._sim._until(
            lambda: self.ended or "established" in self.states,
            5.0 + 4 * self.delivery.delay,
            lambda: f"call {self.id} was not established",
        )

    async def notify(self, *items: Mapping[str, Any]) -> int:
        """Post notification items (see :mod:`callbot.testing.builders`) about this call.

        A roster among them is this call's roster from then on, as one the simulator makes
        itself: Graph finds its participants (to mute or remove them), and the simulator's
        next roster (someone joins, ...) starts from it.
        """
        for roster in _rosters_in(build.notifications(*items)):
            if roster.call_key == self.key:
                self._take_roster(roster)
        return await self._send(*items)

    def _take_roster(self, event: events.ParticipantsUpdated) -> None:
        """Make a roster a test posts about this call the call's own."""
        if event.sequence_number is not None:
            # The simulator's next delta goes after it: one numbered below would be stale.
            self._roster_sequence = max(self._roster_sequence, event.sequence_number)
        if not (event.delta or self.delta_roster):
            self.roster = {}
        for participant in event.participants:
            for stream in participant.media_streams or []:
                if stream.source_id is not None and stream.source_id.isdigit():
                    # The streams the simulator adds later are numbered after the test's.
                    self._next_source_id = max(self._next_source_id, int(stream.source_id) + 1)
            if not participant.id:
                continue  # Graph finds nobody by an id it has not given yet
            key = self._roster_id(participant.id) or participant.id
            if event.change_type == "deleted" or participant.removed_state is not None:
                self.roster.pop(key, None)
            else:
                self.roster[key] = participant
        self._publish_roster()

    # -- driven by the bot's requests ------------------------------------------------

    def _roster_item(
        self,
        changed: Sequence[models.Participant] = (),
        change_type: str = "updated",
        *,
        whole: Sequence[models.Participant] | None = None,
    ) -> dict[str, Any]:
        """The roster as Graph posts it: whole (``whole``, by default everyone in the call),
        or (delta rosters) only who ``changed``."""
        # Only delta rosters are numbered (recorded whole rosters carry no sequenceNumber).
        self._roster_sequence += 1
        self._publish_roster()
        if self.delta_roster:
            return build.delta_roster(
                self.id, changed, sequence_number=self._roster_sequence, change_type=change_type
            )
        return build.roster(self.id, list(self.roster.values()) if whole is None else whole)

    def _publish_roster(self) -> None:
        known = self._sim.graph.calls.get(self.key)
        if known is not None:
            # Graph's participants are the roster it posts: requests about them find them.
            known.participants = {
                pid: p.model_dump(mode="json", by_alias=True, exclude_none=True)
                for pid, p in self.roster.items()
            }

    def _find(self, who: str) -> str:
        participant_id = self._roster_id(who)
        if participant_id is not None:
            return participant_id
        for participant_id, participant in self.roster.items():
            if _participant_name(participant) == who:
                return participant_id
        raise SimulatorError(f"nobody called {who!r} is in call {self.id}")

    def _roster_id(self, given: str | None) -> str | None:
        """The roster's key for a participant id written in any form (case, dashes)."""
        key = id_key(given or "")
        return next((pid for pid in self.roster if id_key(pid) == key), None)

    def _participant(
        self,
        participant_id: str,
        *,
        user_id: str,
        display_name: str | None,
        kind: str,
        tenant_id: str | None = None,
        client_version: str | None = None,
        in_lobby: bool = False,
        bot: bool = False,
    ) -> models.Participant:
        """Someone in this call as a live roster has them: in ``tenant_id`` (by default the
        simulator's), their streams numbered after every stream the call has so far. ``bot``:
        the bot, with a bot's one audio stream and no client language whatever its identity
        kind (a bot joined as a guest has only audio, document 65)."""
        made = build._participant(
            participant_id,
            user_id=user_id,
            display_name=display_name,
            kind=kind,
            muted=False,
            in_lobby=in_lobby,
            removed_reason=None,
            tenant_id=tenant_id or self._sim.tenant_id,
            first_source_id=self._next_source_id,
            client_version=client_version,
        )
        if bot and made.info is not None:
            audio = [s for s in made.media_streams or [] if s.media_type == "audio"]
            info = made.info.model_copy(update={"language_id": None})
            made = made.model_copy(update={"media_streams": audio, "info": info})
        self._next_source_id += len(made.media_streams or [])
        return made

    def _named_by(self, info: Any) -> tuple[str, models.Participant]:
        """Someone a target or an invitation names, with a new participant id, as the
        roster lists them (in the tenant the invitation names, if any)."""
        kind, identity_id, name = _identity_kind_and_id(info)
        participant_id = str(uuid.uuid4())
        return participant_id, self._participant(
            participant_id,
            user_id=identity_id,
            display_name=name,
            kind=kind,
            tenant_id=_identity_tenant(info),
        )

    def _take_caller(self) -> None:
        """The caller of an incoming call is whoever Graph's copy of the call names as its
        ``source``: one ``incoming_call`` offered, or one a test posted itself."""
        known = self._sim.graph.calls.get(self.key)
        if known is None or known.resource.get("direction") != "incoming":
            return  # a placed call's source is the bot itself
        source = known.resource.get("source")
        if isinstance(source, Mapping):
            _, self.remote = self._named_by(source)

    def _source_id(self) -> str:
        """A new stream's ``sourceId``, unused in this call."""
        self._next_source_id += 1
        return str(self._next_source_id - 1)

    def _add_bot(self) -> None:
        if self.bot_participant_id in self.roster:
            return
        kind, identity_id, name, tenant_id = self._bot_identity()
        self.roster[self.bot_participant_id] = self._participant(
            self.bot_participant_id,
            user_id=identity_id,
            display_name=name,
            kind=kind,
            tenant_id=tenant_id,
            # The bot's app, whatever identity it has in the call (sb12, sb15: the app id).
            client_version=f"{self._sim.bot_name} (appid:{self._sim.app_id})",
            # A bot joining a meeting as a guest waits in its lobby (document 65).
            in_lobby=self.meeting and kind == "guest",
            bot=True,
        )

    def _bot_identity(self) -> tuple[str, str, str, str | None]:
        """Who the bot is in this call's roster: its identity kind, id, name and tenant.

        The bot is the identity the call names it by: a call it placed, by its create call's
        ``source``; a call it was called on, by the call's ``targets``. An application
        instance there makes the bot that instance, by the id and name given (sb15, sb16: a
        call placed from one has the instance's object id, not the app id; document 22: an
        incoming call to one names it as the target whose id is the bot's
        ``myParticipantId``). A guest ``source`` (joining a meeting as a guest) makes it
        that guest (document 65). Any other call has it as the ``application``, named by its
        Teams id ``28:<app id>`` (sb12).
        """
        known = self._sim.graph.calls.get(self.key)
        resource = known.resource if known is not None else {}
        kinds: tuple[str, ...]
        if self.direction == "outgoing":
            named, kinds = [resource.get("source")], ("applicationInstance", "guest")
        else:
            targets = resource.get("targets")
            named, kinds = (targets if isinstance(targets, list) else []), ("applicationInstance",)
        for info in named:
            identity = info.get("identity") if isinstance(info, Mapping) else None
            if not isinstance(identity, Mapping):
                continue
            for kind in kinds:
                given = identity.get(kind)
                if isinstance(given, Mapping) and given.get("id"):
                    name, tenant = given.get("displayName"), given.get("tenantId")
                    return (
                        kind,
                        str(given["id"]),
                        name if isinstance(name, str) and name else self._sim.bot_name,
                        tenant if isinstance(tenant, str) and tenant else None,
                    )
        return "application", self._sim.app_id, f"28:{self._sim.app_id}", None

    def _established(self, *, ringing: bool = False) -> None:
        """Queue what Graph posts once a call connects, as recorded from Teams (incoming and
        outgoing calls alike: no ``ringing``): ``establishing``, ``established``, then
        ``established`` again once media flows, then the roster. ``ringing``: a call placed
        through Graph's beta rings first, as its Create call page documents it.
        """
        self._add_bot()
        if self.remote is not None and self.remote.id is not None:
            self.roster.setdefault(self.remote.id, self.remote)
        steps = (
            ["establishing", "ringing", "established"]
            if ringing
            else ["establishing", "established"]
        )
        # A placed call's (or joined meeting's) established says so, as recorded (sb02, sb14).
        placed = "outgoing" if self.direction == "outgoing" else None
        meeting = self._meeting_fields()
        entries = [
            _Outgoing(
                items=[
                    build.call_state(
                        self.id,
                        s,
                        direction=placed if s == "established" else None,
                        **(meeting if s != "ringing" else {}),
                    )
                ]
            )
            for s in steps
        ]
        if self.delivery.out_of_order:
            entries[0], entries[-1] = entries[-1], entries[0]
        media = models.CallMediaState(odata_type="#microsoft.graph.callMediaState", audio="active")
        # Teams repeats established once media flows: an update, not another state.
        entries.append(
            _Outgoing(items=[build.call_state(self.id, "established", media_state=media)])
        )
        everyone = list(self.roster.values())
        if self.group:
            # Teams lists the bot alone first, then the callees who answered (sb15, sb16).
            me = [self.roster[self.bot_participant_id]]
            callees = [p for p in everyone if p.id != self.bot_participant_id]
            entries.append(_Outgoing(items=[self._roster_item(me, "created", whole=me)]))
            entries.append(_Outgoing(items=[self._roster_item(callees, "created")]))
        else:
            entries.append(_Outgoing(items=[self._roster_item(everyone, "created")]))
        for entry in entries:
            self._queue_entry(entry)
        self._expect_keep_alive()

    def _meeting_fields(self) -> dict[str, Any]:
        """The meeting a joined call is in, as Graph repeats it in the call's ``establishing``
        and ``established`` (captured from live bots; documents 06, 07): the ``chatInfo`` and
        ``meetingInfo`` the bot joined with."""
        known = self._sim.graph.calls.get(self.key)
        if not self.meeting or known is None:
            return {}
        fields = {"chat_info": "chatInfo", "meeting_info": "meetingInfo"}
        return {
            name: known.resource[wire]
            for name, wire in fields.items()
            if isinstance(known.resource.get(wire), Mapping)
        }

    def _queue_entry(self, entry: _Outgoing) -> None:
        entry.delay += self._sim.step_delay + self.delivery.delay
        self._unposted += 1
        self._queue.put_nowait(entry)

    def _enqueue(
        self, *items: Mapping[str, Any], delay: float = 0.0
    ) -> asyncio.Future[tuple[int, str | None]]:
        done: asyncio.Future[tuple[int, str | None]] = asyncio.get_running_loop().create_future()
        self._queue_entry(_Outgoing(items=[dict(i) for i in items], delay=delay, done=done))
        return done

    async def _send(self, *items: Mapping[str, Any]) -> int:
        status, reason = await self._enqueue(*items)
        if not 200 <= status < 300:
            summary = f"{describe_notification(build.notifications(*items))} (call {self.id})"
            if status == 0 and reason == _NOT_POSTED:
                raise _CallOver(f"call {self.id} has ended: Graph posts nothing more ({summary})")
            raise SimulatorError(_refusal(status, reason, summary, self.callback_url))
        return status

    def _play_media(
        self, operation_id: str, kind: str, duration: float | None, done: Callable[[], None]
    ) -> None:
        """Graph plays a call's prompts and recordings one after another, in the order they
        were asked for ("queued to process in order"); ``done`` ends one that played. One
        whose ``duration`` is ``None`` (a looping prompt) plays until it is cancelled."""
        self._media[operation_id] = kind
        self._media_waiting.append((operation_id, duration, done))
        if self._media_playing is None:
            self._play_next_media()

    def _play_next_media(self) -> None:
        """Start the next queued prompt or recording still wanted (none was canceled)."""
        self._media_playing = None
        while self._media_waiting:
            operation_id, duration, done = self._media_waiting.popleft()
            if operation_id not in self._media:
                continue

            def played(operation_id: str = operation_id, done: Callable[[], None] = done) -> None:
                done()
                if self._media_playing == operation_id:
                    self._play_next_media()

            self._media_playing = operation_id
            if duration is not None:
                self._later(duration, played)
            return

    def _media_ended(self, operation_id: str) -> None:
        """A prompt or recording ended before its time (a stop tone): the next one starts."""
        if self._media_playing == operation_id:
            self._play_next_media()

    def _later(self, delay: float, action: Callable[[], object]) -> asyncio.Task[None]:
        async def run() -> None:
            await asyncio.sleep(delay)
            if not self.ended:
                action()

        task = asyncio.get_running_loop().create_task(run())
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)
        return task

    def _missed(self) -> None:
        """Graph ends an incoming call the bot did not take in time (408/1106)."""
        if any(self.requests_for(action) for action in ("answer", "reject", "redirect")):
            return
        self._end_on_graph()
        self._enqueue(
            build.call_terminated(
                self.id, code=408, subcode=1106, message="The call was not answered in time."
            )
        )

    def _expect_keep_alive(self) -> None:
        """Graph ends a call that goes ``keep_alive_deadline`` without a ``keepAlive``: counted
        from when it connected, and again from each ``keepAlive``."""
        deadline = self._sim.keep_alive_deadline
        if deadline is None or self._ended_on_graph:
            return
        if self._keep_alive_deadline is not None:
            self._keep_alive_deadline.cancel()
        self._keep_alive_deadline = self._later(deadline, self._not_kept_alive)

    def _not_kept_alive(self) -> None:
        """Graph ends a call it had no keep-alive for in time (408/8537)."""
        if self._ended_on_graph:
            return
        bot = self._sim._bot
        log.warning(
            "simulator_call_not_kept_alive",
            call_id=self.id,
            waited=self._sim.keep_alive_deadline,
            **(
                {
                    "hint": "the bot's keep-alives are off (its keep_alive setting, or "
                    "run_with_simulator(bot, keep_alive=False)): Graph ends its calls so too"
                }
                if bot is not None and not bot.settings.keep_alive
                else {}
            ),
        )
        self._end_on_graph()
        self._enqueue(
            build.call_terminated(
                self.id, code=408, subcode=8537, message="The call was not kept alive."
            )
        )

    @property
    def _ended_on_graph(self) -> bool:
        known = self._sim.graph.calls.get(self.key)
        return known is not None and known.ended

    def _end_on_graph(self) -> None:
        known = self._sim.graph.calls.get(self.key)
        if known is not None:
            known.end()
        for task in list(self._timers):
            task.cancel()

    async def _run(self) -> None:
        while True:
            entry = await self._queue.get()
            try:
                if entry.delay > 0:
                    await asyncio.sleep(entry.delay)
                status = 0
                reason: str | None = _NOT_POSTED
                if not self.ended:  # Graph says nothing more about a call once it has ended
                    body = build.notifications(*(self._as_graph_writes(i) for i in entry.items))
                    status, reason = await self._sim._deliver(body, call_id=self.id)
                    if self.delivery.duplicate:
                        await self._sim._deliver(body, call_id=self.id)
                if entry.done is not None and not entry.done.done():
                    entry.done.set_result((status, reason))
            except asyncio.CancelledError:
                if entry.done is not None and not entry.done.done():
                    entry.done.cancel()
                raise
            except Exception as exc:
                log.exception("simulator_delivery_failed", call_id=self.id)
                if entry.done is not None and not entry.done.done():
                    entry.done.set_exception(exc)
            finally:
                self._unposted -= 1
                self._sim._changed()

    def _as_graph_writes(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """An item as live Teams traffic has it (recorded 2023), with this call's quirks:
        ``resource`` beside ``resourceUrl``, the meeting's capabilities where Teams adds them
        (:meth:`_whole_call_fields`), and the call's ``callChainId`` on the call (but on a
        tone: a recorded tone has none, sb04)."""
        shaped = dict(item)
        data = shaped.get("resourceData")
        if isinstance(data, Mapping) and data.get("@odata.type") == _CALL_TYPE:
            call = {**data, **self._whole_call_fields(data)}
            if "callChainId" not in call and "toneInfo" not in call:
                call["callChainId"] = self.chain_id
            shaped["resourceData"] = call
        url = shaped.get("resourceUrl")
        if not isinstance(url, str) or not url.startswith(_CALLS) or "resource" in shaped:
            return shaped  # an item a test wrote its own way is posted as written
        del shaped["resourceUrl"]
        if self.delivery.compact_ids:
            url = _GUID.sub(lambda found: id_key(found.group()).upper(), url)
        shaped["resource"] = _LEGACY_CALLS + url[len(_CALLS) :]
        if not self.delivery.resource_only:
            shaped["resourceUrl"] = url
        return shaped

    def _whole_call_fields(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """What Teams adds to a call's update once media flows and to its end, P2P and group
        calls alike (recorded sb03, sb06, sb09, sb17, sb19): an empty ``meetingCapability``
        and no ``coOrganizers``. To a group call's end, the ``tokenMeetingInfo`` of the
        meeting Teams made of it (sb17; a P2P call's end has none, sb06, sb19), and so to
        the end of a P2P call escalated into one (no such end was recorded: the meeting of
        its escalation, sb11); to a joined meeting's, the meeting it joined (as its
        ``establishing`` has it; no joined meeting's end was recorded)."""
        ended = data.get("state") == "terminated"
        if not (ended or "mediaState" in data):
            return {}
        fields: dict[str, Any] = {}
        meeting = self._meeting_fields().get("meeting_info") if ended else None
        if ended and self.group and self._group_meeting is None:
            self._group_meeting = _token_meeting_info(
                self._sim.app_id, self.chain_id, self._sim.tenant_id
            )
        if ended and self._group_meeting is not None:
            meeting = self._group_meeting
        if meeting is not None:
            fields["meetingInfo"] = meeting
        fields["meetingCapability"] = {"@odata.type": "#microsoft.graph.meetingCapability"}
        fields["coOrganizers"] = []
        return {key: value for key, value in fields.items() if key not in data}

    def _told(self, event: events.IncomingCall | events.CallStateChanged) -> None:
        """The bot's handlers were told the call moved to a state (its sequencer decided the
        move): the call is in it, on Graph's side too, and a termination ends it."""
        self.states.append(event.state)
        known = self._sim.graph.calls.get(self.key)
        if known is not None and not known.ended:
            known.resource["state"] = event.state
        if isinstance(event, events.CallTerminated):
            self.ended = True
            self._end_on_graph()
        self._sim._changed()

    async def _close(self) -> None:
        for task in [self._worker, *self._timers]:
            task.cancel()
        await asyncio.gather(self._worker, *self._timers, return_exceptions=True)
        while not self._queue.empty():
            entry = self._queue.get_nowait()
            if entry.done is not None and not entry.done.done():
                entry.done.cancel()

    # -- reactions to the bot's requests ---------------------------------------------

    def _on_request(self, request: RecordedRequest, answer: FakeResponse) -> None:
        sim = self._sim
        action = request.action
        body = request.json if isinstance(request.json, Mapping) else {}
        step = sim.step_delay
        if action == "answer":
            self.delta_roster = _asks_for_delta_roster(body)
            self._established()
        elif action == "keepAlive":
            self._expect_keep_alive()
        elif action in ("reject", "redirect"):
            self._end_on_graph()
            # Graph says no more than that the call is gone (documents 17 and 21): no resultInfo.
            ended = build.call_terminated(self.id, code=None)
            if action == "reject":
                # Nor, for a rejected call, any state (document 17, and its 2018 revision).
                path = ended["resourceUrl"]
                ended["resourceData"] = {"@odata.type": _CALL_TYPE, "@odata.id": path}
            else:
                # A redirected one ends naming the call it was (documents 19, 21, 23).
                ended["resourceData"].update(self._redirected(body))
            self._enqueue(ended)
        elif action == "deleteCall":
            self._end_on_graph()
            self._enqueue(build.call_state(self.id, "terminating"))
            ended = build.call_terminated(
                self.id, code=200, subcode=5001, message="The conversation has ended."
            )
            # Graph writes these codes as strings (documents 41, 57).
            ended["resourceData"]["resultInfo"].update(code="200", subcode="5001")
            self._enqueue(ended)
        elif action == "transfer":
            target = body.get("transferTarget")
            # Graph documents a consultative transfer ending otherwise (AppTransferred, 7700).
            consultative = isinstance(target, Mapping) and bool(target.get("replacesCallId"))
            if sim.transfer_outcome != "failed_in_place":
                self._enqueue(build.call_state(self.id, "transferring"))
            if sim.transfer_outcome in ("failed", "failed_in_place"):
                failed = models.ResultInfo(
                    odata_type="#microsoft.graph.resultInfo",
                    code=500,
                    subcode=7700 if consultative else 7000,
                    message="Transfer failed.",
                )
                # A consultative one to a user names the call it replaces (29); to a phone not (30).
                to_a_user = consultative and _identity_kind_and_id(target)[0] != "phone"
                replaces = self._replaces_context() if to_a_user else None
                back = build.call_state(
                    self.id, "established", result_info=failed, replaces_context=replaces
                )
                # Graph writes a failed transfer's subcode as subCode (documents 27, 29, 30, 58).
                written = back["resourceData"]["resultInfo"]
                written["subCode"] = written.pop("subcode")
                self._enqueue(back, delay=sim.transfer_duration)
            else:
                self._enqueue(
                    build.call_state(self.id, "transferAccepted"),
                    delay=sim.transfer_duration,
                )
                self._enqueue(
                    build.call_terminated(self.id, code=None, termination_reason="AppTransferred")
                    if consultative
                    else build.call_terminated(
                        self.id, code=0, subcode=7015, message="GracefulTransferCompleted"
                    ),
                )
        elif action == "subscribeToTone":
            self.subscribed_to_tones = True
            sim._changed()
        elif action in _MEDIA_ACTIONS or action in (
            "sendDtmfTones",
            "invite",
            "startHoldMusic",
            "stopHoldMusic",
            "addLargeGalleryView",
        ):
            self._on_operation(request, answer, body)
        elif action == "cancelMediaProcessing":
            # The prompt or recording playing and every one queued behind it.
            self._stop_keys.clear()
            self._media_waiting.clear()
            self._media_playing = None
            for operation_id, kind in list(self._media.items()):
                del self._media[operation_id]
                extra: dict[str, Any] = {}
                if kind == "recordResponse":
                    extra = {
                        "recordingLocation": "",
                        "recordingAccessToken": "",
                        "completionReason": "operationCanceled",
                    }
                self._enqueue(
                    self._operation_item(operation_id, "failed", _CANCELED, extra), delay=step
                )
        elif action in ("mute", "unmute"):
            self._update_participant(self.bot_participant_id, is_muted=action == "mute")
        elif action == "muteParticipant":
            participant_id = self._roster_id(request.item_id)
            if participant_id is not None:
                self._update_participant(participant_id, is_muted=True)
        elif action == "changeScreenSharingRole":
            self._share_screen(str(body.get("role", "")))
        elif action == "deleteParticipant":
            participant_id = self._roster_id(request.item_id)
            if participant_id is not None:
                gone = self.roster.pop(participant_id)
                self._enqueue(self._roster_item([gone], "deleted"))
                self._ended_if_alone()

    def _redirected(self, redirect: Mapping[str, Any]) -> dict[str, Any]:
        """What Graph's end of a redirected call says of it beside ``terminated`` (documents
        19, 21, 23): its direction, caller, targets, ``myParticipantId``, id and
        ``callbackUri``, as Graph's copy of the call has them; and, when the ``redirect``
        asked for a phone number, who answered (``answeredBy``) by an ``encrypted``
        identity, as only a redirect to a phone is documented ending (document 23)."""
        known = self._sim.graph.calls.get(self.key)
        resource = known.resource if known is not None else {}
        named = ("direction", "callbackUri", "source", "targets", "myParticipantId", "id")
        ended = {key: resource[key] for key in named if resource.get(key) is not None}
        targets = redirect.get("targets")
        if isinstance(targets, list) and any(
            _identity_kind_and_id(target)[0] == "phone" for target in targets
        ):
            ended["answeredBy"] = {
                "@odata.type": "#microsoft.graph.participantInfo",
                "identity": {
                    "@odata.type": "#microsoft.graph.identitySet",
                    "encrypted": {
                        "@odata.type": "#microsoft.graph.identity",
                        "id": uuid.uuid4().hex,
                    },
                },
                "endpointType": "default",
            }
        return ended

    def _ended_if_alone(self) -> asyncio.Future[tuple[int, str | None]] | None:
        """Teams ends a group call once only the bot is left in it (sb17: 200/5010): its end,
        queued, when it is so."""
        if not self.group or self._ended_on_graph or set(self.roster) - {self.bot_participant_id}:
            return None
        self._end_on_graph()
        return self._enqueue(
            build.call_terminated(self.id, code=200, subcode=5010, message=ONLY_ONE_LEFT)
        )

    @property
    def _peer_to_peer(self) -> bool:
        """Whether the call is P2P: neither a meeting joined, nor a group call placed, nor one
        grown into a meeting by an invitation."""
        return not (self.meeting or self.group or self._group_meeting is not None)

    def _refuses(self, request: RecordedRequest) -> tuple[int, str, str] | None:
        """What Graph refuses of a request about this call, as ``(status, code, message)``:
        an action the call's state does not allow (see :meth:`_out_of_state`), and several
        invitees at once to a P2P call (Graph supports that only in group calls, and
        documents no error for it: the 400 is the simulator's own)."""
        refusal = self._out_of_state(request.action)
        if refusal is not None:
            return refusal
        body = request.json if isinstance(request.json, Mapping) else {}
        invitees = body.get("participants")
        several = isinstance(invitees, list) and len(invitees) > 1
        if request.action != "invite" or not several or not self._peer_to_peer:
            return None
        return (
            400,
            "BadRequest",
            "Inviting several participants in one request is supported only in a group "
            "call, and this call is peer-to-peer: invite one (the call then grows into a "
            "meeting), then the others (the simulator's own error: Graph documents none)",
        )

    def _out_of_state(self, action: str) -> tuple[int, str, str] | None:
        """A refusal of ``action`` in the state the call is in on Graph's side: ``answer``,
        ``reject`` and ``redirect`` only while it is ``incoming`` (once), and what acts on a
        call in progress (prompts, recordings, tones, mute, transfer, invitations, ...) not
        before it is ``established``. Graph's pages say so, but not how Graph answers: the
        ``409 Conflict`` (Graph's documented status for a request its resource's current
        state conflicts with) is the simulator's own."""
        known = self._sim.graph.calls.get(self.key)
        state = known.resource.get("state") if known is not None else None
        if not isinstance(state, str):
            return None
        state = models.canonical_call_state(state)
        if action in _ON_AN_INCOMING_CALL and state != "incoming":
            needs = "an incoming call not yet answered, rejected or redirected"
        elif action in _ON_A_CONNECTED_CALL and state in _NOT_CONNECTED_YET:
            needs = "an established call"
        else:
            return None
        return (
            409,
            "Conflict",
            f"The call is {state}: {action} needs {needs} (the simulator's own error: "
            "Graph documents no error for an action in the wrong state)",
        )

    def _escalate(self) -> None:
        """A P2P call someone joins by invitation becomes a group call in a meeting Teams
        makes of it (a failed invitation leaves it as it was). As recorded (sb10, sb11, from
        a bot whose code called one attendee and invited the rest once the call was
        established; microsoft-graph-comms-samples issues 413 and 704
        report the same of live P2P calls a bot invited someone to): ``established`` again,
        with its media, naming the meeting's chat, its properties and what the call replaces
        (the other party's ``replacementLink``, base64), then once more with the meeting's
        ``tokenMeetingInfo`` too (its ``activityId`` the call's chain id, as sb11's). Graph's
        copy of the call names them from then on (``GET`` the call: issue 704)."""
        if not self._peer_to_peer:
            return  # already a meeting or a group call: nothing is escalated
        replaces = self._replaces_context()
        # Shaped as recorded (sb10): a chat thread with no host suffix, an all-zero label.
        chat = {
            "@odata.type": "#microsoft.graph.chatInfo",
            "threadId": f"19:{uuid.uuid4()}",
            "messageId": "0",
        }
        label = {
            "@odata.type": "#microsoft.graph.meetingProperties",
            "meetingLabel": str(uuid.UUID(int=0)),
        }
        self._group_meeting = _token_meeting_info(
            self._sim.app_id, self.chain_id, self._sim.tenant_id
        )
        media = models.CallMediaState(odata_type="#microsoft.graph.callMediaState", audio="active")
        escalated: dict[str, Any] = {
            "media_state": media,
            "chat_info": chat,
            "meeting_properties": label,
            "replaces_context": replaces,
        }
        self._enqueue(build.call_state(self.id, "established", **escalated))
        self._enqueue(
            build.call_state(self.id, "established", meeting_info=self._group_meeting, **escalated)
        )
        known = self._sim.graph.calls.get(self.key)
        if known is not None:
            named = {"chatInfo": chat, "meetingInfo": self._group_meeting}
            known.resource.update(named, **({"replacesContext": replaces} if replaces else {}))

    def _replaces_context(self) -> str | None:
        """The call's ``replacesContext``: the other party's ``replacementLink``, base64 (as
        recorded, sb10); ``None`` when they have none."""
        others = [p for pid, p in self.roster.items() if pid != self.bot_participant_id]
        other = self.remote if self.remote is not None else next(iter(others), None)
        link = other.replacement_link if other is not None else None
        return base64.b64encode(link.encode()).decode("ascii") if link else None

    def _update_participant(self, participant_id: str, **update: Any) -> None:
        """Change a participant's fields and post the roster, as Graph does after ``mute``."""
        current = self.roster.get(participant_id)
        if current is None:
            return
        changed = self.roster[participant_id] = current.model_copy(update=update)
        self._enqueue(self._roster_item([changed]))

    def _share_screen(self, role: str) -> None:
        """The bot's screen-sharing stream after ``changeScreenSharingRole``, in the roster
        update Graph documents (document 42: a ``videoBasedScreenSharing`` stream ``sendOnly``)."""
        me = self.roster.get(self.bot_participant_id)
        if me is None:
            return
        # Documented for a sharer only; a viewer takes the stream in, the other way.
        direction = "sendOnly" if role == "sharer" else "receiveOnly"
        shared = models.MediaStream(
            odata_type="#microsoft.graph.mediaStream",
            media_type="videoBasedScreenSharing",
            label="applicationsharing-video",
            source_id=self._source_id(),
            direction=direction,
            server_muted=False,
        )
        streams = [
            stream
            for stream in me.media_streams or []
            if stream.media_type != "videoBasedScreenSharing"
        ]
        self._update_participant(self.bot_participant_id, media_streams=[*streams, shared])

    def _operation_item(
        self,
        operation_id: str,
        status: str,
        result_info: Mapping[str, Any] | None,
        fields: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """An operation's outcome; with no ``resultInfo`` when ``result_info`` is ``None``, as
        Graph documents the end of ``sendDtmfTones``, an invitation, hold music, the large
        gallery view and a recording a stop tone ended (documents 34-36, 43-55, 69)."""
        body = self._sim.graph.operation_notification(
            operation_id, status=status, result_info=result_info, **dict(fields or {})
        )
        item: dict[str, Any] = body["value"][0]
        if result_info is None:
            del item["resourceData"]["resultInfo"]
        return item

    def _on_operation(
        self, request: RecordedRequest, answer: FakeResponse, body: Mapping[str, Any]
    ) -> None:
        sim = self._sim
        operation = answer.body if isinstance(answer.body, Mapping) else {}
        operation_id = operation.get("id")
        if not isinstance(operation_id, str) or operation_id not in sim.graph.operations:
            return
        if is_settled(str(operation.get("status", ""))):
            return
        action = request.action
        prompts = [p for p in body.get("prompts", []) if isinstance(p, Mapping)]
        if action == "playPrompt":

            def finished() -> None:
                if self._media.pop(operation_id, None) is not None:
                    # As recorded from Teams (sb05): the outcome repeats the prompts, and why.
                    done = {"prompts": prompts, "completionReason": "completedSuccessfully"}
                    self._enqueue(self._operation_item(operation_id, "completed", _DONE, done))

            # Beta's loop plays the prompts until cancelled, and never completes (its page).
            looping = request.version == "beta" and body.get("loop") is True
            duration = None if looping else sim.prompt_duration * max(1, len(prompts))
            self._play_media(operation_id, action, duration, finished)
        elif action == "recordResponse":
            stop = body.get("stopTones")
            if isinstance(stop, list) and stop:
                self._stop_keys[operation_id] = frozenset(str(key) for key in stop)
            duration = sim.prompt_duration * len(prompts) + sim.record_duration

            def recorded() -> None:
                self._stop_keys.pop(operation_id, None)
                if self._media.pop(operation_id, None) is None:
                    return
                location, token = sim.graph.add_recording(sim.recording, call_id=self.id)
                fields = {"recordingLocation": location, "recordingAccessToken": token}
                if request.version == "beta":
                    # The reason is beta's: v1.0 tells it by the 8515 alone (document 32).
                    fields["completionReason"] = "maxRecordDurationReached"
                self._enqueue(
                    self._operation_item(
                        operation_id,
                        "completed",
                        {
                            "code": 200,
                            "subcode": 8515,
                            "message": "Action completed, max record duration reached.",
                        },
                        fields,
                    )
                )

            self._play_media(operation_id, action, duration, recorded)
        elif action == "sendDtmfTones":
            tones = body.get("tones", [])
            count = len(tones) if isinstance(tones, list) else 1
            self._later(
                sim.step_delay * max(1, count),
                lambda: self._enqueue(
                    self._operation_item(
                        operation_id,
                        "completed",
                        None,
                        {"completionReason": "completedSuccessfully"},
                    )
                ),
            )
        elif action == "invite":
            invitees = [p for p in body.get("participants", []) if isinstance(p, Mapping)]

            def joined() -> None:
                failed = sim.invite_outcome == "failed"
                if not failed:
                    self._escalate()  # someone joins: only then does a P2P call grow
                outcome = (
                    self._operation_item(operation_id, "failed", _INVITE_FAILED)
                    if failed
                    else self._operation_item(operation_id, "completed", None)
                )
                if len(invitees) > 1:
                    # As documented for several invitees: on operations/participants, with
                    # "id": null, only its clientContext saying which invitation it ends.
                    path = f"{_CALLS}{self.id}/operations/participants"
                    data = {**outcome["resourceData"], "id": None}
                    outcome = {**outcome, "resourceUrl": path, "resourceData": data}
                self._enqueue(outcome)
                if failed:
                    return  # nobody joined
                added: list[models.Participant] = []
                for invitee in invitees:
                    participant_id, participant = self._named_by(invitee)
                    self.roster[participant_id] = participant
                    added.append(participant)
                self._enqueue(self._roster_item(added, "created"))

            self._later(sim.step_delay, joined)
        else:
            self._later(
                sim.step_delay,
                lambda: self._enqueue(self._operation_item(operation_id, "completed", None)),
            )


def _endpoint(url: str) -> tuple[str, str, int | None, str]:
    """Where ``url`` posts to: its scheme, host (loopback names alike: the bot is served on
    127.0.0.1, which ``localhost`` reaches too), port and path."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host == "localhost" or host.startswith("127."):
        host = "loopback"
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        port = None
    return parts.scheme.lower(), host, port, parts.path


class _Unwritten:
    """A logger whose lines go nowhere: a bot elsewhere writes its own."""

    def debug(self, *args: Any, **fields: Any) -> None:
        pass

    def info(self, *args: Any, **fields: Any) -> None:
        pass


class _BotElsewhere:
    """What a bot in another process told its handlers, as near as the simulator can know:
    what it acknowledged, through callbot's own sequencer with the default settings."""

    def __init__(self, told: Callable[[events.Event], None]) -> None:
        # No answer-deadline warning, and no call left pending long enough to be let go.
        self._lifecycle = Lifecycle(
            termination_grace=Settings.termination_grace,
            answer_warning_after=0.0,
            pending_ttl=24 * 3600.0,
        )
        self._sequencer = Sequencer(
            lambda delivery: told(delivery.event),
            self._lifecycle,
            reorder_window=Settings.reorder_window,
            logger=_Unwritten(),
        )

    def accepted(self, body: Any, tenant_id: str) -> None:
        """The bot acknowledged ``body`` (as the bot does, a call of another tenant is not
        taken)."""
        with contextlib.suppress(MalformedNotification):
            self._sequencer.accept_batch(parse_payload(body, tenant_id=tenant_id))

    async def close(self) -> None:
        self._sequencer.close()
        await self._lifecycle.close()


class _SimulatorCredential:
    """Outbound tokens the simulated Graph accepts, for bots built with their own credential."""

    def __init__(self, graph: FakeGraph, app_id: str) -> None:
        self._graph = graph
        self._app_id = app_id

    async def get_token(self, *scopes: str) -> AccessToken:
        token = "simulator-" + uuid.uuid4().hex
        expires = time.time() + self._graph.token_lifetime  # a token's expiry: the wall clock
        self._graph.tokens[token] = expires
        self._graph.token_clients[token] = self._app_id
        return AccessToken(token, int(expires))


class Simulator:
    """Plays Microsoft Graph for one bot on 127.0.0.1 (see the module documentation).

    ``app_id`` is the bot's application id (the audience of the callback
    tokens); ``callback_url`` is where notifications go (set it, or use
    :func:`run_with_simulator`, which also configures and serves the bot).
    ``prompt_duration`` is how long each prompt plays, ``record_duration`` how
    long a recording lasts, ``transfer_duration`` how long a transfer target
    takes to pick up, ``step_delay`` the pause before each notification,
    ``answer_deadline`` how long an incoming call waits for the bot to answer,
    reject or redirect it before Graph ends it with 408/1106, ``keep_alive_deadline``
    how long a connected call goes without a ``keepAlive`` before Graph ends it with
    408/8537 (all seconds, as Graph's by default, on the event loop's clock; ``None``: never),
    ``recording_retention`` how long a call's recordings are still served once it ended
    (Graph discards them shortly after; by default a minute; ``None``: kept).
    ``delivery`` posts notifications with Graph's quirks (out of order, twice,
    ``resource`` only, compact ids, late: :class:`DeliveryOptions`). With
    ``drive=False`` the simulator only answers requests and posts nothing by
    itself (for replays). ``observers`` see every :class:`Traffic`.
    ``graph_port`` and ``keys_port`` fix the ports (0: any free port), and
    ``key_file`` the signing key (see :class:`TokenAuthority`). ``host`` is the address
    they listen on; a bot takes plain-http Graph and OpenID URLs only on its own machine
    (127.0.0.1, localhost, ::1), so a bot on another host cannot use the simulator.
    ``application_instance_id`` is the object id of the bot's application instance (the
    resource account with its phone number), which a phone call reaches the bot through;
    by default one derived from ``app_id``. ``meeting_attendees`` are already in a meeting
    the bot joins (by default Megan Bowen), and ``outgoing_outcomes`` are what the callees of
    the bot's first calls do (see :meth:`queue_outgoing`): given here, they are in place for
    a meeting the bot joins, or a call it places, as it starts (``on_started``).
    """

    def __init__(
        self,
        *,
        app_id: str = DEFAULT_APP_ID,
        tenant_id: str = TEST_TENANT_ID,
        callback_url: str | None = None,
        bot_name: str = "Bot",
        prompt_duration: float = 0.05,
        record_duration: float = 0.05,
        transfer_duration: float = 0.02,
        answer_deadline: float | None = 15.0,
        keep_alive_deadline: float | None = KEEP_ALIVE_LIMIT,
        recording_retention: float | None = RECORDING_RETENTION,
        step_delay: float = 0.0,
        delivery: DeliveryOptions | None = None,
        drive: bool = True,
        observers: Sequence[Callable[[Traffic], None]] = (),
        host: str = "127.0.0.1",
        graph_port: int = 0,
        keys_port: int = 0,
        key_file: Path | None = None,
        application_instance_id: str | None = None,
        meeting_attendees: Sequence[str] = ("Megan Bowen",),
        outgoing_outcomes: Sequence[str] = (),
    ) -> None:
        self.app_id = app_id
        self.application_instance_id = application_instance_id or str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"applicationInstance:{app_id}")
        )
        """The bot's application instance (object id) that phone calls (and any call
        ``incoming_call(..., to_instance=True)`` makes) are made to, named ``bot_name`` in
        the call (Graph puts a phone call through to a bot only by one)."""
        self.tenant_id = tenant_id
        self.callback_url = callback_url
        """The bot's callback URL: where incoming calls are announced, and a call's
        notifications go when the bot named no ``callbackUri`` for it."""
        self.bot_name = bot_name
        self.prompt_duration = prompt_duration
        self.record_duration = record_duration
        self.transfer_duration = transfer_duration
        self.answer_deadline = answer_deadline
        self.keep_alive_deadline = keep_alive_deadline
        self.step_delay = step_delay
        self.delivery = delivery or DeliveryOptions()
        """How notifications arrive, for calls that do not say otherwise."""
        self.drive = drive
        self.transfer_outcome = "completed"
        """``completed`` (the target picks up: 7015), ``failed`` (back to established, 500)
        or ``failed_in_place`` (the failure told by that update alone: no ``transferring``
        first, as Graph may tell it)."""
        self.invite_outcome = "completed"
        """``completed`` (the invitees join the roster) or ``failed`` (the invitation's
        operation fails with the simulator's own 408, and nobody joins)."""
        self.meeting_attendees: list[str] = list(meeting_attendees)
        """Who is already in a meeting the bot joins (a bot joining as a guest waits in the
        lobby, and is told of nobody else), as the bot asks to join it. A bot that joins one
        as it starts (``on_started``) may ask before a test's body runs: give them to the
        simulator (``meeting_attendees=``) rather than set them there."""
        self.recording: bytes = silent_wav()
        """What a recording made by ``recordResponse`` contains."""
        self.graph = FakeGraph(tenant_id=tenant_id, host=host)
        """The fake Graph REST API (requests, tokens, fault injection)."""
        self.graph.recording_retention = recording_retention
        self.graph.application_names[app_id] = bot_name
        self.authority = TokenAuthority(key_file=key_file)
        """The token issuer whose keys the bot must trust (``openid_config_url``)."""
        self.traffic: list[Traffic] = []
        """Everything that happened, in order. A notification is kept once the bot has
        answered its POST, so its handlers may have run before it is here: ``await
        sim.settled()`` first to read all that was posted."""
        self.observers: list[Callable[[Traffic], None]] = list(observers)
        """Called with each :class:`Traffic` as it happens (the demo prints them)."""
        self.calls: list[SimulatedCall] = []
        """Every call, in the order it started."""
        self._host = host
        self._graph_port = graph_port
        self._keys_port = keys_port
        self._by_key: dict[str, SimulatedCall] = {}
        # The latest handlers that raised, for a wait that runs out to name.
        self._handlers_raised: deque[str] = deque(maxlen=5)
        self._outgoing: list[SimulatedCall] = []
        self._outgoing_taken = 0
        self._outgoing_outcomes: list[str] = []
        self.queue_outgoing(*outgoing_outcomes)
        # id() of each request a wait returned (graph.requests keeps them alive)
        self._returned: set[int] = set()
        self._signal = asyncio.Event()
        self._bot: CallBot | None = None
        """The bot served in this process (``run_with_simulator``), if any."""
        # Other bots served in this process (serve()), by callback URL: other deployments.
        self._others: dict[str, CallBot] = {}
        self._session: aiohttp.ClientSession | None = None
        self._started_at: float | None = None  # on the loop's clock, set by start()
        self._notifying = True
        self._elsewhere: _BotElsewhere | None = None
        # Calls notified about (key -> id), a test's own posts too: settled() waits for each.
        self._notified: dict[str, str] = {}
        self.graph.listeners.append(self._on_request)
        self.graph.checks.append(self._refuses)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the token authority and the fake Graph."""
        await self.authority.start(self._host, self._keys_port)
        try:
            await self.graph.start(port=self._graph_port)
        except BaseException:
            await self.authority.close()
            raise
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._started_at = loop_time()

    async def stop_notifying(self) -> None:
        """Post nothing more (before the bot stops): pending notifications are dropped."""
        self._notifying = False
        await asyncio.gather(*(call._close() for call in self.calls), return_exceptions=True)
        if self._elsewhere is not None:
            await self._elsewhere.close()
            self._elsewhere = None

    async def close(self) -> None:
        """Stop every call's notifications and both servers."""
        await self.stop_notifying()
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.graph.close()
        await self.authority.close()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- pointing a bot at it ---------------------------------------------------------

    @property
    def openid_config_url(self) -> str:
        """The OpenID configuration the bot must trust (``CALLBOT_OPENID_CONFIG_URL``)."""
        return self.authority.openid_config_url

    @property
    def graph_url(self) -> str:
        """The Graph base URL for the bot (``CALLBOT_GRAPH_URL``)."""
        return self.graph.graph_url

    @property
    def authority_url(self) -> str:
        """The token authority for the bot (``CALLBOT_AUTHORITY_URL``)."""
        return self.graph.authority_url

    def bot_settings(self, *, public_url: str | None = None, beta: bool = False) -> dict[str, Any]:
        """Settings that point a bot at this simulator (for ``bot.configure(**...)``);
        ``beta``: at its Graph beta endpoint, for a bot that uses Graph's beta."""
        values: dict[str, Any] = {
            "app_id": self.app_id,
            "tenant_id": self.tenant_id,
            "app_secret": "simulator-secret",
            "certificate_path": None,
            "graph_url": self.graph.beta_url if beta else self.graph_url,
            "authority_url": self.authority_url,
            "openid_config_url": self.openid_config_url,
        }
        if public_url is not None:
            values["public_url"] = public_url
            values["allow_insecure_public_url"] = True
        return values

    def bot_environment(
        self, *, public_url: str | None = None, beta: bool = False
    ) -> dict[str, str]:
        """The ``CALLBOT_*`` variables that point a bot process at this simulator (``beta``:
        at its Graph beta endpoint)."""
        env = {
            "CALLBOT_APP_ID": self.app_id,
            "CALLBOT_TENANT_ID": self.tenant_id,
            "CALLBOT_APP_SECRET": "simulator-secret",
            "CALLBOT_GRAPH_URL": self.graph.beta_url if beta else self.graph_url,
            "CALLBOT_AUTHORITY_URL": self.authority_url,
            "CALLBOT_OPENID_CONFIG_URL": self.openid_config_url,
        }
        if public_url is not None:
            env["CALLBOT_PUBLIC_URL"] = public_url
            env["CALLBOT_ALLOW_INSECURE_PUBLIC_URL"] = "1"
        return env

    def credential(self) -> _SimulatorCredential:
        """An outbound credential whose tokens the simulated Graph accepts."""
        return _SimulatorCredential(self.graph, self.app_id)

    def token(self, **claims: Any) -> str:
        """A callback token for the bot, signed with the published key."""
        claims.setdefault("tenant_id", self.tenant_id)
        return self.authority.mint(audience=self.app_id, **claims)

    @asynccontextmanager
    async def serve(self, bot: CallBot, *, shutdown_timeout: float = 2.0) -> AsyncIterator[str]:
        """Serve another bot against this simulator on 127.0.0.1 while the block runs, and
        yield its callback URL: another deployment of the same app, which the bot of
        :func:`run_with_simulator` sends calls to with ``choose_deployment``.

        As for that bot, its settings (and credential) point at the simulator until the
        block ends, :attr:`traffic` shows its handlers, a call's ``states`` what its
        handlers were told, and ``settled()`` waits for its handlers too; its
        ``on_started`` hooks run as the block begins.
        """
        async with _serving(
            bot, self, shutdown_timeout=shutdown_timeout, keep_alive=None
        ) as callback_url:
            self._others[callback_url] = bot
            bot._serving_started()
            try:
                yield callback_url
            finally:
                del self._others[callback_url]

    # -- calls ---------------------------------------------------------------------

    @property
    def call(self) -> SimulatedCall:
        """The most recent call."""
        if not self.calls:
            raise SimulatorError("no call yet: start one with sim.incoming_call()")
        return self.calls[-1]

    def callback_url_for(self, call_id: str | None) -> str | None:
        """Where Graph posts notifications about ``call_id``: the ``callbackUri`` the bot gave
        for that call (placing, answering, rejecting or redirecting it), else
        :attr:`callback_url` (where Graph announces incoming calls)."""
        known = self.graph.calls.get(id_key(call_id)) if call_id is not None else None
        given = known.callback_uri if known is not None else None
        return given or self.callback_url

    def find_call(self, call_id: str) -> SimulatedCall | None:
        """The simulated call with this id (any case or dashes), if any."""
        return self._by_key.get(id_key(call_id))

    async def incoming_call(
        self,
        from_user: str | None = None,
        *,
        user_id: str | None = None,
        from_phone: str | None = None,
        call_id: str | None = None,
        delivery: DeliveryOptions | None = None,
        to_instance: bool | None = None,
    ) -> SimulatedCall:
        """Someone calls the bot: post the ``incoming`` call and return the call.

        ``from_user`` is the caller's display name (default ``"Adele Vance"``;
        ``user_id`` their object id, derived from the name when not given);
        ``from_phone`` makes it a PSTN caller with that number. The call is made to the
        bot's :attr:`application_instance_id` (the call's target is that
        ``applicationInstance``, whose id is the bot's ``myParticipantId``, and the bot is
        that instance in the roster, as Graph documents it) when ``to_instance`` is true,
        or to the bot's ``application`` when it is false; by default a phone caller calls
        the instance and a user the application (``to_instance=True``: a user calling a
        resource account's bot, such as a receptionist). A phone call to the application
        (``to_instance=False``) raises ``ValueError``: Graph makes none. The bot then
        answers, rejects or redirects it.
        """
        call_id = call_id or str(uuid.uuid4())
        name: str | None
        if from_phone is not None:
            kind, caller_id, name = "phone", from_phone, from_user
        else:
            kind, name = "user", from_user or "Adele Vance"
            caller_id = user_id or str(uuid.uuid5(uuid.NAMESPACE_URL, name))
        if to_instance is None:
            # A phone reaches a bot only through its resource account (document 22).
            to_instance = kind == "phone"
        elif kind == "phone" and not to_instance:
            raise ValueError(
                "a phone call reaches a bot only through its application instance (the "
                "resource account with the number), never its application: leave out "
                "to_instance (or give to_instance=True) for a phone caller, or call from a "
                "user (from_user=...) to reach the bot's application"
            )
        call = self._new_call(call_id, "incoming", None, delivery)
        item = build.incoming_call(
            call_id,
            caller_id=caller_id,
            caller_name=name,
            caller_kind=kind,
            bot_app_id=self.app_id,
            bot_name=self.bot_name,
            tenant_id=self.tenant_id,
            callback_uri=self.callback_url,
            # As documented incoming calls carry it: the bot's own id in the roster to come.
            my_participant_id=call.bot_participant_id,
            bot_instance_id=self.application_instance_id if to_instance else None,
        )
        self.graph.add_call(call_id, **item["resourceData"], callChainId=call.chain_id)
        call._take_caller()
        await call._send(item)
        if self.answer_deadline is not None:
            call._later(self.answer_deadline, call._missed)
        return call

    async def meeting_call(self, *, call_id: str | None = None) -> SimulatedCall:
        """A meeting the bot is in without having asked (for scenarios against a remote bot).

        Posts ``establishing``, ``established`` and the roster (the bot and
        :attr:`meeting_attendees`), then returns the call.
        """
        call = self._new_call(call_id or str(uuid.uuid4()), "outgoing", None, None, meeting=True)
        self.graph.add_call(
            call.id,
            state="establishing",
            direction="outgoing",
            myParticipantId=call.bot_participant_id,
            callChainId=call.chain_id,
        )
        self._add_attendees(call)
        await call.establish()
        return call

    def _add_attendees(self, call: SimulatedCall) -> None:
        call._add_bot()
        if call.roster[call.bot_participant_id].is_in_lobby:
            return  # Graph lists nobody else to a bot until it is let in (document 65's page)
        for name in self.meeting_attendees:
            participant_id = str(uuid.uuid4())
            call.roster[participant_id] = call._participant(
                participant_id,
                user_id=str(uuid.uuid5(uuid.NAMESPACE_URL, name)),
                display_name=name,
                kind="user",
            )

    def queue_outgoing(self, *outcomes: str) -> None:
        """What the next callees do, in order: ``answer``, ``no_answer``, ``busy``, ``decline``.

        Calls the bot places after the queue is empty are answered. A bot that places a call
        as it starts (``on_started``) may place it before a test's body runs: give its
        callees' outcomes to the simulator (``outgoing_outcomes=``) rather than queue them
        there.
        """
        for outcome in outcomes:
            if outcome not in OUTGOING_OUTCOMES:
                raise ValueError(f"unknown outcome {outcome!r}; known: {sorted(OUTGOING_OUTCOMES)}")
        self._outgoing_outcomes.extend(outcomes)

    async def wait_for_outgoing_call(self, timeout: float = 5.0) -> SimulatedCall:
        """The next call the bot placed (or meeting it joined) not returned before."""
        await self._until(
            lambda: len(self._outgoing) > self._outgoing_taken,
            timeout,
            lambda: f"the bot placed no call within {timeout} s",
        )
        self._outgoing_taken += 1
        return self._outgoing[self._outgoing_taken - 1]

    def _new_call(
        self,
        call_id: str,
        direction: str,
        remote: models.Participant | None,
        delivery: DeliveryOptions | None,
        *,
        meeting: bool = False,
    ) -> SimulatedCall:
        call = SimulatedCall(
            self,
            call_id,
            direction=direction,
            remote=remote,
            delivery=delivery or self.delivery,
            meeting=meeting,
        )
        self.calls.append(call)
        self._by_key[call.key] = call
        return call

    # -- shortcuts on the most recent call -----------------------------------------------

    async def press(self, keys: str | Sequence[ToneName], *, timeout: float = 5.0) -> None:
        """The latest call's far end presses keys (see :meth:`SimulatedCall.press`)."""
        await self.call.press(keys, timeout=timeout)

    async def hangup(self) -> None:
        """The latest call's far end hangs up."""
        await self.call.hangup()

    async def join(self, display_name: str, **options: Any) -> str:
        """Someone joins the latest call (see :meth:`SimulatedCall.join`)."""
        return await self.call.join(display_name, **options)

    async def leave(self, who: str) -> None:
        """Someone leaves the latest call."""
        await self.call.leave(who)

    # -- requests --------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request the bot sent (token requests included), in order."""
        return list(self.graph.requests)

    def requests_for(self, action: str) -> list[RecordedRequest]:
        """The bot's requests for one action (``answer``, ``playPrompt``, ``transfer``, ...)."""
        return self.graph.requests_for(action)

    async def settled(self, timeout: float = 5.0) -> None:
        """:meth:`SimulatedCall.settled` for every call so far, and the bot's handlers done
        with every call a notification was posted about (:meth:`post`, a replay)."""
        self._in_process_bot()

        def busy() -> list[str]:
            played = [c.id for c in self.calls if not c._settled]
            posted = [
                call_id
                for key, call_id in self._notified.items()
                if key not in self._by_key and not self._bot_settled(key)
            ]
            return played + posted

        await self._until(
            lambda: not busy(),
            timeout,
            lambda: f"the bot still works on call(s) {', '.join(busy())} after {timeout} s",
        )

    def _in_process_bot(self) -> CallBot:
        if self._bot is None:
            raise SimulatorError(
                "settled() needs the bot in this process: run_with_simulator(bot) or the "
                "sim fixture (a bot in another process: wait for its requests instead)"
            )
        return self._bot

    def _bot_settled(self, call_key: str) -> bool:
        bots = [self._in_process_bot(), *self._others.values()]
        return all(bot._running().settled(call_key) for bot in bots)

    async def wait_for_request(
        self, action: str, *, call: SimulatedCall | None = None, timeout: float = 5.0
    ) -> RecordedRequest:
        """The bot's next request for ``action`` (about ``call``) not returned by an earlier wait.

        Actions are FakeGraph's names: ``answer``, ``reject``, ``redirect``,
        ``transfer``, ``playPrompt``, ``recordResponse``, ``subscribeToTone``,
        ``createCall``, ``deleteCall``, ``invite``, ... Raises
        :class:`SimulatorError` naming what the bot did send when none comes.
        """

        def matching() -> list[RecordedRequest]:
            # Whether asked of the simulator or of the call, a request is returned once.
            found = [r for r in self.graph.requests_for(action) if id(r) not in self._returned]
            if call is not None:
                found = [r for r in found if call._about(r)]
            return found

        def explain() -> str:
            sent = [r.action for r in self.graph.requests if r.action != "token"]
            where = f" about call {call.id}" if call is not None else ""
            return f"the bot sent no {action!r} request{where} within {timeout} s (it sent: {sent})"

        await self._until(lambda: bool(matching()), timeout, explain)
        request = matching()[0]
        self._returned.add(id(request))
        return request

    # -- posting -------------------------------------------------------------------

    async def post(
        self, body: Any, *, call_id: str | None = None, tenant_id: str | None = None
    ) -> int:
        """Sign and post a notification body to the bot; returns the bot's status.

        It goes where Graph would post about ``call_id`` (:meth:`callback_url_for`). A
        ``302 Found`` is followed as Graph follows it (region affinity): the same notification
        is posted to its ``Location``, and the calls it names are posted there from then on.
        ``tenant_id`` overrides the token's ``tid`` (replays keep the recorded tenant).
        The status is the caller's to judge: a refusal is not one of
        :attr:`failed_deliveries` (a test may expect a 403). As Graph's own, a posted
        notification makes the calls it names known to :attr:`graph`, and a termination
        ends its call there; a roster about a simulated call is that call's roster from then
        on (see :meth:`SimulatedCall.notify`).
        """
        for roster in _rosters_in(body):
            played = self.find_call(roster.call_id)
            if played is not None:
                played._take_roster(roster)
        status, _ = await self._deliver(body, call_id=call_id, tenant_id=tenant_id, by_post=True)
        return status

    @property
    def failed_deliveries(self) -> list[Traffic]:
        """Notifications the simulator posted on its own that the bot did not acknowledge
        with 2xx (what :meth:`post` sent is left to its caller)."""
        return [
            t
            for t in self.traffic
            if t.kind == "notification"
            and not (t.status is not None and 200 <= t.status < 300)
            and not t.sent_by_post
            and t.redirected_to is None
        ]

    async def _deliver(
        self,
        body: Any,
        *,
        call_id: str | None,
        tenant_id: str | None = None,
        by_post: bool = False,
    ) -> tuple[int, str | None]:
        """Post ``body`` (retrying as Graph does); the bot's status and refusal reason."""
        url = self.callback_url_for(call_id)
        if url is None:
            raise SimulatorError(
                "no bot attached: set sim.callback_url (or use run_with_simulator)"
            )
        if self._session is None:
            raise SimulatorError("the simulator is not started")
        if not self._notifying:
            return 0, None
        self._graph_side(body)
        data = json.dumps(body).encode()
        status = 0
        reason: str | None = None
        attempt = hops = 0

        def delivered(posted_to: str, **outcome: Any) -> Traffic:
            """The traffic entry of this notification's delivery to ``posted_to``."""
            return Traffic(
                kind="notification",
                at=self._now(),
                call_id=call_id,
                summary=describe_notification(body),
                status=status,
                body=body,
                sent_by_post=True if by_post else None,
                url=posted_to,
                **outcome,
            )

        chain_id = self._chain_id_for(body, call_id)
        message_id = str(uuid.uuid4())
        first_message_id: str | None = None
        while True:
            # What captured callbacks carry (fixtures/captured/*.headers).
            headers = {
                "Authorization": "Bearer " + self.token(tenant_id=tenant_id or self.tenant_id),
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": GRAPH_USER_AGENT,
                "X-Microsoft-Skype-Chain-ID": chain_id,
                "X-Microsoft-Skype-Message-ID": message_id,
            }
            if first_message_id is not None:
                headers["X-Microsoft-Skype-Original-Message-ID"] = first_message_id
            retry_after = 0.2
            location: str | None = None
            try:
                # A 302 is Graph's to follow (below), not the HTTP client's: it keeps the POST.
                async with self._session.post(
                    url, data=data, headers=headers, allow_redirects=False
                ) as response:
                    status = response.status
                    answer = await response.read()
                    retry_after = _retry_after(response.headers.get("Retry-After"), retry_after)
                    reason = _refusal_reason(status, answer)
                    location = response.headers.get("Location")
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, reason = 0, None  # not what an earlier attempt was told
                log.warning("simulator_post_failed", url=url, error=repr(exc))
            if status == 302 and location and hops < MAX_REDIRECTS and self._notifying:
                moved_to = urljoin(url, location)
                self._record(delivered(url, redirected_to=moved_to))
                self._move_calls(body, moved_to)
                url, hops, attempt = moved_to, hops + 1, 0
                continue
            # Graph retries what a bot could not take yet; a refusal it does not retry.
            if status not in (0, 429, 502, 503, 504) or attempt == 3 or not self._notifying:
                break
            attempt += 1
            # Sent again, it is a new message that names the first sending.
            first_message_id = first_message_id or message_id
            message_id = str(uuid.uuid4())
            await asyncio.sleep(retry_after)
        self._record(delivered(url, reason=reason))
        if self._notifying and status in (200, 202) and not self._reaches_bot(url):
            if self._elsewhere is None:
                self._elsewhere = _BotElsewhere(self._told)
            self._elsewhere.accepted(body, tenant_id or self.tenant_id)
        return status, reason

    def _chain_id_for(self, body: Any, call_id: str | None) -> str:
        """The ``X-Microsoft-Skype-Chain-ID`` of a notification: the ``callChainId`` of the call
        it is about, as Graph's copy of the call has it (given one when it has none)."""
        key = id_key(call_id) if call_id is not None else None
        if key is None:
            with contextlib.suppress(MalformedNotification):
                key = next((event.call_key for event in parse_payload(body)), None)
        known = self.graph.calls.get(key) if key is not None else None
        if known is None:
            return str(uuid.uuid4())
        chain = known.resource.get("callChainId")
        if not isinstance(chain, str) or not chain:
            chain = known.resource["callChainId"] = str(uuid.uuid4())
        return chain

    def _move_calls(self, body: Any, callback_url: str) -> None:
        """A bot's 302 moved the calls ``body`` names (region affinity): Graph posts their
        notifications to ``callback_url`` from then on."""
        try:
            told = parse_payload(body)
        except MalformedNotification:
            return
        for key in {event.call_key for event in told}:
            known = self.graph.calls.get(key)
            if known is not None:
                known.resource["callbackUri"] = known.callback_uri = callback_url

    def _reaches_bot(self, url: str) -> bool:
        """Whether ``url`` is the callback endpoint of a bot served in this process (whose
        dispatcher tells what its handlers were handed); a query string does not matter."""
        served = list(self._others)
        if self._bot is not None and self.callback_url is not None:
            served.append(self.callback_url)
        return any(_endpoint(callback_url) == _endpoint(url) for callback_url in served)

    def _graph_side(self, body: Any) -> None:
        """Graph tells a bot only of calls it has: its API knows each call a notification it
        posts names from then on, and none that it says terminated."""
        try:
            told = parse_payload(body)
        except MalformedNotification:
            return  # not a notification (a test's own body): it names no call
        for event in told:
            self._notified.setdefault(event.call_key, event.call_id)
            if self.graph.calls.get(event.call_key) is None:
                data = event.raw.get("resourceData")
                is_call = isinstance(data, Mapping) and data.get("@odata.type") == _CALL_TYPE
                resource = dict(data) if is_call and isinstance(data, Mapping) else {}
                if isinstance(event, events.IncomingCall | events.CallStateChanged):
                    resource["state"] = event.state
                else:  # told of by a tone, a roster, an operation: a call in progress
                    resource["state"] = "established"
                self.graph.add_call(event.call_id, **resource)
            if isinstance(event, events.CallTerminated):
                self.graph.end_call(event.call_id)

    def _told(self, event: events.Event) -> None:
        """The bot's handlers were handed ``event`` (as its sequencer decided): a move of a
        call the simulator plays is that call's."""
        if isinstance(event, events.IncomingCall | events.CallStateChanged):
            call = self.find_call(event.call_id)
            if call is not None:
                call._told(event)

    # -- reacting to requests ----------------------------------------------------------

    async def _on_request(self, request: RecordedRequest, answer: FakeResponse) -> None:
        self._record(
            Traffic(
                kind="request",
                at=self._now(),
                call_id=request.call_id,
                method=request.method,
                path=request.path,
                action=request.action,
                status=answer.status,
                summary=_describe_request(request),
                body=request.json,
            )
        )
        if not self.drive or not self._notifying or not 200 <= answer.status < 300:
            return
        if request.action == "createCall":
            self._on_create_call(request, answer)
            return
        if request.call_id is None:
            return
        call = self.find_call(request.call_id)
        if call is None:
            # A call the simulator did not start (a replayed or scripted one): adopt it.
            call = self._new_call(request.call_id, "incoming", None, None)
            call._take_caller()
        call._on_request(request, answer)

    def _refuses(self, request: RecordedRequest) -> tuple[int, str, str] | None:
        """What Graph refuses of a request about a call the simulator plays (see
        :meth:`SimulatedCall._refuses`); nothing when it does not drive calls (a replay)."""
        call = self.find_call(request.call_id) if request.call_id is not None else None
        if not self.drive or call is None:
            return None
        return call._refuses(request)

    def _on_create_call(self, request: RecordedRequest, answer: FakeResponse) -> None:
        created = answer.body if isinstance(answer.body, Mapping) else {}
        body = request.json if isinstance(request.json, Mapping) else {}
        call_id = created.get("id")
        if not isinstance(call_id, str):
            return
        meeting = body.get("meetingInfo") is not None
        # The beta Create call page documents ringing; the v1.0 calls recorded from Teams have none.
        rings = request.version == "beta" and not meeting
        targets = [t for t in body.get("targets", []) if isinstance(t, Mapping)]
        call = self._new_call(call_id, "outgoing", None, None, meeting=meeting)
        call._placed_by = request
        call.group = not meeting and len(targets) > 1
        if targets:
            _, call.remote = call._named_by(targets[0])
        mine = created.get("myParticipantId")
        if isinstance(mine, str) and mine:
            # The id the answer gave, even one a test's own route for createCall made up.
            call.bot_participant_id = mine
        call.delta_roster = _asks_for_delta_roster(body)
        if meeting:
            self._add_attendees(call)
            call._established()
        else:
            for extra in targets[1:]:
                participant_id, participant = call._named_by(extra)
                call.roster[participant_id] = participant
            outcome = self._outgoing_outcomes.pop(0) if self._outgoing_outcomes else "answer"
            result = OUTGOING_OUTCOMES[outcome]
            if result is None:
                call._established(ringing=rings)
            else:
                code, subcode, message = result
                call._enqueue(build.call_state(call_id, "establishing"))
                if rings:
                    call._enqueue(build.call_state(call_id, "ringing"))
                call._end_on_graph()
                call._enqueue(
                    build.call_terminated(call_id, code=code, subcode=subcode, message=message),
                    delay=self.transfer_duration,
                )
        self._outgoing.append(call)
        self._changed()

    # -- plumbing ------------------------------------------------------------------

    def _now(self) -> float:
        """Seconds since the simulator started, on the loop's clock (``Traffic.at``)."""
        now = loop_time()
        return round(now - (now if self._started_at is None else self._started_at), 3)

    def _handler_ran(self, name: str, event: events.Event, outcome: str) -> None:
        summary = f"{name.rsplit('.', 1)[-1]} ran on {type(event).__name__}"
        if outcome != "ok":
            summary += f" ({outcome})"
        if outcome == "error":
            on = f"{name.rsplit('.', 1)[-1]} on {type(event).__name__}"
            self._handlers_raised.append(f"{on} of call {event.call_id}" if event.call_id else on)
        self._record(
            Traffic(kind="handler", at=self._now(), summary=summary, call_id=event.call_id)
        )

    def _record(self, entry: Traffic) -> None:
        self.traffic.append(entry)
        for observer in list(self.observers):
            try:
                observer(entry)
            except Exception:
                log.exception("simulator_observer_failed")
        self._changed()

    def _changed(self) -> None:
        self._signal.set()
        self._signal = asyncio.Event()

    async def _until(
        self, predicate: Callable[[], bool], timeout: float, explain: Callable[[], str]
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._signal.wait()
        except TimeoutError:
            message = explain()
            refused = self.failed_deliveries
            if refused:
                message += "; notifications the bot refused: " + ", ".join(
                    f"{t.summary} -> {t.status or 'no answer'}" for t in refused[:5]
                )
            if self._handlers_raised:
                # What the bot never did is most often what a handler that raised did not reach.
                message += (
                    "; handlers raised: "
                    + ", ".join(self._handlers_raised)
                    + " (the errors are in the handler_failed log lines, or went to the bot's "
                    "on_error handlers)"
                )
            raise SimulatorError(message) from None


def _rosters_in(body: Any) -> list[events.ParticipantsUpdated]:
    """The rosters a body a test posts tells, as the bot reads them."""
    try:
        told = parse_payload(body)
    except MalformedNotification:
        return []  # not a notification the bot could read: it changes nobody
    return [event for event in told if isinstance(event, events.ParticipantsUpdated)]


def _asks_for_delta_roster(body: Mapping[str, Any]) -> bool:
    options = body.get("callOptions")
    return isinstance(options, Mapping) and options.get("isDeltaRosterEnabled") is True


def _retry_after(value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        return min(max(float(value), 0.0), 6.0)
    except ValueError:
        return default


async def _serve_bot(
    bot: CallBot, sim: Simulator, *, keep_alive: bool | None = None
) -> web.AppRunner:
    # Bind first so the bot's public URL (its callbackUri) names the real port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        # A bot written for Graph's beta (playPrompt's loop, ringing) stays on beta.
        beta = on_beta(bot.settings.graph_url)
        bot.configure(**sim.bot_settings(public_url=f"http://127.0.0.1:{port}", beta=beta))
        if keep_alive is not None:  # else as the bot is configured, as with Graph
            bot.configure(keep_alive=keep_alive)
        runner = web.AppRunner(
            # Its on_started hooks run once it serves the simulator (_serving's caller).
            bot._app_for_own_server(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=1.0,
        )
        await runner.setup()
    except BaseException:
        sock.close()
        raise
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    return runner


@asynccontextmanager
async def run_with_simulator(
    bot: CallBot,
    *,
    shutdown_timeout: float = 2.0,
    keep_alive: bool | None = None,
    **options: Any,
) -> AsyncIterator[Simulator]:
    """Start a :class:`Simulator`, point ``bot`` at it, serve the bot on 127.0.0.1.

    ``options`` are :class:`Simulator` keyword arguments. The bot's own
    settings (and credential) are restored when the block ends; the bot is
    given at most ``shutdown_timeout`` seconds to finish its handlers. It keeps its
    calls alive as it is configured to, as with Graph: unless it turned them off, a
    ``keepAlive`` every ``keep_alive_interval`` (15 minutes) for each established call
    (``sim.graph.requests_for("keepAlive")`` lists them), without which the simulator
    ends a call after 45 minutes, as Graph does; ``keep_alive`` true or false turns them
    on or off for the block. Its ``on_started`` hooks run once it serves the simulator, as
    the block begins.
    """
    saved = bot.settings
    options.setdefault("app_id", saved.app_id or DEFAULT_APP_ID)
    # A bot that only accepts its own tenant gets tokens of that tenant.
    allowed = sorted(saved.allowed_tenants)
    options.setdefault("tenant_id", saved.tenant_id or (allowed[0] if allowed else TEST_TENANT_ID))
    sim = Simulator(**options)
    await sim.start()
    try:
        async with _serving(
            bot, sim, shutdown_timeout=shutdown_timeout, keep_alive=keep_alive
        ) as callback_url:
            sim.callback_url = callback_url
            sim._bot = bot
            bot._serving_started()
            try:
                yield sim
            finally:
                sim._bot = None
                await sim.stop_notifying()
    finally:
        await sim.close()


@asynccontextmanager
async def _serving(
    bot: CallBot, sim: Simulator, *, shutdown_timeout: float, keep_alive: bool | None
) -> AsyncIterator[str]:
    """Serve ``bot`` on 127.0.0.1, pointed at ``sim``, which watches its handlers; yields its
    callback URL once it is ready. Its settings (and credential) are restored after."""
    saved = bot.settings
    saved_credential = getattr(bot, "_credential", None)
    runner: web.AppRunner | None = None
    unwatch = bot.watch_handlers(sim._handler_ran)
    try:
        if saved_credential is not None:
            bot.configure(credential=sim.credential())
        bot.configure(shutdown_timeout=min(saved.shutdown_timeout, shutdown_timeout))
        runner = await _serve_bot(bot, sim, keep_alive=keep_alive)
        # A call whose handlers finished is news to those waiting for it to settle (the
        # dispatcher goes with the bot's runtime when it stops).
        bot._running().dispatcher.when_idle(lambda call_key: sim._changed())
        # What the bot's sequencer hands its handlers is what each call went through.
        bot._running().dispatcher.when_delivered(sim._told)
        await bot.authenticator.wait_ready(5.0)
        yield bot.settings.callback_url
    finally:
        if runner is not None:
            await runner.cleanup()
        unwatch()
        with contextlib.suppress(RuntimeError):
            bot.configure(**_fields_of(saved))
            if saved_credential is not None:
                bot.configure(credential=saved_credential)


def _fields_of(settings: Settings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
