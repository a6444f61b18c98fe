"""Settings, from keyword arguments or ``CALLBOT_*`` environment variables."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ._errors import ConfigurationError
from ._lifecycle import KEEP_ALIVE_LIMIT
from ._log import LOG_FORMATS, level_number

__all__ = ["Settings"]

DEFAULT_GRAPH_URL = "https://graph.microsoft.com/v1.0"
DEFAULT_AUTHORITY_URL = "https://login.microsoftonline.com"
DEFAULT_OPENID_CONFIG_URL = "https://api.aps.skype.com/v1/.well-known/OpenIdConfiguration"
MAX_TOKEN_LEEWAY = 300.0
"""The most clock skew a token's times may be read with (five minutes, the usual bound)."""
MAX_STORE_LEASE = 3600.0
"""The longest Redis lease: a dead instance's calls wait that long for another."""
MINIMUM_DURATIONS: dict[str, tuple[float, str]] = {
    "key_refresh_interval": (60.0, "each refresh fetches the platform's signing keys"),
    "keep_alive_interval": (1.0, "each interval sends every established call's keep-alive"),
    "store_lease": (1.0, "a lease is renewed in Redis every third of it"),
}
"""The shortest value of each setting that repeats work for as long as the bot runs, in
seconds, and the work it repeats: a tiny one would have the bot hammer the key endpoint,
Graph or Redis. Every other duration may be short (a test's, say)."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a bot can be configured with.

    Each field ``name`` can also be given as the environment variable
    ``CALLBOT_NAME`` (``CallBot.from_env()``). Durations are in seconds.
    """

    app_id: str = ""
    """The bot's application (client) id; inbound tokens must have it as audience.

    Required to serve; checked when the bot starts, so a bot module can be
    imported (and configured by a test) before it is set."""
    tenant_id: str | None = None
    """Tenant the bot's outbound app-only token is requested for: its id, or a domain
    name (``contoso.onmicrosoft.com``) the token endpoint knows it by."""
    app_secret: str | None = field(default=None, repr=False)
    """Client secret for outbound tokens (or use ``certificate_path``)."""
    certificate_path: str | None = None
    """PEM file with the private key and certificate for a certificate credential."""
    public_url: str | None = None
    """Public https base URL Graph reaches the bot at; callbackUri = this + callback_path."""
    allow_insecure_public_url: bool = False
    """Accept an http public URL (for a local simulator only)."""
    host: str = "127.0.0.1"
    """Address to listen on: ``0.0.0.0`` for every IPv4 address, ``::`` for every address,
    IPv4 and IPv6 (an IPv6 address with or without brackets: ``[::1]`` is ``::1``)."""
    port: int = 8080
    """Port to listen on (``0``: a free one, named in the ``listening`` log line)."""
    callback_path: str = "/api/calls"
    """Path of the callback route Graph posts notifications to: ``/`` and segments of
    their own (no ``//``, ``.`` or ``..``), without ``?``, ``#``, ``%``, ``{``, ``}`` or
    spaces, and none of ``/healthz``, ``/readyz``, ``/metrics``."""
    graph_url: str = DEFAULT_GRAPH_URL
    """Root of the Graph API the bot calls (the simulator replaces it in tests): https, as the
    app token goes with each request (plain http only to 127.0.0.1, localhost or ::1)."""
    authority_url: str = DEFAULT_AUTHORITY_URL
    """Token authority; outbound tokens come from ``{authority}/{tenant}/oauth2/v2.0/token``:
    https, as the client secret goes there (plain http only to 127.0.0.1, localhost or ::1)."""
    openid_config_url: str = DEFAULT_OPENID_CONFIG_URL
    """The calling platform's OpenID configuration, where inbound tokens' signing keys are:
    https, as its keys decide which tokens are believed (plain http only to 127.0.0.1,
    localhost or ::1)."""
    allowed_tenants: frozenset[str] = frozenset()
    """When not empty, only tokens whose ``tid`` is listed are accepted."""
    token_leeway: float = 60.0
    """Clock skew tolerated on ``exp``/``nbf``/``iat``: at most 300 s."""
    key_refresh_interval: float = 3600.0
    """How often the signing keys are fetched again: at least 60 s (a token signed by a key
    not yet fetched has them fetched at once)."""
    key_refetch_cooldown: float = 5.0
    """After a refetch for an unknown ``kid``, no other refetch for this long (``0``: one
    for each such token, one at a time)."""
    reorder_window: float = 1.0
    """How long a notification that came before the one it follows waits for it, from when
    it came: a state before its predecessor, a tone before its call was established, or
    before the tone numbered just ahead of it."""
    max_concurrent_handlers: int = 256
    """How many calls' handlers may run at once (a handler waiting inside its call counts);
    handlers of an incoming call never wait for one, so that it is answered in time."""
    termination_grace: float = 30.0
    """How long a terminated call's state is kept; that it ended is kept for 10 minutes more,
    so stragglers are dropped."""
    pending_call_ttl: float = 300.0
    """How long a *pending* call is kept: one never seen past ringing the bot (no state, or
    still ``incoming``), or one Graph never accepted a request of the bot's own on (its
    answer, the request placing it, a keep-alive or any action), whatever state its
    notifications claim. Graph ends an unanswered call within 15 s, so only invented ids
    outlive this; an established call still unproven then (the bot restarted without a
    shared store) is sent a keep-alive instead, which proves it or ends it."""
    max_pending_calls: int = 2_000
    """Pending calls (see ``pending_call_ttl``) kept at once; past it the tenant keeping the
    most forgets its own oldest."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Larger callback bodies are refused (413). A full roster takes about 2.2 KB per
    person (as recorded from Teams): 4 MiB holds one of about 1,900."""
    max_json_depth: int = 64
    """Callback bodies nested deeper are refused (400)."""
    max_items_per_request: int = 200
    """Notification items one callback may carry; more is refused (413) before parsing them."""
    max_roster_size: int = 5_000
    """Participants a call's roster holds at most: a request listing more (in one item or
    in all) is refused (413) before parsing them, and who would join a roster past it is
    left out of it (and of ``joined``; who left or changed is still told). A roster keeps at
    most 4 KiB of JSON per participant it may hold (a Teams participant takes about 2.2 KB):
    a change past that is delivered, not kept."""
    header_timeout: float = 10.0
    """How long a request's headers may take to arrive, from their first byte."""
    body_timeout: float = 30.0
    """How long a callback's body may take to arrive once its headers are in."""
    idle_timeout: float = 75.0
    """How long a connection may stay open without a request (fresh or kept alive)."""
    max_connections: int = 1000
    """Inbound connections open at once; a new one closes the longest-idle one."""
    token_cache_bytes: int = 16 * 1024 * 1024
    """Memory the verified-token cache may use (counted as 2 bytes per token character + 1 KiB)."""
    max_token_lifetime: float = 24 * 3600.0
    """Longest accepted token lifetime (``exp`` - ``iat``) and time left (``exp`` - now)."""
    recording_hosts: frozenset[str] = frozenset({"*.skype.com", "*.microsoft.com"})
    """Hosts recordings are downloaded from (https only; ``*.`` matches subdomains).

    The origin of ``graph_url`` is always allowed too (a simulator or a test Graph)."""
    recording_ca_file: str | None = None
    """PEM file of extra CAs trusted for recording downloads (default: the system's); read
    as the bot starts."""
    max_recording_bytes: int = 64 * 1024 * 1024
    """Largest recording ``download_recording`` accepts; a longer answer raises."""
    recording_download_timeout: float = 600.0
    """Longest ``download_recording`` may take in all, redirects included (each read may
    also wait at most ``graph_request_timeout``); past it the download raises."""
    answer_warning_after: float = 10.0
    """Warn when an incoming call is not answered, rejected or redirected by then."""
    graph_retry_time: float = 30.0
    """How long a throttled or failing Graph request is retried before it raises."""
    graph_request_timeout: float = 30.0
    """How long one Graph request attempt may take."""
    keep_alive: bool = True
    """Tell Graph the bot still holds each established call (else it ends after 45 minutes)."""
    keep_alive_interval: float = 15 * 60.0
    """How often a call's keep-alive is sent: at least 1 s, under 45 minutes (Graph ends a
    call with none for 45 minutes; one that failed is tried again a minute later)."""
    shutdown_timeout: float = 25.0
    """On shutdown, how long running handlers may take to finish."""
    store: str = "memory"
    """``memory``, or a Redis URL shared by every instance: ``redis://``, ``rediss://``,
    ``unix://``, ``redis+cluster://``, ``redis+sentinel://`` (each ``rediss+`` for TLS; see
    docs/scaling.md)."""
    store_lease: float = 10.0
    """Redis store: how long an instance's claim on a call outlives its last renewal.

    A crashed instance's calls move to the others after this long (1 s to 3600 s; it is
    renewed every third of it)."""
    store_replicas: int = 0
    """Redis store: how many replicas must hold each write before callbot relies on it
    (answers 202, runs a handler). With ``1`` under Sentinel, a failover loses nothing
    answered and re-runs stay flagged; while fewer replicas keep up, callbacks get 503.
    One server or Sentinel only (``redis://``, ``redis+sentinel://``)."""
    trusted_proxies: tuple[str, ...] = ()
    """Networks whose ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are believed, for log
    lines only (the standard ``Forwarded`` header is not read: have the proxy send these)."""
    log_format: str = "auto"
    """``json``, ``console`` or ``auto`` (console on a terminal, JSON otherwise); applied
    when the bot serves itself (``callbot run``, ``bot.run()``, ``bot.serve()``)."""
    log_level: str = "info"
    """``debug``, ``info``, ``warning``, ``error`` or ``critical``; the standard library's
    ``logging`` too
    (applied like ``log_format``)."""
    record_path: str | None = None
    """When set, accepted notifications are appended to this JSON-lines file."""

    def __post_init__(self) -> None:
        problem = _callback_path_problem(self.callback_path)
        if problem is not None:
            raise ConfigurationError(
                f"callback_path {self.callback_path!r} {problem}: it is the path Graph posts "
                "to, after public_url (CALLBOT_CALLBACK_PATH)"
            )
        if self.public_url is not None:
            parts = urlsplit(self.public_url)
            if parts.scheme not in ("https", "http") or not parts.netloc:
                raise ConfigurationError(
                    f"public_url must be an absolute URL, got {self.public_url!r} "
                    "(CALLBOT_PUBLIC_URL)"
                )
            try:
                parts.port  # noqa: B018 - raises for a port that is not a number 0-65535
            except ValueError:
                bad = True
            else:
                # An empty query or fragment too: callback_path after it would not be a path.
                bad = any(c.isspace() or c in "?#" for c in self.public_url) or not parts.hostname
            if bad:
                raise ConfigurationError(
                    f"public_url must be scheme://host[:port][/path], with no spaces, query or "
                    f"fragment, got {self.public_url!r} (CALLBOT_PUBLIC_URL)"
                )
            if parts.scheme != "https" and not self.allow_insecure_public_url:
                raise ConfigurationError(
                    "public_url must use https: Graph only calls back over TLS "
                    "(set CALLBOT_ALLOW_INSECURE_PUBLIC_URL=1 for a local simulator)"
                )
        # The app token, the client secret, and which tokens are believed travel to these.
        for name in ("graph_url", "authority_url", "openid_config_url"):
            problem = https_problem(getattr(self, name))
            if problem is not None:
                raise ConfigurationError(
                    f"{name} {getattr(self, name)!r} {problem} (CALLBOT_{name.upper()})"
                )
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            # NaN passes every comparison below: a NaN leeway accepted any expired token.
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigurationError(
                    f"{setting.name} must be a finite number, got {value!r} "
                    f"(CALLBOT_{setting.name.upper()})"
                )
            # Every number setting is a duration, a size or a count: none can be negative.
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise ConfigurationError(
                    f"{setting.name} must not be negative, got {value!r} "
                    f"(CALLBOT_{setting.name.upper()})"
                )
        if self.log_format not in LOG_FORMATS:
            raise ConfigurationError(
                f"log_format must be {', '.join(LOG_FORMATS)}, got {self.log_format!r} "
                "(CALLBOT_LOG_FORMAT)"
            )
        if level_number(self.log_level) is None:
            raise ConfigurationError(
                f"log_level must be debug, info, warning, error or critical, got "
                f"{self.log_level!r} (CALLBOT_LOG_LEVEL)"
            )
        if self.keep_alive_interval >= KEEP_ALIVE_LIMIT:
            raise ConfigurationError(
                f"keep_alive_interval must be under 45 minutes (2700 s), got "
                f"{self.keep_alive_interval!r}: Graph ends a call with no keep-alive for that "
                "long (CALLBOT_KEEP_ALIVE_INTERVAL)"
            )
        if self.token_leeway > MAX_TOKEN_LEEWAY:
            # A leeway of hours would accept a token long expired: the expiry check in name only.
            raise ConfigurationError(
                f"token_leeway must be at most {MAX_TOKEN_LEEWAY:g} s, the clock skew tokens are "
                f"usually allowed, got {self.token_leeway!r} (CALLBOT_TOKEN_LEEWAY)"
            )
        for name, (minimum, why) in MINIMUM_DURATIONS.items():
            value = getattr(self, name)
            if value < minimum:
                raise ConfigurationError(
                    f"{name} must be at least {minimum:g} s, got {value!r}: {why} "
                    f"(CALLBOT_{name.upper()})"
                )
        if self.store_lease > MAX_STORE_LEASE:
            # Redis takes no lease of 1e300 ms (every callback got 503), and a dead instance's
            # calls wait a lease before another takes them.
            raise ConfigurationError(
                f"store_lease must be at most {MAX_STORE_LEASE:g} s, got {self.store_lease!r} "
                "(CALLBOT_STORE_LEASE)"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port must be 0 to 65535, got {self.port} (CALLBOT_PORT)")
        for name in (
            "header_timeout",
            "body_timeout",
            "idle_timeout",
            "max_token_lifetime",
            "pending_call_ttl",
            "recording_download_timeout",
            "graph_request_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be positive (CALLBOT_{name.upper()})")
        for name in (
            "max_body_bytes",
            "max_items_per_request",
            "max_connections",
            "max_recording_bytes",
            "max_pending_calls",
            "max_roster_size",
            "max_json_depth",
        ):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1 (CALLBOT_{name.upper()})")
        if self.max_concurrent_handlers < 1:
            raise ConfigurationError("max_concurrent_handlers must be at least 1")
        redis_schemes = (
            *("redis://", "rediss://", "unix://"),
            *("redis+cluster://", "rediss+cluster://", "redis+sentinel://", "rediss+sentinel://"),
        )
        if self.store != "memory" and not self.store.startswith(redis_schemes):
            raise ConfigurationError(
                f"store must be 'memory' or a redis:// URL, got {self.store!r} (CALLBOT_STORE)"
            )
        if self.store_replicas and self.store.startswith(("redis+cluster://", "rediss+cluster://")):
            # WAIT answers for one node's writes: a Cluster spreads a request over several
            raise ConfigurationError(
                "store_replicas works with one server or Sentinel, not a Cluster "
                "(CALLBOT_STORE_REPLICAS)"
            )

    def check(self) -> None:
        """Fail with a message naming what is missing for serving callbacks."""
        if not self.app_id:
            raise ConfigurationError(
                "CALLBOT_APP_ID is required: the bot's application id (the token audience)"
            )

    @property
    def callback_url(self) -> str:
        """The callbackUri given to Graph."""
        if self.public_url is None:
            raise ConfigurationError(
                "public_url is required to answer or place calls (CALLBOT_PUBLIC_URL)"
            )
        return self.public_url.rstrip("/") + self.callback_path

    @property
    def token_url(self) -> str:
        """The OAuth 2.0 token endpoint for the bot's tenant."""
        if not self.tenant_id:
            raise ConfigurationError("tenant_id is required to call Graph (CALLBOT_TENANT_ID)")
        return f"{self.authority_url.rstrip('/')}/{self.tenant_id}/oauth2/v2.0/token"

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``CALLBOT_*`` variables; keyword arguments win over the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get("CALLBOT_" + f.name.upper())
            # A value from a file or a Secret often ends in a newline: never part of a setting.
            raw = raw.strip() if raw is not None else None
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, str(f.type), raw)
        values.update(overrides)
        return cls(**values)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
