"""A local stand-in for Microsoft Graph's calling API and the token endpoint.

:class:`FakeGraph` is a real aiohttp server on 127.0.0.1. It issues app-only
tokens (client secret or certificate assertion, checked when clients are
registered), answers every call action the way Graph documents (status codes,
operation bodies), records every request, and can be told to fail or hang.

Example::

    async with FakeGraph() as graph:
        services = CallServices(graph.settings(app_id=APP_ID))
        offered = graph.add_call(state="established")  # Graph knows the calls it offered
        call = services.call(offered.id)
        op = await call.play_prompt("https://cdn.contoso.com/beep.wav")
        request = await graph.wait_for_request("playPrompt")
        assert request.json["prompts"][0]["mediaInfo"]["uri"].endswith("beep.wav")

It is built to be extended into a call simulator: :meth:`FakeGraph.route`
replaces the answer to an action, :attr:`FakeGraph.checks` refuse a request Graph would
refuse of the call it is about, and :attr:`FakeGraph.listeners` are run
(as tasks) after each answered request, e.g. to post notifications back to a bot.
"""

from __future__ import annotations

import asyncio
import base64
import difflib
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from multidict import CIMultiDict, CIMultiDictProxy

from .._clock import loop_time
from .._config import Settings
from .._errors import CALL_NOT_FOUND
from .._ids import id_key
from ._server import LocalServer
from ._tokens import TEST_TENANT_ID

__all__ = ["FakeGraph", "FakeResponse", "RecordedRequest"]

GRAPH_ROOT = "/v1.0"
BETA_ROOT = "/beta"
AUTHORITY_ROOT = "/authority"
RECORDINGS_ROOT = "/recordings"
RECORDING_RETENTION = 60.0
"""Seconds a call's recordings are still served once the call ended, by default: Graph
discards them "shortly after" (how long it does not say); long enough that a download
racing the caller's hang-up does not fail a test now and then."""
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

_CALL = r"/communications/calls/(?P<call>[^/]+)"
_CALL_ACTIONS = (
    "answer|reject|redirect|transfer|playPrompt|recordResponse|cancelMediaProcessing|"
    "subscribeToTone|sendDtmfTones|mute|unmute|updateRecordingStatus|keepAlive|"
    "changeScreenSharingRole|addLargeGalleryView"
)
_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("POST", r"/communications/calls", "createCall"),
    (
        "POST",
        r"/communications/calls/logTeleconferenceDeviceQuality",
        "logTeleconferenceDeviceQuality",
    ),
    ("GET", _CALL, "getCall"),
    ("DELETE", _CALL, "deleteCall"),
    ("POST", _CALL + rf"/(?:microsoft\.graph\.)?(?P<action>{_CALL_ACTIONS})", ""),
    ("GET", _CALL + r"/participants", "listParticipants"),
    ("POST", _CALL + r"/participants/(?:microsoft\.graph\.)?invite", "invite"),
    ("GET", _CALL + r"/participants/(?P<item>[^/]+)", "getParticipant"),
    ("DELETE", _CALL + r"/participants/(?P<item>[^/]+)", "deleteParticipant"),
    (
        "POST",
        _CALL + r"/participants/(?P<item>[^/]+)/(?:microsoft\.graph\.)?mute",
        "muteParticipant",
    ),
    (
        "POST",
        _CALL + r"/participants/(?P<item>[^/]+)/(?:microsoft\.graph\.)?startHoldMusic",
        "startHoldMusic",
    ),
    (
        "POST",
        _CALL + r"/participants/(?P<item>[^/]+)/(?:microsoft\.graph\.)?stopHoldMusic",
        "stopHoldMusic",
    ),
    ("POST", _CALL + r"/audioRoutingGroups", "createAudioRoutingGroup"),
    ("GET", _CALL + r"/audioRoutingGroups", "listAudioRoutingGroups"),
    ("GET", _CALL + r"/audioRoutingGroups/(?P<item>[^/]+)", "getAudioRoutingGroup"),
    ("PATCH", _CALL + r"/audioRoutingGroups/(?P<item>[^/]+)", "updateAudioRoutingGroup"),
    ("DELETE", _CALL + r"/audioRoutingGroups/(?P<item>[^/]+)", "deleteAudioRoutingGroup"),
    ("GET", _CALL + r"/operations/(?P<item>[^/]+)", "getOperation"),
)

ACTIONS: frozenset[str] = frozenset(
    [
        *_CALL_ACTIONS.split("|"),
        *(action for _, _, action in _ROUTES if action),
        "token",
        "recording",
        "unknown",
    ]
)
"""The name of every request FakeGraph records (:attr:`RecordedRequest.action`)."""


