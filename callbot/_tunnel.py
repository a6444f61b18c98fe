"""The public URL of a development tunnel (``callbot run --tunnel ngrok|devtunnel``).

Graph only calls back over https, to a URL on the internet. During development
a tunnel provides one: start ``ngrok http 8080`` (or host a dev tunnel), and
``callbot run --tunnel ngrok`` asks the running tunnel for its https URL and
uses it as ``public_url``. Nothing is started here: a tunnel that is not
running is reported, with the command that starts one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ._config import listen_address
from ._errors import ConfigurationError
from ._log import get_logger

__all__ = [
    "DEFAULT_NGROK_API",
    "TUNNEL_KINDS",
    "TunnelError",
    "devtunnel_public_url",
    "discover_public_url",
    "ngrok_public_url",
]

log = get_logger("callbot.tunnel")

TUNNEL_KINDS = ("ngrok", "devtunnel")
DEFAULT_NGROK_API = "http://127.0.0.1:4040"
"""Where the ngrok agent serves its local API (its ``web_addr``); ``CALLBOT_NGROK_API``."""

_DEFAULT_PORTS = {"http": 80, "https": 443}


class TunnelError(ConfigurationError):
    """No usable tunnel to the bot's port was found."""


def _addr_target(addr: str) -> tuple[str, int | None]:
    """Host and port of an ngrok ``config.addr`` (``8080``, ``localhost:8080``, a URL)."""
    text = addr.strip()
    if "://" in text:
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError:
            return parts.hostname or "", None
        return parts.hostname or "", port if port is not None else _DEFAULT_PORTS.get(parts.scheme)
    if text.isdigit():
        return "localhost", int(text)
    host, sep, port_text = text.rpartition(":")
    if sep and port_text.isdigit():
        return host.strip("[]"), int(port_text)
    return text, None


def _is_local(host: str, listen_host: str | None) -> bool:
    if host in ("localhost", "") or host == listen_host:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified or address == _address(listen_host)


