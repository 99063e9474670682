"""A queue for a shared link: a few transfers at a time, in request order.

The seeder downloads blob bodies from the origin this way: with every layer at once, the
first segment of any layer is complete only after (segment size x layers) bytes and the
seeder's uplink idles until then; one at a time, it is ready after one segment. A transfer
that stops moving lets the next one start early (and goes on by itself), so one stuck origin
stream cannot hold every queued blob for the whole origin timeout. A transfer about to end
may let the next one start too, so the next request and its TCP ramp-up overlap its last
bytes instead of leaving the link idle between the two.

The queue is also a measure of how far a producer is ahead of the link: the seeder reads the
origin only while the dealt runs waiting in the send queue stay under a bound
(``backlog_below``). That wait always ends, since a slot that stops moving is given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

log = logging.getLogger(__name__)


class LinkQueue:
    def __init__(self, at_once: int, patience: float) -> None:
        self._slots = asyncio.Semaphore(at_once)  # FIFO: waiters are woken in order
        self.patience = patience
        self.queued = 0  # sizes of the transfers waiting for a slot, added up
        self.granted = 0  # slots given so far: it moves as long as the queue moves
        self._dequeued = asyncio.Event()

    @contextlib.asynccontextmanager
    async def slot(
        self, progress: Callable[[], int], what: str, size: int = 0
    ) -> AsyncIterator[Callable[[], None]]:
        """Hold a slot while the body runs; ``progress`` (e.g. bytes so far) must keep
        changing, or after ``patience`` seconds the next waiter may start. The body gets a
        function that lets the next waiter start now (idempotent). ``size`` counts in
        ``queued`` while this one waits."""
        self.queued += size
        try:
            await self._slots.acquire()
        finally:
            self.queued -= size
            self._dequeued.set()
            self._dequeued = asyncio.Event()
        self.granted += 1
        held = True

        def let_next_start() -> None:
            nonlocal held
            if held:
                held = False
                self._slots.release()

        async def watch() -> None:
            last = progress()
            while True:
                await asyncio.sleep(self.patience)
                now = progress()
                if now == last:
                    log.warning("%s made no progress for %gs: letting the next one start",
                                what, self.patience)  # fmt: skip
                    let_next_start()
                    return
                last = now

        watcher = asyncio.create_task(watch())
        try:
            yield let_next_start
        finally:
            watcher.cancel()
            let_next_start()

    async def backlog_below(self, limit: int) -> None:
        """Until the transfers waiting for a slot add up to ``limit`` or less."""
        while self.queued > limit:
            await self._dequeued.wait()
