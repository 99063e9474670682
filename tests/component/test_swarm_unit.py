"""When a piece wait counts as a stall (the agent then falls back to the origin)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from p2p_mirror.core.swarm import Transfer


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