def _address(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` names, however it is written ([2001:db8::5], 2001:0db8::5)."""
    try:
        return ipaddress.ip_address(listen_address(host)) if host else None
    except ValueError:
        return None


async def ngrok_public_url(
    port: int,
    *,
    api_url: str | None = None,
    listen_host: str | None = None,
    timeout: float = 5.0,
) -> str:
    """The https URL of the running ngrok agent's tunnel to local ``port``.

    Reads ``GET {api_url}/api/tunnels`` from the agent's local API
    (``api_url`` defaults to ``CALLBOT_NGROK_API`` or ``http://127.0.0.1:4040``)
    and picks the https tunnel whose ``config.addr`` points at ``port`` on this
    machine (or on ``listen_host``). Raises :class:`TunnelError` when no agent
    answers or none of its tunnels fits.
    """
    base = (api_url or os.environ.get("CALLBOT_NGROK_API") or DEFAULT_NGROK_API).rstrip("/")
    url = base + "/api/tunnels"
    start_hint = f"start one with `ngrok http {port}`"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url, headers={"Accept": "application/json"}) as response,
        ):
            if response.status != 200:
                raise TunnelError(f"the ngrok agent at {base} answered {response.status} to {url}")
            document = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TunnelError(
            f"no ngrok agent answers at {base} ({type(exc).__name__}): {start_hint}, "
            "or set CALLBOT_NGROK_API to its web_addr"
        ) from None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the decoder goes
        raise TunnelError(f"the ngrok agent at {base} did not answer JSON on {url}") from None
    tunnels = document.get("tunnels") if isinstance(document, dict) else None
    if not isinstance(tunnels, list):
        raise TunnelError(f"unexpected answer from the ngrok agent at {url}: no 'tunnels' list")
    seen: list[str] = []
    for tunnel in tunnels:
        if not isinstance(tunnel, dict):
            continue
        public_url = tunnel.get("public_url")
        config = tunnel.get("config")
        addr = config.get("addr") if isinstance(config, dict) else None
        if not isinstance(public_url, str) or not isinstance(addr, str):
            continue
        seen.append(f"{public_url} -> {addr}")
        host, target_port = _addr_target(addr)
        if target_port != port or not _is_local(host, listen_host):
            continue
        if urlsplit(public_url).scheme != "https":
            continue
        log.info("tunnel_found", kind="ngrok", public_url=public_url, addr=addr)
        return public_url
    if not seen:
        raise TunnelError(f"the ngrok agent at {base} has no tunnels running: {start_hint}")
    raise TunnelError(
        f"no https ngrok tunnel points at port {port} (the agent has {', '.join(seen)}): "
        f"{start_hint}"
    )


def _port_entries(document: Any) -> Iterator[Mapping[str, Any]]:
    """Every object with a ``portNumber``, wherever it is nested."""
    if isinstance(document, Mapping):
        if "portNumber" in document:
            yield document
        for value in document.values():
            yield from _port_entries(value)
    elif isinstance(document, list):
        for value in document:
            yield from _port_entries(value)


def devtunnel_public_url(
    port: int,
    *,
    tunnel_id: str | None = None,
    executable: str = "devtunnel",
    timeout: float = 20.0,
) -> str:
    """The https URL that a dev tunnel forwards to local ``port``.

    Runs ``devtunnel show [TUNNEL_ID] --json`` (``tunnel_id`` defaults to
    ``CALLBOT_DEVTUNNEL_ID``; without one, the CLI shows its current tunnel)
    and takes the first https entry of ``portForwardingUris`` of the port
    numbered ``port``. Raises :class:`TunnelError` when the CLI is missing,
    fails, or its output has no such port.
    """
    program = shutil.which(executable)
    if program is None:
        raise TunnelError(
            "the devtunnel CLI is not installed (or not on PATH): install it, or use "
            "--tunnel ngrok, or set CALLBOT_PUBLIC_URL"
        )
    tunnel_id = tunnel_id or os.environ.get("CALLBOT_DEVTUNNEL_ID") or None
    command = [program, "show", *([tunnel_id] if tunnel_id else []), "--json"]
    shown = " ".join(["devtunnel", *command[1:]])
    # A dev tunnel admits only its owner by default, and Graph cannot sign in to it.
    start_hint = (
        f"create one with `devtunnel create --allow-anonymous`, `devtunnel port create -p {port}`, "
        "then `devtunnel host`"
    )
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TunnelError(f"`{shown}` could not run: {exc}") from None
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()
        raise TunnelError(
            f"`{shown}` failed ({detail[-1] if detail else completed.returncode}): {start_hint}"
        )
    try:
        document = json.loads(completed.stdout)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the decoder goes
        raise TunnelError(
            f"could not read the output of `{shown}` as JSON; this devtunnel version "
            "prints another format: set CALLBOT_PUBLIC_URL to the tunnel's https URL instead"
        ) from None
    ports: list[int] = []
    for entry in _port_entries(document):
        number = entry.get("portNumber")
        if isinstance(number, int):
            ports.append(number)
        if number != port:
            continue
        uris = entry.get("portForwardingUris")
        for uri in uris if isinstance(uris, list) else []:
            if isinstance(uri, str) and urlsplit(uri).scheme == "https":
                log.info("tunnel_found", kind="devtunnel", public_url=uri, port=port)
                return uri
    if port in ports:
        raise TunnelError(
            f"`{shown}` lists port {port} but no https URL for it (portForwardingUris): "
            "is the tunnel hosted? run `devtunnel host`"
        )
    listed = f"it lists ports {sorted(set(ports))}" if ports else "it lists no ports"
    raise TunnelError(f"`{shown}` has no port {port} ({listed}): {start_hint}")


def discover_public_url(
    kind: str,
    port: int,
    *,
    listen_host: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The public https URL of a running tunnel of ``kind`` (``ngrok`` or ``devtunnel``)."""
    env = os.environ if environ is None else environ
    if kind == "ngrok":
        return asyncio.run(
            ngrok_public_url(port, api_url=env.get("CALLBOT_NGROK_API"), listen_host=listen_host)
        )
    if kind == "devtunnel":
        return devtunnel_public_url(port, tunnel_id=env.get("CALLBOT_DEVTUNNEL_ID"))
    raise TunnelError(f"unknown tunnel {kind!r}; known: {', '.join(TUNNEL_KINDS)}")
