"""A segment the seeder deals to one agent whole, inline: written straight into its file
(never through libtorrent's add_piece), checked piece by piece, seeded afterwards, served to
peers by libtorrent; a seeder that lies about its bytes or cuts the run sends the agent to
its swarm for that segment. Real libtorrent sessions on loopback; the seeder's HTTP side
is a stand-in."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from p2p_mirror.agent import dealt_segment
from p2p_mirror.agent import pull as pull_module
from p2p_mirror.agent.blob_download import BlobDownload
from p2p_mirror.agent.pull import BlobPuller
from p2p_mirror.agent.seeder_client import SeederClient
from p2p_mirror.agent.splice_run import splice_to_file
from p2p_mirror.core import protocol
from p2p_mirror.core.config import HostPort, Upstream
from p2p_mirror.core.metrics import Metrics
from p2p_mirror.core.oci import Digest
from p2p_mirror.core.origin import Origin
from p2p_mirror.core.store import BlobStore, segment_name
from p2p_mirror.core.swarm import Metainfo, TorrentSession, make_torrent

PIECE = 128 * 1024
SEGMENT = 4 * PIECE
DATA = os.urandom(2 * SEGMENT - PIECE // 2)  # two segments, the last piece short
DIGEST = Digest.parse("sha256:" + hashlib.sha256(DATA).hexdigest())
UPSTREAM = Upstream("registry.example.test", "http://127.0.0.1:9")
PART = 32 * 1024  # a streamed run's write size


@dataclass
class Swarm:
    seeder: TorrentSession  # holds every segment (the seeder's swarm)
    agent: TorrentSession
    peer: TorrentSession  # another node, which only the agent can serve
    metas: list[Metainfo]


@pytest.fixture
async def swarm(tmp_path: Path) -> AsyncIterator[Swarm]:
    src = tmp_path / "seeder"
    src.mkdir()
    metas = []
    for index in range(2):
        path = src / segment_name(DIGEST, index, 2)
        path.write_bytes(DATA[index * SEGMENT : (index + 1) * SEGMENT])
        metas.append(Metainfo.parse(make_torrent(path, ["http://127.0.0.1:9/announce"], PIECE)))
    sessions = [TorrentSession(HostPort("127.0.0.1", 0)) for _ in range(3)]
    for session in sessions:
        await session.start()
    for meta in metas:
        sessions[0].add(meta, src, seed=True, announce=False)
    yield Swarm(*sessions, metas=metas)
    for session in reversed(sessions):
        await session.close()


async def seeder_api(swarm: Swarm, body: dict[int, bytes], streamed: bool = False) -> TestServer:
    """The seeder's blob and torrent endpoints, dealing each segment whole, inline, to the
    one agent asking; segment ``i``'s run is ``body[i]`` where given (a lie or a cut).
    ``streamed``: as the seeder does, the length of the whole run is declared and the run
    sent in parts after the torrent (the agent receives most of it from the socket), a cut
    run ending with the connection."""

    async def blob(request: web.Request) -> web.Response:
        info = protocol.BlobInfo(str(DIGEST), len(DATA), SEGMENT, 2, swarm.seeder.port,
                                 "127.0.0.1")  # fmt: skip
        return web.json_response(info.to_json())

    async def torrent(request: web.Request) -> web.Response:
        index = int(request.match_info["index"])
        meta = swarm.metas[index]
        run = body.get(index, DATA[index * SEGMENT : (index + 1) * SEGMENT])
        headers = protocol.offer_headers(list(range(meta.num_pieces)), len(meta.data))
        if not streamed:
            return web.Response(body=meta.data + run, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_length = len(meta.data) + meta.size
        await resp.prepare(request)
        await resp.write(meta.data)
        for at in range(0, len(run), PART):
            await asyncio.sleep(0.005)  # the agent reads the socket between parts
            await resp.write(run[at : at + PART])
        if len(run) < meta.size:
            assert request.transport is not None
            request.transport.close()
        return resp

    app = web.Application()
    app.router.add_get(protocol.BLOB_INFO_ROUTE, blob)
    app.router.add_get(protocol.TORRENT_ROUTE, torrent)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def pull(tmp_path: Path, swarm: Swarm, body: dict[int, bytes], streamed: bool = False,
               ) -> tuple[BlobDownload, BlobStore, Metrics]:  # fmt: skip
    server = await seeder_api(swarm, body, streamed)
    client = SeederClient([str(server.make_url("")).rstrip("/")], timeout=5)
    store, metrics = BlobStore(tmp_path / "store"), Metrics()
    puller = BlobPuller(store, Origin(5, "agent"), swarm.agent, client, metrics,
                        swarm_timeout=5, stall_timeout=5, seeder_grace=5)  # fmt: skip
    try:
        download = puller.start(DIGEST, len(DATA), UPSTREAM, "demo", {})
        assert download.task is not None
        await asyncio.wait_for(download.task, 30)
    finally:
        await client.close()
        await server.close()
    return download, store, metrics



def assert_whole_blob(download: BlobDownload, store: BlobStore) -> None:
    """The pull ended without error and the store holds exactly ``DATA``."""
    assert download.error is None
    layout = store.layout(DIGEST)
    assert layout is not None
    assert layout.read(0, len(DATA)) == DATA


async def test_a_segment_dealt_whole_is_written_directly_and_served_to_peers(
    tmp_path: Path, swarm: Swarm
) -> None:
    download, store, metrics = await pull(tmp_path, swarm, {})
    assert_whole_blob(download, store)
    assert metrics.value("dealt_segments_total") == 2  # both written directly
    assert metrics.value("seeder_pieces_total") == sum(m.num_pieces for m in swarm.metas)
    assert metrics.value("seeder_segments_total", reason="piece_failed") == 0
    assert swarm.agent.totals().downloaded == 0  # nothing came over BitTorrent
    # another node gets both segments from this agent (libtorrent checks each piece once)
    (tmp_path / "peer").mkdir()
    for index, meta in enumerate(swarm.metas):
        got = swarm.peer.add(meta, tmp_path / "peer", seed=False, announce=False,
                             peers=[("127.0.0.1", swarm.agent.port)])  # fmt: skip
        for piece in range(meta.num_pieces):
            assert await got.wait_piece(piece, timeout=10)
        data = await got.read_pieces(0, meta.num_pieces)
        assert data == DATA[index * SEGMENT : (index + 1) * SEGMENT]
    assert swarm.seeder.totals().uploaded == 0  # all of it from the agent
    assert swarm.agent.hash_failures == 0


async def test_a_seeder_lying_in_a_dealt_segment_is_caught_at_the_piece(
    tmp_path: Path, swarm: Swarm
) -> None:
    """Wrong bytes (right length) in the last segment: that piece fails its hash before any
    of the segment is hashed into the blob's digest or released to a reader (else the
    digest would fail), and the segment comes from the seeder's swarm instead."""
    lie = bytearray(DATA[SEGMENT:])
    lie[PIECE + 1000] ^= 0xFF
    download, store, metrics = await pull(tmp_path, swarm, {1: bytes(lie)})
    assert_whole_blob(download, store)
    assert metrics.value("seeder_segments_total", reason="piece_failed") == 1
    assert swarm.agent.totals().downloaded == len(DATA) - SEGMENT  # segment 1 over BitTorrent
    assert swarm.agent.hash_failures == 0  # the swarm sent only right pieces


