"""Writing an ingested blob into its segment files in a thread of its own.

One long-lived thread per blob writes the bytes, updates the blob's digest and hashes each
piece (SHA-1) in the same pass, so a segment's torrent needs no second read of its file. The
bytes come either from the event loop (``put``: what aiohttp received) or, on a plain-HTTP
origin, from the thread's own receives (``receive``: ``body_receiver``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable

from p2p_mirror.core.store import BlobLayout

WRITE_BATCH = 1024 * 1024  # bytes per hand-off to the thread (received chunks, not copied)
WRITE_QUEUE = 8  # batches waiting for the thread before the event loop waits too


class SegmentWriter:
    """Writes a blob's body, in order, into ``layout``'s segment files; calls
    ``on_segment(index, piece_hashes)`` on the event loop as each segment is complete."""

    def __init__(self, layout: BlobLayout, hasher, piece_size: int,
                 on_segment: Callable[[int, list[bytes]], None],
                 receive: Callable[[Callable[[memoryview], None]], None] | None = None,
                 ) -> None:  # fmt: skip
        """``receive(take)``, if given, runs in the thread and hands it the whole body
        through ``take``, in order (``put`` is not used then)."""
        self.layout = layout
        self._receive = receive
        self.hasher = hasher
        self.piece_size = piece_size
        self.on_segment = on_segment
        self.error: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        # at most a segment ahead of the files: the origin's backpressure acts on segments
        batches = max(1, min(WRITE_QUEUE, layout.segment_size // WRITE_BATCH - 1))
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(batches)
        self._done = self._loop.create_future()
        self._abandoned = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segment-writer", daemon=True)
        self._thread.start()

    async def put(self, batch: list[bytes]) -> None:
        """Queue received bytes (the thread keeps taking them even after a failure)."""
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            await asyncio.to_thread(self._queue.put, batch)

    async def close(self) -> None:
        """Wait until everything queued is written (or the writer failed); if cancelled,
        the thread stops at its next batch instead."""
        try:
            if self._receive is None:
                await self.put(None)  # type: ignore[arg-type]
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self._abandoned.set()
            raise

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            self._write_all()
        except _Abandoned:
            return
        except BaseException as e:  # noqa: BLE001 - reported to the event loop by check()
            self.error = e
            with contextlib.suppress(_Abandoned):
                while self._receive is None and self._next() is not None:  # let put() go on
                    pass
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            self._loop.call_soon_threadsafe(self._done.set_result, None)

    def _next(self) -> list[bytes] | None:
        while True:
            with contextlib.suppress(queue.Empty):
                return self._queue.get(timeout=0.5)
            if self._abandoned.is_set():
                raise _Abandoned

    def _write_all(self) -> None:
        self._index, self._offset = 0, 0
        self._piece, self._hashes = hashlib.sha1(), []
        self._fd = self._open(0)
        try:
            if self._receive is not None:
                self._receive(self._take)
            else:
                while (batch := self._next()) is not None:
                    for chunk in batch:
                        self._take(memoryview(chunk))
        finally:
            if self._fd >= 0:
                os.close(self._fd)
        if self._offset == self.layout.size:
            self._segment_done(self._index, self._hashes)

    def _take(self, view: memoryview) -> None:
        """Write, hash and cut the body's next bytes (in the thread)."""
        layout, size = self.layout, self.layout.size
        self.hasher.update(view)
        while view:
            seg_start = self._index * layout.segment_size
            seg_end = min(seg_start + layout.segment_size, size)
            piece_end = min(seg_start + (len(self._hashes) + 1) * self.piece_size, seg_end)
            part = view[: piece_end - self._offset]
            if not part:
                raise ValueError("more bytes than the blob's size")
            self._piece.update(part)
            _write(self._fd, part)
            self._offset += len(part)
            view = view[len(part) :]
            if self._offset == piece_end:
                self._hashes.append(self._piece.digest())
                self._piece = hashlib.sha1()
            if self._offset == seg_end and self._offset < size:
                os.close(self._fd)
                self._fd = -1
                self._segment_done(self._index, self._hashes)
                self._index, self._hashes = self._index + 1, []
                self._fd = self._open(self._index)

    def _open(self, index: int) -> int:
        return os.open(self.layout.segment_path(index), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                       0o644)  # fmt: skip

    def _segment_done(self, index: int, hashes: list[bytes]) -> None:
        try:
            self._loop.call_soon_threadsafe(self.on_segment, index, hashes)
        except RuntimeError:  # the loop is gone (shutdown)
            raise _Abandoned from None


class _Abandoned(Exception):
    """The ingest stopped waiting for this writer."""


def _write(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]
