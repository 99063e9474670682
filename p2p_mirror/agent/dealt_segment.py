"""A segment the seeder dealt to this agent whole, inline after its torrent (the first or
only node pulling a blob): its bytes go straight into the segment file as they arrive and
are checked and hashed from there, without handing pieces to libtorrent (whose binding
copies every byte). Each piece is checked against the torrent before its bytes count as
downloaded, in the same pass that feeds the blob's digest, so a seeder that sends wrong
bytes is caught at the piece and the segment comes from the swarm instead. Once every
piece is checked the torrent joins the session as a seed (told that its pieces were
checked: libtorrent need not hash them again when peers ask).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from p2p_mirror.agent.splice_run import splice_to_file
from p2p_mirror.core.config import MiB
from p2p_mirror.core.swarm import Metainfo, Transfer, map_range
from p2p_mirror.core.taken_body import TakenBody

HASH_MIN = 1 * MiB  # bytes the reader waits for per hand-off to a hashing thread (or the rest)


@dataclass
class DealtSegment:
    """A whole dealt segment being written into ``path``; readers wait for ``written``."""

    meta: Metainfo
    path: Path
    written: int = 0  # bytes at the start of the file, written in full
    transfer: Transfer | None = None  # downloading the segment once the run broke
    broken: bool = False  # the run broke or a piece failed: ``transfer`` takes it from the swarm
    writer: asyncio.Task[None] | None = None  # the task writing the run
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
                self._put(fd, chunk)
        finally:
            os.close(fd)
        self._check_complete()

    async def receive(self, run: TakenBody) -> None:
        """Write the run from its socket into the file (``splice_to_file``): the bytes
        aiohttp already held, then the rest without passing through Python."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            self._put(fd, run.head)
            if run.left:
                await splice_to_file(run.sock, fd, self.written, run.left, run.idle_timeout,
                                     self._advanced)  # fmt: skip
        finally:
            os.close(fd)
        self._check_complete()

    def _put(self, fd: int, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            n = os.pwrite(fd, view, self.written)
            view = view[n:]
            self._advanced(n)

    def _advanced(self, n: int) -> None:
        self.written += n
        if self.written >= self._wanted:
            self._notify()

    def _check_complete(self) -> None:
        if self.written != self.size:
            raise asyncio.IncompleteReadError(b"", self.size - self.written)

    def broke(self, transfer: Transfer) -> None:
        """The run broke or a piece failed: ``transfer`` downloads the segment instead."""
        self.transfer, self.broken = transfer, True
        self._notify()

    async def wait_beyond(self, pos: int, timeout: float) -> bool:
        """True once ``HASH_MIN`` bytes and a whole piece past ``pos`` (or the rest of the
        segment) are written, or the run broke; False after ``timeout`` in which no byte
        was written."""
        want = min(self.size, pos + max(HASH_MIN, self.meta.piece_length))
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

    def verifiable(self) -> int:
        """Where the whole pieces written so far end."""
        if self.written >= self.size:
            return self.size
        return self.written - self.written % self.meta.piece_length


def verify_and_hash(hasher, meta: Metainfo, path: Path, start: int, end: int) -> str | None:
    """Check the pieces holding bytes [start, end) of ``path`` (``end``: a piece's end)
    against ``meta``, then feed those bytes to ``hasher``, from one mapping (blocking: run
    it in a thread; hashlib releases the GIL). None if they passed; else what failed, with
    nothing hashed."""
    first = start // meta.piece_length
    lo = meta.piece_range(first)[0]  # a piece starts on a page
    view = map_range(path, lo, end)
    if view is None:
        return "gone from the disk"
    for piece in range(first, -(-end // meta.piece_length)):
        a, b = meta.piece_range(piece)
        if not meta.piece_ok(piece, view[a - lo : b - lo]):
            return f"piece {piece} fails its hash"
    hasher.update(view[start - lo :])
    return None
