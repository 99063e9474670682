"""How the seeder sizes a blob's segments and a segment's pieces."""

from __future__ import annotations

import pytest

from p2p_mirror.core.config import SeederConfig, parse_segment_parts
from p2p_mirror.seeder.sizing import MIN_PIECE, SEGMENT_PARTS, piece_size_for, segment_size_for

MiB = 1024 * 1024
PIECE = 256 * 1024


@pytest.mark.parametrize(
    ("size", "parts", "segment"),
    [
        (0, SEGMENT_PARTS, PIECE),  # an empty blob is still one (empty) segment
        (1000, SEGMENT_PARTS, PIECE),
        (1 * MiB, SEGMENT_PARTS, PIECE),  # 4 segments of one piece
        (8 * MiB + 5, SEGMENT_PARTS, 5 * PIECE),  # rounded up to whole pieces
        (16 * MiB, SEGMENT_PARTS, 2 * MiB),
        (64 * MiB, SEGMENT_PARTS, 8 * MiB),
        (128 * MiB, SEGMENT_PARTS, 16 * MiB),
        (1024 * MiB, SEGMENT_PARTS, 16 * MiB),  # large blobs: capped, so swarms stay few
        (8 * MiB + 5, 4, 9 * PIECE),  # segment_parts 4: fewer, larger segments
        (16 * MiB, 4, 4 * MiB),
        (64 * MiB, 4, 16 * MiB),
        (16 * MiB, 1, 16 * MiB),
    ],
)
def test_segment_size(size: int, parts: int, segment: int) -> None:
    got = segment_size_for(size, 16 * MiB, PIECE, parts)
    assert got == segment
    assert got % PIECE == 0
    count = max(1, -(-size // got))
    assert count <= max(parts, -(-size // (16 * MiB)))


def test_default_parts_is_the_seeders_default() -> None:
    assert SeederConfig.__dataclass_fields__["segment_parts"].default == SEGMENT_PARTS


@pytest.mark.parametrize("bad", ["0", "65", "-1", "four", "2.5"])
def test_segment_parts_out_of_range_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse_segment_parts(bad)


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
