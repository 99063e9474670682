"""A queue for a shared link: the queue of waiting transfers, and that waiting on it ends."""

from __future__ import annotations

import asyncio

from p2p_mirror.seeder.link_queue import LinkQueue


async def test_the_backlog_counts_waiting_transfers_and_drains_past_a_stuck_one() -> None:
    """Two transfers wait behind one that never moves: they count in ``queued`` until they
    get a slot, and a wait for the backlog to drain ends once the stuck one lets the next start."""
    queue = LinkQueue(1, patience=0.2)
    stuck = asyncio.Event()
    started: list[str] = []

    async def transfer(name: str, size: int) -> None:
        async with queue.slot(lambda: 0, name, size):
            started.append(name)
            await stuck.wait()  # never progresses

    tasks = [asyncio.create_task(transfer(name, size))
             for name, size in (("first", 5), ("second", 7), ("third", 11))]  # fmt: skip
    await asyncio.sleep(0.05)
    assert started == ["first"]
    assert queue.queued == 18 and queue.granted == 1
    await asyncio.wait_for(queue.backlog_below(11), timeout=2)  # second let the third start
    assert started == ["first", "second"] and queue.queued == 11
    await asyncio.wait_for(queue.backlog_below(0), timeout=2)
    assert started == ["first", "second", "third"] and queue.granted == 3
    stuck.set()
    await asyncio.gather(*tasks)
    assert queue.queued == 0


async def test_a_cancelled_waiter_leaves_the_backlog() -> None:
    queue = LinkQueue(1, patience=60)
    async with queue.slot(lambda: 0, "holder"):
        waiter = asyncio.create_task(queue.slot(lambda: 0, "waiter", 100).__aenter__())
        await asyncio.sleep(0.05)
        assert queue.queued == 100
        waiter.cancel()
        await asyncio.wait_for(queue.backlog_below(0), timeout=1)
    assert queue.queued == 0
