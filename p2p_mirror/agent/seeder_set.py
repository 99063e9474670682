"""The seeders an agent knows, and which of them owns a blob.

Configured seeder URLs whose host is a name (a headless Service) stand for every address
the name resolves to; names are resolved again every ``refresh`` seconds, each lookup
bounded in time and in the addresses it keeps. Each blob is owned by one seeder, chosen by
rendezvous hashing of its digest over the members' ``address:port``, so every agent asks the
same seeder and the origin sends each blob once. A member that failed (refused, timed out,
answered 5xx) is tried last for ``down_for`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from p2p_mirror.core import rendezvous

log = logging.getLogger(__name__)
Resolver = Callable[[str, int], Awaitable[list[str]]]
MAX_ADDRESSES = 64  # per name: more seeders than that behind one Service is a mistake
RESOLVE_TIMEOUT = 5.0
DEFAULT_REFRESH = 30.0
DEFAULT_DOWN_FOR = 30.0


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every A/AAAA address of ``host`` (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _with_host(url: str, host: str) -> str:
    """``url`` with its host replaced by the address ``host`` (port and path kept)."""
    parts = urlsplit(url)
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def member_key(url: str) -> str:
    """A member's rendezvous name: ``address:port`` (the same on every agent)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SeederSet:
    """The live seeder set, from configured URLs (names expanded to their addresses)."""

    def __init__(
        self,
        urls: list[str],
        resolve: Resolver = resolve_addresses,
        refresh: float = DEFAULT_REFRESH,
        down_for: float = DEFAULT_DOWN_FOR,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.configured = list(dict.fromkeys(urls))
        self.resolve = resolve
        self.refresh_every = refresh
        self.down_for = down_for
        self.clock = clock
        self._named = [u for u in self.configured if not _is_ip(urlsplit(u).hostname or "")]
        self._expanded: dict[str, list[str]] = {}  # named URL -> its address URLs
        self._resolved_at: float | None = None
        self._down: dict[str, float] = {}  # member URL -> when it may be tried first again
        self._refreshing: asyncio.Task[None] | None = None

    @property
    def members(self) -> list[str]:
        """Every member URL: literal ones as given, named ones as their addresses (or as
        the name itself until it first resolved)."""
        out: list[str] = []
        for url in self.configured:
            out.extend(self._expanded.get(url, [url]) if url in self._named else [url])
        return list(dict.fromkeys(out))

    async def ranked(self, key: str) -> list[str]:
        """Members in the order to ask for ``key``: its owner first, then the next owners;
        members marked down go last (still tried if all else fails)."""
        await self._fresh()
        now = self.clock()
        by_key = {member_key(url): url for url in self.members}
        order = [by_key[k] for k in rendezvous.rank(by_key, key)]
        up = [u for u in order if self._down.get(u, 0.0) <= now]
        return up + [u for u in order if u not in up]

    def mark_down(self, url: str) -> None:
        if url in self.members:
            self._down[url] = self.clock() + self.down_for
            log.warning("seeder %s is down; asking the next one for %gs", url, self.down_for)

    def mark_up(self, url: str) -> None:
        self._down.pop(url, None)

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing

    async def _fresh(self) -> None:
        """Resolve the names when due: waited for the first time, in the background after
        (a slow resolver must not hold up pulls that the known addresses can serve)."""
        if not self._named:
            return
        due = self._resolved_at is None or self.clock() - self._resolved_at >= self.refresh_every
        if due and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.create_task(self.refresh())
        if self._resolved_at is None and self._refreshing is not None:
            await asyncio.shield(self._refreshing)

    async def refresh(self) -> None:
        """Resolve every named URL once; a failed lookup keeps the addresses known before."""
        for url in self._named:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                async with asyncio.timeout(RESOLVE_TIMEOUT):
                    addresses = await self.resolve(parts.hostname or "", port)
            except (OSError, TimeoutError, UnicodeError) as e:
                log.warning("seeder %s: cannot resolve (%s); keeping %d known addresses",
                            url, e or type(e).__name__, len(self._expanded.get(url, [])))
                continue
            addresses = [a for a in addresses if _is_ip(a)][:MAX_ADDRESSES]
            if addresses:
                expanded = [_with_host(url, a) for a in sorted(addresses)]
                if expanded != self._expanded.get(url):
                    log.info("seeder %s: %d addresses: %s", url, len(expanded),
                             ", ".join(addresses))
                self._expanded[url] = expanded
        self._resolved_at = self.clock()
        live = set(self.members)
        self._down = {u: t for u, t in self._down.items() if u in live}