def known_action(action: str) -> str:
    """``action`` when FakeGraph names requests so; any other raises ``ValueError`` (a
    misspelt name matches no request: a test asserting that none was sent would pass)."""
    if action in ACTIONS:
        return action
    by_letters = {name.lower(): name for name in ACTIONS}
    close = by_letters.get(action.replace("_", "").lower())
    close = close or next(iter(difflib.get_close_matches(action, ACTIONS, n=1)), None)
    hint = f": did you mean {close!r}?" if close else ""
    raise ValueError(
        f"FakeGraph records no request {action!r}{hint} (it names them: "
        f"{', '.join(sorted(ACTIONS))})"
    )


# action -> (operation type, response status, initial operation status), as documented
OPERATIONS: dict[str, tuple[str, int, str]] = {
    "playPrompt": ("playPromptOperation", 200, "running"),
    "recordResponse": ("recordOperation", 200, "running"),
    "cancelMediaProcessing": ("cancelMediaProcessingOperation", 200, "completed"),
    "subscribeToTone": ("subscribeToToneOperation", 200, "completed"),
    "sendDtmfTones": ("sendDtmfTonesOperation", 200, "running"),
    "mute": ("muteParticipantOperation", 200, "completed"),
    "unmute": ("unmuteParticipantOperation", 200, "completed"),
    "updateRecordingStatus": ("updateRecordingStatusOperation", 200, "completed"),
    "addLargeGalleryView": ("addLargeGalleryViewOperation", 202, "running"),
    "invite": ("inviteParticipantsOperation", 200, "Running"),
    "muteParticipant": ("muteParticipantOperation", 200, "completed"),
    "startHoldMusic": ("startHoldMusicOperation", 202, "running"),
    "stopHoldMusic": ("stopHoldMusicOperation", 202, "running"),
}

# actions Graph accepts without a body in the answer
ACCEPTED: dict[str, int] = {
    "answer": 202,
    "reject": 202,
    "redirect": 202,
    "transfer": 202,
    "changeScreenSharingRole": 202,
    "keepAlive": 200,
    "logTeleconferenceDeviceQuality": 200,
}

# Requests naming one participant of the call (``participants/{id}...``).
_ABOUT_A_PARTICIPANT = frozenset(
    {"getParticipant", "deleteParticipant", "muteParticipant", "startHoldMusic", "stopHoldMusic"}
)

# Graph's error code for a call it does not have (never created or offered, or ended), as
# live bots have reported it with 404 and "Call not found.".
_CALL_NOT_FOUND = CALL_NOT_FOUND

