"""Ingest: each blob from the origin once, cut into segment files, each published as a torrent.

A blob's size and segment layout are known at once (the origin's HEAD); its body comes
``origin_streams`` at a time in request order (blobs of one piece, such as image configs,
at once), and each segment's torrent is published as soon as its bytes have arrived, so
peers start before the whole blob is here. The last segment is published only after the
whole blob matched its digest, so no peer can ever complete a blob that fails it. Reading
the origin pauses while the dealt runs waiting to be sent exceed a backlog (backpressure).

This module owns every job's state; the HTTP API reads it through ``IngestJob``'s read-only
views and awaits torrents through ``Ingest.torrent_for``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from types import MappingProxyType

import aiohttp

from p2p_mirror.core.bounds import TooLarge, check_size, content_length
from p2p_mirror.core.config import SeederConfig, Upstream, parse_registry_name, upstream_for
from p2p_mirror.core.diskspace import NoSpace, Reservation
from p2p_mirror.core.metrics import Metrics
from p2p_mirror.core.oci import Digest, OCIError
from p2p_mirror.core.origin import Origin, OriginUnavailable
from p2p_mirror.core.provenance import origin_has_bytes
from p2p_mirror.core.seeding import SeededBlobs, StoredTorrents
from p2p_mirror.core.store import BlobLayout, BlobStore
from p2p_mirror.core.swarm import Metainfo, make_torrent
from p2p_mirror.core.taken_body import TakenBody, take_body
from p2p_mirror.seeder import tracker_shard
from p2p_mirror.seeder.body_receiver import BodyCut, BodyReceiver, BodyStalled, BodyTooLong
from p2p_mirror.seeder.credentials import RegistryAuth
from p2p_mirror.seeder.dealing import Dealer
from p2p_mirror.seeder.link_queue import LinkQueue
from p2p_mirror.seeder.segment_writer import WRITE_BATCH, SegmentWriter
from p2p_mirror.seeder.sizing import piece_size_for, segment_size_for

log = logging.getLogger("p2p_mirror.seeder")
STUCK_STREAM_SECONDS = 5.0  # an origin body this long without a byte lets the next one start
# The next blob's request goes out this many bytes before the current body ends, so its
# request and TCP ramp-up overlap the current body's last bytes.
NEXT_REQUEST_LEAD_BYTES = 512 * 1024
BACKLOG_SEGMENTS = 2  # dealt runs waiting to be sent, in segments, before the origin waits
CHECK_SECONDS = 60.0  # a registry's "yes, this repository has the blob" is trusted this long
CHECKS_PER_JOB = 256  # (registry, repository) answers kept per job at most


class IngestError(Exception):
    """A blob could not be ingested; ``reason`` is a short label (also a metric label).

    ``origin_status`` is the origin's HTTP status where it refused the blob.
    """

    ORIGIN_REFUSED = "origin_refused"
    ORIGIN_UNAVAILABLE = "origin_unavailable"
    ORIGIN_INCOMPLETE = "origin_incomplete"  # no size, sizes that disagree, a short body
    DIGEST_MISMATCH = "digest_mismatch"  # more bytes than announced, or bytes that fail it
    TOO_LARGE = "too_large"  # larger than max_blob_size
    NO_SPACE = "no_space"  # no room on disk, even after evicting
    FAILED = "error"  # our own failure (a disk error)

    def __init__(self, reason: str, message: str, origin_status: int | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message, self.origin_status = reason, message, origin_status

    @property
    def credentials_refused(self) -> bool:
        """The origin refused the seeder's own credentials (or their absence): an agent
        should fetch the blob from the origin with its client's credentials."""
        return self.reason == self.ORIGIN_REFUSED and self.origin_status in (401, 403)


