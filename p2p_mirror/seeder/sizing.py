"""How the seeder cuts a blob: segment size per blob, piece size per segment."""

from __future__ import annotations

SEGMENT_PIECES = 32  # pieces per segment that small segments' piece size aims for
MIN_PIECE = 32 * 1024  # smaller pieces cost more CPU than they save


# Segments per blob, at least (the seeder's ``segment_parts``): more shorten the tail on slow
# links, fewer cost less CPU per pull (each is a torrent on every node; docs/design.md).
SEGMENT_PARTS = 8


def segment_size_for(size: int, largest: int, piece: int, parts: int = SEGMENT_PARTS) -> int:
    """Cut every blob in at least ``parts`` segments (whole pieces, at most ``largest``).

    Peers can start on a segment as soon as the seeder has it, so even a small layer's
    distribution overlaps with its origin download, and the last segment (what is left to
    send when the origin is done) is small; large blobs stay at ``largest`` per torrent so
    the tracker does not see thousands of swarms.
    """
    part = -(-size // parts)
    return max(piece, min(largest, -(-part // piece) * piece))


def piece_size_for(segment: int, largest: int) -> int:
    """The largest piece, halved (down to ``MIN_PIECE``) until a segment holds about
    ``SEGMENT_PIECES`` of them: 32 KiB for segments under 2 MiB, 64 KiB under 4 MiB.

    An agent can share a piece only once it holds all of it, so in a small segment large
    pieces make every hop wait, and fewer agents get a dealt run; large segments keep large
    pieces, which cost less CPU per byte.
    """
    piece = largest
    power_of_two = piece & (piece - 1) == 0  # halving keeps it one (a configured 96 KiB stays)
    while power_of_two and piece // 2 >= MIN_PIECE and piece * SEGMENT_PIECES > segment:
        piece //= 2
    return piece
