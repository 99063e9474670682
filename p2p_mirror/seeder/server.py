"""The seeder: pulls each blob from the origin once, cuts it into segment torrents, seeds them.

Agents ask ``GET /v1/blobs/<digest>?registry=R&repo=NAME`` (with the client's credentials)
and get the blob's size and segment count at once (the origin's HEAD); each segment's
torrent is published at ``/v1/blobs/<digest>/torrents/<i>`` as soon as its bytes have
arrived from the origin, so peers start before the whole blob is here. Blob bodies come
from the origin ``origin_streams`` at a time in request order (blobs of one piece, such as
image configs, at once); a torrent request that waits longer than ``?wait=`` gets 202 with
the seeder's origin byte count, a sign of life. The last segment is published only after
the whole blob matched its digest, so no peer can ever complete a blob that fails it.

The seeder's upload link carries every byte once at the origin's pace, so it must not send
a piece twice. It does not announce to the tracker: it deals each segment's pieces out over
the agents waiting for it in runs of consecutive pieces (the torrent response names an
agent's run); with ``?pieces=inline`` the run's bytes follow the torrent in that response,
else the agent fetches its run in a second request
(``/v1/blobs/<digest>/segments/<i>/pieces/<p>?count=K``). It gets every other piece from its
peers, contacting the seeder's swarm only if its peers make no progress. So every agent has
something to share the moment a segment is out, and every downlink carries an even share of
the seeder's stream (20 Mbit/s, 64 MiB: one whole segment per agent took N=8 36.9-37.4 s and
N=16 43.5 s; dealt pieces 34.9-35.1 s and 42.2 s; the seeder sends the image once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from p2p_mirror.core.config import SeederConfig, parse_count, upstream_for
from p2p_mirror.core.metrics import Metrics
from p2p_mirror.core.oci import Digest, OCIError, validate_name
from p2p_mirror.core.origin import Origin, OriginUnavailable, error_for_status, forward_headers
from p2p_mirror.core.protocol import PIECES_HEADER, TORRENT_LENGTH_HEADER
from p2p_mirror.core.service import background, every, healthz, serve, wait_for_signal
from p2p_mirror.core.store import BlobLayout, BlobStore
from p2p_mirror.core.swarm import Metainfo, Swarm, Transfer, make_torrent, read_range
from p2p_mirror.seeder.turns import Turns

log = logging.getLogger("p2p_mirror.seeder")
STUCK_STREAM_SECONDS = 5.0  # an origin body this long without a byte lets the next one start
# The next blob's request goes out this many bytes before the current body ends: at a link
# of 20-50 Mbit/s, about the time a new request and its TCP ramp-up take (measured, 4 x 16
# MiB layers at 20 Mbit/s: each switch idled the origin link for 0.3-0.6 s without it).
HAND_ON_BYTES = 512 * 1024
PIECE_SEND_PATIENCE = 1.0  # a piece send this long without draining lets the next one start
BACKLOG_SEGMENTS = 2  # dealt runs waiting to be sent, in segments, before the origin waits
SEGMENT_PIECES = 32  # pieces per segment that small segments' piece size aims for
MIN_PIECE = 32 * 1024  # smaller cost more CPU than they save (16 KiB: N=8 9.5 -> 14.6 s)


@dataclass
class SeedJob:
    """One blob being (or already) seeded; torrents resolve as segments become available."""

    digest: Digest
    layout: BlobLayout | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    torrents: list[asyncio.Future[bytes]] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    error: OCIError | None = None
    task: asyncio.Task[None] | None = None
    metas: dict[int, Metainfo] = field(default_factory=dict)
    waiting: dict[int, Counter[str]] = field(default_factory=dict)
    dealt: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    received: int = 0  # body bytes from the origin so far

    def fail(self, error: OCIError) -> None:
        self.error = error
        self.ready.set()
        for fut in self.torrents:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # mark retrieved: agents may never ask for it


class Seeder:
    def __init__(self, cfg: SeederConfig) -> None:
        self.cfg = cfg
        self.store = BlobStore(cfg.data_dir)
        self.origin = Origin(cfg.origin_timeout, "seeder")
        self.swarm = Swarm(
            cfg.bt_listen,
            cfg.upload_rate_limit,
            cfg.download_rate_limit,
            # Only designated and stalled agents connect, so every one of them gets a slot
            # (a choked one would wait for the next 15 s unchoke round).
            unchoke_slots=cfg.unchoke_slots,
        )
        self.jobs: dict[Digest, SeedJob] = {}
        self.dealt_pieces: Counter[str] = Counter()  # pieces handed to each agent so far
        self.origin_turns = Turns(cfg.origin_streams, STUCK_STREAM_SECONDS)
        self.piece_turns = Turns(cfg.piece_sends, PIECE_SEND_PATIENCE)
        self.metrics = Metrics()
        self.metrics.describe("origin_bytes_total", "Blob bytes fetched from origin registries")
        self.metrics.describe("seed_jobs_total", "Blob seeding jobs by result")
        self.metrics.describe("piece_bytes_total", "Bytes of dealt pieces sent to agents")

    async def start(self) -> None:
        self.store.recover()
        await self.swarm.start()
        for entry in self.store.entries():
            layout = self.store.layout(entry.digest)
            torrents = layout.saved_torrents() if layout else None
            if layout is None or torrents is None:
                continue
            job = SeedJob(entry.digest, layout)
            for index, data in enumerate(torrents):
                self._seed(job, index, data)
                job.torrents.append(_resolved(data))
            job.ready.set()
            self.jobs[entry.digest] = job
        self.metrics.gauge("torrents", lambda: len(self.swarm.transfers), "Torrents in session")
        self.metrics.gauge("upload_bytes", lambda: self.swarm.totals().uploaded, "Payload seeded")
        self.metrics.gauge("dealt_backlog_bytes", lambda: self.piece_turns.queued,
                           "Bytes of dealt pieces waiting for a send turn (above "
                           f"{BACKLOG_SEGMENTS} segments' worth, the origin download waits)")

    @property
    def origin_bytes(self) -> int:
        """Blob bytes received from origins so far (the agents' sign that it is working)."""
        return int(self.metrics.value("origin_bytes_total"))

    async def close(self) -> None:
        for job in self.jobs.values():
            if job.task:
                job.task.cancel()
        await self.swarm.close()
        await self.origin.close()

    async def ensure(self, digest: Digest, registry: str, name: str, headers) -> SeedJob:
        """The job for ``digest``, started if needed; returns once its size is known."""
        job = self.jobs.get(digest)
        if job is None or job.error is not None:
            job = SeedJob(digest)
            self.jobs[digest] = job
            upstream = upstream_for(self.cfg.registries, registry)
            job.task = asyncio.create_task(self._fetch(job, upstream, name, headers))
        await job.ready.wait()
        if job.error:
            raise job.error
        return job

    async def _fetch(self, job: SeedJob, upstream, name: str, headers) -> None:
        try:
            await self._download(job, upstream, name, headers)
            self.metrics.inc("seed_jobs_total", result="ok")
        except OCIError as e:
            self.metrics.inc("seed_jobs_total", result=e.code)
            log.warning("blob %s from %s/%s: %s", job.digest, upstream.name, name, e)
            job.fail(e)
        except OriginUnavailable as e:
            self.metrics.inc("seed_jobs_total", result="origin_unavailable")
            log.warning("blob %s: origin unavailable: %s", job.digest, e)
            job.fail(OCIError("UNAVAILABLE", str(e)))
        except Exception as e:  # noqa: BLE001 - a disk error must fail the job, not the server
            self.metrics.inc("seed_jobs_total", result="error")
            log.exception("blob %s failed", job.digest)
            job.fail(OCIError("UNAVAILABLE", f"seeder error: {e}"))
        if job.error is not None:
            self._stop_seeding(job)
            if job.layout is not None:
                self.store.abandon(job.layout)

    async def _download(self, job: SeedJob, upstream, name: str, headers) -> None:
        send = forward_headers(headers)
        status, head, _ = await self.origin.request(
            "HEAD", upstream, name, "blobs", str(job.digest), send
        )
        if status != 200:
            raise error_for_status(status, "blobs")
        size = _content_length(head)
        if size is None:
            raise OCIError("UNAVAILABLE", "origin sent no Content-Length")
        segment = segment_size_for(size, self.cfg.segment_size, self.cfg.piece_size)
        layout = self.store.begin(job.digest, size, segment)
        job.layout = layout
        loop = asyncio.get_running_loop()
        job.torrents = [loop.create_future() for _ in range(layout.count)]
        job.ready.set()  # agents learn the layout now, while the blob may still be queued
        # A blob of one piece (an image config, a tiny layer) costs the origin link next to
        # nothing: it does not wait behind the large bodies (runtimes need the config early).
        if size <= self.cfg.piece_size:
            await self._stream(job, layout, upstream, name, send, lambda: None, None)
        else:
            def moved() -> int:  # paused for the dealt runs (_stream): not stuck while they go
                return job.received + self.piece_turns.granted

            async with self.origin_turns.turn(moved, f"blob {job.digest}") as on:
                backlog = BACKLOG_SEGMENTS * layout.segment_size
                await self._stream(job, layout, upstream, name, send, on, backlog)
        await self._publish(job, layout.count - 1)  # the digest matched: peers may finish
        await asyncio.to_thread(self.store.commit, layout)  # fsync, off the event loop
        log.info("seeding %s (%d bytes, %d segments)", job.digest, layout.size, layout.count)

    async def _stream(
        self, job: SeedJob, layout: BlobLayout, upstream, name: str, send,
        nearly_done: Callable[[], None], backlog: int | None,
    ) -> None:
        """Write the blob into its segment files, publishing each one as it completes;
        ``nearly_done()`` once the last ``HAND_ON_BYTES`` are on their way.

        Reading pauses while the dealt runs not yet sent add up to more than ``backlog``
        bytes (if given): agents that take their runs more slowly than the origin sends (a
        CPU-bound lab, 256 MiB at N=16) would otherwise wait in a queue that only grows, time
        out and fetch those segments again, from the seeder's swarm or the origin."""
        resp = await self.origin.open_blob(upstream, name, job.digest, send)
        try:
            if resp.status != 200:
                raise error_for_status(resp.status, "blobs")
            if resp.content_length != layout.size:
                raise OCIError("UNAVAILABLE", "origin's GET and HEAD disagree on the size")
            hasher = job.digest.hasher()
            offset = 0
            index = 0
            seg = open(layout.segment_path(0), "wb")  # noqa: SIM115 - closed per segment below
            try:
                async for chunk in resp.content.iter_any():
                    if offset + len(chunk) > layout.size:
                        raise OCIError("DIGEST_INVALID", "origin sent more bytes than announced")
                    hasher.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        room = layout.segment_len(index) - (offset - index * layout.segment_size)
                        seg.write(view[:room])
                        offset += min(room, len(view))
                        view = view[room:]
                        if offset == (index + 1) * layout.segment_size and offset < layout.size:
                            seg.close()
                            await self._publish(job, index)
                            index += 1
                            seg = open(layout.segment_path(index), "wb")  # noqa: SIM115
                    job.received = offset
                    self.metrics.inc("origin_bytes_total", len(chunk))
                    if layout.size - offset <= HAND_ON_BYTES:
                        nearly_done()
                    if backlog is not None and self.piece_turns.queued > backlog:
                        await self.piece_turns.backlog_below(backlog)
            finally:
                seg.close()
        finally:
            resp.release()
        if offset != layout.size:
            raise OCIError("UNAVAILABLE", f"origin sent {offset} of {layout.size} bytes")
        if hasher.hexdigest() != job.digest.hex:
            raise OCIError("DIGEST_INVALID", "origin bytes do not match the digest")

    async def _publish(self, job: SeedJob, index: int) -> None:
        """Make segment ``index``'s torrent, seed it, and hand it to waiting agents."""
        layout = job.layout
        assert layout is not None
        path = layout.segment_path(index)
        piece = piece_size_for(layout.segment_size, self.cfg.piece_size)
        data = await asyncio.to_thread(make_torrent, path, self.cfg.tracker, piece)
        tmp = layout.torrent_path(index).with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, layout.torrent_path(index))
        self._seed(job, index, data)
        waiting = [agent for agent, n in job.waiting.get(index, Counter()).items() if n > 0]
        if waiting:
            self._deal(job, index, waiting)
        job.torrents[index].set_result(data)

    def _deal(self, job: SeedJob, index: int, agents: list[str]) -> None:
        """Deal segment ``index``'s pieces out in even runs of consecutive pieces (one request
        each), agents with the fewest pieces so far first."""
        if len(self.dealt_pieces) > 100_000:
            self.dealt_pieces.clear()
        random.shuffle(agents)  # ties: random
        agents.sort(key=lambda a: self.dealt_pieces[a])
        pieces = job.metas[index].num_pieces
        agents = agents[:pieces]  # at least one piece each
        hands = {agent: list(range(i * pieces // len(agents), (i + 1) * pieces // len(agents)))
                 for i, agent in enumerate(agents)}  # fmt: skip
        for agent, run in hands.items():
            self.dealt_pieces[agent] += len(run)
        job.dealt[index] = hands

    def _seed(self, job: SeedJob, index: int, torrent: bytes) -> None:
        assert job.layout is not None
        meta = Metainfo.parse(torrent)
        job.metas[index] = meta
        job.transfers.append(self.swarm.add(meta, job.layout.dir, seed=True, announce=False))

    def _stop_seeding(self, job: SeedJob) -> None:
        for transfer in job.transfers:
            self.swarm.remove(transfer)
        job.transfers.clear()

    def _evict(self, digest: Digest) -> None:
        """Stop seeding a blob before the store deletes its files."""
        job = self.jobs.pop(digest, None)
        if job is not None:
            self._stop_seeding(job)
        log.info("evicted %s", digest)

    async def gc(self) -> None:
        active = {d for d, j in self.jobs.items() if j.task and not j.task.done()}
        self.store.gc(self.cfg.cache_max_bytes, self.cfg.min_free_disk, active,
                      before_evict=self._evict)  # fmt: skip

    # --- HTTP API -------------------------------------------------------------------------

    async def handle_blob(self, request: web.Request) -> web.Response:
        try:
            digest = Digest.parse(request.match_info["digest"])
            name = validate_name(request.query.get("repo", ""))
            registry = request.query.get("registry", "")
            if not registry:
                raise OCIError("NAME_INVALID", "registry parameter required")
            job = await self.ensure(digest, registry, name, request.headers)
        except OCIError as e:
            return e.response()
        layout = job.layout
        assert layout is not None
        return web.json_response(
            {
                "digest": str(digest),
                "size": layout.size,
                "segment_size": layout.segment_size,
                "segments": layout.count,
                "bt_port": self.swarm.port,
            }
        )

    async def handle_torrent(self, request: web.Request) -> web.Response:
        try:
            digest = Digest.parse(request.match_info["digest"])
        except OCIError as e:
            return e.response()
        job = self.jobs.get(digest)
        index = int(request.match_info["index"])
        if job is None or not job.ready.is_set() or index >= len(job.torrents):
            return OCIError("BLOB_UNKNOWN", "no such blob or segment").response()
        # An agent is its address and BitTorrent port: several may share a host.
        agent = f"{request.remote}:{request.query.get('bt_port', '')}"
        waiting = job.waiting.setdefault(index, Counter())
        waiting[agent] += 1
        try:
            data = await asyncio.wait_for(
                asyncio.shield(job.torrents[index]), _wait_seconds(request.query.get("wait"))
            )
        except OCIError as e:
            return e.response()
        except TimeoutError:
            # Not published yet (queued, or still arriving): how far the origin downloads
            # got tells the agent a busy seeder from a stuck one.
            return web.json_response({"origin_bytes": self.origin_bytes}, status=202)
        finally:
            waiting[agent] -= 1
        if index not in job.dealt:  # nobody was waiting when it was published
            self._deal(job, index, [agent])
        run = job.dealt[index].get(agent, [])
        headers = {PIECES_HEADER: ",".join(map(str, run))}
        if request.query.get("pieces") != "inline":
            return web.Response(body=data, content_type="application/x-bittorrent",
                                headers=headers)  # fmt: skip
        # The run follows the torrent in this response: a second request would reach us a
        # round trip after the segment is out (78 ms median at N=8, 20 Mbit/s), and until
        # then the uplink may idle (16 MiB at N=8: 9.73 -> 9.60 s, medians of 6 alternating
        # runs; and 256 fewer requests per pull). Tried and dropped: dealing a segment at its
        # first byte and streaming the run ahead of the torrent, as the origin sends it. No
        # piece can be shared before the torrent is out, and then all of them appear at once:
        # more end-game duplicates (node download 1.10x the image, not 1.05x) and 64 MiB at
        # N=8 took 36.3-37.0 s against 33.6-33.9 s (16 MiB: no change).
        headers[TORRENT_LENGTH_HEADER] = str(len(data))
        resp = web.StreamResponse(headers={**headers, "Content-Type": "application/octet-stream"})
        pieces = range(run[0], run[-1] + 1) if run else range(0)
        resp.content_length = len(data) + _run_bytes(job.metas[index], pieces)
        await resp.prepare(request)
        await resp.write(data)
        return await self._send_pieces(request, resp, job, index, pieces)

    async def handle_piece(self, request: web.Request) -> web.StreamResponse:
        """``count`` (default 1) consecutive pieces of a published segment, for the agent
        they were dealt to (one that did not ask for them inline), streamed piece by piece."""
        try:
            digest = Digest.parse(request.match_info["digest"])
        except OCIError as e:
            return e.response()
        job = self.jobs.get(digest)
        index, first = int(request.match_info["index"]), int(request.match_info["piece"])
        count = _count(request.query.get("count"))
        meta = job.metas.get(index) if job is not None else None
        if (job is None or job.layout is None or meta is None or count is None
                or first + count > meta.num_pieces):  # fmt: skip
            return OCIError("BLOB_UNKNOWN", "no such blob, segment or pieces").response()
        pieces = range(first, first + count)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = _run_bytes(meta, pieces)
        return await self._send_pieces(request, resp, job, index, pieces)

    async def _send_pieces(
        self, request: web.Request, resp: web.StreamResponse, job: SeedJob, index: int,
        pieces: range,
    ) -> web.StreamResponse:
        """Stream ``pieces`` of segment ``index`` on ``resp`` (prepared here if not yet), in
        turn with the other runs.

        A few runs at a time (``piece_sends``): N pieces sent side by side would all become
        complete, and shareable, only at the end; in turn, the first is out at once. One at a
        time cannot fill the link when a send outgrows the socket buffer (256 KiB pieces:
        59.7 s at N=8), four can. (Measured, N=16 at 20 Mbit/s: all 16 side by side 43 s; one
        at a time 39.4-40 s; four 40.8 s; N=8: 34.3-35.0 s either way.)
        """
        assert job.layout is not None
        meta, path = job.metas[index], job.layout.segment_path(index)
        sent = 0
        what = f"pieces {pieces.start}+{len(pieces)} of {job.digest}"
        # an inline response without a run only ends: no turn to wait for
        turn = (self.piece_turns.turn(lambda: sent, what, _run_bytes(meta, pieces)) if pieces
                else contextlib.nullcontext())  # fmt: skip
        async with turn:
            for piece in pieces:
                lo, hi = meta.piece_range(piece)
                try:
                    data = await asyncio.to_thread(read_range, path, lo, hi)
                except OSError as e:  # evicted meanwhile
                    if not resp.prepared:
                        return OCIError("BLOB_UNKNOWN", f"segment gone: {e}").response()
                    raise
                if not resp.prepared:
                    await resp.prepare(request)
                await resp.write(data)
                sent += len(data)
            await resp.write_eof()
        self.metrics.inc("piece_bytes_total", sent)
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(r"/v1/blobs/{digest}", self.handle_blob)
        app.router.add_get(r"/v1/blobs/{digest}/torrents/{index:\d+}", self.handle_torrent)
        app.router.add_get(r"/v1/blobs/{digest}/segments/{index:\d+}/pieces/{piece:\d+}",
                           self.handle_piece)  # fmt: skip
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", self.metrics.handler)
        return app


def segment_size_for(size: int, largest: int, piece: int, parts: int = 8) -> int:
    """Cut every blob in at least ``parts`` segments (whole pieces, at most ``largest``).

    Peers can start on a segment as soon as the seeder has it, so even a small layer's
    distribution overlaps with its origin download, and the last segment (what is left to
    send when the origin is done) is small; large blobs stay at ``largest`` per torrent so
    the tracker does not see thousands of swarms. (Measured, 4 x 16 MiB layers: 4 MiB
    segments 20.6 s at N=8, 2 MiB 17-18 s; 1 MiB 15.5 s at N=8 but 34 s instead of 25 s at
    N=16, where dozens more announces and connections per node hit the CPU. Again later,
    at 20 Mbit/s N=8: 1 MiB 33.8-34.2 s, 2 MiB 34.2-35.5 s; but at 50 Mbit/s N=8, where
    the lab's CPU is the limit, 1 MiB 15.5-17.1 s, 2 MiB 15.1-15.2 s: each byte costs more
    CPU in smaller pieces and more torrent ends, which a node on a fast link pays too.)
    """
    part = -(-size // parts)
    return max(piece, min(largest, -(-part // piece) * piece))


def piece_size_for(segment: int, largest: int) -> int:
    """The largest piece, halved (down to ``MIN_PIECE``) until a segment holds about
    ``SEGMENT_PIECES`` of them: 32 KiB for segments under 2 MiB, 64 KiB under 4 MiB.

    An agent can share a piece only once it holds all of it, so in a small segment large
    pieces make every hop wait, and fewer agents get a dealt run; large segments keep large
    pieces, which cost less CPU per byte. (Measured at 20 Mbit/s, N=8: 4 x 4 MiB layers
    (512-640 KiB segments) 9.7-10.0 s with 128 KiB pieces, 9.3-9.65 s with 32 KiB, 14.6 s with
    16 KiB; N=4 8.9-9.2 s -> 8.3-8.5 s. 4 x 16 MiB layers (2 MiB segments): 35.0-35.3 s with
    128 KiB, 34.0 s with 64 KiB.)
    """
    piece = largest
    power_of_two = piece & (piece - 1) == 0  # halving keeps it one (a configured 96 KiB stays)
    while power_of_two and piece // 2 >= MIN_PIECE and piece * SEGMENT_PIECES > segment:
        piece //= 2
    return piece


def _content_length(headers) -> int | None:
    try:
        size = int(headers.get("Content-Length", ""))
    except ValueError:
        return None
    return size if size >= 0 else None


def _run_bytes(meta: Metainfo, pieces: range) -> int:
    """Bytes of a run of consecutive pieces."""
    return meta.piece_range(pieces[-1])[1] - meta.piece_range(pieces[0])[0] if pieces else 0


def _count(text: str | None) -> int | None:
    """``?count=`` of a piece request: a positive integer, 1 if absent, else None."""
    if text is None:
        return 1
    try:
        return parse_count(text)
    except ValueError:
        return None


def _wait_seconds(text: str | None, default: float = 30.0, longest: float = 300.0) -> float:
    """How long a torrent request may wait for its segment (``?wait=``, clamped)."""
    try:
        wait = float(text) if text is not None else default
    except ValueError:
        return default
    return min(max(wait, 0.0), longest) if math.isfinite(wait) else default


def _resolved(data: bytes) -> asyncio.Future[bytes]:
    fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    fut.set_result(data)
    return fut


async def _main(cfg: SeederConfig) -> None:
    seeder = Seeder(cfg)
    await seeder.start()
    runner = await serve(seeder.app(), cfg.listen.host, cfg.listen.port, "seeder", log,
                         cfg.drain_timeout)  # fmt: skip
    log.info("seeder BitTorrent on %s:%d", cfg.bt_listen.host, seeder.swarm.port)

    try:
        async with background(every(60, seeder.gc, log)):
            await wait_for_signal()
    finally:
        await runner.cleanup()
        await seeder.close()


def run_seeder(cfg: SeederConfig) -> None:
    asyncio.run(_main(cfg))
