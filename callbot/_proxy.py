"""Who sent a callback, when the bot sits behind a reverse proxy.

Behind nginx or an ingress, every callback arrives from the proxy's address.
The proxy says who its client was in ``X-Forwarded-For`` and
``X-Forwarded-Proto``; those headers are believed only when the connection
comes from a network listed in ``trusted_proxies`` (``CALLBOT_TRUSTED_PROXIES``),
because anyone else can write them. They are read here, from the right, and
only for log lines: the request itself is not rewritten, a header that cannot
be read never fails a callback, and nothing (least of all ``callbackUri``,
which always comes from ``public_url``) is built from them. They are read when a
line asks who sent a request, not by a middleware: aiohttp refuses some
requests (an ``Expect`` it does not take) before any middleware runs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import hdrs, web

from ._errors import ConfigurationError
from ._log import get_logger

__all__ = [
    "ForwardedClient",
    "forwarded_client",
    "parse_networks",
    "peer_address",
    "trust_proxies",
]

log = get_logger("callbot.proxy")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


@dataclass(frozen=True, slots=True)
class ForwardedClient:
    """Where a request came from, as far as the bot can tell."""

    address: str | None
    """The client's address: the peer's, or the one a trusted proxy forwarded."""
    scheme: str
    """``https`` when a trusted proxy terminated TLS for the client."""
    peer: str | None
    """The address of the connection itself (the proxy, when there is one)."""


# The networks whose forwarded headers are believed, kept on the app they serve.
_TRUSTED: web.AppKey[tuple[Network, ...]] = web.AppKey("callbot_trusted_proxies", tuple)


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Read ``trusted_proxies`` entries (addresses or CIDR networks)."""
    networks: list[Network] = []
    for entry in entries:
        text = entry.strip()
        if not text:
            continue
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigurationError(
                f"trusted_proxies: {text!r} is not an IP address or network "
                "(CALLBOT_TRUSTED_PROXIES takes comma-separated CIDRs, e.g. 10.0.0.0/8)"
            ) from None
        networks.append(_unmapped(network))
    return tuple(networks)


def _unmapped(network: Network) -> Network:
    """``::ffff:10.0.0.0/104`` as ``10.0.0.0/8``: addresses are compared as IPv4 (``_address``)."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        first = network.network_address.ipv4_mapped
        assert first is not None  # within ::ffff:0:0/96
        return ipaddress.IPv4Network((first, network.prefixlen - 96))
    return network


def _is_trusted(peer: str | None, networks: tuple[Network, ...]) -> bool:
    address = _address(peer) if peer else None
    return address is not None and _within(address, networks)


def _within(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: tuple[Network, ...]
) -> bool:
    return any(address in network for network in networks)


def _address(entry: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as proxies write it: ``1.2.3.4``, ``1.2.3.4:port`` (Azure Application
    Gateway), ``::1``, ``[::1]:port``, a zone after ``%``; ``None`` for anything else."""
    text = entry.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    # A dual-stack socket (the bot on ::) sees an IPv4 peer as ::ffff:a.b.c.d.
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def _listed(request: web.BaseRequest, name: str) -> list[str]:
    """A header's entries, its lines joined: two lines of a header are one list."""
    return ",".join(request.headers.getall(name, [])).split(",")


def _read_headers(request: web.BaseRequest, networks: tuple[Network, ...]) -> ForwardedClient:
    """The right-most ``X-Forwarded-For`` entry outside ``networks``, read from the right:
    entries left of it were written by the client, so nothing there (junk included)
    changes the answer. The first unreadable entry ends the reading."""
    client: str | None = None
    hops = 0
    for entry in reversed(_listed(request, hdrs.X_FORWARDED_FOR)):
        address = _address(entry)
        if address is None:
            log.debug("forwarded_headers_unreadable", peer=request.remote)
            break
        client = str(address)
        hops += 1
        if not _within(address, networks):
            break
    if client is None:
        return ForwardedClient(peer_address(request), request.scheme, peer_address(request))
    scheme = request.scheme
    protos = [p.strip().lower() for p in _listed(request, hdrs.X_FORWARDED_PROTO) if p.strip()]
    if protos:
        # Proxies that append a scheme per hop put the client's as far from the right as its
        # address; one that writes a single scheme gives it for every hop.
        proto = protos[-hops] if hops <= len(protos) else protos[0]
        scheme = proto if proto in ("http", "https") else scheme
    return ForwardedClient(client, scheme, peer_address(request))


def trust_proxies(app: web.Application, trusted_proxies: Iterable[str]) -> None:
    """Believe the forwarded headers of requests to ``app`` from ``trusted_proxies``.

    Raises :class:`~callbot.ConfigurationError` for an entry that is not an
    address or network.
    """
    app[_TRUSTED] = parse_networks(trusted_proxies)


def forwarded_client(request: web.Request) -> ForwardedClient:
    """Where ``request`` (routed, if only to aiohttp's refusal) came from: forwarded by a
    trusted proxy, or the peer itself."""
    networks = request.app.get(_TRUSTED, ())
    if (
        networks
        and hdrs.X_FORWARDED_FOR in request.headers
        and _is_trusted(request.remote, networks)
    ):
        return _read_headers(request, networks)
    return ForwardedClient(peer_address(request), request.scheme, peer_address(request))


def peer_address(request: web.BaseRequest) -> str | None:
    """The connection's address, an IPv4 one as IPv4 even on a dual-stack socket."""
    remote = request.remote
    address = _address(remote) if remote else None
    return remote if address is None else str(address)
