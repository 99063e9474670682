"""The agent's HTTP(S) proxy for dockerd (``HTTPS_PROXY``/``HTTP_PROXY``), on loopback.

dockerd's ``registry-mirrors`` covers Docker Hub only; every other registry is reached
through this proxy instead:

- ``CONNECT host:port`` to a configured registry: answered 200, then TLS is terminated with a
  certificate for that host from the node-local CA (``core.tls``), and each request behind it
  is served by the mirror exactly as ``/v2/<repo>/...?ns=<registry>`` (credentials kept).
- ``CONNECT`` to any other host: a byte-for-byte tunnel; the client sees that host's own
  certificate. No certificate is ever minted for a host that is not configured.
- ``GET http://host/v2/...`` (plain-HTTP registries) to a configured registry: served by the
  mirror the same way; to any other host: refused with 403 (put it in ``NO_PROXY``).

Bounded: connections, request-head size, head and TLS-handshake time, tunnel idle time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from p2p_mirror.core.config import HostPort
from p2p_mirror.core.metrics import Metrics
from p2p_mirror.core.tls import LeafCache, load_or_create_ca

log = logging.getLogger("p2p_mirror.agent.proxy")

MAX_HEAD = 8192
MAX_CONNECTIONS = 512
HEAD_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
TUNNEL_IDLE = 300.0
KEEPALIVE = 75.0
HIGH_WATER = 256 * 1024

Serve = Callable[[web.BaseRequest, str], Awaitable[web.StreamResponse]]
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOST = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)$")


class ProxyRefusal(Exception):
    """Answer the client with ``status`` and ``reason`` and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names; the last of repeated ones


