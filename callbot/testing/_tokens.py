"""A local stand-in for the calling platform's token issuer.

:class:`TokenAuthority` serves an OpenID configuration and a JWKS document on
127.0.0.1 and mints callback tokens signed with the key it publishes, so a bot's
:class:`~callbot._auth.Authenticator` (or a whole bot under the simulator) can
be exercised against real HTTP and real signatures without Microsoft's
endpoints. It can also mint every kind of bad token and simulate a key endpoint
that is down or slow.

Example::

    async with TokenAuthority() as authority:
        auth = Authenticator(app_id=APP_ID, openid_config_url=authority.openid_config_url)
        await auth.start()
        token = authority.mint(audience=APP_ID)
        await auth.verify(f"Bearer {token}")
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from ._server import LocalServer

__all__ = ["TEST_TENANT_ID", "TokenAuthority"]

TEST_TENANT_ID = "4f6c6a2e-3b1d-4e8a-9c57-2d0b8e1f7a63"
"""The tenant id :meth:`TokenAuthority.mint` puts in ``tid`` unless told otherwise."""

OPENID_CONFIG_PATH = "/v1/.well-known/OpenIdConfiguration"
JWKS_PATH = "/v1/keys"


def _new_key() -> tuple[str, rsa.RSAPrivateKey]:
    return secrets.token_urlsafe(16), rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _read_own_key(path: Path) -> rsa.RSAPrivateKey | None:
    """The key in ``path`` if this user wrote it: anything someone else could have placed or
    read (another owner, group or world bits, a symbolic link, a pipe) is not trusted."""
    # Not blocking: a pipe placed there would hold the open for as long as it liked.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return None
    with os.fdopen(descriptor, "rb") as kept:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            return None
        # Where there are owners (not Windows, whose temporary directory is per user).
        if hasattr(os, "getuid") and (status.st_uid != os.getuid() or status.st_mode & 0o077):
            return None
        try:
            loaded = serialization.load_pem_private_key(kept.read(), password=None)
        except (OSError, ValueError):
            return None
    return loaded if isinstance(loaded, rsa.RSAPrivateKey) else None


def _kept_key(path: Path) -> tuple[str, rsa.RSAPrivateKey]:
    """The key kept in ``path`` (made and written there, readable by its owner only, when
    there is none), with a ``kid`` drawn from its public half: the same key, the same kid."""
    key = _read_own_key(path)
    if key is None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        partial: str | None = None
        try:
            # A new file of a name no one can foresee (0600), renamed into place whole: a
            # run starting meanwhile never reads half a key.
            descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(descriptor, "wb") as out:
                out.write(pem)
            os.replace(partial, path)
        except OSError:
            # Not writable here (another user's file, say): this run's key is its own.
            if partial is not None:
                Path(partial).unlink(missing_ok=True)
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kid = base64.urlsafe_b64encode(hashlib.sha256(public).digest()[:16]).rstrip(b"=").decode()
    return kid, key


class TokenAuthority(LocalServer):
    """Plays the calling platform's token issuer on 127.0.0.1.

    It serves an OpenID configuration and a JWKS document, and mints callback
    tokens.

    ``issuer`` is the ``iss`` of minted tokens and the ``issuer`` of the served
    OpenID configuration. A fresh RSA 2048 key with a random ``kid`` is the
    signing key from the start; with ``key_file``, the key kept in that file (made
    and written there the first time), so that a bot that fetched it once trusts
    every later authority started with the same file.

    Endpoints (see :meth:`create_app`):

    * ``GET /v1/.well-known/OpenIdConfiguration`` - ``issuer``, ``jwks_uri``, ...
    * ``GET /v1/keys`` - the published public keys, ``{"keys": [...]}``

    Fault injection: set :attr:`available` to ``False`` to make both endpoints
    answer 503, or :attr:`delay` to a number of seconds to wait before
    answering. :attr:`jwks_fetches` counts requests for the keys document.

    Use it with ``await start()`` / ``await close()`` or as an async context
    manager.
    """

    available: bool
    """When ``False`` both endpoints answer 503 Service Unavailable."""
    delay: float
    """Seconds each endpoint waits before answering (0 for none)."""
    jwks_fetches: int
    """How many times the keys document was requested (including 503 answers)."""

    def __init__(
        self, *, issuer: str = "https://api.botframework.com", key_file: Path | None = None
    ) -> None:
        super().__init__()
        self.issuer = issuer
        self.available = True
        self.delay = 0.0
        self.jwks_fetches = 0
        kid, key = _new_key() if key_file is None else _kept_key(key_file)
        self._kid = kid
        self._keys: dict[str, rsa.RSAPrivateKey] = {kid: key}

    # -- keys ------------------------------------------------------------

    @property
    def kid(self) -> str:
        """The ``kid`` of the current signing key."""
        return self._kid

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        """The current signing key."""
        return self._keys[self._kid]

    def rotate_key(self, *, keep_old: bool = True, kid: str | None = None) -> str:
        """Make a new key the signing key and publish it; return its ``kid``.

        With ``keep_old=False`` the previous keys are withdrawn from the JWKS
        document, so tokens they signed stop verifying once a verifier refreshes.
        ``kid`` publishes the new key under that kid, in place of the key published
        under it (the current one's: a key replaced under its kid).
        """
        new_kid, key = _new_key()
        kid = new_kid if kid is None else kid
        if not keep_old:
            self._keys.clear()
        self._keys[kid] = key
        self._kid = kid
        return kid

    def jwks(self) -> dict[str, Any]:
        """The JWKS document served at ``/v1/keys``: public keys only."""
        keys = []
        for kid, key in self._keys.items():
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
            keys.append(jwk)
        return {"keys": keys}

    # -- tokens ----------------------------------------------------------

    def mint(
        self,
        *,
        audience: str,
        tenant_id: str | None = TEST_TENANT_ID,
        issuer: str | None = None,
        expires_in: float | None = 300,
        not_before: float | None = None,
        issued_at: float | None = None,
        kid: str | None = None,
        algorithm: str = "RS256",
        extra_claims: Mapping[str, Any] | None = None,
        extra_headers: Mapping[str, Any] | None = None,
        signing_key: Any = None,
    ) -> str:
        """Mint a callback token signed with the current key.

        ``audience`` becomes ``aud`` (a bot expects its app id). ``tenant_id``
        becomes ``tid``; ``None`` leaves it out. ``issuer`` overrides the
        authority's issuer. ``expires_in`` is counted from now (negative for an
        expired token); ``None`` leaves ``exp`` out. ``not_before`` and
        ``issued_at`` are absolute Unix times for ``nbf`` and ``iat`` and default
        to now. ``kid`` overrides the header's ``kid``; ``signing_key`` signs with
        another key (one that is not published, or an EC key with
        ``algorithm="ES256"``). ``extra_claims`` and ``extra_headers`` are added
        last and win over the defaults.
        """
        now = time.time()
        claims: dict[str, Any] = {
            "iss": self.issuer if issuer is None else issuer,
            "aud": audience,
            "iat": int(now) if issued_at is None else issued_at,
            "nbf": int(now) if not_before is None else not_before,
        }
        if expires_in is not None:
            claims["exp"] = int(now + expires_in)
        if tenant_id is not None:
            claims["tid"] = tenant_id
        claims.update(extra_claims or {})
        headers: dict[str, Any] = {"kid": self._kid if kid is None else kid, "typ": "JWT"}
        headers.update(extra_headers or {})
        key = self.private_key if signing_key is None else signing_key
        return jwt.encode(claims, key, algorithm=algorithm, headers=headers)

    # -- HTTP ------------------------------------------------------------

    def create_app(self) -> web.Application:
        """An aiohttp application serving the OpenID configuration and the JWKS."""
        app = web.Application()
        app.router.add_get(OPENID_CONFIG_PATH, self._handle_config)
        app.router.add_get(JWKS_PATH, self._handle_jwks)
        return app

    @property
    def openid_config_url(self) -> str:
        """URL of the OpenID configuration, to give an Authenticator (after :meth:`start`)."""
        return self.base_url + OPENID_CONFIG_PATH

    async def _gate(self) -> web.Response | None:
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        if not self.available:
            return web.json_response({"error": "unavailable"}, status=503)
        return None

    async def _handle_config(self, request: web.Request) -> web.Response:
        refused = await self._gate()
        if refused is not None:
            return refused
        origin = f"{request.scheme}://{request.host}"
        return web.json_response(
            {
                "issuer": self.issuer,
                "authorization_endpoint": origin + "/v1/authorize",
                "jwks_uri": origin + JWKS_PATH,
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            }
        )

    async def _handle_jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        refused = await self._gate()
        if refused is not None:
            return refused
        return web.json_response(self.jwks())