_ERROR_CODES = {
    400: "BadRequest",
    401: "InvalidAuthenticationToken",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


@dataclass(frozen=True, kw_only=True)
class RecordedRequest:
    """One request FakeGraph received.

    ``path`` is relative to the Graph version root (``/communications/calls/...``)
    for Graph requests, else the URL path. ``action`` names what was asked:
    a call action (``answer``, ``playPrompt``, ``keepAlive``, ...), ``createCall``,
    ``getCall``, ``deleteCall``, ``invite``, ``muteParticipant``, ``startHoldMusic``,
    ``listParticipants``, ``createAudioRoutingGroup``, ..., ``token`` or ``recording``.
    """

    method: str
    path: str
    action: str
    headers: CIMultiDictProxy[str]
    body: bytes
    json: Any = None
    form: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    call_id: str | None = None
    item_id: str | None = None
    """The participant, audio routing group, operation or recording id in the path."""
    at: float = 0.0
    """When FakeGraph received it, on the event loop's clock (``loop.time()``: simulated
    time in a test on looptime)."""
    version: str | None = None
    """The Graph version a Graph request named: ``v1.0`` or ``beta``."""

    @property
    def client_request_id(self) -> str | None:
        """The ``client-request-id`` header the client sent."""
        return self.headers.get("client-request-id")

    @property
    def scenario_id(self) -> str | None:
        """The ``scenario-id`` header the client sent."""
        return self.headers.get("scenario-id")

    @property
    def bearer(self) -> str | None:
        """The bearer token sent, if any."""
        value = self.headers.get("Authorization", "")
        return value[7:] if value.lower().startswith("bearer ") else None


@dataclass(kw_only=True)
class FakeResponse:
    """What FakeGraph answers: a status, a JSON body (or ``None``), extra headers."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    """Bytes to send as is (recordings), instead of ``body``."""


# What _answer gives for a request whose connection is to be closed unanswered.
_DROPPED = FakeResponse(status=502)

Handler = Callable[[RecordedRequest], "FakeResponse | Awaitable[FakeResponse]"]
Listener = Callable[[RecordedRequest, FakeResponse], Coroutine[Any, Any, None]]
Check = Callable[[RecordedRequest], "tuple[int, str, str] | None"]


@dataclass(kw_only=True)
class _Fault:
    match: str
    status: int | None
    headers: dict[str, str]
    body: Any
    remaining: int
    hang: bool = False
    drop: bool = False
    acted: bool = False

    def __post_init__(self) -> None:
        if not self.match.startswith("/"):
            known_action(self.match)  # a path is taken as it is


@dataclass(kw_only=True)
class FakeCall:
    """What FakeGraph knows of one call."""

    id: str
    resource: dict[str, Any]
    participants: dict[str, dict[str, Any]] = field(default_factory=dict)
    audio_routing_groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    ended: bool = False
    ended_at: float | None = None
    """When the call ended, on the event loop's clock (its recordings go some time after)."""
    callback_uri: str | None = None
    """The ``callbackUri`` the bot gave for the call (placing, answering, rejecting or
    redirecting it), or the ``Location`` a bot's ``302 Found`` moved the call to: where
    Graph posts the call's notifications. A notification's own
    copy of the resource does not set it (a replay must not post to a recorded URL)."""

    def end(self) -> None:
        """The call is over: Graph answers 404 about it from now on."""
        if not self.ended:
            self.ended, self.ended_at = True, loop_time()
        self.resource["state"] = "terminated"


def _callback_uri(request: RecordedRequest) -> str | None:
    """The ``callbackUri`` a request from the bot gives, if any."""
    uri = request.json.get("callbackUri") if isinstance(request.json, Mapping) else None
    return uri if isinstance(uri, str) and uri else None


class FakeGraph(LocalServer):
    """Plays Microsoft Graph (calls) and the Microsoft identity platform token endpoint.

    ``tenant_id`` is the tenant tokens are issued for; ``token_lifetime`` the
    seconds an issued token lives. The API is served under ``v1.0``
    (:attr:`graph_url`) and ``beta`` (:attr:`beta_url`) alike. Graph endpoints
    answer 401 unless they get a bearer token FakeGraph issued and still considers
    valid. A call is known once created (``POST /communications/calls``) or
    offered (:meth:`add_call`); every request about a call it does not know, or
    about one that ended (``DELETE``, :meth:`end_call`), answers 404 with Graph's
    error body (code ``8522``, ``Call not found.``).
    """

    def __init__(
        self,
        *,
        tenant_id: str = TEST_TENANT_ID,
        token_lifetime: int = 3599,
        host: str = "127.0.0.1",
    ) -> None:
        self.tenant_id = tenant_id
        self.token_lifetime = token_lifetime
        super().__init__(host=host)
        self.requests: list[RecordedRequest] = []
        """Every request received, in order (token requests included)."""
        self.answers: list[tuple[RecordedRequest, FakeResponse]] = []
        """Every request answered, with its answer, in the order answered."""
        self.calls: dict[str, FakeCall] = {}
        """Known calls, by :func:`callbot._ids.id_key` of their id."""
        self.operations: dict[str, dict[str, Any]] = {}
        """Every operation started, by id (as Graph answered it)."""
        self.operation_calls: dict[str, str] = {}
        """The call id of every operation started, by operation id."""
        self.tokens: dict[str, float] = {}
        """Issued access tokens and when they expire (epoch seconds)."""
        self.token_clients: dict[str, str] = {}
        """The application (client) id each issued token was issued to."""
        self.application_names: dict[str, str] = {}
        """Each application's registered name, by client id: Graph names the application
        that placed a call by it (the call's ``source``)."""
        self.operation_status: dict[str, str] = {k: v[2] for k, v in OPERATIONS.items()}
        """The status an action's operation starts in (change it to simulate Graph)."""
        self.listeners: list[Listener] = []
        """Coroutines run as tasks after each answered request (for simulators)."""
        self.checks: list[Check] = []
        """Run on each request about a call Graph has, before it is carried out: one that
        returns ``(status, code, message)`` refuses it with Graph's error body (for
        simulators, which know what kind of call it is)."""
        self.require_auth = True
        self._secrets: dict[str, str] = {}
        self._certificates: dict[str, x509.Certificate] = {}
        self._recordings: dict[str, tuple[bytes, str, str | None]] = {}
        self.recording_retention: float | None = RECORDING_RETENTION
        """Seconds a call's recordings are still served once the call ended (``None``: kept).
        Graph discards them "shortly after the call ends"; by default, as the call ends."""
        self._handlers: dict[str, Handler] = {}
        self._faults: list[_Fault] = []
        self._waited: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._release = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._routes = [
            (method, re.compile(pattern + r"/?$", re.IGNORECASE), action)
            for method, pattern, action in _ROUTES
        ]

    # -- lifecycle ----------------------------------------------------------------

    def create_app(self) -> web.Application:
        """The aiohttp application (every path goes through one dispatcher)."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    async def start(self, host: str | None = None, port: int = 0) -> None:
        """Serve on ``host`` and ``port`` (0, the default, picks a free port)."""
        await super().start(host, port)
        self._release.clear()

    async def _before_close(self) -> None:
        # Release hung requests and finish listener tasks before the server stops.
        self._release.set()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def graph_url(self) -> str:
        """The Graph base URL to configure (``settings.graph_url``)."""
        return self.base_url + GRAPH_ROOT

    @property
    def beta_url(self) -> str:
        """The base URL of Graph's beta, for a bot that uses it (the same API is served)."""
        return self.base_url + BETA_ROOT

    @property
    def authority_url(self) -> str:
        """The token authority to configure (``settings.authority_url``)."""
        return self.base_url + AUTHORITY_ROOT

    @property
    def token_url(self) -> str:
        """The token endpoint of :attr:`tenant_id`."""
        return f"{self.authority_url}/{self.tenant_id}/oauth2/v2.0/token"

    def settings(
        self, *, app_id: str = "6c4a7c4e-2b1a-4d7e-9a53-7a1bfb4c0d11", **overrides: Any
    ) -> Settings:
        """Settings pointing a bot at this server (a client secret unless overridden)."""
        values: dict[str, Any] = {
            "app_id": app_id,
            "tenant_id": self.tenant_id,
            "app_secret": "fake-graph-secret",
            "graph_url": self.graph_url,
            "authority_url": self.authority_url,
            "public_url": "https://bot.example.test",
            "keep_alive": False,
        }
        values.update(overrides)
        return Settings(**values)

    # -- configuration ------------------------------------------------------------

    def register_client(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        certificate: x509.Certificate | bytes | None = None,
    ) -> None:
        """Accept tokens only for registered clients, with this secret or certificate.

        ``certificate`` is an ``x509.Certificate`` or PEM bytes; client assertions
        must be signed by its key and name its thumbprint.
        """
        if secret is not None:
            self._secrets[client_id] = secret
        if certificate is not None:
            if isinstance(certificate, bytes):
                certificate = x509.load_pem_x509_certificate(certificate)
            self._certificates[client_id] = certificate

    def route(self, action: str, handler: Handler) -> None:
        """Answer ``action`` with ``handler(request) -> FakeResponse`` instead of the default."""
        self._handlers[known_action(action)] = handler

    def fail_next(
        self,
        action_or_path: str,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
        times: int = 1,
        acted: bool = False,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` (a Graph error body).

        Match by action name, or by path (starting with ``/``, relative to the Graph root).
        ``acted``: Graph carries each out first, as a 504 from a gateway that stopped
        waiting for it can hide.
        """
        self._faults.append(
            _Fault(
                match=action_or_path,
                status=status,
                headers=dict(headers or {}),
                body=body,
                remaining=times,
                acted=acted,
            )
        )

    def hang_next(self, action_or_path: str, *, times: int = 1) -> None:
        """Never answer the next ``times`` matching requests (until :meth:`close`)."""
        self._faults.append(
            _Fault(
                match=action_or_path, status=None, headers={}, body=None, remaining=times, hang=True
            )
        )

    def drop_next(self, action_or_path: str, *, times: int = 1, acted: bool = False) -> None:
        """Close the connection of the next ``times`` matching requests once they are
        recorded, answering nothing: the client cannot tell whether Graph acted on them.
        ``acted``: Graph carries each out first (a call hung up, a prompt played), and
        only its answer is lost.

        Unlike :meth:`hang_next`, this does not depend on the client's timeout."""
        self._faults.append(
            _Fault(
                match=action_or_path,
                status=None,
                headers={},
                body=None,
                remaining=times,
                drop=True,
                acted=acted,
            )
        )

    def clear_faults(self) -> None:
        """Forget the failures and hangs not yet used."""
        self._faults.clear()

    def revoke_tokens(self) -> None:
        """Make every issued token invalid (Graph then answers 401)."""
        self.tokens.clear()

    def add_call(self, call_id: str | None = None, **resource: Any) -> FakeCall:
        """Know a call (an incoming call, say) with these resource properties."""
        call_id = call_id or str(uuid.uuid4())
        body = {"@odata.type": "#microsoft.graph.call", "id": call_id, "state": "incoming"}
        body.update(resource)
        call = FakeCall(id=call_id, resource=body)
        self.calls[id_key(call_id)] = call
        return call

    def end_call(self, call_id: str) -> None:
        """The call (a known one) is gone: later requests about it answer 404."""
        self._call(call_id).end()

    def add_participant(self, call_id: str, participant: Mapping[str, Any]) -> dict[str, Any]:
        """Add a participant (a ``participant`` resource) to a known call's roster."""
        item = {"@odata.type": "#microsoft.graph.participant", "id": str(uuid.uuid4())}
        item.update(participant)
        self._call(call_id).participants[str(item["id"])] = item
        return item

    def add_recording(
        self, data: bytes, *, access_token: str | None = None, call_id: str | None = None
    ) -> tuple[str, str]:
        """Serve ``data`` as a recording; returns its location and its access token.

        A recording of a call (``call_id``) is gone :attr:`recording_retention` seconds after
        the call ends, as Graph discards recordings shortly after their call ends."""
        recording_id = str(uuid.uuid4())
        token = access_token or base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()
        self._recordings[recording_id] = (data, token, call_id)
        return f"{self.base_url}{RECORDINGS_ROOT}/{recording_id}", token

    # -- inspection ---------------------------------------------------------------

    def requests_for(self, action: str) -> list[RecordedRequest]:
        """The recorded requests for one action, in order."""
        action = known_action(action)
        return [r for r in self.requests if r.action == action]

    def answer_to(self, request: RecordedRequest) -> FakeResponse:
        """What FakeGraph answered to ``request``."""
        for recorded, answer in self.answers:
            if recorded is request:
                return answer
        raise LookupError("that request has not been answered")

    @property
    def token_requests(self) -> list[RecordedRequest]:
        """The recorded token requests."""
        return self.requests_for("token")

    async def wait_for_request(self, action: str, timeout: float = 5.0) -> RecordedRequest:
        """The next request for ``action`` not returned by an earlier wait (waits for it)."""
        async with asyncio.timeout(timeout):
            while True:
                seen = self.requests_for(action)
                index = self._waited.get(action, 0)
                if len(seen) > index:
                    self._waited[action] = index + 1
                    return seen[index]
                changed = self._changed
                await changed.wait()

    def operation_notification(
        self,
        operation_id: str,
        *,
        status: str = "completed",
        result_info: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """The ``commsNotifications`` body Graph posts when an operation ends."""
        operation = dict(self.operations[operation_id])
        call_id = self.operation_calls[operation_id]
        operation.update(fields)
        operation["status"] = status
        if result_info is None:
            result_info = (
                {"code": 200, "subcode": 0, "message": "Action completed successfully."}
                if status == "completed"
                else {"code": 500, "subcode": 0, "message": "Action failed."}
            )
        operation["resultInfo"] = {"@odata.type": "#microsoft.graph.resultInfo", **result_info}
        path = f"/communications/calls/{call_id}/operations/{operation_id}"
        return {
            "@odata.type": "#microsoft.graph.commsNotifications",
            "value": [
                {
                    "@odata.type": "#microsoft.graph.commsNotification",
                    "changeType": "deleted",
                    "resourceUrl": path,
                    # No @odata.id: a live Teams outcome has none (recorded sb05).
                    "resourceData": operation,
                }
            ],
        }

    # -- serving ------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        path = request.path
        graph_path: str | None = None
        version: str | None = None
        for root in (GRAPH_ROOT, BETA_ROOT):
            if path.startswith(root + "/"):
                graph_path, version = path[len(root) :], root[1:]
        action, call_id, item_id = self._classify(request.method, path, graph_path)
        body: Any = None
        form: dict[str, str] = {}
        if action == "token":
            form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        elif raw.strip():
            try:
                body = await request.json()
            except ValueError:
                body = None
        recorded = RecordedRequest(
            method=request.method,
            path=graph_path if graph_path is not None else path,
            action=action,
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=raw,
            json=body,
            form=form,
            query=dict(request.query),
            call_id=call_id,
            item_id=item_id,
            at=loop_time(),
            version=version,
        )
        self.requests.append(recorded)
        self._changed.set()
        self._changed = asyncio.Event()
        answer = await self._answer(recorded)
        if answer is _DROPPED:
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=answer.status)  # never written: the connection is gone
        self.answers.append((recorded, answer))
        self._tell_listeners(recorded, answer)
        return self._to_web(recorded, answer)

    def _tell_listeners(self, request: RecordedRequest, answer: FakeResponse) -> None:
        for listener in self.listeners:
            task = asyncio.get_running_loop().create_task(listener(request, answer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _classify(
        self, method: str, path: str, graph_path: str | None
    ) -> tuple[str, str | None, str | None]:
        if path.startswith(AUTHORITY_ROOT + "/") and path.endswith("/oauth2/v2.0/token"):
            return "token", None, None
        if path.startswith(RECORDINGS_ROOT + "/"):
            return "recording", None, path[len(RECORDINGS_ROOT) + 1 :]
        if graph_path is None:
            return "unknown", None, None
        for route_method, pattern, action in self._routes:
            if route_method != method:
                continue
            match = pattern.match(graph_path)
            if match is None:
                continue
            groups = match.groupdict()
            return action or groups["action"], groups.get("call"), groups.get("item")
        return "unknown", None, None

    async def _answer(self, request: RecordedRequest) -> FakeResponse:
        fault = self._take_fault(request)
        if fault is not None:
            if fault.acted:
                # Carried out, so what follows from it follows (a simulated call's news).
                self._tell_listeners(request, await self._serve(request))
            if fault.drop:
                return _DROPPED
            if fault.hang:
                await self._release.wait()
                return self._error(request, 503, "ServiceUnavailable", "released on close")
            assert fault.status is not None
            if fault.body is not None:
                return FakeResponse(status=fault.status, body=fault.body, headers=fault.headers)
            answer = self._error(
                request, fault.status, _ERROR_CODES.get(fault.status, "Error"), "injected failure"
            )
            answer.headers.update(fault.headers)
            return answer
        return await self._serve(request)

    async def _serve(self, request: RecordedRequest) -> FakeResponse:
        """What Graph does with a request no fault is injected into, and answers."""
        if request.action == "token":
            return self._on_token(request)
        if request.action == "recording":
            return self._on_recording(request)
        if request.action == "unknown":
            return self._error(request, 404, "UnknownAction", f"no such endpoint: {request.path}")
        if self.require_auth:
            expiry = self.tokens.get(request.bearer or "")
            if expiry is None or expiry < time.time():
                return self._error(
                    request,
                    401,
                    "InvalidAuthenticationToken",
                    "Access token is missing or invalid.",
                )
        if request.call_id is not None and request.action != "logTeleconferenceDeviceQuality":
            known = self.calls.get(id_key(request.call_id))
            if known is None or known.ended:
                # Graph has no call it never created or offered, and forgets one that ended.
                return self._error(request, 404, _CALL_NOT_FOUND, "Call not found.")
            if request.action in _ABOUT_A_PARTICIPANT and (
                _find(known.participants, request.item_id) is None
            ):
                # Graph acts only on someone in the call: its roster, or one added by a test.
                return self._error(request, 404, "NotFound", "Participant not found.")
            for check in self.checks:
                refusal = check(request)
                if refusal is not None:
                    return self._error(request, *refusal)
        handler = self._handlers.get(request.action)
        if handler is not None:
            result = handler(request)
            answer = await result if isinstance(result, Awaitable) else result
            if request.action == "createCall":
                self._created(answer, _callback_uri(request))
            return answer
        return self._default(request)

    def _created(self, answer: FakeResponse, callback_uri: str | None) -> None:
        """A call a routed ``createCall`` answered it made is Graph's from then on."""
        body = answer.body
        if 200 <= answer.status < 300 and isinstance(body, Mapping):
            call_id = body.get("id")
            if isinstance(call_id, str) and id_key(call_id) not in self.calls:
                self.add_call(call_id, **body).callback_uri = callback_uri

    def _take_fault(self, request: RecordedRequest) -> _Fault | None:
        for fault in self._faults:
            if fault.match.startswith("/"):
                hit = fault.match.lower() == request.path.lower()
            else:
                hit = fault.match == request.action
            if hit:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _to_web(self, request: RecordedRequest, answer: FakeResponse) -> web.StreamResponse:
        headers = answer.headers
        if request.action not in ("token", "recording"):
            headers.setdefault("request-id", str(uuid.uuid4()))
            if request.client_request_id:
                headers.setdefault("client-request-id", request.client_request_id)
        if answer.raw is not None:
            return web.Response(status=answer.status, body=answer.raw, headers=headers)
        if answer.body is None:
            return web.Response(status=answer.status, headers=headers)
        return web.json_response(answer.body, status=answer.status, headers=headers)

    def _error(
        self, request: RecordedRequest, status: int, code: str, message: str
    ) -> FakeResponse:
        return FakeResponse(
            status=status,
            body={
                "error": {
                    "code": code,
                    "message": message,
                    "innerError": {
                        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                        "request-id": str(uuid.uuid4()),
                        "client-request-id": request.client_request_id,
                    },
                }
            },
        )

    def _call(self, call_id: str) -> FakeCall:
        call = self.calls.get(id_key(call_id))
        if call is None:
            raise LookupError(f"FakeGraph knows no call {call_id}: add_call() it first")
        return call

    # -- default answers ------------------------------------------------------------

    def _default(self, request: RecordedRequest) -> FakeResponse:
        action = request.action
        if action == "createCall":
            return self._on_create_call(request)
        if action in OPERATIONS:
            return self._on_operation(request)
        assert request.call_id is not None or action == "logTeleconferenceDeviceQuality"
        if action in ACCEPTED:
            if request.call_id is not None:
                self._apply(request)
            return FakeResponse(status=ACCEPTED[action])
        call = self._call(request.call_id or "")
        if action == "getCall":
            return FakeResponse(status=200, body=call.resource)
        if action == "deleteCall":
            call.end()
            return FakeResponse(status=204)
        if action == "listParticipants":
            return FakeResponse(status=200, body={"value": list(call.participants.values())})
        if action in ("getParticipant", "deleteParticipant"):
            found = _find(call.participants, request.item_id)
            assert found is not None  # answered 404 before any route otherwise
            if action == "deleteParticipant":
                del call.participants[found]
                return FakeResponse(status=204)
            return FakeResponse(status=200, body=call.participants[found])
        return self._audio_routing(request, call)

    def _apply(self, request: RecordedRequest) -> None:
        call = self._call(request.call_id or "")
        if request.action == "answer":
            call.resource["state"] = "establishing"
        if request.action in ("answer", "reject", "redirect"):
            # Graph posts the call's later notifications there; without one, where it did.
            uri = _callback_uri(request)
            if uri is not None:
                call.resource["callbackUri"] = call.callback_uri = uri

    def _on_create_call(self, request: RecordedRequest) -> FakeResponse:
        body = dict(request.json) if isinstance(request.json, Mapping) else {}
        call_id = str(uuid.uuid4())
        resource = {
            **body,
            "@odata.type": "#microsoft.graph.call",
            "id": call_id,
            "state": "establishing",
            "direction": "outgoing",
            "callChainId": str(uuid.uuid4()),
            "myParticipantId": str(uuid.uuid4()),
        }
        resource.setdefault("targets", [])
        app_id = self.token_clients.get(request.bearer or "")
        if "source" not in body and app_id is not None:
            # Graph's answer names the application that placed it when the request named no one.
            resource["source"] = _application_source(app_id, self.application_names.get(app_id))
        self.calls[id_key(call_id)] = FakeCall(
            id=call_id, resource=resource, callback_uri=_callback_uri(request)
        )
        return FakeResponse(
            status=201,
            body=resource,
            headers={"Location": f"{self._root_of(request)}/communications/calls/{call_id}"},
        )

    def _on_operation(self, request: RecordedRequest) -> FakeResponse:
        call = self._call(request.call_id or "")
        odata_type, status_code, _ = OPERATIONS[request.action]
        payload = request.json if isinstance(request.json, Mapping) else {}
        operation_id = str(uuid.uuid4())
        operation: dict[str, Any] = {
            "@odata.type": f"#microsoft.graph.{odata_type}",
            "id": operation_id,
            "status": self.operation_status[request.action],
            "clientContext": payload.get("clientContext"),
            "resultInfo": None,
        }
        if request.action == "recordResponse":
            operation["recordingLocation"] = None
        if request.action == "invite":
            operation["participants"] = payload.get("participants", [])
        self.operations[operation_id] = dict(operation)
        self.operation_calls[operation_id] = call.id
        headers: dict[str, str] = {}
        # Graph names the operation in a Location, but an invitation's only in its body.
        if request.action != "invite":
            headers["Location"] = (
                f"{self._root_of(request)}/communications/calls/{call.id}/operations/{operation_id}"
            )
        return FakeResponse(status=status_code, body=operation, headers=headers)

    def _root_of(self, request: RecordedRequest) -> str:
        """The version root the request named: Graph answers in the version it was asked."""
        return self.beta_url if request.version == "beta" else self.graph_url

    def _audio_routing(self, request: RecordedRequest, call: FakeCall) -> FakeResponse:
        groups = call.audio_routing_groups
        action = request.action
        payload = dict(request.json) if isinstance(request.json, Mapping) else {}
        if action == "createAudioRoutingGroup":
            created = {"id": str(uuid.uuid4()), **payload}
            groups[str(created["id"])] = created
            return FakeResponse(status=200, body=created)
        if action == "listAudioRoutingGroups":
            return FakeResponse(status=200, body={"value": list(groups.values())})
        if action == "getOperation":
            operation_id = _find(self.operations, request.item_id)
            if operation_id is None:
                return self._error(request, 404, "NotFound", "Operation not found.")
            return FakeResponse(status=200, body=self.operations[operation_id])
        group_id = _find(groups, request.item_id)
        group = groups[group_id] if group_id is not None else None
        if group is None:
            return self._error(request, 404, "NotFound", "Audio routing group not found.")
        if action == "updateAudioRoutingGroup":
            group.update(payload)
            return FakeResponse(status=200, body=group)
        if action == "deleteAudioRoutingGroup":
            del groups[str(group["id"])]
            return FakeResponse(status=204)
        return FakeResponse(status=200, body=group)

    def _on_recording(self, request: RecordedRequest) -> FakeResponse:
        recording_id = request.item_id or ""
        stored = self._recordings.get(recording_id)
        if stored is not None and self._discarded(stored[2]):
            del self._recordings[recording_id]
            stored = None
        if stored is None:
            return FakeResponse(status=404)
        data, token, _ = stored
        if request.bearer != token:
            return FakeResponse(status=401)
        return FakeResponse(status=200, raw=data, headers={"Content-Type": "audio/wav"})

    def _discarded(self, call_id: str | None) -> bool:
        """Whether a recording of ``call_id`` is gone: its call ended long enough ago."""
        call = self.calls.get(id_key(call_id)) if call_id is not None else None
        if call is None or call.ended_at is None or self.recording_retention is None:
            return False
        return loop_time() >= call.ended_at + self.recording_retention

    # -- token endpoint -------------------------------------------------------------

    def _on_token(self, request: RecordedRequest) -> FakeResponse:
        form = request.form
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "AADSTS70003: grant_type")
        if not form.get("scope", "").endswith("/.default"):
            return _oauth_error(400, "invalid_scope", "AADSTS1002012: scope must be .default")
        client_id = form.get("client_id", "")
        problem = self._check_client(request, client_id)
        if problem is not None:
            return problem
        token = "fake-graph-" + base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.tokens[token] = time.time() + self.token_lifetime
        if client_id:
            self.token_clients[token] = client_id
        return FakeResponse(
            status=200,
            body={
                "token_type": "Bearer",
                "expires_in": self.token_lifetime,
                "ext_expires_in": self.token_lifetime,
                "access_token": token,
            },
        )

    def _check_client(self, request: RecordedRequest, client_id: str) -> FakeResponse | None:
        form = request.form
        if not self._secrets and not self._certificates:
            return None
        assertion = form.get("client_assertion")
        if assertion is not None:
            certificate = self._certificates.get(client_id)
            if certificate is None:
                return _oauth_error(401, "invalid_client", "AADSTS700027: no certificate")
            if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
                return _oauth_error(400, "invalid_request", "AADSTS50027: assertion type")
            reason = _verify_assertion(
                assertion, certificate, client_id, self._token_url_of(request)
            )
            if reason is not None:
                return _oauth_error(401, "invalid_client", f"AADSTS700027: {reason}")
            return None
        secret = self._secrets.get(client_id)
        if secret is None or form.get("client_secret") != secret:
            return _oauth_error(401, "invalid_client", "AADSTS7000215: Invalid client secret.")
        return None

    def _token_url_of(self, request: RecordedRequest) -> str:
        return self.base_url + request.path


def _find(items: Mapping[str, Any], item_id: str | None) -> str | None:
    """The key of ``items`` naming ``item_id`` in any of its forms (case, dashes): Graph
    takes an id as callbot compares ids."""
    key = id_key(item_id or "")
    return next((found for found in items if id_key(found) == key), None)


def _application_source(app_id: str, name: str | None) -> dict[str, Any]:
    """The ``source`` Graph gives a call an application placed naming no one (its Create call
    answer: the ``application`` by its id and registered name)."""
    application: dict[str, Any] = {"@odata.type": "#microsoft.graph.identity", "id": app_id}
    if name:
        application["displayName"] = name
    return {
        "@odata.type": "#microsoft.graph.participantInfo",
        "identity": {"@odata.type": "#microsoft.graph.identitySet", "application": application},
    }


def _oauth_error(status: int, error: str, description: str) -> FakeResponse:
    return FakeResponse(
        status=status,
        body={"error": error, "error_description": description, "error_codes": []},
    )


def _thumbprint(certificate: x509.Certificate, algorithm: hashes.HashAlgorithm) -> str:
    digest = certificate.fingerprint(algorithm)
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _verify_assertion(
    assertion: str, certificate: x509.Certificate, client_id: str, token_url: str
) -> str | None:
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError as exc:
        return f"malformed assertion: {exc}"
    sha256 = header.get("x5t#S256")
    sha1 = header.get("x5t")
    if sha256 is not None:
        if sha256 != _thumbprint(certificate, hashes.SHA256()):
            return "x5t#S256 names another certificate"
    elif sha1 is not None:
        if sha1 != _thumbprint(certificate, hashes.SHA1()):
            return "x5t names another certificate"
    else:
        return "no x5t#S256 or x5t header"
    key = certificate.public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        claims = jwt.decode(
            assertion,
            pem,
            algorithms=["PS256", "RS256", "ES256"],
            audience=token_url,
            options={"require": ["exp", "nbf", "iss", "sub", "aud", "jti"]},
        )
    except jwt.PyJWTError as exc:
        return f"assertion rejected: {exc}"
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        return "iss and sub must be the client id"
    return None
