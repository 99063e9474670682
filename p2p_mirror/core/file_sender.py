"""Sending ranges of files to one connection with sendfile(2), on a duplicate of the
connection's socket (the agent's blobs to its clients, the seeder's dealt runs to agents).
asyncio's ``loop.sendfile`` spends, per call, a future, a pause and a resume of the
transport's reading, an ``fstat`` and a seek, and per partial send a writer registration
and a wake-up of its own: most of the event loop's Python work while a blob streams. Here a
partial send waits for the socket through one writer kept registered while the range goes
out."""

from __future__ import annotations

import asyncio
import os
from typing import BinaryIO


class FileSender:
    """Sends file ranges on ``sock`` (a duplicate of a plain TCP connection's descriptor,
    closed by ``close``). Nothing else may write to the connection meanwhile: the transport's
    own buffer must be empty before the first ``send``."""

    def __init__(self, sock: int) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._writable: asyncio.Future[None] | None = None

    @classmethod
    def for_transport(cls, transport: asyncio.BaseTransport) -> FileSender | None:
        """A sender on ``transport``'s socket, or None where the connection is not a plain
        socket (TLS: the bytes must pass through the transport) or the transport still holds
        bytes to send (the response's headers, normally sent at once): ``loop.sendfile``
        waits for those."""
        sock = transport.get_extra_info("socket")
        if (sock is None or transport.get_extra_info("sslcontext") is not None
                or not isinstance(transport, asyncio.WriteTransport)
                or transport.get_write_buffer_size()):  # fmt: skip
            return None
        return cls(os.dup(sock.fileno()))

    def close(self) -> None:
        if self.sock >= 0:
            os.close(self.sock)
            self.sock = -1

    async def send(self, fd: int, offset: int, count: int) -> int:
        """Send ``count`` bytes of the file ``fd`` from ``offset``; the bytes sent, fewer
        only if the file ends first. A connection that breaks raises ``OSError``."""
        sent = 0
        registered = False
        try:
            while sent < count:
                try:
                    n = os.sendfile(self.sock, fd, offset + sent, count - sent)
                except BlockingIOError:
                    n = -1
                if n == 0:
                    break
                if n > 0:
                    sent += n
                    if sent == count:
                        break
                # short: the socket's buffer is full; go on once it has room again
                if not registered:
                    self._loop.add_writer(self.sock, self._wake)
                    registered = True
                self._writable = self._loop.create_future()
                await self._writable
        finally:
            self._writable = None
            if registered:
                self._loop.remove_writer(self.sock)
        return sent

    def _wake(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)


async def send_file_range(transport: asyncio.Transport, sender: FileSender | None, f: BinaryIO,
                          offset: int, count: int) -> int:
    """Send ``count`` bytes of ``f`` from ``offset``: through ``sender`` on a plain socket,
    else (TLS, or bytes still buffered) through asyncio, which copies them through the
    transport."""
    if count <= 0:
        return 0
    if sender is not None:
        return await sender.send(f.fileno(), offset, count)
    return await asyncio.get_running_loop().sendfile(transport, f, offset, count)
