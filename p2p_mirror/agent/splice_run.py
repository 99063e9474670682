"""Receiving a run of bytes from a socket straight into a file with splice(2), socket ->
pipe -> file: the bytes never enter Python (no receive copy, no chunk objects) and the
event loop does one step per pipe-full instead of a parser feed, a reader wake-up and a
write per received chunk."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable

from p2p_mirror.core.config import MiB

PIPE_SIZE = 1 * MiB  # bytes moved per step (Linux's default pipe-max-size); the only buffer
YIELD_EVERY = 4 * MiB  # bytes moved without giving the event loop a turn, at most (+ a step)


async def splice_to_file(
    sock: int, file: int, offset: int, count: int, idle_timeout: float,
    progress: Callable[[int], None],
) -> None:
    """Move ``count`` bytes from the non-blocking socket ``sock`` into ``file`` at
    ``offset``, calling ``progress(n)`` after each ``n`` bytes are in the file. Raises
    ``asyncio.IncompleteReadError`` if the socket ends first and ``TimeoutError`` after
    ``idle_timeout`` seconds without a byte (the bytes moved before stay written)."""
    loop = asyncio.get_running_loop()
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    waiting: asyncio.Future[None] | None = None  # set while the socket has nothing for us
    last_byte = loop.time()

    def readable() -> None:
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def watch() -> None:
        # one timer for the whole run instead of a timeout per wait for the socket
        nonlocal watchdog
        now = loop.time()
        if now - last_byte < idle_timeout:
            watchdog = loop.call_at(last_byte + idle_timeout, watch)
        elif waiting is not None and not waiting.done():
            waiting.set_exception(TimeoutError(f"no byte for {idle_timeout:g}s"))
        else:  # late, between two steps: a whole period more
            watchdog = loop.call_at(now + idle_timeout, watch)

    watchdog = loop.call_at(last_byte + idle_timeout, watch)
    try:
        with contextlib.suppress(OSError):  # a lower pipe-max-size: smaller steps
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        loop.add_reader(sock, readable)
        try:
            left, unyielded = count, 0
            while left:
                try:
                    moved = os.splice(sock, pipe_w, min(left, PIPE_SIZE),
                                      flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    unyielded = 0
                    waiting = loop.create_future()
                    try:
                        await waiting
                    finally:
                        waiting = None
                    continue
                if moved == 0:
                    raise asyncio.IncompleteReadError(b"", left)
                last_byte = loop.time()
                while moved:  # the pipe is empty again before the next step
                    n = os.splice(pipe_r, file, moved, offset_dst=offset)
                    offset, moved, left, unyielded = offset + n, moved - n, left - n, unyielded + n
                    progress(n)
                if unyielded >= YIELD_EVERY:
                    # the rest of the loop (the client's sends, the hashing hand-offs) runs
                    # at least this often however fast the bytes come
                    unyielded = 0
                    await asyncio.sleep(0)
        finally:
            loop.remove_reader(sock)
    finally:
        watchdog.cancel()
        os.close(pipe_r)
        os.close(pipe_w)