"""The hosts plain http may reach: this machine only, for tests and the local demo."""


def https_problem(url: str) -> str | None:
    """Why ``url`` is no absolute ``https`` URL (plain ``http`` only for :data:`LOOPBACK_HOSTS`),
    or ``None`` when it is one."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if not host:
        return "is not an absolute URL (scheme://host/path)"
    scheme = parts.scheme.lower()
    if scheme == "https" or (scheme == "http" and host in LOOPBACK_HOSTS):
        return None
    return "is not https (plain http only for 127.0.0.1, localhost or ::1)"


def host_listed(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` is one of ``patterns`` (``*.example.com`` matches its subdomains),
    compared without case or a trailing dot."""
    host = host.lower().rstrip(".")
    for allowed in patterns:
        pattern = allowed.lower()
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


BOT_PATHS = ("/healthz", "/readyz", "/metrics")
"""The paths the bot answers beside its callback path."""


def listen_address(host: str) -> str:
    """``host`` as sockets take it: an IPv6 address without the brackets a URL writes."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _callback_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be the callback route's: what the route would take literally
    (``%``, a query, a fragment), as a variable (``{name}``), or what a client would rewrite
    (``.`` and ``..`` segments) is never the path Graph posts to."""
    if not path.startswith("/"):
        return "must start with '/'"
    if any(c.isspace() or not c.isprintable() or c in "?#%{}" for c in path):
        return "has a space, a control character, or one of ? # % { }"
    segments = path[1:].removesuffix("/").split("/")
    if path != "/" and any(segment in ("", ".", "..") for segment in segments):
        return "has an empty, '.' or '..' segment"
    if path in BOT_PATHS:
        # Proxies keep these from the internet (deploy/): Graph's callbacks would be refused.
        return f"is one of the bot's own paths {', '.join(BOT_PATHS)}"
    return None


def _convert(name: str, type_name: str, raw: str) -> Any:
    env_name = "CALLBOT_" + name.upper()
    try:
        if type_name == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name.startswith(("frozenset", "tuple")):
            items = [item.strip() for item in raw.split(",") if item.strip()]
            if not items:
                # Set, yet naming nothing: CALLBOT_ALLOWED_TENANTS=" , " allowed every tenant.
                raise ConfigurationError(
                    f"{env_name}: {raw!r} lists nothing (unset it for the default)"
                )
            return frozenset(items) if type_name.startswith("frozenset") else tuple(items)
    except ValueError:
        raise ConfigurationError(f"{env_name}: cannot read {raw!r} as {type_name}") from None
    return raw
