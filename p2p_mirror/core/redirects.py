"""Where an origin may send a role: redirects and token realms are checked before they are
followed (docs/security.md, rule 6).

A target must use https, or the scheme configured for that registry, and every address its
host resolves to must be public, or of the same kind (loopback, link-local, private) as an
address of the registry's own configured host: a registry in the cluster may redirect to
storage in the cluster, one on the internet may not redirect into it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import urljoin, urlsplit

from p2p_mirror.core.config import Upstream

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Awaitable[list[Address]]]
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
NEVER = "never"  # unspecified, multicast, reserved: no registry lives there


class RedirectRefused(Exception):
    """A redirect or token realm pointing where the rules forbid (the message is for logs)."""


def address_kind(address: Address) -> str:
    """``public``, ``loopback``, ``link-local``, ``private`` or ``never``."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return NEVER
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_private or not address.is_global:
        return "private"
    return "public"


async def resolve(host: str) -> list[Address]:
    """Every address ``host`` stands for (an IP literal: itself, without DNS)."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, None)
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


async def check_target(url: str, upstream: Upstream, resolver: Resolver = resolve) -> None:
    """Raise ``RedirectRefused`` unless ``url`` is a place ``upstream`` may send us."""
    parts = urlsplit(url)
    allowed_schemes = {"https", urlsplit(upstream.url).scheme}
    if parts.scheme not in allowed_schemes:
        raise RedirectRefused(f"{upstream.name}: redirect to scheme {parts.scheme!r} refused")
    if not parts.hostname:
        raise RedirectRefused(f"{upstream.name}: redirect without a host refused")
    try:
        targets = await resolver(parts.hostname)
        own = await resolver(urlsplit(upstream.url).hostname or "")
    except OSError as e:
        raise RedirectRefused(f"{upstream.name}: cannot resolve {parts.hostname}: {e}") from None
    allowed = {"public"} | {address_kind(a) for a in own}
    allowed.discard(NEVER)
    for address in targets:
        if address_kind(address) not in allowed:
            raise RedirectRefused(
                f"{upstream.name}: redirect to {address} ({address_kind(address)}) refused"
            )


def next_hop(current: str, status: int, location: str | None) -> str | None:
    """The absolute URL a redirect response points to, or None if it is no redirect."""
    if status not in REDIRECT_STATUSES or not location:
        return None
    return urljoin(current, location)


def same_origin(a: str, b: str) -> bool:
    """Whether credentials for ``a`` may go to ``b`` (scheme, host and port equal)."""
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)
