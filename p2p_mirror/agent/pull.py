"""Getting one blob onto this node: from the swarm first, from the origin if that fails.

A ``BlobFetch`` produces the blob's bytes in order into its store directory and advances
``available`` as a contiguous, already-hashed prefix grows; any number of client responses
read that prefix while it grows. Swarm trouble (no seeder, no torrent, no progress within a
deadline) hands over to the origin at the current offset, so the pull still succeeds. The
blob enters the cache only when the whole of it matched its digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from p2p_mirror.core.config import MiB, Upstream
from p2p_mirror.core.metrics import Metrics
from p2p_mirror.core.oci import Digest, OCIError
from p2p_mirror.core.origin import Origin, OriginUnavailable, error_for_status, forward_headers
from p2p_mirror.core.protocol import PIECES_HEADER, TORRENT_LENGTH_HEADER
from p2p_mirror.core.store import BlobLayout, BlobStore, segment_name
from p2p_mirror.core.swarm import Metainfo, SwarmError, TorrentSession, Transfer

log = logging.getLogger("p2p_mirror.fetch")
READ_CHUNK = 4 * MiB
DEFAULT_SEGMENT = 64 * MiB
TORRENT_ATTEMPTS = 2  # a torrent request whose connection fails is sent again this often


class Fallback(Exception):
    """The swarm path gave up; the reason is the message (used as a metric label too)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class BlobFetch:
    """One blob being fetched; readers wait on ``available`` bytes."""

    digest: Digest
    size: int
    upstream: Upstream
    name: str
    headers: Mapping[str, str]
    layout: BlobLayout | None = None
    available: int = 0
    done: bool = False
    error: OCIError | None = None
    metas: list[Metainfo] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    watchers: list[asyncio.Task[None]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def advance(self, n: int) -> None:
        self.available += n
        self._changed.set()
        self._changed = asyncio.Event()

    def finish(self, error: OCIError | None = None) -> None:
        self.error = error
        self.done = error is None
        self._changed.set()

    async def wait_beyond(self, offset: int) -> None:
        """Until bytes past ``offset`` are available, or the fetch ended."""
        while self.available <= offset and not self.done and self.error is None:
            await self._changed.wait()
        if self.error is not None and self.available <= offset:
            raise self.error


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
    ) -> tuple[str, dict]:
        """(seeder URL, info) from the first seeder that knows or fetched the blob."""
        errors = []
        params = {"registry": registry, "repo": name}
        send = forward_headers(headers)
        for url in self.urls:
            try:
                async with self.session.get(
                    f"{url}/v1/blobs/{digest}", params=params, headers=send
                ) as resp:
                    if resp.status == 200:
                        return url, await resp.json()
                    errors.append(f"{url}: {resp.status} {(await resp.text())[:200]}")
            except (aiohttp.ClientError, TimeoutError) as e:
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
                    f"{url}/v1/blobs/{digest}/torrents/{index}",
                    params={"bt_port": str(bt_port), "wait": f"{patience / 3:g}",
                            "pieces": "inline"},  # fmt: skip
                    # No bound on the whole response: the dealt run after the torrent goes
                    # at the pace of our download link, which can fall behind the seeder in
                    # a long pull (256 MiB at N=16); only a seeder silent this long is given
                    # up, and the segment then comes from its swarm.
                    timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=patience, sock_read=patience * 4 / 3),
                )
                if resp.status == 200:
                    return await _offer(resp)
                async with resp:
                    if resp.status != 202:
                        raise Fallback("seeder", f"torrent {index}: {resp.status}")
                    now = (await resp.json()).get("origin_bytes")
            except (aiohttp.ClientError, asyncio.IncompleteReadError, TimeoutError) as e:
                # One lost connection is no dead seeder: on a busy lab's links (256 MiB at
                # N=16) a few of its TCP connections stall or time out, and giving up here
                # costs the rest of the blob from the origin. Ask again (on another connection).
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
            f"{url}/v1/blobs/{digest}/segments/{index}/pieces/{first}",
            params={"count": str(len(sizes))},
        ) as resp:
            if resp.status != 200:
                raise Fallback("seeder", f"pieces {first}+{len(sizes)} of {index}: {resp.status}")
            for piece, size in enumerate(sizes, start=first):
                yield piece, await resp.content.readexactly(size)


async def _offer(resp: aiohttp.ClientResponse) -> SegmentOffer:
    """Read a 200 torrent response up to its dealt pieces; the offer keeps it open for them."""
    dealt = parse_piece_list(resp.headers.get(PIECES_HEADER, ""))
    length = resp.headers.get(TORRENT_LENGTH_HEADER)
    if length is None:  # a seeder that sends the pieces only on request
        async with resp:
            return SegmentOffer(await resp.read(), dealt)
    try:
        return SegmentOffer(await resp.content.readexactly(int(length)), dealt, resp)
    except BaseException:  # a malformed length or a cut body: a seeder failure
        resp.close()
        raise


