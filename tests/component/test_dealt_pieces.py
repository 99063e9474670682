"""Pieces the seeder deals to an agent: fetched over HTTP, checked, handed to libtorrent (real
sessions on loopback); a piece that fails sends the agent to the seeder's swarm instead."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from support.fakes import FixedSource

from p2p_mirror.agent.blob_download import BlobDownload
from p2p_mirror.agent.pull import BlobPuller
from p2p_mirror.agent.seeder_client import SeederClient, SegmentOffer
from p2p_mirror.core.config import HostPort
from p2p_mirror.core.metrics import Metrics
from p2p_mirror.core.oci import Digest
from p2p_mirror.core.origin import Origin
from p2p_mirror.core.protocol import PIECES_HEADER, TORRENT_LENGTH_HEADER
from p2p_mirror.core.store import BlobStore
from p2p_mirror.core.swarm import Metainfo, SwarmError, TorrentSession, Transfer, make_torrent

PIECE = 128 * 1024
DIGEST = Digest.parse("sha256:" + "ab" * 32)
DATA = os.urandom(4 * PIECE)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[TorrentSession, TorrentSession, Metainfo]]:
    """Two started sessions on loopback (no tracker) and a torrent of ``DATA``, which is
    written to ``tmp_path/"seeder"/"segment"``; neither session has the torrent yet."""
    src = tmp_path / "seeder"
    src.mkdir()
    (src / "segment").write_bytes(DATA)
    meta = Metainfo.parse(make_torrent(src / "segment", ["http://127.0.0.1:9/announce"], PIECE))
    first, second = (
        TorrentSession(HostPort("127.0.0.1", 0)),
        TorrentSession(HostPort("127.0.0.1", 0)),
    )
    await first.start()
    await second.start()
    yield first, second, meta
    await second.close()
    await first.close()


@pytest.fixture
def sessions(
    tmp_path: Path, pair: tuple[TorrentSession, TorrentSession, Metainfo]
) -> tuple[TorrentSession, TorrentSession, Metainfo]:
    """A seeding session holding one segment, and an empty downloading one."""
    seeder, agent, meta = pair
    seeder.add(meta, tmp_path / "seeder", seed=True, announce=False)
    return seeder, agent, meta


def piece_bytes(piece: int, broken: dict[int, str]) -> bytes:
    if broken.get(piece) == "corrupt":
        return b"x" * PIECE
    return DATA[piece * PIECE : (piece + 1) * PIECE]


async def piece_server(dealt: list[int], broken: dict[int, str]) -> TestServer:
    """The seeder's piece endpoint (``count`` pieces from ``piece`` on) and its torrent
    endpoint, whose response goes on with the ``dealt`` pieces. A run holding a ``broken``
    piece answers 500 (inline: the body ends before that piece), or comes back with that
    piece corrupted."""

    async def piece(request: web.Request) -> web.Response:
        first, count = int(request.match_info["piece"]), int(request.query.get("count", "1"))
        run = range(first, first + count)
        if any(broken.get(p) == "500" for p in run):
            return web.Response(status=500)
        return web.Response(body=b"".join(piece_bytes(p, broken) for p in run))

    async def torrent(request: web.Request) -> web.Response:
        body = b"torrent"
        for p in dealt:
            if broken.get(p) == "500":
                break  # the body ends short of it
            body += piece_bytes(p, broken)
        return web.Response(body=body, headers={
            PIECES_HEADER: ",".join(map(str, dealt)), TORRENT_LENGTH_HEADER: "7"})  # fmt: skip

    app = web.Application()
    app.router.add_get("/v1/blobs/{digest}/segments/{index}/pieces/{piece}", piece)
    app.router.add_get("/v1/blobs/{digest}/torrents/{index}", torrent)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def deal(tmp_path: Path, agent: TorrentSession, seeder: TorrentSession, meta: Metainfo,
               pieces: list[int], broken: dict[int, str], inline: bool = False,
               ) -> tuple[Transfer, Metrics]:  # fmt: skip
    """Deal ``pieces`` to ``agent``: after the torrent in its response (``inline``), or
    fetched in a request per run, as from a seeder that sends them only on request."""
    server = await piece_server(pieces, broken)
    url = str(server.make_url("")).rstrip("/")
    client = SeederClient([url], timeout=5)
    metrics = Metrics()
    puller = BlobPuller(BlobStore(tmp_path / "store"), Origin(5, "agent"), agent, client, metrics,
                      swarm_timeout=5, stall_timeout=5, seeder_grace=5)  # fmt: skip
    download = BlobDownload(DIGEST, len(DATA), None, "demo", {})  # type: ignore[arg-type]
    save = tmp_path / "agent"
    save.mkdir()
    transfer = agent.add(meta, save, seed=False, announce=False)
    offer = await client.torrent(url, DIGEST, 0, 6881) if inline else SegmentOffer(b"", pieces)
    assert (offer.body is not None) == inline
    try:
        source = FixedSource([("127.0.0.1", seeder.port)])
        await puller._dealt_pieces(download, source, url, 0, transfer, offer)  # type: ignore[arg-type]
    finally:
        offer.close()
        await client.close()
        await server.close()
    return transfer, metrics


@pytest.mark.parametrize("inline", [True, False])
async def test_dealt_pieces_are_shared_without_the_seeders_swarm(
    tmp_path: Path, sessions: tuple[TorrentSession, TorrentSession, Metainfo], inline: bool
) -> None:
    seeder, agent, meta = sessions
    transfer, metrics = await deal(tmp_path, agent, seeder, meta, [2, 0], {}, inline)
    for piece in (0, 2):
        assert await transfer.wait_piece(piece, timeout=5)
        got = await transfer.read_pieces(piece, piece + 1)
        assert got == DATA[piece * PIECE : (piece + 1) * PIECE]
    assert metrics.value("seeder_pieces_total") == 2
    await asyncio.sleep(0.5)
    assert transfer.done == {0, 2}  # nobody else was asked: the seeder's swarm not joined
    assert not transfer.handle.get_peer_info()


async def test_a_run_of_pieces_is_read_in_one_go_once_flushed(
    tmp_path: Path, sessions: tuple[TorrentSession, TorrentSession, Metainfo]
) -> None:
    """The agent streams a run of finished pieces with one read, after libtorrent flushed
    them; a file that comes up short is never served: the read fails after its retries."""
    seeder, agent, meta = sessions
    transfer, _ = await deal(tmp_path, agent, seeder, meta, list(range(meta.num_pieces)), {})
    for piece in range(meta.num_pieces):
        assert await transfer.wait_piece(piece, timeout=5)
    assert await transfer.read_pieces(0, meta.num_pieces) == DATA
    assert await transfer.read_pieces(1, 3) == DATA[PIECE : 3 * PIECE]
    agent.remove(transfer)  # nothing rewrites the file now
    os.truncate(transfer.path, 3 * PIECE)
    assert await transfer.read_pieces(0, 2) == DATA[: 2 * PIECE]
    with pytest.raises(SwarmError, match="removed"):
        await transfer.read_pieces(1, 4, timeout=0.3)


@pytest.mark.parametrize(("failure", "inline", "added"), [
    ("500", False, 0), ("corrupt", False, 2), ("500", True, 1), ("corrupt", True, 3),
    ("out of range", True, 0), ("out of range", False, 0),
])  # fmt: skip
async def test_a_failed_dealt_piece_joins_the_seeders_swarm(
    tmp_path: Path,
    sessions: tuple[TorrentSession, TorrentSession, Metainfo],
    failure: str,
    inline: bool,
    added: int,
) -> None:
    """Nobody else was dealt that piece: the agent takes the segment from the seeder's swarm
    (a corrupt piece is handed to libtorrent, whose hash check discards it: its
    hash_failed alert sends the agent there), and still ends with the right bytes."""
    seeder, agent, meta = sessions
    dealt = [0, 1, 3] if failure != "out of range" else [0, meta.num_pieces]
    transfer, metrics = await deal(tmp_path, agent, seeder, meta, dealt, {1: failure}, inline)
    # on request, pieces 0-1 come in one request: a 500 loses both, a corrupt piece 1 fails
    # libtorrent's check and piece 3 is never asked for; inline, the body stops short before
    # piece 1 or all three come; a piece the segment does not have fails the whole deal
    # before any is read
    assert metrics.value("seeder_pieces_total") == added
    assert metrics.value("seeder_segments_total", reason="piece_failed") == 1
    for piece in range(meta.num_pieces):
        assert await transfer.wait_piece(piece, timeout=10)
    assert b"".join([await transfer.read_pieces(p, p + 1) for p in range(meta.num_pieces)]) == DATA
    assert 1 in transfer.failed if failure == "corrupt" else not transfer.failed
    assert agent.hash_failures == (failure == "corrupt")


async def test_peers_are_given_their_grace_only_once_our_dealt_run_is_in(
    tmp_path: Path, sessions: tuple[TorrentSession, TorrentSession, Metainfo]
) -> None:
    """No peer sends anything: while our own dealt run is still on its way (the seeder's
    queue; nobody else has a piece yet either) that is no stall; once it is in and the grace
    has passed with no peer bytes, the agent asks the seeder's swarm and completes from it."""
    seeder, agent, meta = sessions
    metrics = Metrics()
    puller = BlobPuller(BlobStore(tmp_path / "store"), Origin(5, "agent"), agent, None, metrics,
                      swarm_timeout=5, stall_timeout=5, seeder_grace=0.2)  # fmt: skip
    (tmp_path / "agent").mkdir()
    transfer = agent.add(meta, tmp_path / "agent", seed=False, announce=False)
    run_in = asyncio.Event()
    dealer = asyncio.create_task(run_in.wait())
    watcher = asyncio.create_task(
        puller._seeder_if_stalled(transfer, FixedSource([("127.0.0.1", seeder.port)]), dealer)  # type: ignore[arg-type]
    )
    await asyncio.sleep(1.0)  # five graces
    assert metrics.value("seeder_segments_total", reason="stalled") == 0
    run_in.set()
    await asyncio.wait_for(watcher, timeout=5)
    assert metrics.value("seeder_segments_total", reason="stalled") == 1
    for piece in range(meta.num_pieces):
        assert await transfer.wait_piece(piece, timeout=10)


