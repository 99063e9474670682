"""A segment the seeder dealt to this agent whole, inline after its torrent (the first or
only node pulling a blob): its bytes go straight into the segment file as they arrive and
are hashed from there, without handing pieces to libtorrent, whose binding copies every
byte and which SHA-1s every piece. Once the file is complete its torrent joins the session
as a seed (libtorrent checks a piece the first time a peer asks for it, so no peer gets a
piece that fails its hash). The blob's digest decides, as for every byte of a blob.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from p2p_mirror.core.config import MiB
from p2p_mirror.core.swarm import Metainfo, Transfer, map_range

HASH_MIN = 1 * MiB  # bytes the reader waits for per hand-off to a hashing thread (or the rest)


@dataclass
class DealtSegment:
    """A whole dealt segment being written into ``path``; readers wait for ``written``."""

    meta: Metainfo
    path: Path
    written: int = 0  # bytes at the start of the file, written in full
    transfer: Transfer | None = None  # seeding once written; downloading if the run broke
    broken: bool = False  # the run broke: ``transfer`` takes the segment from the swarm
    _wanted: int = 0  # the waiting reader is woken once ``written`` reaches this
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def size(self) -> int:
        return self.meta.size

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def write(self, chunks: AsyncIterator[bytes]) -> None:
        """Write the run into the file as it arrives. On the event loop: a page-cache write
        of one received chunk costs less than a hand-off to a thread."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            async for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(fd, view, self.written)
                    view = view[n:]
                    self.written += n
                if self.written >= self._wanted:
                    self._notify()
        finally:
            os.close(fd)
        if self.written != self.size:
            raise asyncio.IncompleteReadError(b"", self.size - self.written)

    def finish(self, transfer: Transfer, broken: bool = False) -> None:
        """The run ended: ``transfer`` seeds the segment, or (``broken``) downloads it."""
        self.transfer, self.broken = transfer, broken
        self._notify()

    async def wait_beyond(self, pos: int, timeout: float) -> bool:
        """True once ``HASH_MIN`` bytes past ``pos`` (or the rest of the segment) are
        written, or the run broke; False after ``timeout`` in which no byte was written."""
        want = min(self.size, pos + HASH_MIN)
        while self.written < want and not self.broken:
            before = self.written
            self._wanted = want
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
            except TimeoutError:
                if self.written == before:
                    return False
        return True


def hash_written(hasher, path: Path, start: int, end: int) -> bool:
    """Feed bytes [start, end) of ``path`` to ``hasher`` from a mapping (blocking: run it in
    a thread; hashlib releases the GIL). False, with nothing hashed, if the file is gone or
    shorter (a broken run's file is replaced)."""
    lo = start - start % mmap.ALLOCATIONGRANULARITY
    view = map_range(path, lo, end)
    if view is None:
        return False
    hasher.update(view[start - lo :])
    return True