class IngestJob:
    """One blob being (or already) ingested; its torrents resolve as segments are published.

    Read-only outside this module: ``layout``, ``error``, ``metas``, ``waiting_agents``."""

    def __init__(self, digest: Digest, layout: BlobLayout | None = None) -> None:
        self.digest = digest
        self._layout = layout
        self._ready = asyncio.Event()
        # made on demand: a huge blob must not cost a future per segment up front
        self._torrents: dict[int, asyncio.Future[bytes]] = {}
        self._error: IngestError | None = None
        self._task: asyncio.Task[None] | None = None
        self._metas: dict[int, Metainfo] = {}
        self._waiting: dict[int, Counter[str]] = {}  # agents waiting for each segment
        self._runs: dict[int, dict[str, list[int]]] = {}  # each segment's dealt runs
        self._received = 0  # body bytes from the origin so far
        self._streaming = False  # the body has its origin turn (not queued behind others)
        self._reservation: Reservation | None = None  # disk held for it while it downloads
        # (registry, repository) -> when its origin last confirmed the blob to the seeder
        self._confirmed: dict[tuple[str, str], float] = {}
        self._sources: set[str] = set()  # registries whose bytes of this blob matched
        self._checking: dict[tuple[str, str], asyncio.Future[None]] = {}  # checks under way

    @property
    def layout(self) -> BlobLayout | None:
        return self._layout

    @property
    def error(self) -> IngestError | None:
        return self._error

    @property
    def metas(self) -> Mapping[int, Metainfo]:
        """The published segments' torrents, parsed."""
        return MappingProxyType(self._metas)

    @property
    def active(self) -> bool:
        return self._task is not None and not self._task.done()

    def has_segment(self, index: int) -> bool:
        """Whether the layout is known and has segment ``index`` (published or not)."""
        return self._ready.is_set() and self._layout is not None and index < self._layout.count

    def _torrent(self, index: int) -> asyncio.Future[bytes]:
        fut = self._torrents.get(index)
        if fut is None:
            fut = self._torrents[index] = asyncio.get_running_loop().create_future()
            if self._error is not None:
                fut.set_exception(self._error)
                fut.exception()
        return fut

    def waiting_agents(self, index: int) -> int:
        return sum(self._waiting.get(index, Counter()).values())

    def _fail(self, error: IngestError) -> None:
        self._error = error
        self._ready.set()
        for fut in self._torrents.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # mark retrieved: agents may never ask for it