async def test_a_peer_that_turns_seed_while_we_wait_still_sends_its_last_piece(
    tmp_path: Path, pair: tuple[TorrentSession, TorrentSession, Metainfo]
) -> None:
    """The peer had only what we already took (we told it we were not interested), then its
    last piece arrives and makes it a seed: we still get that piece at once, on the same
    connection (libtorrent's default closes it and reconnects a second or more later)."""
    holder, waiter, meta = pair
    (tmp_path / "holder").mkdir()
    (tmp_path / "waiter").mkdir()
    held = holder.add(meta, tmp_path / "holder", seed=False, announce=False)
    wanted = waiter.add(meta, tmp_path / "waiter", seed=False, announce=False,
                        peers=[("127.0.0.1", holder.port)])  # fmt: skip
    last = meta.num_pieces - 1
    for piece in range(last):
        await held.add_piece(piece, DATA[piece * PIECE : (piece + 1) * PIECE])
    for piece in range(last):
        assert await wanted.wait_piece(piece, timeout=5)
    await asyncio.sleep(0.3)  # our NOT_INTERESTED reaches the holder
    loop = asyncio.get_running_loop()
    start = loop.time()
    await held.add_piece(last, DATA[last * PIECE :])
    assert await wanted.wait_piece(last, timeout=5)
    assert loop.time() - start < 0.5
    assert len(wanted.handle.get_peer_info()) == 1


async def test_pieces_handed_over_the_moment_a_torrent_is_added_are_kept(
    tmp_path: Path, pair: tuple[TorrentSession, TorrentSession, Metainfo]
) -> None:
    """A dealt run can arrive right behind its torrent; libtorrent lost pieces added while it
    still checked the new torrent's files (2 of 30 torrents). Forty fresh torrents, every
    piece handed over at once: all of them finish."""
    _, agent, meta = pair
    for round_ in range(40):
        save = tmp_path / f"agent{round_}"
        save.mkdir()
        transfer = agent.add(meta, save, seed=False, announce=False)
        for piece in range(meta.num_pieces):
            await transfer.add_piece(piece, DATA[piece * PIECE : (piece + 1) * PIECE])
        for piece in range(meta.num_pieces):
            assert await transfer.wait_piece(piece, timeout=5), (round_, piece)
        agent.remove(transfer)
