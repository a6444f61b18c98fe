"""A callback receiver as a bot author would write it without callbot.

aiohttp for the endpoint, PyJWT's ``PyJWKClient`` for the signing keys,
pydantic models for the body: the token is verified (signature, audience,
issuer, expiry), the body is validated, each notification is handed to a
handler task and the request answered 202. It is reasonable code, not a
straw man; what it lacks (no per-call order, no duplicate drops, blocking key
fetches on the loop) is what such code usually lacks.

By default every request's token is verified. With ``cache_tokens`` it does
what a careful author does, since Graph reuses one token for many requests:
a token verified once is remembered until its expiry, and a request bearing
it skips the signature check.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ISSUERS = ["https://api.botframework.com", "https://graph.microsoft.com"]
# Remembered tokens at most; Graph uses a handful at a time, so clearing is enough of a policy.
TOKEN_CACHE_SIZE = 1024


class Identity(BaseModel):
    """A user, application or phone identity."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    id: str | None = None
    display_name: str | None = Field(None, alias="displayName")


class IdentitySet(BaseModel):
    """Who a participant is."""

    model_config = ConfigDict(extra="allow")
    user: Identity | None = None
    application: Identity | None = None
    phone: Identity | None = None


class ParticipantInfo(BaseModel):
    """A call's source or target."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    identity: IdentitySet | None = None
    region: str | None = None
    language_id: str | None = Field(None, alias="languageId")


class CallResource(BaseModel):
    """The call a notification is about."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    odata_type: str | None = Field(None, alias="@odata.type")
    state: str | None = None
    direction: str | None = None
    source: ParticipantInfo | None = None
    targets: list[ParticipantInfo] = Field(default_factory=list)
    requested_modalities: list[str] = Field(default_factory=list, alias="requestedModalities")


class Notification(BaseModel):
    """One item of the batch."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    change_type: str = Field(alias="changeType")
    resource_url: str = Field(alias="resourceUrl")
    resource_data: CallResource | list[Any] | None = Field(None, alias="resourceData")

    @property
    def call_id(self) -> str:
        return self.resource_url.split("/")[3]


class NotificationBatch(BaseModel):
    """What Graph posts."""

    value: list[Notification]


class HandwrittenReceiver:
    """The endpoint, with a counter of handled notifications for the benchmark."""

    def __init__(self, *, app_id: str, jwks_url: str, cache_tokens: bool = False) -> None:
        self.app_id = app_id
        self.jwks = jwt.PyJWKClient(jwks_url)
        self.cache_tokens = cache_tokens
        self._verified: dict[str, float] = {}  # token -> its expiry (epoch seconds)
        self.handled = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def on_notification(self, call_id: str, notification: Notification) -> None:
        """The bot's logic would go here."""
        self.handled += 1

    async def callback(self, request: web.Request) -> web.Response:
        """Verify, validate, hand off, answer."""
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return web.json_response({"error": "missing token"}, status=401)
        token = header[len("Bearer ") :]
        if self._verified.get(token, 0.0) <= time.time():
            try:
                self._verify(token)
            except jwt.PyJWTError as exc:
                return web.json_response({"error": str(exc)}, status=401)
        try:
            batch = NotificationBatch.model_validate_json(await request.read())
        except ValidationError:
            return web.json_response({"error": "bad body"}, status=400)
        for notification in batch.value:
            task = asyncio.create_task(self.on_notification(notification.call_id, notification))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return web.Response(status=202)

    def _verify(self, token: str) -> None:
        """Check the token's signature and claims; remember it when caching."""
        signing_key = self.jwks.get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token,
            signing_key.key,
            algorithms=["RS256"],
            audience=self.app_id,
            issuer=ISSUERS,
        )
        if self.cache_tokens:
            if len(self._verified) >= TOKEN_CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = float(claims["exp"])

    def create_app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application()
        app.router.add_post("/api/calls", self.callback)
        return app