async def test_a_dealt_segment_cut_short_comes_from_the_seeders_swarm(
    tmp_path: Path, swarm: Swarm
) -> None:
    download, store, metrics = await pull(tmp_path, swarm, {0: DATA[: SEGMENT - PIECE - 5]})
    assert_whole_blob(download, store)
    assert metrics.value("seeder_segments_total", reason="piece_failed") == 1
    assert metrics.value("dealt_segments_total") == 1  # segment 1 still written directly
    assert swarm.agent.totals().downloaded == SEGMENT  # segment 0 over BitTorrent


async def test_a_seeded_file_with_wrong_bytes_never_reaches_a_peer(
    tmp_path: Path, swarm: Swarm
) -> None:
    """What the direct path relies on: a torrent added as a seed over a file it never
    checked has each piece checked the first time a peer asks; a wrong one is not sent."""
    meta = swarm.metas[0]
    held = tmp_path / "agent"
    held.mkdir()
    wrong = bytearray(DATA[:SEGMENT])
    wrong[PIECE + 7] ^= 0xFF
    (held / meta.name).write_bytes(wrong)
    swarm.agent.add(meta, held, seed=True, announce=False)
    (tmp_path / "peer").mkdir()
    got = swarm.peer.add(meta, tmp_path / "peer", seed=False, announce=False,
                         peers=[("127.0.0.1", swarm.agent.port)])  # fmt: skip
    for piece in (0, 2, 3):
        assert await got.wait_piece(piece, timeout=10)
    assert not await got.wait_piece(1, timeout=2)
    assert swarm.peer.hash_failures == 0  # never even sent