def _runs(pieces: list[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]]."""
    runs: list[list[int]] = []
    for piece in sorted(set(pieces)):
        if runs and runs[-1][-1] == piece - 1:
            runs[-1].append(piece)
        else:
            runs.append([piece])
    return runs


def parse_piece_list(text: str) -> list[int]:
    """``"0,3,6"`` -> [0, 3, 6]; anything malformed means none (peers or a stall cover it)."""
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        return []


@dataclass
class Fetcher:
    """Runs ``BlobFetch``es: swarm first, origin on failure, verify, cache, keep seeding."""

    store: BlobStore
    origin: Origin
    swarm: TorrentSession | None
    seeders: SeederClient | None
    metrics: Metrics
    swarm_timeout: float
    stall_timeout: float
    seeder_grace: float
    on_cached: Callable[[Digest], None] = lambda digest: None
    active: dict[Digest, BlobFetch] = field(default_factory=dict)
    seeding: dict[Digest, list[Transfer]] = field(default_factory=dict)

    def start(
        self, digest: Digest, size: int, upstream: Upstream, name: str, headers: Mapping[str, str]
    ) -> BlobFetch:
        """The running fetch of ``digest`` (concurrent requests share it), or a new one."""
        fetch = self.active.get(digest)
        if fetch is not None and fetch.error is None and not fetch.done:
            return fetch
        fetch = BlobFetch(digest, size, upstream, name, dict(headers))
        self.active[digest] = fetch
        task = asyncio.create_task(self._run(fetch))
        task.add_done_callback(lambda t: self.active.pop(digest, None))
        return fetch

    async def _run(self, fetch: BlobFetch) -> None:
        hasher = fetch.digest.hasher()
        try:
            if self.swarm is not None and self.seeders is not None and fetch.size > 0:
                try:
                    await self._from_swarm(fetch, hasher)
                except Exception as e:  # noqa: BLE001 - whatever broke in P2P, the origin remains
                    reason = e.reason if isinstance(e, Fallback) else "swarm"
                    self.metrics.inc("fallbacks_total", reason=reason)
                    log.warning(
                        "blob %s: swarm failed at %d/%d bytes (%s); continuing from origin",
                        fetch.digest, fetch.available, fetch.size, e,
                    )
            if fetch.available < fetch.size or fetch.layout is None:
                await self._from_origin(fetch, hasher)
            if hasher.hexdigest() != fetch.digest.hex:
                raise OCIError("DIGEST_INVALID", "blob bytes do not match the digest")
            assert fetch.layout is not None
            await asyncio.to_thread(self.store.commit, fetch.layout)  # fsync, off the event loop
            self._seed(fetch)
            fetch.finish()
            self.on_cached(fetch.digest)
            log.info("cached %s (%d bytes)", fetch.digest, fetch.size)
        except Exception as e:  # noqa: BLE001 - every failure must reach the waiting readers
            error = e if isinstance(e, OCIError) else OCIError("UNAVAILABLE", str(e) or repr(e))
            if isinstance(e, OriginUnavailable):
                error = OCIError("UNAVAILABLE", f"origin unavailable: {e}")
            log.warning("blob %s failed: %s", fetch.digest, error)
            self.metrics.inc("blob_failures_total", code=error.code)
            if self.swarm is not None:
                for transfer in fetch.transfers:
                    self.swarm.remove(transfer)
            if fetch.layout is not None:
                self.store.abandon(fetch.layout)
            fetch.finish(error)

    async def _from_swarm(self, fetch: BlobFetch, hasher) -> None:
        assert self.swarm is not None and self.seeders is not None
        try:
            url, info = await asyncio.wait_for(
                self.seeders.blob_info(
                    fetch.digest, fetch.upstream.name, fetch.name, fetch.headers
                ),
                self.swarm_timeout,
            )
        except TimeoutError:
            raise Fallback("seeder", "timed out") from None
        if info.get("size") != fetch.size or int(info.get("segment_size", 0)) <= 0:
            raise Fallback("seeder", f"seeder disagrees on size: {info}")
        log.debug("blob %s: seeder %s has it: %s", fetch.digest, url, info)
        layout = self.store.begin(fetch.digest, fetch.size, int(info["segment_size"]))
        fetch.layout = layout
        peers = [(await _resolve(urlsplit(url).hostname or ""), int(info["bt_port"]))]
        # Ask for every segment's torrent at once and join each swarm as soon as it is
        # published, ahead of the reader: joining late costs ~1 s per segment.
        getters = [
            asyncio.create_task(self._join(fetch, url, i, peers)) for i in range(layout.count)
        ]
        try:
            for index, getter in enumerate(getters):
                transfer = await getter  # fails once the seeder stops making progress
                await self._consume(fetch, hasher, index, transfer)
                log.debug("blob %s: segment %d streamed; peers: %s", fetch.digest, index,
                         transfer.peer_summary())
        finally:
            for task in (*getters, *fetch.watchers):
                task.cancel()

    async def _join(self, fetch: BlobFetch, url: str, index: int, peers) -> Transfer:
        assert self.swarm is not None and self.seeders is not None and fetch.layout is not None
        offer = await self.seeders.torrent(url, fetch.digest, index, self.swarm.port)
        dealer: asyncio.Task[None] | None = None
        try:
            meta = Metainfo.parse(offer.torrent)
            expected = segment_name(fetch.digest, index, fetch.layout.count)
            if meta.name != expected or meta.size != fetch.layout.segment_len(index):
                raise Fallback("seeder", f"torrent {index} does not describe segment {expected}")
            fetch.layout.torrent_path(index).write_bytes(offer.torrent)
            fetch.metas.append(meta)
            log.debug("blob %s: joining segment %d swarm (%s), pieces %s from the seeder",
                      fetch.digest, index, meta.info_hash, offer.dealt)  # fmt: skip
            transfer = self.swarm.add(meta, fetch.layout.dir, seed=False)
            fetch.transfers.append(transfer)
            if offer.dealt:
                dealer = asyncio.create_task(
                    self._dealt_pieces(fetch, url, index, transfer, offer, peers))  # fmt: skip
                fetch.watchers.append(dealer)
            fetch.watchers.append(
                asyncio.create_task(self._seeder_if_stalled(transfer, peers, dealer)))  # fmt: skip
            return transfer
        finally:  # the response ends with the dealt pieces, even if that task never ran
            if dealer is None:
                offer.close()
            else:
                dealer.add_done_callback(lambda _task: offer.close())

    async def _dealt_pieces(
        self, fetch: BlobFetch, url: str, index: int, transfer: Transfer, offer: SegmentOffer,
        seeder: list[tuple[str, int]],
    ) -> None:
        """Take the pieces the seeder dealt us, from the torrent's response (or in one request
        per run of consecutive pieces), and hand each to libtorrent as it arrives, which
        shares it at once.

        Nobody else gets these pieces from the seeder: if one fails, take the segment from
        the seeder's swarm instead (peers still get them from us once we have them).
        """
        assert self.seeders is not None
        meta = transfer.meta
        try:
            if not all(0 <= p < meta.num_pieces for p in offer.dealt):
                raise Fallback("seeder", f"dealt pieces {offer.dealt} not all in segment {index}")
            for run in [offer.dealt] if offer.body is not None else _runs(offer.dealt):
                sizes = [end - start for start, end in map(meta.piece_range, run)]
                if offer.body is not None:
                    pieces = offer.inline_pieces(sizes)
                else:
                    pieces = self.seeders.pieces(url, fetch.digest, index, run[0], sizes)
                async for piece, data in pieces:
                    if not meta.piece_ok(piece, data):
                        raise Fallback("seeder", f"piece {piece} of segment {index} fails its hash")
                    await transfer.add_piece(piece, data)
                    self.metrics.inc("seeder_pieces_total")
        except (Fallback, aiohttp.ClientError, asyncio.IncompleteReadError, TimeoutError) as e:
            log.warning("blob %s: dealt piece failed (%s); joining the seeder's swarm",
                        fetch.digest, e or type(e).__name__)  # fmt: skip
            self.metrics.inc("seeder_segments_total", reason="piece_failed")
            transfer.connect(seeder)

    async def _seeder_if_stalled(
        self, transfer: Transfer, seeder: list[tuple[str, int]], dealer: asyncio.Task[None] | None
    ) -> None:
        """Peers sent nothing for this segment for ``seeder_grace``: ask the seeder too.

        Covers a designated agent that died or is slow, and a tracker that is down. Bytes,
        not pieces, count as progress: on a busy swarm one piece may take longer than that.
        The clock starts once our own dealt run is in (``dealer``): until the seeder has sent
        the segment's runs no peer has anything to send, and they wait in its queue for as
        long as its uplink is behind (256 MiB at N=16: counted from the torrent, 230 of 512
        segments were asked from the seeder, whose uplink then carried 1.6x the image).
        """
        if dealer is not None:
            await asyncio.wait([dealer])  # done or failed: a failure asked the seeder already
        received = 0
        while True:
            await asyncio.sleep(self.seeder_grace)
            if transfer.complete or transfer.error is not None:
                return
            now = transfer.payload_received()
            if now == received:
                log.debug("segment %s: no progress from peers, asking the seeder",
                          transfer.meta.name)  # fmt: skip
                self.metrics.inc("seeder_segments_total", reason="stalled")
                transfer.connect(seeder)
                return
            received = now

    async def _consume(self, fetch: BlobFetch, hasher, index: int, transfer: Transfer) -> None:
        """Advance through segment ``index`` as the swarm completes its pieces in order,
        taking every finished piece that follows at once (up to ``READ_CHUNK`` bytes): one
        read, check and hash per run instead of per piece, which is CPU the agents share."""
        layout = fetch.layout
        assert layout is not None
        base = index * layout.segment_size
        meta = transfer.meta
        piece = 0
        while piece < meta.num_pieces:
            if not await transfer.wait_piece(piece, self.stall_timeout):
                raise Fallback("stall", f"no progress for {self.stall_timeout:.0f}s")
            start, stop = meta.piece_range(piece)[0], piece + 1
            while (stop < meta.num_pieces and stop in transfer.done
                   and meta.piece_range(stop)[1] - start <= READ_CHUNK):
                stop += 1  # fmt: skip
            data = await transfer.read_pieces(piece, stop)
            piece = stop
            skip = max(0, fetch.available - (base + start))  # already streamed
            if skip >= len(data):
                continue
            data = data[skip:]
            await asyncio.to_thread(hasher.update, data)
            self.metrics.inc("blob_bytes_total", len(data), source="swarm")
            fetch.advance(len(data))

    async def _from_origin(self, fetch: BlobFetch, hasher) -> None:
        """Fetch the rest of the blob from the origin, writing it where the swarm would have."""
        if self.swarm is not None:
            for transfer in fetch.transfers:
                self.swarm.remove(transfer)
        if fetch.layout is None:
            fetch.layout = self.store.begin(fetch.digest, fetch.size, DEFAULT_SEGMENT)
        layout = fetch.layout
        # A removed torrent may still flush blocks into its files: write to new inodes.
        await asyncio.to_thread(layout.detach_from, fetch.available)
        offset = fetch.available
        resp = await self.origin.open_blob(
            fetch.upstream, fetch.name, fetch.digest, forward_headers(fetch.headers), offset
        )
        try:
            if resp.status not in (200, 206):
                raise error_for_status(resp.status, "blobs")
            skip = offset if resp.status == 200 else 0
            async for chunk in resp.content.iter_chunked(READ_CHUNK):
                if skip:
                    drop = min(skip, len(chunk))
                    chunk, skip = chunk[drop:], skip - drop
                    if not chunk:
                        continue
                if fetch.available + len(chunk) > fetch.size:
                    raise OCIError("DIGEST_INVALID", "origin sent more bytes than the blob has")
                await asyncio.to_thread(layout.write, fetch.available, chunk)
                await asyncio.to_thread(hasher.update, chunk)
                self.metrics.inc("blob_bytes_total", len(chunk), source="origin")
                fetch.advance(len(chunk))
        finally:
            resp.release()
        if fetch.available != fetch.size:
            raise OCIError("UNAVAILABLE", f"origin sent {fetch.available} of {fetch.size} bytes")
        if fetch.size == 0:
            await asyncio.to_thread(layout.write, 0, b"")

    def _seed(self, fetch: BlobFetch) -> None:
        """Keep sharing a cached blob whose torrents we know (re-added if we fell back)."""
        if self.swarm is None or fetch.layout is None:
            return
        layout = fetch.layout
        if len(fetch.metas) != layout.count:
            for transfer in fetch.transfers:
                self.swarm.remove(transfer)
            return
        transfers = []
        for meta in fetch.metas:
            current = self.swarm.get(meta.info_hash)
            if current is None or current.error:
                current = self.swarm.add(meta, layout.dir, seed=True)
            transfers.append(current)
        self.seeding[fetch.digest] = transfers

    def reseed(self) -> int:
        """At start: share every cached blob whose segment torrents are on disk."""
        if self.swarm is None:
            return 0
        count = 0
        for entry in self.store.entries():
            layout = self.store.layout(entry.digest)
            if layout is None:
                continue
            torrents = layout.saved_torrents()
            if torrents is None:
                continue
            with contextlib.suppress(SwarmError):
                metas = [Metainfo.parse(data) for data in torrents]
                self.seeding[entry.digest] = [
                    self.swarm.add(m, layout.dir, seed=True) for m in metas
                ]
                count += 1
        return count

    def stop_seeding(self, digest: Digest) -> None:
        for transfer in self.seeding.pop(digest, []):
            if self.swarm is not None:
                self.swarm.remove(transfer)


async def _resolve(host: str) -> str:
    """An IP literal for libtorrent's connect_peer (seeder URLs may name a host)."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    infos = await asyncio.get_running_loop().getaddrinfo(host, None)
    return str(infos[0][4][0])
