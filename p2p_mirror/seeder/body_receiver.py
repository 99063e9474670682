"""Receiving a plain-HTTP origin body from its socket in the segment writer's thread.

Through aiohttp, every chunk of at most 256 KiB costs the event loop a receive, a parse, a
copy and a wake-up. Here the writer's thread receives into one reusable buffer of
``RECV_BYTES`` with a blocking receive that waits for the whole buffer, and the writer
hashes and writes from it. The event loop hears of it per segment (``on_segment``) and of
the progress every ``REPORT_BYTES``, or at once after a receive that ends a segment, reaches
``size - lead`` or comes up short (a slow origin). A receive stops at those marks, so a slow
origin's segment is published, and the next blob's request sent, once its bytes are in.
The thread still follows the ingest's rules: it reads past a segment only once that segment
is published, and not while the dealt runs waiting to be sent exceed the backlog (the event
loop lets it go on, ``segment_published`` and ``LinkQueue.backlog_below``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

from p2p_mirror.core.config import MiB
from p2p_mirror.core.taken_body import TakenBody
from p2p_mirror.seeder.link_queue import LinkQueue

RECV_BYTES = 1 * MiB  # bytes per receive at most: the buffer, reused for the whole body
REPORT_BYTES = 4 * MiB  # the event loop hears of progress this often at least (+ see _progress)
WAKE_SECONDS = 0.5  # a receive with nothing to return gives up this often (stop, idle check)


class BodyCut(Exception):
    """The origin closed the connection before the end of the body."""

    def __init__(self, received: int) -> None:
        super().__init__(f"the body ended after {received} bytes")
        self.received = received


class BodyTooLong(Exception):
    """The origin sent more bytes than its Content-Length."""


class BodyStalled(Exception):
    """The origin sent nothing for its read timeout."""

    def __init__(self, seconds: float, received: int, size: int) -> None:
        super().__init__(f"origin sent nothing for {seconds:g}s after {received} of {size} bytes")


class Stopped(Exception):
    """The ingest stopped (cancelled): the thread gives up."""


class BodyReceiver:
    """Receives the ``size``-byte body ``taken`` off aiohttp, in the writer's thread
    (``run``). Created on the event loop; ``on_progress(n)`` runs there as bytes arrive."""

    def __init__(self, taken: TakenBody, size: int, segment_size: int, send_queue: LinkQueue,
                 backlog: int | None, on_progress: Callable[[int], None],
                 lead: int = 0) -> None:  # fmt: skip
        self._loop = asyncio.get_running_loop()
        self._head = taken.head
        self._left = taken.left
        self._idle_timeout = taken.idle_timeout
        # its own descriptor, closed by the thread (run) or by stop() if it is not in run()
        self._sock = socket.socket(fileno=os.dup(taken.sock))
        self.size = size
        self._lead_mark = size - lead
        self.segment_size = segment_size
        self._send_queue = send_queue
        self._backlog = backlog
        self._on_progress = on_progress
        self._turn = threading.Condition()  # guards the four fields below
        self._published = 0  # segments published so far (the event loop counts)
        self._backlog_clear = False
        self._stopped = False
        self._running = False  # the thread is in run(): it closes the socket
        self._backlog_task: asyncio.Task[None] | None = None
        self.received = 0  # written by the thread only
        self._posted = 0  # received when the thread last asked for a report
        self._reported = 0
        self._report_due = False

    # --- the event loop's side

    def segment_published(self) -> None:
        with self._turn:
            self._published += 1
            self._turn.notify_all()

    def stop(self) -> None:
        """Make the thread give up soon (idempotent; after the end, nothing to do)."""
        with self._turn:  # also keeps the thread from closing the socket meanwhile
            self._stopped = True
            self._turn.notify_all()
            if self._running:  # wake a receive under way; the thread closes the socket
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
            else:  # done, or never started (the writer failed first)
                self._sock.close()
        if self._backlog_task is not None:
            self._backlog_task.cancel()

    def _wait_backlog(self) -> None:
        if not self._stopped:
            self._backlog_task = self._loop.create_task(self._backlog_below())

    async def _backlog_below(self) -> None:
        assert self._backlog is not None
        await self._send_queue.backlog_below(self._backlog)
        with self._turn:
            self._backlog_clear = True
            self._turn.notify_all()

    def _report(self) -> None:
        self._report_due = False  # first: bytes counted from now on are reported again
        n = self.received - self._reported
        self._reported += n
        if n:
            self._on_progress(n)

    # --- the thread's side

    def run(self, take: Callable[[memoryview], None]) -> None:
        """Hand the whole body to ``take``, in order; raises ``BodyCut``, ``BodyTooLong``,
        ``BodyStalled`` or ``Stopped``."""
        sock = self._sock
        with self._turn:
            if self._stopped:
                raise Stopped
            self._running = True
        try:
            if self._head:
                take(memoryview(self._head))
                self._progress(len(self._head), urgent=True)
            self._head = b""
            if self._left:
                self._receive(sock, take)
            with contextlib.suppress(BlockingIOError, ConnectionError):
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    raise BodyTooLong("origin sent more bytes than announced")
        finally:
            with self._turn:
                self._running = False
                sock.close()

    def _receive(self, sock: socket.socket, take: Callable[[memoryview], None]) -> None:
        # Blocking, so that one receive waits for a whole buffer (MSG_WAITALL); this also
        # clears O_NONBLOCK on aiohttp's paused descriptor, which is closed after the body.
        sock.setblocking(True)
        wake = min(WAKE_SECONDS, self._idle_timeout)
        seconds = int(wake)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", seconds, int((wake - seconds) * 1e6)))  # fmt: skip
        buffer = memoryview(bytearray(min(RECV_BYTES, self._left)))
        left, offset = self._left, self.received
        last_byte = time.monotonic()
        while left:
            if self._wait_turn(offset):
                last_byte = time.monotonic()  # waiting for the loop is not the origin's idling
            mark = self._next_mark(offset)
            want = min(len(buffer), mark - offset)
            try:
                n = sock.recv_into(buffer, want, socket.MSG_WAITALL)
            except ConnectionError:
                raise Stopped if self._stopped else BodyCut(offset) from None
            except BlockingIOError:  # nothing for a wake interval
                if self._stopped:
                    raise Stopped from None
                if time.monotonic() - last_byte >= self._idle_timeout:
                    raise BodyStalled(self._idle_timeout, offset, self.size) from None
                continue
            if n == 0:
                raise Stopped if self._stopped else BodyCut(offset)
            last_byte = time.monotonic()
            take(buffer[:n])
            offset += n
            left -= n
            # a short receive: the origin is slower than this thread, a wake-up costs nothing
            self._progress(n, urgent=offset == mark or n < want)

    def _next_mark(self, offset: int) -> int:
        """Where the receive from ``offset`` ends at the latest: the segment's end, the
        next request's lead, or the body's end."""
        mark = min(self.size, (offset // self.segment_size + 1) * self.segment_size)
        return min(mark, self._lead_mark) if offset < self._lead_mark else mark

    def _wait_turn(self, offset: int) -> bool:
        """Block until the thread may read past ``offset``; whether it had to wait."""
        waited = False
        with self._turn:
            # the segment before the one ``offset`` starts in is published: its dealt runs
            # count in the backlog before more is read
            while self._published < offset // self.segment_size and not self._stopped:
                waited = True
                self._turn.wait()
            if self._stopped:
                raise Stopped
        if self._backlog is not None and self._send_queue.queued > self._backlog:
            with self._turn:
                self._backlog_clear = False
            self._call_loop(self._wait_backlog)
            with self._turn:
                while not self._backlog_clear and not self._stopped:
                    self._turn.wait()
                if self._stopped:
                    raise Stopped
            waited = True
        return waited

    def _progress(self, n: int, urgent: bool) -> None:
        self.received += n
        if not self._report_due and (urgent or self.received - self._posted >= REPORT_BYTES):
            self._report_due = True
            self._posted = self.received
            self._call_loop(self._report)

    def _call_loop(self, callback: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is gone (shutdown)
            raise Stopped from None