@pytest.fixture
def spliced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes each direct receive (``splice_to_file``) was asked for."""
    counts: list[int] = []

    async def spy(sock: int, file: int, offset: int, count: int, *args, **kwargs) -> None:
        counts.append(count)
        await splice_to_file(sock, file, offset, count, *args, **kwargs)

    monkeypatch.setattr(dealt_segment, "splice_to_file", spy)
    return counts


async def test_a_streamed_run_is_received_from_the_socket_into_the_file(
    tmp_path: Path, swarm: Swarm, spliced: list[int]
) -> None:
    download, store, metrics = await pull(tmp_path, swarm, {}, streamed=True)
    assert_whole_blob(download, store)
    assert metrics.value("dealt_segments_total") == 2
    assert len(spliced) == 2 and all(count > 0 for count in spliced)  # the socket path ran
    assert swarm.agent.totals().downloaded == 0


async def test_a_seeder_lying_in_a_received_run_is_caught_at_the_piece(
    tmp_path: Path, swarm: Swarm, spliced: list[int]
) -> None:
    lie = bytearray(DATA[SEGMENT:])
    lie[-100] ^= 0xFF  # in the part received from the socket
    download, store, metrics = await pull(tmp_path, swarm, {1: bytes(lie)}, streamed=True)
    assert_whole_blob(download, store)
    assert len(spliced) == 2
    assert metrics.value("seeder_segments_total", reason="piece_failed") == 1
    assert swarm.agent.totals().downloaded == len(DATA) - SEGMENT  # segment 1 over BitTorrent


async def test_a_received_run_cut_by_the_seeder_comes_from_its_swarm(
    tmp_path: Path, swarm: Swarm, spliced: list[int]
) -> None:
    download, store, metrics = await pull(tmp_path, swarm, {0: DATA[: SEGMENT - PIECE - 5]},
                                          streamed=True)  # fmt: skip
    assert_whole_blob(download, store)
    assert len(spliced) == 2
    assert metrics.value("seeder_segments_total", reason="piece_failed") == 1
    assert metrics.value("dealt_segments_total") == 1
    assert swarm.agent.totals().downloaded == SEGMENT  # segment 0 over BitTorrent


@pytest.mark.parametrize("chunked", [False, True])
async def test_only_a_plain_body_of_torrent_and_run_is_taken_off_aiohttp(
    tmp_path: Path, swarm: Swarm, chunked: bool
) -> None:
    """A chunked body carries framing between the bytes: the socket path must not take it
    (nor an encoded or TLS one), and the run is then read through aiohttp whole."""
    meta, run = swarm.metas[0], DATA[:SEGMENT]

    async def torrent(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=protocol.offer_headers(
            list(range(meta.num_pieces)), len(meta.data)))  # fmt: skip
        if chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(meta.data) + len(run)
        await resp.prepare(request)
        await resp.write(meta.data)
        for at in range(0, len(run), PART):
            await asyncio.sleep(0.005)
            await resp.write(run[at : at + PART])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get(protocol.TORRENT_ROUTE, torrent)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    client = SeederClient([str(server.make_url("")).rstrip("/")], timeout=5)
    try:
        offer = await client.torrent(str(server.make_url("")).rstrip("/"), DIGEST, 0, 1)
        try:
            direct = offer.direct_run(len(run))
            if chunked:
                assert direct is None
                got = b"".join([chunk async for chunk in offer.inline_run(len(run))])
            else:
                assert direct is not None and direct.left > 0
                out = tmp_path / "run"
                fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.pwrite(fd, direct.head, 0)
                    await splice_to_file(direct.sock, fd, len(direct.head), direct.left, 5.0,
                                         lambda n: None)  # fmt: skip
                finally:
                    os.close(fd)
                    direct.close()
                got = out.read_bytes()
        finally:
            offer.close()
        assert got == run
    finally:
        await client.close()
        await server.close()


async def test_the_blobs_checks_run_in_one_thread_of_the_downloads_own(
    tmp_path: Path, swarm: Swarm, spliced: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every check-and-hash of the dealt bytes runs, in blob order, in the download's one
    thread (not a new executor job each), which ends with the download."""
    checked: list[tuple[int, str]] = []

    def spy(hasher, meta: Metainfo, path: Path, start: int, end: int) -> str | None:
        second = meta.info_hash == swarm.metas[1].info_hash
        checked.append((second, threading.current_thread().name))
        return dealt_segment.verify_and_hash(hasher, meta, path, start, end)

    monkeypatch.setattr(pull_module, "verify_and_hash", spy)
    download, store, metrics = await pull(tmp_path, swarm, {}, streamed=True)
    assert_whole_blob(download, store)
    assert metrics.value("dealt_segments_total") == 2 and len(spliced) == 2
    assert {name for _, name in checked} == {"blob-hash"}
    segments = [second for second, _ in checked]
    assert segments == sorted(segments) and segments[0] is False and segments[-1] is True
    for _ in range(100):  # its thread ends once the pull did
        if not any(t.name == "blob-hash" for t in threading.enumerate()):
            break
        await asyncio.sleep(0.02)
    assert not any(t.name == "blob-hash" for t in threading.enumerate())
