"""Turns at a shared link: the queue of waiting transfers, and that waiting on it ends."""

from __future__ import annotations

import asyncio

from p2p_mirror.seeder.turns import Turns


async def test_the_backlog_counts_waiting_transfers_and_drains_past_a_stuck_one() -> None:
    """Two transfers wait behind one that never moves: they count in ``queued`` until they
    get a turn, and a wait for the backlog to drain ends once the stuck one is handed on."""
    turns = Turns(1, patience=0.2)
    stuck = asyncio.Event()
    started: list[str] = []

    async def transfer(name: str, size: int) -> None:
        async with turns.turn(lambda: 0, name, size):
            started.append(name)
            await stuck.wait()  # never progresses

    tasks = [asyncio.create_task(transfer(name, size))
             for name, size in (("first", 5), ("second", 7), ("third", 11))]  # fmt: skip
    await asyncio.sleep(0.05)
    assert started == ["first"]
    assert turns.queued == 18 and turns.granted == 1
    await asyncio.wait_for(turns.backlog_below(11), timeout=2)  # second handed its turn
    assert started == ["first", "second"] and turns.queued == 11
    await asyncio.wait_for(turns.backlog_below(0), timeout=2)
    assert started == ["first", "second", "third"] and turns.granted == 3
    stuck.set()
    await asyncio.gather(*tasks)
    assert turns.queued == 0


async def test_a_cancelled_waiter_leaves_the_backlog() -> None:
    turns = Turns(1, patience=60)
    async with turns.turn(lambda: 0, "holder"):
        waiter = asyncio.create_task(turns.turn(lambda: 0, "waiter", 100).__aenter__())
        await asyncio.sleep(0.05)
        assert turns.queued == 100
        waiter.cancel()
        await asyncio.wait_for(turns.backlog_below(0), timeout=1)
    assert turns.queued == 0
