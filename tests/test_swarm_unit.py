"""When a piece wait counts as a stall (the agent then falls back to the origin)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mirror.swarm import Transfer


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
