"""Taking a response body off aiohttp: the bytes it has already received, plus the
connection's socket, which aiohttp reads no more. The caller receives the rest in fewer,
larger steps than aiohttp's per-chunk parse, copy and wake-up (the agent's dealt runs by
splice, the seeder's origin bodies in its writer thread). The connection is never reused:
close the response afterwards."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import aiohttp


@dataclass
class TakenBody:
    """``head`` (the bytes aiohttp had received) then ``left`` bytes to receive from ``sock``
    (a duplicate of the connection's descriptor, non-blocking, closed by ``close``)."""

    head: bytes
    sock: int
    left: int
    idle_timeout: float  # the sender going this long without a byte is given up
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.sock)


def take_body(resp: aiohttp.ClientResponse, skipped: int, size: int,
              idle_timeout: float) -> TakenBody | None:  # fmt: skip
    """The ``size`` bytes of ``resp``'s body after the ``skipped`` already read, taken off
    aiohttp (see the module). None where the body is not the plain bytes on a plain socket
    (TLS, a chunked or encoded body, a length other than ``skipped + size``): read it
    through aiohttp then. ``asyncio.IncompleteReadError`` if aiohttp's buffer does not add
    up (the stream is not the one expected)."""
    connection = resp.connection
    headers = resp.headers
    if (connection is None or connection.transport is None or connection.protocol is None
            or resp.url.scheme != "http"
            or connection.transport.get_extra_info("sslcontext") is not None
            or "Transfer-Encoding" in headers or "Content-Encoding" in headers
            or resp.content_length != skipped + size):  # fmt: skip
        return None
    sock = connection.transport.get_extra_info("socket")
    if sock is None:
        return None
    content = resp.content
    parts = []
    while part := content.read_nowait():  # a drain may resume the parser and refill it
        parts.append(part)
    head = b"".join(parts)
    try:  # aiohttp's own pause also stops its sock_read timer
        connection.protocol.pause_reading()
    except (AssertionError, AttributeError):  # no parser left: stop the transport itself
        connection.transport.pause_reading()
    # no await since the drain: nothing more came in
    if content.total_bytes != skipped + len(head) or len(head) > size:
        raise asyncio.IncompleteReadError(head, size)  # not the stream we drained: give up
    return TakenBody(head, os.dup(sock.fileno()), size - len(head), idle_timeout)
