"""A blob download's blocking jobs run in order in one thread of their own."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from p2p_mirror.agent.serial_thread import SerialThread


async def test_jobs_run_in_order_in_one_thread_off_the_event_loop() -> None:
    jobs = SerialThread("blob-hash")
    ran: list[tuple[int, str]] = []

    def job(n: int) -> int:
        ran.append((n, threading.current_thread().name))
        return n * n

    try:
        results = [await jobs.run(job, n) for n in range(5)]
    finally:
        jobs.close()
    assert results == [0, 1, 4, 9, 16]
    assert [n for n, _ in ran] == list(range(5))
    assert {name for _, name in ran} == {"blob-hash"}
    assert threading.current_thread().name != "blob-hash"


async def test_a_jobs_exception_reaches_its_caller_and_the_thread_goes_on() -> None:
    jobs = SerialThread("blob-hash")

    def fails() -> None:
        raise ValueError("bad piece")

    try:
        with pytest.raises(ValueError, match="bad piece"):
            await jobs.run(fails)
        assert await jobs.run(lambda: "next") == "next"
    finally:
        jobs.close()


async def test_a_cancelled_caller_leaves_the_thread_usable_and_close_ends_it() -> None:
    jobs = SerialThread("blob-hash")
    started = threading.Event()

    def slow() -> str:
        started.set()
        time.sleep(0.2)
        return "late"

    waiter = asyncio.ensure_future(jobs.run(slow))
    await asyncio.to_thread(started.wait, 5)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await jobs.run(lambda: 42) == 42  # after the slow job, in order
    thread = jobs._thread
    assert thread is not None and thread.is_alive()
    jobs.close()
    await asyncio.to_thread(thread.join, 5)
    assert not thread.is_alive()


async def test_no_thread_until_the_first_job() -> None:
    jobs = SerialThread("blob-hash")
    jobs.close()  # nothing to end
    assert jobs._thread is None
