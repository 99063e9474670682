"""Accepting and driving the tracker's connections straight on the event loop's selector.

BitTorrent clients open a connection per announce (libtorrent sends ``Connection: close``),
so the per-connection cost matters as much as the per-request one. asyncio's own server
starts a task, a future and a transport object for every accepted socket; here an accepted
socket is one ``add_reader`` callback and a small transport that writes straight to the
socket, buffering only what the kernel does not take at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from p2p_mirror.core.config import HostPort

log = logging.getLogger("tracker")

ACCEPTS_PER_WAKEUP = 256
HIGH_WATER = 256 * 1024  # unsent bytes per connection before its reading is paused


class SocketTransport(asyncio.Transport):
    """The part of ``asyncio.Transport`` ``HttpProtocol`` uses, on a non-blocking socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: asyncio.Protocol, peer: Any) -> None:  # fmt: skip
        super().__init__()
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol = protocol
        self.peer = peer
        self.pending = bytearray()
        self.closing = False
        self.reading = True
        self.writing_paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def on_readable(self) -> bool:
        """Read what is there; False if nothing was."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            self._lost(e)
            return True
        if not data:
            self._lost(None)
            return True
        self.protocol.data_received(data)
        return True

    def start_reading(self) -> None:
        """Serve a request that came with the handshake at once; a one-request connection
        then closes without ever entering the selector."""
        self.on_readable()
        if not self.closing and self.reading:
            self.loop.add_reader(self.fd, self.on_readable)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or not data:
            return
        if not self.pending:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._lost(e)
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self.loop.add_writer(self.fd, self._on_writable)
        self.pending += data
        if len(self.pending) > HIGH_WATER and not self.writing_paused:
            self.writing_paused = True
            self.protocol.pause_writing()

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(e)
            return
        del self.pending[:sent]
        if self.pending:
            return
        self.loop.remove_writer(self.fd)
        if self.closing:
            self._lost(None)
        elif self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()

    def pause_reading(self) -> None:
        if self.reading and not self.closing:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def resume_reading(self) -> None:
        if not self.reading and not self.closing:
            self.reading = True
            self.loop.add_reader(self.fd, self.on_readable)

    def close(self) -> None:
        """Stop reading; close once every written byte is out."""
        if self.closing:
            return
        self.closing = True
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False
        if not self.pending:
            self._lost(None)

    def abort(self) -> None:
        self.closing = True
        self.pending.clear()
        self._lost(None)

    def _lost(self, exc: Exception | None) -> None:
        if self.sock.fileno() < 0:
            return
        self.closing = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self.sock.close()
        self.protocol.connection_lost(exc)


class Listener:
    """A listening socket whose connections get ``protocol_factory()`` protocols."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol_factory: Callable[[], asyncio.Protocol]) -> None:  # fmt: skip
        self.loop = loop
        self.sock = sock
        self.factory = protocol_factory
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: keep serving who is connected
                log.warning("accept failed: %s", e)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protocol = self.factory()
            transport = SocketTransport(self.loop, conn, protocol, peer)
            protocol.connection_made(transport)
            if not transport.closing:
                transport.start_reading()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


def bound_socket(
    listen: HostPort,
    kind: socket.SocketKind,
    options: Callable[[socket.socket], None] = lambda _sock: None,
) -> socket.socket:
    """A socket of ``kind`` bound to ``listen`` (an IPv6 wildcard also takes IPv4), with
    ``options`` applied before the bind; closed again if any step fails."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        listen.host, listen.port, type=kind, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        options(sock)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock
