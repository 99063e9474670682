"""Stored blobs and their torrents in step (``core.seeding``, used by agent and seeder), on a
real libtorrent session: seed a stored blob, seed every stored blob again at start (skipping
one whose saved torrent is damaged), stop seeding before eviction."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2p_mirror.core.config import HostPort
from p2p_mirror.core.oci import Digest
from p2p_mirror.core.seeding import SeededBlobs
from p2p_mirror.core.store import BlobLayout, BlobStore
from p2p_mirror.core.swarm import Metainfo, TorrentSession, make_torrent

PIECE = 32 * 1024
SEGMENT = 2 * PIECE


def stored_blob(store: BlobStore, data: bytes) -> tuple[BlobLayout, list[Metainfo]]:
    """A verified blob in ``store``, each segment's torrent saved beside it."""
    layout = store.begin(Digest.of(data), len(data), SEGMENT)
    layout.write(0, data)
    metas = []
    for index in range(layout.count):
        torrent = make_torrent(layout.segment_path(index), ["http://127.0.0.1:9/announce"], PIECE)
        layout.torrent_path(index).write_bytes(torrent)
        metas.append(Metainfo.parse(torrent))
    store.commit(layout)
    return layout, metas


@pytest.fixture
async def session() -> AsyncIterator[TorrentSession]:
    session = TorrentSession(HostPort("127.0.0.1", 0))
    await session.start()
    yield session
    await session.close()


@pytest.mark.parametrize("announce", [True, False])
async def test_a_stored_blob_is_seeded_and_stops_before_eviction(
    tmp_path: Path, session: TorrentSession, announce: bool
) -> None:
    store = BlobStore(tmp_path)
    layout, metas = stored_blob(store, os.urandom(3 * SEGMENT))
    seeded = SeededBlobs(store, session, announce=announce)
    seeded.seed(layout.digest, layout, metas)
    assert set(session.transfers) == {m.info_hash for m in metas}
    assert all(t.complete for t in seeded.transfers[layout.digest])
    seeded.seed(layout.digest, layout, metas)  # again: the same transfers, none added
    assert len(session.transfers) == len(metas)

    evicted = store.gc(1, 0.0, before_evict=seeded.stop)  # over any cap: evict it
    assert evicted == [layout.digest]
    assert session.transfers == {} and layout.digest not in seeded.transfers


async def test_a_blob_still_arriving_is_seeded_segment_by_segment(
    tmp_path: Path, session: TorrentSession
) -> None:
    store = BlobStore(tmp_path)
    layout, metas = stored_blob(store, os.urandom(2 * SEGMENT))
    seeded = SeededBlobs(store, session, announce=False)
    for meta in metas:
        seeded.seed_segment(layout.digest, layout, meta)
    assert [t.meta for t in seeded.transfers[layout.digest]] == metas
    seeded.stop(layout.digest)
    assert session.transfers == {}


async def test_every_stored_blob_is_seeded_again_at_start_but_a_damaged_one(
    tmp_path: Path, session: TorrentSession
) -> None:
    store = BlobStore(tmp_path)
    good, good_metas = stored_blob(store, os.urandom(3 * SEGMENT))
    damaged, _ = stored_blob(store, os.urandom(SEGMENT + 5))
    damaged.torrent_path(1).write_bytes(b"not a torrent")
    unsaved, _ = stored_blob(store, os.urandom(SEGMENT))
    unsaved.torrent_path(0).unlink()

    seeded = SeededBlobs(store, session)
    again = seeded.reseed_all()
    assert [s.digest for s in again] == [good.digest]
    assert again[0].metas == good_metas
    assert again[0].torrents == [m.data for m in good_metas]
    assert set(seeded.transfers) == {good.digest}
    assert set(session.transfers) == {m.info_hash for m in good_metas}
