"""How the seeder sizes a blob's segments and a segment's pieces."""

from __future__ import annotations

import pytest

from p2p_mirror.seeder.sizing import MIN_PIECE, SEGMENT_PARTS, piece_size_for, segment_size_for

MiB = 1024 * 1024
PIECE = 256 * 1024


@pytest.mark.parametrize(
    ("size", "segment"),
    [
        (0, PIECE),  # an empty blob is still one (empty) segment
        (1000, PIECE),
        (1 * MiB, PIECE),  # 4 segments of one piece
        (8 * MiB + 5, 9 * PIECE),  # rounded up to whole pieces
        (16 * MiB, 4 * MiB),
        (64 * MiB, 16 * MiB),
        (128 * MiB, 16 * MiB),
        (1024 * MiB, 16 * MiB),  # large blobs: capped, so swarms stay few
    ],
)
def test_segment_size(size: int, segment: int) -> None:
    got = segment_size_for(size, 16 * MiB, PIECE)
    assert got == segment
    assert got % PIECE == 0
    count = max(1, -(-size // got))
    assert count <= max(SEGMENT_PARTS, -(-size // (16 * MiB)))


@pytest.mark.parametrize(
    ("segment", "largest", "piece"),
    [
        (512 * 1024, 128 * 1024, MIN_PIECE),  # never below the floor
        (2 * MiB - 1, 128 * 1024, 32 * 1024),
        (2 * MiB, 128 * 1024, 64 * 1024),  # 32 pieces
        (4 * MiB, 128 * 1024, 128 * 1024),
        (16 * MiB, 128 * 1024, 128 * 1024),  # large segments keep the configured size
        (512 * 1024, 16 * 1024, 16 * 1024),  # a configured size under the floor stays
        (512 * 1024, 96 * 1024, 96 * 1024),  # not a power of two: not halved
    ],
)
def test_small_segments_get_small_pieces(segment: int, largest: int, piece: int) -> None:
    assert piece_size_for(segment, largest) == piece
