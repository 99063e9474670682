"""``read_pieces``: a dealt run cut into its pieces whatever sizes the reads come in."""

from __future__ import annotations

import asyncio
import os

import pytest

from p2p_mirror.agent.seeder_client import read_pieces, read_run


class Chunks:
    """A response body that delivers ``chunks`` one at a time, as a connection does."""

    def __init__(self, chunks: list[bytes], http_chunk_ends: bool = False) -> None:
        self.chunks = list(chunks)
        self.http_chunk_ends = http_chunk_ends  # (b"", True) after each, as aiohttp can
        self._ended = True

    async def readchunk(self) -> tuple[bytes, bool]:
        if self.http_chunk_ends and not self._ended:
            self._ended = True
            return b"", True
        self._ended = False
        return (self.chunks.pop(0) if self.chunks else b""), False


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


SIZES = [100, 100, 100, 37]  # the last piece of a segment is shorter
DATA = os.urandom(sum(SIZES))
EXPECTED = [(7 + i, DATA[sum(SIZES[:i]) : sum(SIZES[: i + 1])]) for i in range(len(SIZES))]


@pytest.mark.parametrize(
    "cuts",
    [
        [],  # the whole run in one read
        [100, 200, 300],  # a piece per read
        [1, 2, 3, 150, 199, 201, 336],  # pieces across reads, tiny reads
        list(range(10, 337, 10)),  # many reads per piece
    ],
)
async def test_every_piece_whole_and_in_order(cuts: list[int]) -> None:
    body = Chunks(split(DATA, cuts))
    batches = [b async for b in read_pieces(body, [7, 8, 9, 10], SIZES)]  # type: ignore[arg-type]
    assert [p for b in batches for p in b] == EXPECTED
    assert all(batches)  # no empty batch
    assert all(isinstance(data, bytes) for b in batches for _, data in b)


async def test_a_batch_per_chunk_and_a_chunk_that_is_a_piece_is_not_copied() -> None:
    chunks = split(DATA, [100, 250, 337])
    body = Chunks(chunks)
    batches = [b async for b in read_pieces(body, [7, 8, 9, 10], SIZES)]  # type: ignore[arg-type]
    assert [[p for p, _ in b] for b in batches] == [[7], [8], [9, 10]]
    assert [p for b in batches for p in b] == EXPECTED
    assert batches[0][0][1] is chunks[0]


async def test_a_cut_body_gives_the_whole_pieces_then_fails() -> None:
    body = Chunks(split(DATA[:250], [120]))
    got = []
    with pytest.raises(asyncio.IncompleteReadError):
        async for batch in read_pieces(body, [7, 8, 9, 10], SIZES):  # type: ignore[arg-type]
            got += batch
    assert got == EXPECTED[:2]


async def test_a_whole_run_comes_in_the_chunks_received_without_copies() -> None:
    """``read_run`` (a segment dealt whole): each chunk as received, never past the run."""
    chunks = split(DATA, [1, 150, 300])
    got = [c async for c in read_run(Chunks([*chunks, b"more"]), len(DATA))]  # type: ignore[arg-type]
    assert b"".join(got) == DATA
    assert all(a is b for a, b in zip(got, chunks, strict=True))


async def test_a_whole_run_cut_short_fails_after_the_chunks_before_the_cut() -> None:
    got = []
    with pytest.raises(asyncio.IncompleteReadError):
        async for chunk in read_run(Chunks(split(DATA[:200], [120])), len(DATA)):  # type: ignore[arg-type]
            got.append(chunk)
    assert b"".join(got) == DATA[:200]


async def test_a_chunked_bodys_chunk_ends_are_not_its_end() -> None:
    """aiohttp's ``readchunk`` returns ``(b"", True)`` at each end of an HTTP chunk."""
    pieces = [p async for batch in read_pieces(Chunks(split(DATA, [50, 250]), True),
                                               [7, 8, 9, 10], SIZES) for p in batch]  # fmt: skip
    assert pieces == EXPECTED
    run = [c async for c in read_run(Chunks(split(DATA, [50, 250]), True), len(DATA))]
    assert b"".join(run) == DATA
