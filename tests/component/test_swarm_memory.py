"""What bounds an agent's memory while peers stream a blob into it (issue 24): libtorrent
reads all a peer's socket holds into that peer's receive buffer at once and queues every
block of it for the disk, so each peer connection's kernel receive buffer must stay small
(real sessions and sockets on loopback)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import require_binaries, until

from p2p_mirror.core.config import HostPort, MiB
from p2p_mirror.core.swarm import RECV_SOCKET_BUFFER, Metainfo, TorrentSession, make_torrent

PIECE = 64 * 1024


@pytest.fixture
async def sessions() -> AsyncIterator[tuple[TorrentSession, TorrentSession]]:
    seeder, agent = (TorrentSession(HostPort("127.0.0.1", 0)),
                     TorrentSession(HostPort("127.0.0.1", 0)))  # fmt: skip
    await seeder.start()
    await agent.start()
    yield seeder, agent
    await agent.close()
    await seeder.close()


def receive_buffers(peer_port: int) -> list[int]:
    """The kernel's receive buffer (bytes) of each established socket whose peer listens on
    ``peer_port``, as ``ss`` reports it (``skmem:(...,rbN,...)``)."""
    out = subprocess.run(
        ["ss", "-tmnH", "state", "established", "dport", "=", f":{peer_port}"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    return [int(rb) for rb in re.findall(r"\brb(\d+)", out)]


async def test_a_downloading_peer_socket_buffers_at_most_the_bound(
    sessions: tuple[TorrentSession, TorrentSession], tmp_path: Path
) -> None:
    """The agent's connection to a peer it downloads from gets the small receive buffer
    (the kernel doubles what is asked, and may cap it lower): with `main`'s 4 MiB, 17 peers
    held ~40 MiB of an agent's memory in libtorrent's receive buffers."""
    require_binaries("ss")
    seeder, agent = sessions
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "segment").write_bytes(os.urandom(4 * MiB))
    meta = Metainfo.parse(make_torrent(src / "segment", [], PIECE))
    seeder.add(meta, src, seed=True, announce=False)
    got = agent.add(meta, dst, seed=False, announce=False, peers=[("127.0.0.1", seeder.port)])
    await until(lambda: bool(receive_buffers(seeder.port)), 10, "a connection to the seeder")
    buffers = receive_buffers(seeder.port)
    assert buffers and all(0 < rb <= 2 * RECV_SOCKET_BUFFER for rb in buffers), buffers
    for piece in range(meta.num_pieces):  # and the blob still arrives whole through it
        assert await got.wait_piece(piece, timeout=10)


async def test_the_disk_queue_bound_is_applied_to_the_session(
    sessions: tuple[TorrentSession, TorrentSession],
) -> None:
    """libtorrent 2.1 lets 100 MiB of received blocks wait for the disk by default."""
    _, agent = sessions
    settings = agent.session.get_settings()
    assert settings["max_queued_disk_bytes"] <= 4 * MiB
    assert settings["recv_socket_buffer_size"] == RECV_SOCKET_BUFFER
