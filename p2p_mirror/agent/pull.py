"""Pulling one blob onto this node: from the swarm first, from the origin if that fails.

A ``BlobPuller`` runs each ``BlobDownload``: it asks a seeder for the blob's segment
torrents, joins each segment's swarm, takes the pieces the seeder dealt this agent, and
reads the segments in order as their pieces complete. Swarm trouble (no seeder, no torrent,
no progress within a deadline) passes to the origin at the current offset, so the pull
still succeeds. The blob enters the cache only when the whole of it matched its digest, and
is then seeded (``p2p_mirror.core.seeding``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp

from p2p_mirror.agent.blob_download import BlobDownload
from p2p_mirror.agent.dealt_segment import DealtSegment, verify_and_hash
from p2p_mirror.agent.seeder_client import (
    BlobSource,
    Fallback,
    SeederClient,
    SegmentOffer,
    runs_of,
)
from p2p_mirror.agent.serial_thread import SerialThread
from p2p_mirror.core.bounds import JOIN_AHEAD_SEGMENTS, transfer_deadline
from p2p_mirror.core.config import MiB, Upstream
from p2p_mirror.core.diskspace import Reservation
from p2p_mirror.core.metrics import Metrics
from p2p_mirror.core.oci import Digest, OCIError
from p2p_mirror.core.origin import Origin, OriginUnavailable, error_for_status, forward_headers
from p2p_mirror.core.seeding import SeededBlobs
from p2p_mirror.core.store import BlobLayout, BlobStore, segment_name
from p2p_mirror.core.swarm import Metainfo, SwarmError, TorrentSession, Transfer

log = logging.getLogger(__name__)
READ_CHUNK = 4 * MiB
DEFAULT_SEGMENT = 64 * MiB
# a client that reconnects (containerd retries with Range) finds its download still going
ORPHAN_GRACE = 5.0
ORIGIN_BODY_ATTEMPTS = 3  # an origin body cut or stalled is asked again from its offset


@dataclass
class BlobPuller:
    """Runs ``BlobDownload``s: swarm first, origin on failure, verify, cache, keep seeding."""

    store: BlobStore
    origin: Origin
    session: TorrentSession | None
    seeders: SeederClient | None
    metrics: Metrics
    swarm_timeout: float
    stall_timeout: float
    seeder_grace: float
    on_cached: Callable[[Digest], None] = lambda digest: None
    seeded: SeededBlobs | None = None  # made from ``session`` if not given
    active: dict[Digest, BlobDownload] = field(default_factory=dict)
    swarm_min_rate: int = 0  # bytes/s each segment must keep up from the start (0: none)
    origin_min_rate: int = 0  # bytes/s the origin's part must keep up from its start (0: none)
    # holds disk space for a new download (``BlobStore.reserve``); raises ``NoSpace``
    reserve: Callable[[int], Reservation] | None = None

    def __post_init__(self) -> None:
        if self.seeded is None and self.session is not None:
            self.seeded = SeededBlobs(self.store, self.session)

    def start(
        self, digest: Digest, size: int, upstream: Upstream, name: str, headers: Mapping[str, str]
    ) -> BlobDownload:
        """The running download of ``digest`` (concurrent requests share it), or a new one."""
        download = self.active.get(digest)
        if download is not None and download.error is None and not download.done:
            return download
        reservation = self.reserve(size) if self.reserve is not None else None  # or NoSpace
        download = BlobDownload(digest, size, upstream, name, dict(headers))
        download.reservation = reservation
        self.active[digest] = download
        download.task = task = asyncio.create_task(self._pull(download))

        def ended(_task: asyncio.Task[None]) -> None:
            if self.active.get(digest) is download:
                del self.active[digest]
            if reservation is not None:
                self.store.ledger.release(reservation)

        task.add_done_callback(ended)
        return download

    def reader_left(self, download: BlobDownload) -> None:
        """A client response stopped reading: with nobody else reading, the download has no
        purpose left (it would only fill the disk), so it is cancelled after a short grace
        in which a retrying client may come back."""
        if download.readers or download.done or download.error is not None:
            return

        async def cancel_if_still_orphaned() -> None:
            await asyncio.sleep(ORPHAN_GRACE)
            if not download.readers and download.task is not None and not download.task.done():
                log.info("blob %s: no reader left; cancelling its download", download.digest)
                self.metrics.inc("orphaned_downloads_total")
                download.task.cancel()

        download.orphan_timer = asyncio.create_task(cancel_if_still_orphaned())

    async def _pull(self, download: BlobDownload) -> None:
        hasher = download.digest.hasher()
        jobs = SerialThread("blob-hash")  # the blob's hashing and writes, in order
        try:
            if self.session is not None and self.seeders is not None and download.size > 0:
                try:
                    await self._from_swarm(download, hasher, jobs)
                except Exception as e:  # noqa: BLE001 - whatever broke in P2P, the origin remains
                    reason = e.reason if isinstance(e, Fallback) else "swarm"
                    self.metrics.inc("fallbacks_total", reason=reason)
                    log.warning(
                        "blob %s: swarm failed at %d/%d bytes (%s); continuing from origin",
                        download.digest, download.available, download.size, e,
                    )
            if download.available < download.size or download.layout is None:
                await self._from_origin(download, hasher, jobs)
            if hasher.hexdigest() != download.digest.hex:
                raise OCIError("DIGEST_INVALID", "blob bytes do not match the digest")
            download.digest_matched()
            assert download.layout is not None
            await asyncio.to_thread(self.store.commit, download.layout)  # fsync, off the event loop
            await asyncio.to_thread(self.store.add_source, download.layout, download.upstream.name)
            self._seed(download)
            download.finish()
            self.on_cached(download.digest)
            log.info("cached %s (%d bytes)", download.digest, download.size)
        except asyncio.CancelledError:
            self._drop(download, OCIError("UNAVAILABLE", "download cancelled"))
            raise
        except Exception as e:  # noqa: BLE001 - every failure must reach the waiting readers
            # Clients get a fixed message; hosts, ports and exception text go to the log only.
            error = e if isinstance(e, OCIError) else OCIError("UNAVAILABLE", "download failed")
            if isinstance(e, OriginUnavailable):
                error = OCIError("UNAVAILABLE", "origin registry unavailable")
            log.warning("blob %s failed: %s", download.digest, e or repr(e))
            self.metrics.inc("blob_failures_total", code=error.code)
            self._drop(download, error)
        finally:
            jobs.close()

    def _drop(self, download: BlobDownload, error: OCIError) -> None:
        """A failed or cancelled download: out of the swarm, off the disk, readers told."""
        for task in download.watchers:
            task.cancel()
        if self.session is not None:
            for transfer in download.transfers:
                self.session.remove(transfer)
        if download.layout is not None:
            self.store.abandon(download.layout)
        download.finish(error)

    async def _from_swarm(self, download: BlobDownload, hasher, jobs: SerialThread) -> None:
        assert self.session is not None and self.seeders is not None
        source = self.seeders.source(download.digest, download.upstream.name, download.name)
        try:
            url, info = await asyncio.wait_for(source.open(), self.swarm_timeout)
        except TimeoutError:
            raise Fallback("seeder", "timed out") from None
        if (info.size != download.size or info.segment_size <= 0
                or info.segments != max(1, -(-info.size // info.segment_size))):  # fmt: skip
            raise Fallback("seeder", f"seeder disagrees on size: {info}")
        log.debug("blob %s: seeder %s has it: %s", download.digest, url, info)
        layout = self.store.begin(download.digest, download.size, info.segment_size)
        download.layout = layout
        # Ask for the segments' torrents ahead of the reader and join each swarm as soon as
        # it is published (joining late delays every segment), but only so many ahead: a
        # task per segment of a huge blob would be a task per 16 MiB.
        getters: dict[int, asyncio.Task[Transfer | DealtSegment]] = {}
        joined = 0
        started = asyncio.get_running_loop().time()
        try:
            for index in range(layout.count):
                while joined < min(layout.count, index + JOIN_AHEAD_SEGMENTS):
                    getters[joined] = asyncio.create_task(
                        self._join(download, source, joined))  # fmt: skip
                    joined += 1
                # Each segment is due by an absolute deadline, however patient the waits
                # inside are: past it the rest of the blob comes from the origin.
                end = min(download.size, (index + 1) * layout.segment_size)
                deadline = transfer_deadline(started, self.swarm_timeout, end,
                                             self.swarm_min_rate)  # fmt: skip
                try:
                    joined_segment = await asyncio.wait_for(  # fails once the seeder stalls
                        getters.pop(index), _left(deadline))
                except TimeoutError:
                    raise _late(index, deadline - started) from None
                if isinstance(joined_segment, DealtSegment):
                    await self._consume_dealt(
                        download, hasher, jobs, index, joined_segment, source, deadline, started)
                    log.debug("blob %s: segment %d streamed as dealt", download.digest, index)
                    continue
                transfer = joined_segment
                await self._consume(download, hasher, jobs, index, transfer, deadline, started)
                if log.isEnabledFor(logging.DEBUG):  # asks libtorrent's thread, and waits
                    log.debug("blob %s: segment %d streamed; peers: %s", download.digest,
                              index, transfer.peer_summary())  # fmt: skip
        finally:
            for task in (*getters.values(), *download.watchers):
                task.cancel()

    async def _join(
        self, download: BlobDownload, source: BlobSource, index: int
    ) -> Transfer | DealtSegment:
        """Join segment ``index``'s swarm and take its dealt run; a segment dealt to us
        whole, inline, is written straight into its file, checked, then seeded
        (``DealtSegment``)."""
        assert self.session is not None and self.seeders is not None and download.layout is not None
        url, offer = await source.torrent(index, self.session.port)
        dealer: asyncio.Task[None] | None = None
        try:
            meta = Metainfo.parse(offer.torrent)
            expected = segment_name(download.digest, index, download.layout.count)
            if meta.name != expected or meta.size != download.layout.segment_len(index):
                raise Fallback("seeder", f"torrent {index} does not describe segment {expected}")
            download.layout.torrent_path(index).write_bytes(offer.torrent)
            download.metas.append(meta)
            if offer.body is not None and offer.dealt == list(range(meta.num_pieces)):
                # nobody else holds a piece of it yet: no swarm to join until it is checked
                segment = DealtSegment(meta, download.layout.segment_path(index))
                dealer = asyncio.create_task(self._write_dealt(download, source, segment, offer))
                segment.writer = dealer
                download.watchers.append(dealer)
                return segment
            log.debug("blob %s: joining segment %d swarm (%s), pieces %s from the seeder",
                      download.digest, index, meta.info_hash, offer.dealt)  # fmt: skip
            transfer = self.session.add(meta, download.layout.dir, seed=False)
            download.transfers.append(transfer)
            if offer.dealt:
                dealer = asyncio.create_task(
                    self._dealt_pieces(download, source, url, index, transfer, offer))  # fmt: skip
                download.watchers.append(dealer)
            download.watchers.append(
                asyncio.create_task(self._seeder_if_stalled(transfer, source, dealer)))  # fmt: skip
            return transfer
        finally:  # the response ends with the dealt pieces, even if that task never ran
            if dealer is None:
                offer.close()
            else:
                dealer.add_done_callback(lambda _task: offer.close())

    async def _dealt_pieces(
        self, download: BlobDownload, source: BlobSource, url: str, index: int,
        transfer: Transfer, offer: SegmentOffer,
    ) -> None:
        """Take the pieces the seeder dealt us and hand each to libtorrent as it arrives,
        which checks its hash and shares it at once.

        Nobody else gets these pieces from the seeder. If the connection broke, ask once
        more (the same seeder deals us the same run again; one that is down, its successor
        deals the segment anew); if that fails too, or the bytes were wrong, take the
        segment from the seeder's swarm (peers still get them from us once we have them).
        """
        try:
            await self._take_run(download, url, index, transfer, offer)
            return
        except Fallback as e:
            failure: Exception = e
        except (aiohttp.ClientError, asyncio.IncompleteReadError, TimeoutError) as e:
            log.warning("blob %s: dealt run of segment %d cut (%s); asking again",
                        download.digest, index, e or type(e).__name__)  # fmt: skip
            failure = e
            try:
                assert self.session is not None
                url, again = await source.torrent(index, self.session.port)
            except Fallback as e2:
                failure = e2
            else:
                try:
                    await self._take_run(download, url, index, transfer, again)
                    return
                except (Fallback, aiohttp.ClientError, asyncio.IncompleteReadError,
                        TimeoutError) as e2:  # fmt: skip
                    failure = e2
                finally:
                    again.close()
        log.warning("blob %s: dealt piece failed (%s); joining the seeder's swarm",
                    download.digest, failure or type(failure).__name__)  # fmt: skip
        self.metrics.inc("seeder_segments_total", reason="piece_failed")
        transfer.connect(source.peers)

    async def _write_dealt(
        self, download: BlobDownload, source: BlobSource, segment: DealtSegment,
        offer: SegmentOffer,
    ) -> None:
        """Write a segment dealt to us whole into its file; if the run breaks, the segment
        comes from the seeder's swarm instead (``_dealt_failed``)."""
        try:
            run = offer.direct_run(segment.size)
            if run is None:
                await segment.write(offer.inline_run(segment.size))
            else:
                try:
                    await segment.receive(run)
                finally:
                    run.close()
        except (aiohttp.ClientError, asyncio.IncompleteReadError, TimeoutError, OSError) as e:
            self._dealt_failed(download, source, segment, f"cut at {segment.written}/"
                               f"{segment.size} ({e or type(e).__name__})")  # fmt: skip

    def _dealt_failed(
        self, download: BlobDownload, source: BlobSource, segment: DealtSegment, why: str
    ) -> None:
        """Take a dealt segment whose run broke or failed a piece's hash from the seeder's
        swarm, into a new file (a late write of the old run lands in the old one)."""
        assert self.session is not None and download.layout is not None
        if segment.broken:
            return
        log.warning("blob %s: dealt segment %s %s; joining the seeder's swarm",
                    download.digest, segment.meta.name, why)  # fmt: skip
        self.metrics.inc("seeder_segments_total", reason="piece_failed")
        if segment.writer is not None and segment.writer is not asyncio.current_task():
            segment.writer.cancel()  # the rest of its run is of no use
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()
        transfer = self.session.add(segment.meta, download.layout.dir, seed=False,
                                    peers=source.peers)  # fmt: skip
        download.transfers.append(transfer)
        segment.broke(transfer)

    async def _take_run(
        self, download: BlobDownload, url: str, index: int, transfer: Transfer,
        offer: SegmentOffer,
    ) -> None:
        """The dealt run of ``offer``, from its response (or in one request per run of
        consecutive pieces), each piece checked and handed to libtorrent."""
        assert self.seeders is not None
        meta = transfer.meta
        if not all(0 <= p < meta.num_pieces for p in offer.dealt):
            raise Fallback("seeder", f"dealt pieces {offer.dealt} not all in segment {index}")
        for run in [offer.dealt] if offer.body is not None else runs_of(offer.dealt):
            sizes = [end - start for start, end in map(meta.piece_range, run)]
            if offer.body is not None:
                pieces = offer.inline_pieces(sizes)
            else:
                pieces = self.seeders.pieces(url, download.digest, index, run[0], sizes)
            async for batch in pieces:
                # not those taken before the connection broke, or from a peer
                fresh = [(piece, data) for piece, data in batch if piece not in transfer.done]
                await transfer.add_pieces(fresh)
                self.metrics.inc("seeder_pieces_total", len(fresh))
            for piece in run:  # libtorrent hashes each added piece (we need not)
                try:
                    verified = await transfer.verdict(piece, self.stall_timeout)
                except (SwarmError, TimeoutError) as e:
                    raise Fallback("seeder", f"piece {piece} of segment {index}: {e}") from e
                if not verified:
                    raise Fallback("seeder", f"piece {piece} of segment {index} fails its hash")

    async def _seeder_if_stalled(
        self, transfer: Transfer, source: BlobSource, dealer: asyncio.Task[None] | None
    ) -> None:
        """Peers sent nothing for this segment for ``seeder_grace``: ask the seeder too.

        Covers a designated agent that died or is slow, and a tracker that is down. Bytes,
        not pieces, count as progress: on a busy swarm one piece may take longer than that.
        The clock starts once our own dealt run is in (``dealer``): until the seeder has sent
        the segment's runs no peer has anything to send, and they wait in its queue for as
        long as its uplink is behind.
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
                transfer.connect(source.peers)
                return
            received = now

    async def _consume(
        self, download: BlobDownload, hasher, jobs: SerialThread, index: int, transfer: Transfer,
        deadline: float = float("inf"), started: float = 0.0,
    ) -> None:
        """Advance through segment ``index`` as the swarm completes its pieces in order,
        taking every finished piece that follows at once (up to ``READ_CHUNK`` bytes): one
        read, check and hash per run instead of per piece, which is CPU the agents share."""
        layout = download.layout
        assert layout is not None
        base = index * layout.segment_size
        meta = transfer.meta
        piece = 0
        while piece < meta.num_pieces:
            # only the wait is cut at the deadline, never the hashing: hasher and
            # ``available`` stay in step for the origin to continue from
            try:
                async with asyncio.timeout_at(None if deadline == float("inf") else deadline):
                    moving = await transfer.wait_piece(piece, self.stall_timeout)
            except TimeoutError:
                raise _late(index, deadline - started) from None
            if not moving:
                raise Fallback("stall", f"no progress for {self.stall_timeout:.0f}s")
            start, stop = meta.piece_range(piece)[0], piece + 1
            while (stop < meta.num_pieces and stop in transfer.done
                   and meta.piece_range(stop)[1] - start <= READ_CHUNK):
                stop += 1  # fmt: skip
            data = await transfer.read_pieces(piece, stop)
            piece = stop
            skip = max(0, download.available - (base + start))  # already streamed
            if skip >= len(data):
                continue
            data = data[skip:]
            await jobs.run(hasher.update, data)
            self.metrics.inc("blob_bytes_total", len(data), source="swarm")
            download.advance(len(data))

    async def _consume_dealt(
        self, download: BlobDownload, hasher, jobs: SerialThread, index: int,
        segment: DealtSegment,
        source: BlobSource, deadline: float = float("inf"), started: float = 0.0,
    ) -> None:
        """Advance through a segment dealt to us whole as its pieces are written, checking
        each piece's hash and then hashing the blob from the file, and seed it once all is
        checked; from the seeder's swarm (``_consume``) once the run broke or a piece failed."""
        layout = download.layout
        assert layout is not None
        base = index * layout.segment_size
        while (pos := download.available - base) < segment.size:
            try:
                async with asyncio.timeout_at(None if deadline == float("inf") else deadline):
                    moving = await segment.wait_beyond(pos, self.stall_timeout)
            except TimeoutError:
                raise _late(index, deadline - started) from None
            if not moving:
                raise Fallback("stall", f"no progress for {self.stall_timeout:.0f}s")
            if segment.broken:
                break
            end = segment.verifiable()
            verdict = await jobs.run(verify_and_hash, hasher, segment.meta, segment.path,
                                     pos, end)  # fmt: skip
            if verdict is not None:
                self._dealt_failed(download, source, segment, verdict)
                break
            self.metrics.inc("blob_bytes_total", end - pos, source="swarm")
            download.advance(end - pos)
        else:  # every piece checked: seed it (libtorrent need not check them again)
            assert self.session is not None
            transfer = self.session.add(segment.meta, layout.dir, seed=True, checked=True)
            download.transfers.append(transfer)
            self.metrics.inc("seeder_pieces_total", segment.meta.num_pieces)
            self.metrics.inc("dealt_segments_total")
            return
        assert segment.transfer is not None
        await self._consume(download, hasher, jobs, index, segment.transfer, deadline, started)

    async def _from_origin(self, download: BlobDownload, hasher, jobs: SerialThread) -> None:
        """Download the rest of the blob from the origin, writing it where the swarm would have."""
        if self.session is not None:
            for transfer in download.transfers:
                self.session.remove(transfer)
        if download.layout is None:
            download.layout = self.store.begin(download.digest, download.size, DEFAULT_SEGMENT)
        layout = download.layout
        # A removed torrent may still flush blocks into its files: write to new inodes.
        await asyncio.to_thread(layout.detach_from, download.available)
        # However patient each read is, the whole rest of the blob is due by an absolute
        # deadline: a body trickling a byte at a time never stalls, yet must end.
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = transfer_deadline(started, self.stall_timeout,
                                     download.size - download.available, self.origin_min_rate)
        for attempt in range(1, ORIGIN_BODY_ATTEMPTS + 1):
            try:
                await self._origin_body(download, hasher, jobs, layout, deadline)
                break
            except (aiohttp.ClientError, TimeoutError) as e:
                if loop.time() >= deadline:
                    self.metrics.inc("origin_deadlines_total")
                    raise OCIError("UNAVAILABLE", f"origin body not in by its deadline "
                                   f"({deadline - started:.0f}s) at "
                                   f"{download.available}/{download.size}") from None
                # a cut or stalled body: ask again from where it stopped (Range)
                if attempt == ORIGIN_BODY_ATTEMPTS:
                    raise OCIError("UNAVAILABLE", f"origin body failed {attempt} times at "
                                   f"{download.available}/{download.size}: {e!r}") from None
                log.warning("blob %s: origin body failed at %d/%d (%r); resuming",
                            download.digest, download.available, download.size, e)  # fmt: skip
                self.metrics.inc("origin_resumes_total")
        if download.available != download.size:
            raise OCIError("UNAVAILABLE",
                           f"origin sent {download.available} of {download.size} bytes")
        if download.size == 0:
            await asyncio.to_thread(layout.write, 0, b"")

    async def _origin_body(
        self, download: BlobDownload, hasher, jobs: SerialThread, layout: BlobLayout,
        deadline: float,
    ) -> None:
        """One origin GET from ``download.available`` on; a read that waits longer than
        ``stall_timeout`` for its next byte, or past ``deadline``, raises TimeoutError (only
        the request and the read are cut, never the write and hash, so the next attempt
        continues in step)."""
        offset = download.available
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(None if deadline == float("inf") else deadline):
            resp = await self.origin.open_blob(
                download.upstream, download.name, download.digest,
                forward_headers(download.headers), offset,
            )
        try:
            if resp.status not in (200, 206):
                raise error_for_status(resp.status, "blobs")
            skip = offset if resp.status == 200 else 0
            while True:
                async with asyncio.timeout_at(min(loop.time() + self.stall_timeout, deadline)):
                    chunk = await resp.content.read(READ_CHUNK)
                if not chunk:
                    break
                if skip:
                    drop = min(skip, len(chunk))
                    chunk, skip = chunk[drop:], skip - drop
                    if not chunk:
                        continue
                if download.available + len(chunk) > download.size:
                    raise OCIError("DIGEST_INVALID", "origin sent more bytes than the blob has")
                await jobs.run(layout.write, download.available, chunk)
                await jobs.run(hasher.update, chunk)
                self.metrics.inc("blob_bytes_total", len(chunk), source="origin")
                download.advance(len(chunk))
        finally:
            resp.release()

    def _seed(self, download: BlobDownload) -> None:
        """Keep sharing a cached blob whose torrents we know (re-added if we fell back)."""
        if self.session is None or self.seeded is None or download.layout is None:
            return
        if len(download.metas) != download.layout.count:
            for transfer in download.transfers:
                self.session.remove(transfer)
            return
        self.seeded.seed(download.digest, download.layout, download.metas)


def _left(deadline: float) -> float | None:
    """Seconds until ``deadline`` (None: there is none)."""
    if deadline == float("inf"):
        return None
    return max(0.0, deadline - asyncio.get_running_loop().time())


def _late(index: int, after: float) -> Fallback:
    return Fallback("deadline", f"segment {index} not in by its deadline ({after:.0f}s)")