class Ingest:
    """Runs the ingest jobs of one seeder."""

    def __init__(self, cfg: SeederConfig, store: BlobStore, origin: Origin, seeded: SeededBlobs,
                 dealer: Dealer, metrics: Metrics,
                 auth: RegistryAuth | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self.auth = auth if auth is not None else RegistryAuth({})
        self.store = store
        self.origin = origin
        self.seeded = seeded
        self.dealer = dealer
        self.metrics = metrics
        self.origin_queue = LinkQueue(cfg.origin_streams, STUCK_STREAM_SECONDS,
                                      cfg.origin_min_rate)  # fmt: skip
        self._jobs: dict[Digest, IngestJob] = {}
        metrics.describe("origin_bytes_total", "Blob bytes fetched from origin registries")
        metrics.describe("seed_jobs_total", "Blob seeding jobs by result")
        metrics.describe("origin_bodies_total", "Origin blob bodies by reader: aiohttp on the "
                         "event loop, or the segment writer's thread (plain HTTP)")

    @property
    def origin_bytes(self) -> int:
        """Blob bytes received from origins so far (the agents' sign that it is working)."""
        return int(self.metrics.value("origin_bytes_total"))

    def job(self, digest: Digest) -> IngestJob | None:
        return self._jobs.get(digest)

    def jobs(self) -> int:
        return len(self._jobs)

    def progress(self, job: IngestJob) -> tuple[int, int | None]:
        """(this blob's origin bytes, the seeder's origin bytes while the blob still waits
        for its origin turn, else None): what a 202 tells the waiting agent."""
        return job._received, None if job._streaming else self.origin_bytes

    def active(self) -> set[Digest]:
        """Blobs still being ingested (not to be evicted)."""
        return {d for d, job in self._jobs.items() if job.active}

    def restore(self, stored: StoredTorrents) -> None:
        """A job for a blob stored (and seeded again) at start: every torrent published."""
        job = IngestJob(stored.digest, stored.layout)
        job._sources = set(self.store.sources(stored.layout))
        for index, (data, meta) in enumerate(zip(stored.torrents, stored.metas, strict=True)):
            job._metas[index] = meta
            job._torrent(index).set_result(data)
        job._received, job._streaming = stored.layout.size, True
        job._ready.set()
        self._jobs[stored.digest] = job

    def close(self) -> None:
        for job in self._jobs.values():
            if job._task:
                job._task.cancel()

    def upstream(self, registry: str) -> Upstream:
        """The configured endpoint of ``registry``: the seeder fetches from nowhere else.

        ``OCIError`` for a name outside the grammar or the configuration; the message does
        not echo the name."""
        try:
            name = parse_registry_name(registry)
        except ValueError:
            raise OCIError("NAME_INVALID", "invalid registry parameter") from None
        upstream = upstream_for(self.cfg.registries, name)
        if upstream is None:
            raise OCIError("NAME_UNKNOWN", "registry not configured on this seeder")
        return upstream

    async def ensure(self, digest: Digest, upstream: Upstream, name: str) -> IngestJob:
        """The job for ``digest``, started if needed; returns once its size is known and
        ``upstream`` confirmed that ``name`` has the blob (to the seeder's own credentials):
        a job started for one registry is no answer for another.

        Raises ``IngestError`` if it failed or the registry refused.
        """
        job = self._jobs.get(digest)
        if job is None or job.error is not None:
            job = IngestJob(digest)
            self._jobs[digest] = job
            job._task = asyncio.create_task(self._run(job, upstream, name))
        await job._ready.wait()
        if job.error:
            raise job.error
        key = (upstream.name, name)
        if job._confirmed.get(key, 0.0) <= time.monotonic() - CHECK_SECONDS:
            # Agents asking at once share one check (a body download, for a new registry).
            check = job._checking.get(key)
            if check is None:
                check = asyncio.ensure_future(self._confirm(job, upstream, name))
                job._checking[key] = check
                check.add_done_callback(lambda _: job._checking.pop(key, None))
            await asyncio.shield(check)
        return job

    async def _confirm(self, job: IngestJob, upstream: Upstream, name: str) -> None:
        """Ask ``upstream`` (HEAD, the seeder's credentials) whether ``name`` has the blob.
        A registry the blob's bytes never came from must send them (checked against the
        digest, then dropped): its HEAD proves nothing, a lying registry says yes to
        anything."""
        key = (upstream.name, name)
        try:
            status, head = await self._head(job.digest, upstream, name)
        except OriginUnavailable as e:
            log.warning("blob %s: check at %s/%s: %s", job.digest, upstream.name, name, e)
            raise IngestError(IngestError.ORIGIN_UNAVAILABLE, str(e)) from None
        if status != 200:
            raise _refused(status)
        assert job.layout is not None
        if content_length(head) != job.layout.size:
            raise IngestError(IngestError.ORIGIN_INCOMPLETE, "origin disagrees on the size")
        if upstream.name not in job._sources:
            status = await origin_has_bytes(self.origin, upstream, name, job.digest,
                                            job.layout.size, self.auth.headers(upstream, name))
            if status != 200:
                raise _refused(status) if status else IngestError(
                    IngestError.ORIGIN_INCOMPLETE, "origin did not send the blob")  # fmt: skip
            job._sources.add(upstream.name)
            if not job.active:  # committed already; else the commit records every source
                await asyncio.to_thread(self.store.add_source, job.layout, upstream.name)
        if len(job._confirmed) >= CHECKS_PER_JOB:
            job._confirmed.clear()
        job._confirmed[key] = time.monotonic()

    async def _head(self, digest: Digest, upstream: Upstream, name: str):
        """(status, headers) of the origin's HEAD with the seeder's credentials, after the
        registry's token dance if it asks for one."""
        send = self.auth.headers(upstream, name)
        status, head, _ = await self.origin.request("HEAD", upstream, name, "blobs", str(digest),
                                                    send)  # fmt: skip
        if status == 401 and await self.auth.answer(upstream, name, head.get("WWW-Authenticate")):
            send = self.auth.headers(upstream, name)
            status, head, _ = await self.origin.request("HEAD", upstream, name, "blobs",
                                                        str(digest), send)  # fmt: skip
        return status, head

    async def torrent_for(self, job: IngestJob, index: int, agent: str,
                          wait: float) -> tuple[bytes, list[int]]:  # fmt: skip
        """Segment ``index``'s torrent and the run of pieces dealt to ``agent``, once it is
        published; TimeoutError after ``wait`` seconds, ``IngestError`` if the job failed."""
        waiting = job._waiting.setdefault(index, Counter())
        waiting[agent] += 1
        try:
            data = await asyncio.wait_for(asyncio.shield(job._torrent(index)), wait)
        finally:
            waiting[agent] -= 1
            if not waiting[agent]:
                del waiting[agent]
        if index not in job._runs:  # nobody was waiting when it was published
            job._runs[index] = self.dealer.assign(job._metas[index].num_pieces, [agent])
        return data, job._runs[index].get(agent, [])

    def evict(self, digest: Digest) -> None:
        """Forget a blob and stop seeding it before the store deletes its files."""
        self._jobs.pop(digest, None)
        self.seeded.stop(digest)
        log.info("evicted %s", digest)

    async def _run(self, job: IngestJob, upstream: Upstream, name: str) -> None:
        try:
            await self._ingest(job, upstream, name)
            self.metrics.inc("seed_jobs_total", result="ok")
        except IngestError as e:
            self.metrics.inc("seed_jobs_total", result=e.reason)
            log.warning("blob %s from %s/%s: %s", job.digest, upstream.name, name, e)
            job._fail(e)
        except OriginUnavailable as e:
            self.metrics.inc("seed_jobs_total", result=IngestError.ORIGIN_UNAVAILABLE)
            log.warning("blob %s: origin unavailable: %s", job.digest, e)
            job._fail(IngestError(IngestError.ORIGIN_UNAVAILABLE, str(e)))
        except Exception as e:  # noqa: BLE001 - a disk error must fail the job, not the server
            self.metrics.inc("seed_jobs_total", result=IngestError.FAILED)
            log.exception("blob %s failed", job.digest)
            job._fail(IngestError(IngestError.FAILED, f"seeder error: {e}"))
        if job._reservation is not None:  # committed (counted as cache) or dropped
            self.store.ledger.release(job._reservation)
            job._reservation = None
        if job.error is not None:
            self.seeded.stop(job.digest)
            if job.layout is not None:
                self.store.abandon(job.layout)
            # Forget it: its requesters have their error, and the next request starts over.
            if self._jobs.get(job.digest) is job:
                del self._jobs[job.digest]

    async def _ingest(self, job: IngestJob, upstream: Upstream, name: str) -> None:
        status, head = await self._head(job.digest, upstream, name)
        if status != 200:
            raise _refused(status)
        job._confirmed[(upstream.name, name)] = time.monotonic()
        job._sources.add(upstream.name)
        send = self.auth.headers(upstream, name)
        size = content_length(head)
        if size is None:
            raise IngestError(IngestError.ORIGIN_INCOMPLETE, "origin sent no Content-Length")
        try:
            check_size("blob", size, self.cfg.max_blob_size, "max_blob_size")
        except TooLarge as e:
            raise IngestError(IngestError.TOO_LARGE, str(e)) from None
        segment = segment_size_for(
            size, self.cfg.segment_size, self.cfg.piece_size, self.cfg.segment_parts
        )
        try:  # room for it, counting the blobs in flight; else the agents use the origin
            job._reservation = self.store.reserve(
                size, self.cfg.cache_max_bytes, self.cfg.min_free_disk, self.active(),
                before_evict=self.evict)  # fmt: skip
        except NoSpace as e:
            raise IngestError(IngestError.NO_SPACE, str(e)) from None
        layout = self.store.begin(job.digest, size, segment)
        job._layout = layout
        job._ready.set()  # agents learn the layout now, while the blob may still be queued
        # A blob of one piece (an image config, a tiny layer) costs the origin link next to
        # nothing: it does not wait behind the large bodies (runtimes need the config early).
        if size <= self.cfg.piece_size:
            job._streaming = True
            hashes = await self._stream(job, layout, upstream, name, send, lambda: None, None)
        else:
            send_queue = self.dealer.send_queue

            def moved() -> int:  # paused for the dealt runs (_stream): not stuck while they go
                return job._received + send_queue.granted_bytes

            async with self.origin_queue.slot(moved, f"blob {job.digest}") as let_next_start:
                job._streaming = True
                backlog = BACKLOG_SEGMENTS * layout.segment_size
                hashes = await self._stream(job, layout, upstream, name, send, let_next_start,
                                            backlog)  # fmt: skip
        await self._publish(job, layout.count - 1, hashes)  # the digest matched: peers may finish
        await asyncio.to_thread(self.store.commit, layout)  # fsync, off the event loop
        for source in sorted(job._sources):
            await asyncio.to_thread(self.store.add_source, layout, source)
        log.info("seeding %s (%d bytes, %d segments)", job.digest, layout.size, layout.count)

    async def _stream(
        self, job: IngestJob, layout: BlobLayout, upstream: Upstream, name: str, send,
        nearly_done: Callable[[], None], backlog: int | None,
    ) -> list[bytes]:
        """Write the blob into its segment files, publishing each one as it completes;
        ``nearly_done()`` once the last ``NEXT_REQUEST_LEAD_BYTES`` are on their way.

        Reading pauses while the dealt runs not yet sent add up to more than ``backlog``
        bytes (if given): agents that take their runs more slowly than the origin sends
        would otherwise wait in a queue that only grows, time out and download those
        segments again, from the seeder's swarm or the origin.

        Returns the last segment's piece hashes, to publish once the digest matched."""
        resp = await self.origin.open_blob(upstream, name, job.digest, send)
        taken: TakenBody | None = None
        try:
            if resp.status != 200:
                raise _refused(resp.status)
            if resp.content_length != layout.size:
                raise IngestError(IngestError.ORIGIN_INCOMPLETE,
                                  "origin's GET and HEAD disagree on the size")  # fmt: skip
            hasher = job.digest.hasher()
            piece = piece_size_for(layout.segment_size, self.cfg.piece_size)
            publishing: list[asyncio.Task[None]] = []
            last: list[list[bytes]] = []  # the last segment waits for the digest
            published = asyncio.Event()  # set as each segment is published
            receiver: BodyReceiver | None = None

            def on_segment(index: int, hashes: list[bytes]) -> None:
                if index < layout.count - 1:
                    task = asyncio.create_task(self._publish(job, index, hashes))
                    task.add_done_callback(lambda _: published.set())
                    if receiver is not None:
                        task.add_done_callback(lambda _: receiver.segment_published())
                    publishing.append(task)
                else:
                    last.append(hashes)

            try:
                taken = take_body(resp, 0, layout.size, self.origin.timeout.sock_read or 60.0)
            except (asyncio.IncompleteReadError, aiohttp.ClientPayloadError):
                raise IngestError(IngestError.ORIGIN_INCOMPLETE,
                                  "origin's body broke off or did not add up") from None
            self.metrics.inc("origin_bodies_total", reader="aiohttp" if taken is None else "thread")
            if taken is None:  # TLS, chunked or encoded: through aiohttp on the event loop
                writer = SegmentWriter(layout, hasher, piece, on_segment)
                reading = self._read(job, layout, resp, writer, publishing, published,
                                     nearly_done, backlog)  # fmt: skip
            else:
                def progress(n: int) -> None:
                    job._received += n
                    self.metrics.inc("origin_bytes_total", n)
                    if layout.size - job._received <= NEXT_REQUEST_LEAD_BYTES:
                        nearly_done()

                receiver = BodyReceiver(taken, layout.size, layout.segment_size,
                                        self.dealer.send_queue, backlog, progress,
                                        NEXT_REQUEST_LEAD_BYTES)  # fmt: skip
                writer = SegmentWriter(layout, hasher, piece, on_segment, receiver.run)
                reading = None
            try:
                if reading is not None:
                    await reading
            except (BodyCut, BodyTooLong, BodyStalled) as e:
                raise _body_error(e, layout.size) from None
            finally:
                try:
                    await writer.close()
                finally:
                    if receiver is not None:
                        receiver.stop()  # cancelled or failed: the thread gives up
                done = await asyncio.gather(*publishing, return_exceptions=True)
            _check_writer(writer, layout)
            for result in done:
                if isinstance(result, BaseException):
                    raise result
        finally:
            if taken is None:
                resp.release()
            else:  # aiohttp's connection was read past: never reused
                taken.close()
                resp.close()
        if job._received != layout.size:
            raise _body_error(BodyCut(job._received), layout.size)
        if hasher.hexdigest() != job.digest.hex:
            raise IngestError(IngestError.DIGEST_MISMATCH, "origin bytes do not match the digest")
        return last[0]

    async def _read(
        self, job: IngestJob, layout: BlobLayout, resp: aiohttp.ClientResponse,
        writer: SegmentWriter, publishing: list[asyncio.Task[None]], published: asyncio.Event,
        nearly_done: Callable[[], None], backlog: int | None,
    ) -> None:
        """Read the body through aiohttp on the event loop into ``writer``."""
        send_queue = self.dealer.send_queue
        offset = 0
        batch: list[bytes] = []
        batched = 0
        idle_timeout = self.origin.timeout.sock_read or 60.0
        async for chunk in _body_chunks(resp, layout.size, idle_timeout):
            if offset + len(chunk) > layout.size:
                raise BodyTooLong("origin sent more bytes than announced")
            batch.append(chunk)
            batched += len(chunk)
            offset += len(chunk)
            # a batch that completes a segment goes at once: its torrent is due
            segment = offset // layout.segment_size
            if (batched >= WRITE_BATCH or offset == layout.size
                    or segment > (offset - batched) // layout.segment_size):  # fmt: skip
                await writer.put(batch)
                batch, batched = [], 0
            # a segment's bytes are written in the thread; read the next one only once
            # it is published, so that the backlog below sees its dealt runs
            while (segment > sum(t.done() for t in publishing)
                   and offset < layout.size and not writer.error):  # fmt: skip
                published.clear()
                await published.wait()
            job._received = offset
            self.metrics.inc("origin_bytes_total", len(chunk))
            if layout.size - offset <= NEXT_REQUEST_LEAD_BYTES:
                nearly_done()
            if backlog is not None and send_queue.queued > backlog:
                if batch:  # what came so far may complete a segment: publish it
                    await writer.put(batch)
                    batch, batched = [], 0
                await send_queue.backlog_below(backlog)

    async def _publish(self, job: IngestJob, index: int, hashes: list[bytes]) -> None:
        """Make segment ``index``'s torrent (of its pieces' ``hashes``), seed it, and deal it
        to the waiting agents."""
        layout = job.layout
        assert layout is not None
        path = layout.segment_path(index)
        piece = piece_size_for(layout.segment_size, self.cfg.piece_size)
        made = await asyncio.to_thread(make_torrent, path, (), piece, hashes)
        data = tracker_shard.shard(made, self.cfg.tracker)
        tmp = layout.torrent_path(index).with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, layout.torrent_path(index))
        meta = Metainfo.parse(data)
        job._metas[index] = meta
        self.seeded.seed_segment(job.digest, layout, meta)
        waiting = [agent for agent, n in job._waiting.get(index, Counter()).items() if n > 0]
        if waiting:
            job._runs[index] = self.dealer.assign(meta.num_pieces, waiting)
        job._torrent(index).set_result(data)


def _check_writer(writer: SegmentWriter, layout: BlobLayout) -> None:
    """The writer's (and its receives') failure, as the ingest's error."""
    try:
        writer.check()
    except (BodyCut, BodyTooLong, BodyStalled) as e:
        raise _body_error(e, layout.size) from None


def _body_error(error: BodyCut | BodyTooLong | BodyStalled, size: int) -> IngestError:
    """A body that failed, from either reader (the writer's thread or aiohttp's), as the
    ingest's error."""
    if isinstance(error, BodyCut):
        return IngestError(IngestError.ORIGIN_INCOMPLETE,
                           f"origin sent {error.received} of {size} bytes")  # fmt: skip
    if isinstance(error, BodyTooLong):
        return IngestError(IngestError.DIGEST_MISMATCH, str(error))
    return IngestError(IngestError.ORIGIN_UNAVAILABLE, str(error))


async def _body_chunks(resp: aiohttp.ClientResponse, size: int,
                       idle_timeout: float) -> AsyncIterator[bytes]:  # fmt: skip
    """``resp``'s body as aiohttp receives it; a stall or a cut raises what the writer
    thread's receives raise (``BodyStalled``, ``BodyCut``)."""
    received = 0
    try:
        async for chunk in resp.content.iter_any():
            received += len(chunk)
            yield chunk
    except TimeoutError:  # aiohttp's sock_read timeout (ServerTimeoutError)
        raise BodyStalled(idle_timeout, received, size) from None
    except aiohttp.ClientPayloadError:
        raise BodyCut(received) from None


def _refused(status: int) -> IngestError:
    return IngestError(IngestError.ORIGIN_REFUSED, f"origin answered {status}", status)