def parse_head(data: bytes) -> RequestHead:
    """The request line and headers of one proxy request (``data`` ends at the blank line)."""
    try:
        text = data.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise ProxyRefusal(400, "undecodable request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        raise ProxyRefusal(400, "malformed request line")
    if parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProxyRefusal(505, "HTTP/1.x only")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise ProxyRefusal(400, "malformed header line")
        headers[name.lower()] = value.strip()
    return RequestHead(parts[0].upper(), parts[1], headers)


def parse_authority(authority: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` (``[v6]:port`` too) as (lower-case host without brackets, port)."""
    m = re.fullmatch(r"(\[[^\]]+\]|[^:\[\]/]+)(?::(\d{1,5}))?", authority)
    if not m or not _HOST.match(m.group(1)):
        raise ProxyRefusal(400, f"bad host {authority[:100]!r}")
    port = int(m.group(2)) if m.group(2) else default_port
    if not 0 < port < 65536:
        raise ProxyRefusal(400, "port out of range")
    return m.group(1).strip("[]").lower(), port


def registry_name(host: str, port: int, default_port: int) -> str:
    """The registry name a client means by ``host:port`` (``host`` alone on the scheme's port)."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port == default_port else f"{shown}:{port}"


def absolute_authority(target: str) -> str:
    """``host[:port]`` of an absolute-form ``http://`` target; https:// must use CONNECT."""
    m = re.match(r"(?i)^http://([^/?#]+)(?:[/?#]|$)", target)
    if not m:
        raise ProxyRefusal(400, "a proxy request needs an absolute http:// URL or CONNECT")
    if "@" in m.group(1):
        raise ProxyRefusal(400, "credentials in the URL are not accepted")
    return m.group(1)


def _response(status: int, reason: str) -> bytes:
    body = (reason + "\n").encode()
    return (f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


_PHRASES = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            502: "Bad Gateway", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}


class _Head(asyncio.Protocol):
    """Reads one request head (bounded in size and time), then hands the connection on."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.proxy.admit(transport):  # type: ignore[arg-type]
            return
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        if not self.done and self.transport is not None:
            self.done = True
            self.transport.write(_response(408, "request head not received in time"))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.done or self.transport is None:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self.done = True
                self.transport.write(_response(431, f"request head over {MAX_HEAD} bytes"))
                self.transport.close()
            return
        if end + 4 > MAX_HEAD:
            self.done = True
            self.transport.write(_response(431, f"request head over {MAX_HEAD} bytes"))
            self.transport.close()
            return
        self.done = True
        if self.timer:
            self.timer.cancel()
        self.transport.pause_reading()
        head, rest = bytes(self.buf[: end + 4]), bytes(self.buf[end + 4:])
        self.proxy.spawn(self.proxy.dispatch(self.transport, head, rest))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer:
            self.timer.cancel()
        self.done = True
        if self.transport is not None:
            self.proxy.release(self.transport)


class _Relay(asyncio.Protocol):
    """One side of a tunnel: what arrives here is written to ``peer``, with back-pressure."""

    def __init__(self, proxy: Proxy, counted: asyncio.Transport | None) -> None:
        self.proxy = proxy
        self.counted = counted  # the client side's transport, released when this side ends
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._touch()

    def _touch(self) -> None:
        if self.idle:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(TUNNEL_IDLE, self._expire)

    def _expire(self) -> None:
        for t in (self.transport, self.peer):
            if t is not None:
                t.abort()

    def data_received(self, data: bytes) -> None:
        self._touch()
        if self.peer is not None:
            self.peer.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.can_write_eof():
            self.peer.write_eof()
        return True  # half-close: the other direction may still be sending

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle:
            self.idle.cancel()
        if self.peer is not None:
            self.peer.close()
        if self.counted is not None:
            self.proxy.release(self.counted)


class _Handoff(asyncio.Protocol):
    """Buffers what arrives until the mirror's HTTP handler is attached (TLS may deliver the
    first request before ``start_tls`` returns), then passes everything to it."""

    def __init__(self, proxy: Proxy, counted: asyncio.Transport) -> None:
        self.proxy = proxy
        self.counted = counted
        self.inner: asyncio.Protocol | None = None
        self.pending = bytearray()
        self.eof = False

    def attach(self, inner: asyncio.Protocol, transport: asyncio.BaseTransport,
               first: bytes = b"") -> None:
        self.inner = inner
        inner.connection_made(transport)
        data, self.pending = bytes(first) + bytes(self.pending), bytearray()
        if data:
            inner.data_received(data)
        if self.eof:
            inner.eof_received()

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            if len(self.pending) + len(data) > MAX_HEAD * 8:
                self.counted.abort()  # a client that floods before we are ready loses it
                return
            self.pending += data
        else:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is None:
            self.eof = True
            return None
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)
        self.proxy.release(self.counted)


class Proxy:
    """The listener; ``serve(request, registry)`` is the mirror's handler for one request."""

    def __init__(self, serve: Serve, registries: Iterable[str], leaves: LeafCache,
                 metrics: Metrics | None = None, max_connections: int = MAX_CONNECTIONS) -> None:
        self.serve = serve
        self.registries = frozenset(r.lower() for r in registries)
        self.leaves = leaves
        self.metrics = metrics or Metrics()
        self.max_connections = max_connections
        self.connections: set[asyncio.Transport] = set()
        self.tasks: set[asyncio.Task] = set()
        self.server: asyncio.AbstractServer | None = None
        self.metrics.describe("proxy_connections_total",
                              "Proxy connections by mode (intercept, tunnel, plain, refused)")

    # --- bookkeeping ---------------------------------------------------------------------

    def admit(self, transport: asyncio.Transport) -> bool:
        if len(self.connections) >= self.max_connections:
            self.metrics.inc("proxy_connections_total", mode="refused")
            transport.write(_response(503, "too many proxy connections"))
            transport.close()
            return False
        self.connections.add(transport)
        return True

    def release(self, transport: asyncio.Transport) -> None:
        self.connections.discard(transport)

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self, listen: HostPort) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Head(self), listen.host, listen.port,
                                               reuse_address=True)
        port = self.server.sockets[0].getsockname()[1]
        log.info("proxy ready on %s:%d for %s", listen.host, port,
                 ", ".join(sorted(self.registries)) or "no registry")
        return port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.connections):
            t.abort()
        for task in list(self.tasks):
            task.cancel()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    # --- requests ------------------------------------------------------------------------

    async def dispatch(self, transport: asyncio.Transport, head: bytes, rest: bytes) -> None:
        try:
            req = parse_head(head)
            if req.method == "CONNECT":
                await self._connect(transport, req, rest)
            else:
                self._plain(transport, req, head + rest)
        except ProxyRefusal as e:
            self.metrics.inc("proxy_connections_total", mode="refused")
            log.info("proxy refused a request: %d %s", e.status, e.reason)
            if not transport.is_closing():
                transport.write(_response(e.status, e.reason))
                transport.close()
        except Exception:
            log.exception("proxy connection failed")
            transport.abort()

    async def _connect(self, transport: asyncio.Transport, req: RequestHead, rest: bytes) -> None:
        host, port = parse_authority(req.target, 443)
        registry = registry_name(host, port, 443)
        if registry in self.registries:
            if rest:
                raise ProxyRefusal(400, "data sent before the CONNECT was answered")
            await self._intercept(transport, host, registry)
        else:
            await self._tunnel(transport, host, port, rest)

    async def _intercept(self, transport: asyncio.Transport, host: str, registry: str) -> None:
        loop = asyncio.get_running_loop()
        ctx = self.leaves.context(host)  # minted once per host, then cached
        transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        handoff = _Handoff(self, transport)
        try:
            tls = await loop.start_tls(transport, handoff, ctx, server_side=True,
                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError, ConnectionError) as e:
            log.info("TLS handshake with a client for %s failed: %s", registry, e)
            transport.abort()
            self.release(transport)
            return
        if tls is None:  # pragma: no cover - the client went away during the handshake
            self.release(transport)
            return
        self.metrics.inc("proxy_connections_total", mode="intercept")
        handoff.attach(self._http_server(registry)(), tls)

    def _http_server(self, registry: str | None) -> web.Server:
        """aiohttp's HTTP/1.1 handling for one connection, bound to its registry (None: per
        request, from the absolute URL of a plain proxy request)."""
        return web.Server(functools.partial(self._handle, registry), access_log=None,
                          keepalive_timeout=KEEPALIVE, max_line_size=MAX_HEAD,
                          max_field_size=MAX_HEAD)

    async def _handle(self, bound: str | None, request: web.BaseRequest) -> web.StreamResponse:
        registry = bound
        if registry is None:  # plain-HTTP proxy request: the registry is its URL's host
            url = request.url
            host, port = (url.host or "").lower(), url.port or 80
            registry = registry_name(host, port, 80)
            if registry not in self.registries:
                return web.Response(status=403, text=f"{registry}: not a configured registry; "
                                    "this proxy forwards configured registries only\n")
        return await self.serve(request, registry)

    def _plain(self, transport: asyncio.Transport, req: RequestHead, data: bytes) -> None:
        host, port = parse_authority(absolute_authority(req.target), 80)
        registry = registry_name(host, port, 80)
        if registry not in self.registries:
            raise ProxyRefusal(403, f"{registry}: not a configured registry; plain-HTTP "
                               "requests are forwarded for configured registries only")
        self.metrics.inc("proxy_connections_total", mode="plain")
        handoff = _Handoff(self, transport)
        transport.set_protocol(handoff)
        handoff.attach(self._http_server(None)(), transport, data)
        transport.resume_reading()

    async def _tunnel(self, transport: asyncio.Transport, host: str, port: int,
                      rest: bytes) -> None:
        loop = asyncio.get_running_loop()
        client_side = _Relay(self, transport)
        try:
            upstream, origin_side = await asyncio.wait_for(
                loop.create_connection(lambda: _Relay(self, None), host, port), CONNECT_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise ProxyRefusal(502, f"cannot reach {host}:{port}: {e}") from None
        if transport.is_closing():
            upstream.close()
            return
        self.metrics.inc("proxy_connections_total", mode="tunnel")
        origin_side.peer = transport
        client_side.peer = upstream
        transport.set_protocol(client_side)
        client_side.connection_made(transport)
        transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        for side in (transport, upstream):
            side.set_write_buffer_limits(high=HIGH_WATER)
        if rest:
            upstream.write(rest)
        transport.resume_reading()


def mirror_handler(
    root: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    handle: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
) -> Serve:
    """Serve a proxied request as the mirror serves ``/v2/<repo>/...?ns=<registry>``."""

    async def serve(request: web.BaseRequest, registry: str) -> web.StreamResponse:
        path = request.rel_url.path
        if path in ("/v2", "/v2/"):
            return await root(request)
        if not path.startswith("/v2/"):
            return web.Response(status=404, text="not a registry API path\n")
        rel = request.rel_url.with_query([
            *((k, v) for k, v in request.rel_url.query.items() if k != "ns"), ("ns", registry)
        ])
        return await handle(request.clone(rel_url=rel))

    return serve


def proxied_registries(names: Iterable[str], default_registry: str) -> set[str]:
    """Registries the proxy intercepts: every configured one and the default one."""
    return {*names, default_registry}


async def start_proxy(agent: object, listen: HostPort, data_dir: Path,
                      registries: Iterable[str]) -> Proxy:
    """Make (or load) the CA, then listen: the agent's startup hook."""
    ca = await asyncio.to_thread(load_or_create_ca, data_dir)
    proxy = Proxy(mirror_handler(agent.v2_root, agent.handle),  # type: ignore[attr-defined]
                  registries, LeafCache(ca),
                  getattr(agent, "metrics", None))
    await proxy.start(listen)
    return proxy
