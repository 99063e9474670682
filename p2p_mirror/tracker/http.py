"""A lean HTTP/1.1 server for the tracker: GET only, keep-alive and pipelining, no bodies.

Announces are tiny GETs answered from memory, so a general web framework's per-request cost
(request objects, middlewares, header multidicts) was most of the tracker's CPU. This speaks
just enough HTTP for BitTorrent clients, Prometheus and curl, with every buffer bounded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("tracker")

MAX_HEAD = 16384  # request line + headers: an announce is ~300 bytes, a 128-hash scrape 8 KiB
MAX_PIPELINED = 64 * 1024  # unanswered bytes buffered per connection
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           413: "Content Too Large", 431: "Request Header Fields Too Large",
           500: "Internal Server Error"}  # fmt: skip


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = b"text/plain"


Handler = Callable[[bytes, str, "ipaddress.IPv4Address | ipaddress.IPv6Address | None"], Response]


class Connections:
    """Every open connection, so they can be capped, timed out when idle and closed at stop."""

    def __init__(self, limit: int, idle_timeout: float) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.open: set[HttpProtocol] = set()

    def close_idle(self) -> int:
        cutoff = time.monotonic() - self.idle_timeout
        idle = [c for c in self.open if c.last_active < cutoff]
        for c in idle:
            c.close()
        return len(idle)

    def close_all(self) -> None:
        for c in list(self.open):
            c.close()


class HttpProtocol(asyncio.Protocol):
    """One client connection; ``handler(path, raw_query, source_ip)`` answers each request."""

    def __init__(self, handler: Handler, connections: Connections) -> None:
        self.handler = handler
        self.connections = connections
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.source: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.last_active = time.monotonic()
        self.paused = False
        self.closing = False
        self.out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.connections.open) >= self.connections.limit:
            transport.abort()
            return
        self.connections.open.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            addr = ipaddress.ip_address(peer[0].split("%", 1)[0])
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            self.source = addr

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.open.discard(self)
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        # the client does not read its answers: stop reading its requests until it does
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()
            self._serve()

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.closing:
            return
        self.last_active = time.monotonic()
        self.buf += data
        if len(self.buf) > MAX_PIPELINED:
            self._fail(413)
            self._flush()
            return
        self._serve()

    def _serve(self) -> None:
        buf = self.buf
        while not self.paused and not self.closing and self.transport is not None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._fail(431)
                break
            if end > MAX_HEAD:
                self._fail(431)
                break
            head = bytes(buf[:end])
            del buf[: end + 4]
            self._request(head)
        self._flush()

    def _flush(self) -> None:
        """One write for every answer to what arrived together (pipelined requests)."""
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
            self.out.clear()
            if self.closing:
                self.transport.close()

    def _request(self, head: bytes) -> None:
        line, _, headers = head.partition(b"\r\n")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._fail(400)
            return
        method, target, version = parts
        lower = headers.lower()
        has_body = b"content-length:" in lower or b"transfer-encoding:" in lower
        if has_body and not _zero_length(lower):
            self._fail(413)  # no request here has a body; do not guess its framing
            return
        keep_alive = (b"connection: close" not in lower) if version == b"HTTP/1.1" else (
            b"connection: keep-alive" in lower)  # fmt: skip
        if method != b"GET":
            self._send(Response(405, b"only GET\n"), keep_alive)
            return
        path, _, query = target.partition(b"?")
        try:
            resp = self.handler(path, query.decode("latin-1"), self.source)
        except Exception:  # a bug, not the client's fault: say so, keep serving others
            log.exception("request %r failed", target[:200])
            resp = Response(500, b"internal error\n")
        self._send(resp, keep_alive)

    def _send(self, resp: Response, keep_alive: bool) -> None:
        self.out.append(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
                resp.status, REASONS.get(resp.status, "Error").encode(), resp.content_type,
                len(resp.body), b"" if keep_alive else b"Connection: close\r\n",
                resp.body)  # fmt: skip
        )
        if not keep_alive:
            self.closing = True

    def _fail(self, status: int) -> None:
        if self.transport is not None and not self.closing:
            self.buf.clear()
            self._send(Response(status, REASONS[status].encode() + b"\n"), keep_alive=False)


def _zero_length(lower_headers: bytes) -> bool:
    if b"transfer-encoding:" in lower_headers:
        return False
    for line in lower_headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip() == b"content-length":
            return value.strip() == b"0"
    return False
