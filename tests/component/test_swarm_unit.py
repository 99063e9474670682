"""When a piece wait counts as a stall (the agent then falls back to the origin), and when a
finished piece may be read from its file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from p2p_mirror.core.swarm import Metainfo, SwarmError, Transfer, make_torrent


def transfer() -> Transfer:
    """A transfer without a session: wait_piece only looks at finished pieces and errors."""
    return Transfer(meta=None, handle=None, save_dir=Path("."))  # type: ignore[arg-type]


async def finish(t: Transfer, pieces: list[int], every: float) -> None:
    for piece in pieces:
        await asyncio.sleep(every)
        t.done.add(piece)
        t._notify()


async def test_a_moving_torrent_is_not_a_stall() -> None:
    """Rarest-first may leave the reader's piece for last: other pieces finishing keep the
    wait alive well past the timeout."""
    t = transfer()
    task = asyncio.create_task(finish(t, [*range(1, 12), 0], every=0.05))
    assert await t.wait_piece(0, timeout=0.5)  # ~0.6 s in all, never 0.5 s without a piece
    await task


async def test_a_torrent_that_stopped_moving_is_a_stall() -> None:
    t = transfer()
    task = asyncio.create_task(finish(t, [1, 2, 0], every=0.4))
    assert not await t.wait_piece(0, timeout=0.2)
    task.cancel()


async def test_a_cancelled_wait_ends_even_when_a_piece_finishes_at_that_moment() -> None:
    """Cancelling a fetch in the same turn as a piece finishes must cancel it (Python 3.11's
    wait_for returned normally instead, and the wait went on until its timeout)."""
    t = transfer()
    waiting = asyncio.create_task(t.wait_piece(0, timeout=30))
    await asyncio.sleep(0.01)  # waiting for a piece
    t.done.add(1)
    t._notify()  # another piece finished...
    waiting.cancel()  # ...as the fetch is cancelled
    done, _ = await asyncio.wait([waiting], timeout=2)
    assert waiting in done and waiting.cancelled()


class RecordingHandle:
    def __init__(self) -> None:
        self.added: list[int] = []

    def add_piece(self, piece: int, data: bytes, flags: int) -> None:
        self.added.append(piece)


async def test_a_piece_waits_for_libtorrents_check_of_the_new_torrent() -> None:
    """libtorrent loses a piece added while it checks a new torrent's files: hand it over
    only once it reported the check done, and give up if that never comes."""
    t = transfer()
    t.handle = RecordingHandle()  # type: ignore[assignment]
    adding = asyncio.create_task(t.add_piece(3, b"x"))
    await asyncio.sleep(0.05)
    assert t.handle.added == []
    t.checked.set()
    await adding
    assert t.handle.added == [3]
    never = transfer()
    never.handle = RecordingHandle()  # type: ignore[assignment]
    with pytest.raises(TimeoutError):
        await never.add_piece(0, b"x", timeout=0.05)
    assert never.handle.added == []


class FlushingHandle:
    """Counts flush requests; the test plays libtorrent and says when each one completed."""

    def __init__(self) -> None:
        self.flushes = 0

    def flush_cache(self) -> None:
        self.flushes += 1


def segment_transfer(tmp_path: Path, data: bytes, piece: int) -> Transfer:
    """A downloading transfer of ``data`` whose file holds only zeros so far (libtorrent has
    verified pieces in memory but not written them yet)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "segment").write_bytes(data)
    meta = Metainfo.parse(make_torrent(src / "segment", [], piece))
    save = tmp_path / "save"
    save.mkdir()
    (save / "segment").write_bytes(b"\0" * len(data))
    return Transfer(meta, FlushingHandle(), save)  # type: ignore[arg-type]


async def test_a_finished_piece_is_read_only_after_libtorrent_flushed_it(tmp_path: Path) -> None:
    """libtorrent reports a piece finished before its blocks are in the file: the reader
    never reads (nor serves) the file before a flush asked for after the piece finished has
    completed; a flush asked for earlier does not count, and one flush serves every reader
    whose pieces it covers."""
    piece = 16384
    data = os.urandom(3 * piece)
    t = segment_transfer(tmp_path, data, piece)
    t.done.add(0)
    first = asyncio.create_task(t.read_pieces(0, 1))
    again = asyncio.create_task(t.read_pieces(0, 1))
    await asyncio.sleep(0.05)
    assert t.handle.flushes == 1 and not first.done() and not again.done()
    t.done.update({1, 2})  # finish after that flush was asked for
    later = asyncio.create_task(t.read_pieces(1, 3))
    await asyncio.sleep(0.05)
    assert t.handle.flushes == 2
    (t.path).write_bytes(data[:piece] + b"\0" * 2 * piece)  # only piece 0 written so far
    t._cache_flushed()  # the first flush completed
    assert await first == await again == data[:piece]
    await asyncio.sleep(0.05)
    assert not later.done()  # the first flush's alert does not cover pieces 1-2
    t.path.write_bytes(data)
    t._cache_flushed()
    assert await later == data[piece:]
    assert await t.read_pieces(0, 3) == data and t.handle.flushes == 2  # all known on disk


async def test_a_short_read_is_retried_and_then_fails(tmp_path: Path) -> None:
    piece = 16384
    data = os.urandom(2 * piece)
    t = segment_transfer(tmp_path, data, piece)
    t.done.update({0, 1})
    t.on_disk.update({0, 1})
    t.path.write_bytes(data[:piece])  # shorter than the run
    reading = asyncio.create_task(t.read_pieces(0, 2, timeout=2))
    await asyncio.sleep(0.05)
    assert t.handle.flushes == 1 and not reading.done()  # asks libtorrent again
    t.path.write_bytes(data)
    t._cache_flushed()
    assert await reading == data
    t.on_disk.clear()
    assert await t.read_pieces(0, 2) == data  # a short run that matches its hashes...
    assert t.handle.flushes == 1  # ...needs no flush
    t.path.write_bytes(data[:piece] + b"\0" * piece)  # not written yet (or the wrong bytes)
    with pytest.raises(SwarmError, match="never reached the disk"):
        await t.read_pieces(0, 2, timeout=0.1)  # no flush completes
    assert t.handle.flushes == 2


async def test_the_verdict_on_an_added_piece_is_libtorrents_hash_check() -> None:
    """An added piece is verified once finished, rejected once its hash_failed alert came
    (the agent then takes the segment from the seeder's swarm), and undecided until then."""
    t = transfer()
    deciding = asyncio.create_task(t.verdict(1, timeout=5))
    await asyncio.sleep(0.02)
    assert not deciding.done()
    t.failed.add(1)
    t._notify()
    assert await deciding is False
    t.done.add(2)
    assert await t.verdict(2, timeout=1) is True
    with pytest.raises(TimeoutError):
        await t.verdict(3, timeout=0.05)
