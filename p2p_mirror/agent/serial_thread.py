"""One thread of its own for a blob download's blocking work (checking and hashing what
arrived, writing the origin's bytes), run one job after another. ``asyncio.to_thread``
costs, per job, a context copy, an executor submission and two chained futures, each with
callbacks on the event loop; here a job is a queue entry and one callback with its result."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SerialThread:
    """Runs blocking jobs in order in one thread, started at the first job and ended by
    ``close``. Each caller awaits its job, so at most one job per caller waits in the queue."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._jobs: queue.SimpleQueue[tuple[asyncio.Future[Any], Callable[..., Any], tuple]
                                      | None] = queue.SimpleQueue()  # fmt: skip
        self._thread: threading.Thread | None = None

    async def run(self, job: Callable[..., T], *args: Any) -> T:
        """``job(*args)`` in the thread; its result or its exception. A cancelled caller
        stops waiting; the job still runs to its end (as with ``asyncio.to_thread``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        done: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((done, job, args))
        return await done

    def close(self) -> None:
        """End the thread after the jobs already queued."""
        if self._thread is not None:
            self._jobs.put(None)

    def _work(self) -> None:
        while (entry := self._jobs.get()) is not None:
            done, job, args = entry
            try:
                outcome: tuple[Any, BaseException | None] = (job(*args), None)
            except BaseException as e:  # noqa: BLE001 - the caller gets it, as from to_thread
                outcome = (None, e)
            try:
                self._loop.call_soon_threadsafe(_settle, done, outcome)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return


def _settle(done: asyncio.Future[Any], outcome: tuple[Any, BaseException | None]) -> None:
    if done.cancelled():
        return
    result, error = outcome
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)
