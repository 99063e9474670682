"""How the seeder cuts blobs into segment torrents, and in which order it fetches them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support.roles import running_seeder

from p2p_mirror.core.file_sender import FileSender
from p2p_mirror.core.metrics import sample_sum
from p2p_mirror.core.oci import Digest
from p2p_mirror.core.protocol import (
    PIECES_HEADER,
    TORRENT_LENGTH_HEADER,
    parse_piece_list,
)
from p2p_mirror.seeder.api import WRITE_BYTES
from p2p_mirror.seeder.ingest import BACKLOG_SEGMENTS, NEXT_REQUEST_LEAD_BYTES
from p2p_mirror.seeder.link_queue import LinkQueue
from p2p_mirror.seeder.server import Seeder
from p2p_mirror.seeder.sizing import piece_size_for

MiB = 1024 * 1024
PIECE = 256 * 1024
SEEDER_PIECE = 128 * 1024  # the seeder's default


# --- origin order and the waiting protocol (a stand-in origin whose bodies the test holds) --

REG = "reg.test"
BLOB = 1_600_000
BT = {"bt_port": "1"}  # the agent's BitTorrent port, required on torrent requests


class HeldOrigin:
    """A registry stand-in: HEAD answers at once, a GET sends the blob but its last ``held``
    bytes (default: half), which wait until the test releases them; it records the order in
    which GETs began."""

    def __init__(self, blobs: list[bytes], held: int | None = None) -> None:
        self.blobs = {f"sha256:{hashlib.sha256(b).hexdigest()}": b for b in blobs}
        self.held = held
        self.release = {digest: asyncio.Event() for digest in self.blobs}
        self.gets: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        data = self.blobs[digest]
        if request.method == "HEAD":
            return web.Response(body=data)  # aiohttp sends the headers only
        self.gets.append(digest)
        resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await resp.prepare(request)
        cut = len(data) // 2 if self.held is None else len(data) - self.held
        await resp.write(data[:cut])
        await self.release[digest].wait()
        await resp.write(data[cut:])
        await resp.write_eof()
        return resp


@contextlib.asynccontextmanager
async def served(origin: HeldOrigin) -> AsyncIterator[TestServer]:
    """``origin`` on loopback; every held body is released before it stops."""
    app = web.Application()
    app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", origin.handle)
    origin_server = TestServer(app, host="127.0.0.1")
    await origin_server.start_server()
    try:
        yield origin_server
    finally:
        for event in origin.release.values():
            event.set()
        await origin_server.close()


@pytest.fixture
async def held() -> AsyncIterator[tuple[HeldOrigin, TestServer]]:
    # half of each body held: more than NEXT_REQUEST_LEAD_BYTES
    origin = HeldOrigin([os.urandom(BLOB), os.urandom(BLOB)])
    async with served(origin) as origin_server:
        yield origin, origin_server


@contextlib.asynccontextmanager
async def seeder_of(tmp_path: Path, origin_server: TestServer, **extra: object) -> AsyncIterator[
    tuple[Seeder, TestClient]
]:
    """A real seeder in front of ``origin_server`` (``extra``: more of its config)."""
    async with running_seeder(tmp_path, {REG: str(origin_server.make_url(""))},
                              **extra) as running:  # fmt: skip
        yield running


async def ask(client: TestClient, digest: str) -> dict:
    resp = await client.get(f"/v1/blobs/{digest}", params={"registry": REG, "repo": "library/demo"})
    assert resp.status == 200
    return await resp.json()


async def test_blobs_come_from_the_origin_one_at_a_time(
    tmp_path: Path, held: tuple[HeldOrigin, TestServer]
) -> None:
    """Two blobs asked for at once: both layouts are known at once (HEAD), but the second
    body is fetched only after the first, and a request for its segment meanwhile gets
    202 with its own and the queue's origin progress instead of hanging."""
    origin, origin_server = held
    first, second = origin.blobs
    async with seeder_of(tmp_path, origin_server) as (seeder, client):
        assert seeder.cfg.origin_streams == 1
        for digest in (first, second):
            assert (await ask(client, digest))["size"] == BLOB
        await _until(lambda: seeder.origin_bytes >= BLOB // 2)
        assert origin.gets == [first]

        resp = await client.get(f"/v1/blobs/{second}/torrents/0", params={**BT, "wait": "0.2"})
        assert resp.status == 202
        # none of its own bytes yet, but the blob ahead of it moves: the agent keeps waiting
        body = await resp.json()
        assert body["blob_bytes"] == 0 and body["queue_bytes"] >= BLOB // 2

        origin.release[first].set()
        resp = await client.get(f"/v1/blobs/{second}/torrents/0", params={**BT, "wait": "10"})
        assert resp.status == 200  # its first half arrived: segment 0 is published
        assert origin.gets == [first, second]
        origin.release[second].set()
        last = (await ask(client, second))["segments"] - 1
        assert (await client.get(f"/v1/blobs/{second}/torrents/{last}", params=BT)).status == 200
        assert seeder.origin_bytes == 2 * BLOB


async def test_a_stuck_origin_stream_lets_the_next_blob_start(
    tmp_path: Path, held: tuple[HeldOrigin, TestServer]
) -> None:
    """The first body stops half way: after the patience the second one starts anyway (and
    the first still completes once its bytes come)."""
    origin, origin_server = held
    first, second = origin.blobs
    async with seeder_of(tmp_path, origin_server) as (seeder, client):
        seeder.ingest.origin_queue.patience = 0.3
        for digest in (first, second):
            await ask(client, digest)
        await _until(lambda: origin.gets == [first, second], timeout=3)  # not the 5 s default
        origin.release[second].set()
        last = (await ask(client, second))["segments"] - 1
        assert (await client.get(f"/v1/blobs/{second}/torrents/{last}", params=BT)).status == 200
        origin.release[first].set()
        assert (await client.get(f"/v1/blobs/{first}/torrents/{last}", params=BT)).status == 200


async def test_the_next_blob_starts_as_the_current_one_nearly_ends(tmp_path: Path) -> None:
    """With the current body's last bytes on their way, the next blob's request goes out
    (no idle link between two bodies); until then it waits in the queue."""
    blobs = [os.urandom(3 * MiB), os.urandom(3 * MiB)]
    origin = HeldOrigin(blobs, held=NEXT_REQUEST_LEAD_BYTES // 2)
    first, second = origin.blobs
    async with (
        served(origin) as origin_server,
        seeder_of(tmp_path, origin_server) as (seeder, client),
    ):
            seeder.ingest.origin_queue.patience = 60.0  # a stalled body does not let the next start
            for digest in (first, second):
                await ask(client, digest)
            await _until(lambda: origin.gets == [first, second])
            assert not origin.release[first].is_set()  # the first body is not finished
            assert seeder.origin_bytes >= 3 * MiB - NEXT_REQUEST_LEAD_BYTES


async def test_a_one_piece_blob_does_not_wait_in_the_queue(tmp_path: Path) -> None:
    """An image config asked for while a large body is still arriving is fetched at once."""
    origin = HeldOrigin([os.urandom(BLOB), os.urandom(1000)])
    large, config = origin.blobs
    origin.release[config].set()
    async with (
        served(origin) as origin_server,
        seeder_of(tmp_path, origin_server) as (seeder, client),
    ):
            seeder.ingest.origin_queue.patience = 60.0  # only the one-piece bypass can help
            await ask(client, large)
            await _until(lambda: origin.gets == [large])
            assert (await ask(client, config))["segments"] == 1
            resp = await client.get(f"/v1/blobs/{config}/torrents/0", params={**BT, "wait": "5"})
            assert resp.status == 200
            assert origin.gets == [large, config]
            assert not origin.release[large].is_set()  # the large body is still held


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@dataclass
class HeldSegment:
    """A seeder serving one 4 MiB blob whose last segment the origin holds back until the
    test releases it: agents can wait for that segment together."""

    origin: HeldOrigin
    seeder: Seeder
    client: TestClient
    digest: str
    segment: int  # segment size
    last: int  # the held segment's index


@contextlib.asynccontextmanager
async def last_segment_held(tmp_path: Path) -> AsyncIterator[HeldSegment]:
    origin = HeldOrigin([os.urandom(4 * MiB)])
    (digest,) = origin.blobs
    async with (
        served(origin) as origin_server,
        seeder_of(tmp_path, origin_server) as (seeder, client),
    ):
        info = await ask(client, digest)
        await _until(lambda: seeder.origin_bytes >= 2 * MiB)  # up to the held half
        yield HeldSegment(origin, seeder, client, digest, info["segment_size"],
                          info["segments"] - 1)  # fmt: skip


async def test_a_segments_pieces_are_dealt_out_over_the_waiting_agents(tmp_path: Path) -> None:
    """Three agents wait for a segment: each gets a run of consecutive pieces, none twice,
    all of them dealt; the piece endpoint serves one piece or a run; a late agent gets none."""
    async with last_segment_held(tmp_path) as held:
        origin, seeder, client, digest = held.origin, held.seeder, held.client, held.digest
        segment, last = held.segment, held.last
        assert segment > SEEDER_PIECE  # several pieces per segment

        async def torrent(port: int) -> list[int]:
            resp = await client.get(f"/v1/blobs/{digest}/torrents/{last}",
                                    params={"wait": "10", "bt_port": str(port)})  # fmt: skip
            assert resp.status == 200
            return parse_piece_list(resp.headers[PIECES_HEADER])

        waiting = [asyncio.create_task(torrent(port)) for port in (1, 2, 3)]
        job = seeder.ingest.job(Digest.parse(digest))
        assert job is not None
        await _until(lambda: job.waiting_agents(last) == 3)
        origin.release[digest].set()
        runs = await asyncio.gather(*waiting)
        piece = piece_size_for(segment, SEEDER_PIECE)
        assert piece < SEEDER_PIECE  # a small segment gets small pieces
        pieces = -(-(4 * MiB - last * segment) // piece)
        assert sorted(p for run in runs for p in run) == list(range(pieces))
        assert all(run == list(range(run[0], run[-1] + 1)) for run in runs), runs
        assert await torrent(4) == []  # dealt already

        blob = origin.blobs[digest]
        for p in range(pieces):
            resp = await client.get(f"/v1/blobs/{digest}/segments/{last}/pieces/{p}")
            assert resp.status == 200
            start = last * segment + p * piece
            assert await resp.read() == blob[start : min(start + piece, len(blob))]
        whole = await client.get(f"/v1/blobs/{digest}/segments/{last}/pieces/0",
                                 params={"count": str(pieces)})  # fmt: skip
        assert await whole.read() == blob[last * segment :]
        beyond = await client.get(f"/v1/blobs/{digest}/segments/{last}/pieces/0",
                                  params={"count": str(pieces + 1)})  # fmt: skip
        assert beyond.status == 404
        for bad in ({"count": "0"}, {"count": "x"}, {"count": "9" * 6000}):
            resp = await client.get(f"/v1/blobs/{digest}/segments/{last}/pieces/0", params=bad)
            assert resp.status == 400, bad
            assert (await resp.json())["errors"][0]["code"] == "PARAMETER_INVALID"
        missing = await client.get(f"/v1/blobs/{digest}/segments/{last}/pieces/{pieces}")
        assert missing.status == 404
        assert (await missing.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
        assert seeder.metrics.value("piece_bytes_total") == 2 * (len(blob) - last * segment)


async def test_an_agent_that_asks_inline_gets_its_run_after_the_torrent(tmp_path: Path) -> None:
    """``?pieces=inline``: the torrent response goes on with the agent's dealt run, so no
    second request; the torrent is the one others get, the run is the blob's bytes, each
    piece leaves once; a late agent, dealt nothing, gets the torrent alone."""
    async with last_segment_held(tmp_path) as held:
        origin, seeder, client, digest = held.origin, held.seeder, held.client, held.digest
        segment, last = held.segment, held.last

        async def torrent(port: int, **inline: str) -> tuple[list[int], bytes, bytes]:
            resp = await client.get(f"/v1/blobs/{digest}/torrents/{last}",
                                    params={"wait": "10", "bt_port": str(port), **inline})
            assert resp.status == 200
            body = await resp.read()
            length = int(resp.headers.get(TORRENT_LENGTH_HEADER, len(body)))
            assert resp.content_length == len(body)
            return parse_piece_list(resp.headers[PIECES_HEADER]), body[:length], body[length:]

        waiting = [asyncio.create_task(torrent(port, pieces="inline")) for port in (1, 2)]
        job = seeder.ingest.job(Digest.parse(digest))
        assert job is not None
        await _until(lambda: job.waiting_agents(last) == 2)
        origin.release[digest].set()
        answers = await asyncio.gather(*waiting)
        plain = await torrent(3)  # not inline: the torrent only, the same bytes
        late = await torrent(4, pieces="inline")

        piece = piece_size_for(segment, SEEDER_PIECE)
        blob = origin.blobs[digest]
        for dealt, data, run in answers:
            assert data == plain[1]
            start = last * segment + dealt[0] * piece
            assert dealt and run == blob[start : start + len(run)]
            assert len(run) == min(len(dealt) * piece, len(blob) - start)
        assert sorted(p for dealt, _, _ in answers for p in dealt) == list(range(-(-(
            len(blob) - last * segment) // piece)))
        assert late == ([], plain[1], b"")
        assert plain[0] == [] and plain[2] == b""
        assert seeder.metrics.value("piece_bytes_total") == len(blob) - last * segment


async def test_the_origin_is_read_only_a_backlog_ahead_of_the_dealt_runs(tmp_path: Path) -> None:
    """The agent's dealt runs cannot leave (the test holds the only send slot): the seeder
    stops reading the origin once ``BACKLOG_SEGMENTS`` segments of runs wait, rather than
    queueing the whole blob; once runs leave it reads on, and every run is the blob's bytes."""
    origin = HeldOrigin([os.urandom(8 * MiB)], held=0)  # the origin sends it all at once
    (digest,) = origin.blobs
    origin.release[digest].set()
    async with (
        served(origin) as origin_server,
        # 1 MiB segments: eight of them, more than the backlog and what may pass it
        seeder_of(tmp_path, origin_server, segment_size="1MiB") as (seeder, client),
    ):
        seeder.dealer.send_queue = LinkQueue(1, patience=60.0)
        release = asyncio.Event()

        async def hold_the_link() -> None:
            async with seeder.dealer.send_queue.slot(lambda: 0, "the test"):
                await release.wait()

        holder = asyncio.create_task(hold_the_link())
        info = await ask(client, digest)
        segment, count = info["segment_size"], info["segments"]
        assert count == 8

        async def run(index: int) -> bytes:
            resp = await client.get(f"/v1/blobs/{digest}/torrents/{index}",
                                    params={"wait": "20", "bt_port": "1", "pieces": "inline"})
            assert resp.status == 200
            return (await resp.read())[int(resp.headers[TORRENT_LENGTH_HEADER]):]

        runs = [asyncio.create_task(run(i)) for i in range(count)]
        await _until(lambda: seeder.dealer.send_queue.queued > BACKLOG_SEGMENTS * segment)
        await asyncio.sleep(0.3)  # the stream sees it at its next chunk
        paused_at = seeder.origin_bytes
        await asyncio.sleep(0.5)
        assert seeder.origin_bytes == paused_at  # paused, not just slow
        # a run joins the queue a little after its segment is out: up to a segment more
        assert paused_at < (BACKLOG_SEGMENTS + 3) * segment < 8 * MiB
        metrics = await (await client.get("/metrics")).text()
        backlog = sample_sum(metrics, "p2p_mirror_dealt_backlog_bytes")
        assert backlog == seeder.dealer.send_queue.queued
        assert seeder.dealer.send_queue.queued > BACKLOG_SEGMENTS * segment
        release.set()
        blob = origin.blobs[digest]
        assert await asyncio.gather(*runs) == [blob[i * segment : (i + 1) * segment]
                                               for i in range(count)]  # fmt: skip
        assert seeder.origin_bytes == len(blob)
        # the body was received in the writer's thread, which kept to the backlog too
        assert seeder.metrics.value("origin_bodies_total", reader="thread") == 1
        await holder


@pytest.mark.parametrize("plain", [True, False], ids=["file-sender", "asyncio-fallback"])
async def test_a_dealt_run_goes_out_by_sendfile_in_parts_of_whole_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plain: bool
) -> None:
    """A run goes from the segment file to the socket by sendfile (no copy through Python),
    in parts of whole pieces, at most ``WRITE_BYTES`` each (the send queue sees progress at
    each), not piece by piece, and the parts are the run's bytes. On a plain connection the
    parts go through ``FileSender`` (sendfile on the socket, not asyncio's); where it cannot
    take the connection (TLS, or bytes still buffered: made so here) asyncio's
    ``loop.sendfile`` sends the same parts."""
    origin = HeldOrigin([os.urandom(8 * MiB)], held=0)
    (digest,) = origin.blobs
    origin.release[digest].set()
    sends: list[tuple[int, int]] = []
    by_asyncio: list[tuple[int, int]] = []
    sendfile, send = asyncio.BaseEventLoop.sendfile, FileSender.send

    async def recording_loop(self: asyncio.BaseEventLoop, transport: asyncio.WriteTransport,
                             file: object, offset: int = 0, count: int | None = None,
                             **kw: object) -> int:  # fmt: skip
        assert count is not None
        by_asyncio.append((offset, count))
        sends.append((offset, count))
        return await sendfile(self, transport, file, offset, count, **kw)  # type: ignore[arg-type]

    async def recording_sender(self: FileSender, fd: int, offset: int, count: int) -> int:
        sends.append((offset, count))
        return await send(self, fd, offset, count)

    async with (
        served(origin) as origin_server,
        seeder_of(tmp_path, origin_server, segment_size="4MiB", segment_parts=2) as (_, client),
    ):
        info = await ask(client, digest)
        segment = info["segment_size"]
        resp = await client.get(f"/v1/blobs/{digest}/torrents/0",
                                params={"wait": "20", "bt_port": "1"})  # fmt: skip
        assert resp.status == 200
        piece = piece_size_for(segment, SEEDER_PIECE)
        pieces = segment // piece
        assert pieces * piece > WRITE_BYTES > piece  # several sends of several pieces
        monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", recording_loop)
        monkeypatch.setattr(FileSender, "send", recording_sender)
        if not plain:
            monkeypatch.setattr(FileSender, "for_transport", classmethod(lambda cls, t: None))
        run = await client.get(f"/v1/blobs/{digest}/segments/0/pieces/0",
                               params={"count": str(pieces)})  # fmt: skip
        assert await run.read() == origin.blobs[digest][:segment]
    assert sum(count for _, count in sends) == segment
    assert [offset for offset, _ in sends] == [sum(c for _, c in sends[:i])
                                               for i in range(len(sends))]  # fmt: skip
    assert all(n % piece == 0 and n <= WRITE_BYTES for _, n in sends), sends
    assert 1 < len(sends) < pieces
    assert by_asyncio == ([] if plain else sends)


async def test_a_failed_job_is_dropped(
    tmp_path: Path, held: tuple[HeldOrigin, TestServer]
) -> None:
    """A blob the origin does not have fails its job, which is then forgotten (its memory
    freed): many bad digests cannot pile up jobs, and the next request starts over."""
    _, origin_server = held
    async with seeder_of(tmp_path, origin_server) as (seeder, client):
        for n in range(4):
            digest = f"sha256:{n:064x}"
            resp = await client.get(f"/v1/blobs/{digest}",
                                    params={"registry": REG, "repo": "library/demo"})  # fmt: skip
            assert resp.status >= 400
            assert seeder.ingest.job(Digest.parse(digest)) is None
        assert seeder.ingest.jobs() == 0


async def test_a_blob_without_room_on_disk_is_refused_before_its_download(
    tmp_path: Path, held: tuple[HeldOrigin, TestServer]
) -> None:
    """The seeder reserves a blob's size before downloading it: with no room (here a cache
    cap below the blob), the job fails at once and agents take the blob from the origin."""
    origin, origin_server = held
    first = next(iter(origin.blobs))
    async with seeder_of(tmp_path, origin_server) as (seeder, client):
        seeder.ingest.cfg.cache_max_bytes = BLOB // 2
        resp = await client.get(f"/v1/blobs/{first}",
                                params={"registry": REG, "repo": "library/demo"})  # fmt: skip
        assert resp.status == 503
        assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
        assert seeder.metrics.value("seed_jobs_total", result="no_space") == 1
        assert origin.gets == [] and len(seeder.store.ledger) == 0
        assert seeder.ingest.job(Digest.parse(first)) is None


@pytest.mark.parametrize("parts", [4, 8])
async def test_segment_parts_sets_how_many_torrents_a_blob_gets(tmp_path: Path, parts: int) -> None:
    """``segment_parts``: a blob well under ``segment_size`` (and a whole number of pieces
    per part) is cut into that many torrents."""
    size = 4 * MiB
    origin = HeldOrigin([os.urandom(size)], held=0)
    (digest,) = origin.blobs
    async with served(origin) as origin_server, seeder_of(
        tmp_path, origin_server, segment_parts=parts
    ) as (_seeder, client):
        info = await ask(client, digest)
        assert info["segments"] == parts
        assert info["segment_size"] * parts == size
