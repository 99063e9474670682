"""The seeder's segment writer: bytes in any chunking land in the right segment files, with
the blob's digest and every piece's SHA-1 computed on the way; a disk error is reported."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from p2p_mirror.core.oci import Digest
from p2p_mirror.core.store import BlobLayout
from p2p_mirror.seeder.segment_writer import SegmentWriter

PIECE = 1000


def layout_of(tmp_path: Path, data: bytes, segment: int) -> BlobLayout:
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    return BlobLayout(digest, len(data), segment, tmp_path)


@pytest.mark.parametrize("size", [0, 1, 2 * PIECE, 7 * PIECE + 123, 12 * PIECE])
async def test_segments_and_piece_hashes_match_the_bytes(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    segment = 4 * PIECE
    layout = layout_of(tmp_path, data, segment)
    hasher = layout.digest.hasher()
    seen: dict[int, list[bytes]] = {}
    writer = SegmentWriter(layout, hasher, PIECE, lambda i, h: seen.__setitem__(i, h))
    chunks = [data[i : i + 777] for i in range(0, len(data), 777)]  # across every boundary
    for i in range(0, len(chunks), 3):
        await writer.put(chunks[i : i + 3])
    await writer.close()
    writer.check()
    assert hasher.hexdigest() == layout.digest.hex
    assert sorted(seen) == list(range(layout.count))
    for index in range(layout.count):
        part = data[index * segment : (index + 1) * segment]
        assert layout.segment_path(index).read_bytes() == part
        pieces = [part[i : i + PIECE] for i in range(0, len(part), PIECE)]
        assert seen[index] == [hashlib.sha1(p).digest() for p in pieces]


async def test_a_disk_error_is_reported_and_does_not_block_the_sender(tmp_path: Path) -> None:
    data = os.urandom(20 * PIECE)
    layout = layout_of(tmp_path / "gone", data, 4 * PIECE)  # no such directory
    writer = SegmentWriter(layout, layout.digest.hasher(), PIECE, lambda i, h: None)
    for i in range(0, len(data), PIECE):  # more batches than the queue holds
        await asyncio.wait_for(writer.put([data[i : i + PIECE]]), 5)
    await asyncio.wait_for(writer.close(), 5)
    with pytest.raises(FileNotFoundError):
        writer.check()
