"""How the seeder cuts blobs into segment torrents."""

from __future__ import annotations

import pytest

from mirror.seeder import segment_size_for

MiB = 1024 * 1024
PIECE = 256 * 1024


@pytest.mark.parametrize(
    ("size", "segment"),
    [
        (0, PIECE),  # an empty blob is still one (empty) segment
        (1000, PIECE),
        (1 * MiB, PIECE),  # 4 segments of one piece
        (8 * MiB + 5, 5 * PIECE),  # rounded up to whole pieces
        (16 * MiB, 2 * MiB),
        (64 * MiB, 8 * MiB),
        (128 * MiB, 16 * MiB),
        (1024 * MiB, 16 * MiB),  # large blobs: capped, so swarms stay few
    ],
)
def test_segment_size(size: int, segment: int) -> None:
    got = segment_size_for(size, 16 * MiB, PIECE)
    assert got == segment
    assert got % PIECE == 0
    count = max(1, -(-size // got))
    assert count <= max(8, -(-size // (16 * MiB)))
