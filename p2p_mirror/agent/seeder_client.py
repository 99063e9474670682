"""The agent's client of the seeders (``p2p_mirror.core.protocol``): blob info, segment
offers (a torrent and the pieces dealt to this agent), and runs of dealt pieces."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp

from p2p_mirror.core import protocol
from p2p_mirror.core.oci import Digest
from p2p_mirror.core.origin import forward_headers

log = logging.getLogger(__name__)
TORRENT_ATTEMPTS = 2  # a torrent request whose connection fails is sent again this often


class Fallback(Exception):
    """The swarm path gave up; the reason is the message (used as a metric label too)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class SegmentOffer:
    """A segment's torrent and the pieces the seeder dealt this agent; ``body`` is the open
    response the dealt pieces follow the torrent in, or None (a seeder that sends them only
    on request). Whoever holds the offer closes it."""

    torrent: bytes
    dealt: list[int]
    body: aiohttp.ClientResponse | None = None

    def close(self) -> None:
        if self.body is not None:
            self.body.close()

    async def inline_pieces(self, sizes: list[int]) -> AsyncIterator[tuple[int, bytes]]:
        """(piece, bytes) of the dealt run as it arrives after the torrent."""
        assert self.body is not None
        for piece, size in zip(self.dealt, sizes, strict=True):
            yield piece, await self.body.content.readexactly(size)


class SeederClient:
    """Asks seeders for a blob's segment torrents, trying each configured seeder in turn."""

    def __init__(self, urls: list[str], timeout: float) -> None:
        self.urls = urls
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def blob_info(
        self, digest: Digest, registry: str, name: str, headers: Mapping[str, str]
    ) -> tuple[str, protocol.BlobInfo]:
        """(seeder URL, info) from the first seeder that knows or ingested the blob."""
        errors = []
        send = forward_headers(headers)
        for url in self.urls:
            try:
                async with self.session.get(
                    url + protocol.blob_info_path(digest),
                    params=protocol.blob_info_query(registry, name),
                    headers=send,
                ) as resp:
                    if resp.status == 200:
                        return url, protocol.BlobInfo.from_json(await resp.json())
                    errors.append(f"{url}: {resp.status} {(await resp.text())[:200]}")
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                errors.append(f"{url}: {e or type(e).__name__}")
        raise Fallback("seeder", "; ".join(errors))

    async def torrent(self, url: str, digest: Digest, index: int, bt_port: int) -> SegmentOffer:
        """Segment ``index``'s torrent, and the pieces this agent takes from the seeder (their
        bytes follow in the same response where the seeder does that).

        The seeder publishes a segment once its bytes arrived from the origin, which for a
        blob queued behind others can take minutes: wait as long as the seeder's origin
        downloads advance, and give up after ``timeout`` seconds in which they did not, or
        when ``TORRENT_ATTEMPTS`` requests in a row lost their connection.
        """
        loop = asyncio.get_running_loop()
        patience = self.timeout.total or 30.0
        progress, since = None, loop.time()
        failures = 0
        while True:
            try:
                resp = await self.session.get(
                    url + protocol.torrent_path(digest, index),
                    params=protocol.torrent_query(bt_port, patience / 3),
                    # No bound on the whole response: the dealt run after the torrent goes
                    # at the pace of our download link, which can fall behind the seeder in
                    # a long pull; only a seeder silent this long is given up, and the
                    # segment then comes from its swarm.
                    timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=patience, sock_read=patience * 4 / 3),
                )
                if resp.status == 200:
                    return await _offer(resp)
                async with resp:
                    if resp.status != 202:
                        raise Fallback("seeder", f"torrent {index}: {resp.status}")
                    now = protocol.parse_not_yet(await resp.json())
            except (aiohttp.ClientError, asyncio.IncompleteReadError, TimeoutError) as e:
                # One lost connection is no dead seeder: on busy links a few TCP connections
                # stall or time out, and giving up here costs the rest of the blob from the
                # origin. Ask again (on another connection).
                failures += 1
                error = f"torrent {index}: {e or type(e).__name__}"
                if failures >= TORRENT_ATTEMPTS:
                    raise Fallback("seeder", error) from None
                log.warning("blob %s: %s; asking again", digest, error)
                continue
            except ValueError as e:
                raise Fallback("seeder", f"torrent {index}: {e}") from None
            failures = 0
            if now != progress:
                progress, since = now, loop.time()
            elif loop.time() - since >= patience:
                raise Fallback("seeder", f"torrent {index}: no origin progress for {patience:g}s")

    async def pieces(
        self, url: str, digest: Digest, index: int, first: int, sizes: list[int]
    ) -> AsyncIterator[tuple[int, bytes]]:
        """(piece, bytes) of a run of consecutive pieces the seeder dealt to this agent, one
        piece at a time as they arrive (``sizes``: each piece's length)."""
        async with self.session.get(
            url + protocol.pieces_path(digest, index, first),
            params=protocol.pieces_query(len(sizes)),
        ) as resp:
            if resp.status != 200:
                raise Fallback("seeder", f"pieces {first}+{len(sizes)} of {index}: {resp.status}")
            for piece, size in enumerate(sizes, start=first):
                yield piece, await resp.content.readexactly(size)


async def _offer(resp: aiohttp.ClientResponse) -> SegmentOffer:
    """Read a 200 torrent response up to its dealt pieces; the offer keeps it open for them."""
    try:
        dealt, length = protocol.parse_offer_headers(resp.headers)
    except protocol.ProtocolError:
        resp.close()
        raise
    if length is None:  # a seeder that sends the pieces only on request
        async with resp:
            return SegmentOffer(await resp.read(), dealt)
    try:
        return SegmentOffer(await resp.content.readexactly(length), dealt, resp)
    except BaseException:  # a cut body: a seeder failure
        resp.close()
        raise


def runs_of(pieces: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]]: one request per run of consecutive pieces."""
    runs: list[list[int]] = []
    for piece in sorted(set(pieces)):
        if runs and runs[-1][-1] == piece - 1:
            runs[-1].append(piece)
        else:
            runs.append([piece])
    return runs
