"""Stand-ins for collaborators that tests fake: scripted HTTP origins on loopback, a
fault-injecting relay, a blob's seeder that cannot be asked again."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict


@contextlib.asynccontextmanager
async def aiohttp_servers() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Serve aiohttp apps (stand-in seeders, origins) on loopback ports until the block ends:
    the block gets a function that starts one and returns its base URL."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


@contextlib.contextmanager
def http_server(
    handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1"
) -> Iterator[str]:
    """``handler`` served on a loopback port (of ``host``, in 127/8) from a thread while the
    block runs: its URL."""
    server = ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class StaticOrigin:
    """An in-process registry stand-in (aiohttp): one manifest ``library/demo:v1``, the blobs
    given, and a blob whose HEAD claims ``huge_size`` bytes (``huge_digest``); 404 for the
    rest. Mount with ``app()``."""

    def __init__(self, blobs: list[bytes], huge_size: int = 1 << 45) -> None:
        self.blobs = {f"sha256:{hashlib.sha256(b).hexdigest()}": b for b in blobs}
        self.manifest = b'{"schemaVersion": 2, "layers": []}'
        self.huge_digest = "sha256:" + "e" * 64
        self.huge_size = huge_size

    async def handle(self, request: web.Request) -> web.StreamResponse:
        kind, ref = request.match_info["kind"], request.match_info["ref"]
        if kind == "manifests" and request.match_info["name"] == "library/demo" and ref == "v1":
            return web.Response(body=self.manifest,
                                content_type="application/vnd.oci.image.manifest.v1+json")
        if kind == "blobs" and ref == self.huge_digest:
            resp = web.StreamResponse(headers={"Content-Length": str(self.huge_size)})
            if request.method == "HEAD":
                await resp.prepare(request)
                return resp
            return web.Response(status=500)
        if kind == "blobs" and ref in self.blobs:
            return web.Response(body=self.blobs[ref])  # aiohttp handles HEAD and Range
        code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
        return web.json_response({"errors": [{"code": code, "message": "unknown"}]}, status=404)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v2/{name:.+}/{kind:manifests|blobs}/{ref}", self.handle)
        app.router.add_get("/v2/", self.root)
        return app

    async def root(self, request: web.Request) -> web.Response:
        return web.json_response({})


class FaultRelay:
    """A fault-injecting HTTP relay in front of a real registry, served from its own thread
    (aiohttp): ``fault`` decides, per blob GET, what goes wrong. Faults (each applies to the
    first ``times`` GETs of each blob whose digest ``matches``, then the relay passes through):

    - ``pass``: nothing;
    - ``slow``: the body at ``rate`` bytes/s;
    - ``5xx``: 503 before any byte;
    - ``reset``: the connection cut after ``after`` bytes;
    - ``stall``: no byte after ``after`` bytes, until the relay stops;
    - ``lie``: bytes flipped after ``after`` bytes (same length: only the digest tells).

    ``fault="lie", times=0`` lies to every GET. ``huge`` digests get a HEAD with a 2^45
    Content-Length."""

    def __init__(self, upstream: str, fault: str = "pass", times: int = 1, after: int = 256 * 1024,
                 rate: int = 64 * 1024, matches: Callable[[str], bool] = lambda d: True,
                 huge: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.upstream = upstream.rstrip("/")
        self.fault, self.times, self.after, self.rate = fault, times, after, rate
        self.matches, self.huge = matches, huge
        self.gets: dict[str, int] = {}
        self.faults = 0  # faults injected
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def _faulty(self, digest: str) -> bool:
        if self.fault == "pass" or not self.matches(digest):
            return False
        n = self.gets[digest] = self.gets.get(digest, 0) + 1
        return self.times == 0 or n <= self.times

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind, ref = request.match_info["kind"], request.match_info["ref"]
        if kind == "blobs" and ref in self.huge:
            return web.Response(status=200, headers={"Content-Length": str(1 << 45)}) \
                if request.method == "HEAD" else web.Response(status=503)
        faulty = kind == "blobs" and request.method == "GET" and self._faulty(ref)
        if faulty:
            self.faults += 1
            if self.fault == "5xx":
                return web.Response(status=503)
        send = CIMultiDict((k, v) for k, v in request.headers.items()
                           if k.lower() in ("authorization", "accept", "range"))  # fmt: skip
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=send, allow_redirects=False
        ) as up:
            headers = {k: v for k, v in up.headers.items()
                       if k.lower() in ("content-type", "content-length", "docker-content-digest",
                                        "www-authenticate", "content-range", "etag",
                                        "docker-distribution-api-version")}  # fmt: skip
            resp = web.StreamResponse(status=up.status, headers=headers)
            await resp.prepare(request)
            if request.method == "HEAD":
                await resp.write_eof()
                return resp
            sent = 0
            async for chunk in up.content.iter_chunked(16 * 1024):
                if faulty and sent + len(chunk) > self.after:
                    if self.fault == "reset":
                        if request.transport is not None:
                            request.transport.close()
                        return resp
                    if self.fault == "stall":
                        assert self._stop is not None
                        await self._stop.wait()
                        if request.transport is not None:
                            request.transport.close()
                        return resp
                    if self.fault == "lie":
                        chunk = bytes(b ^ 0xFF for b in chunk)
                await resp.write(chunk)
                sent += len(chunk)
                if faulty and self.fault == "slow":
                    await asyncio.sleep(len(chunk) / self.rate)
            await resp.write_eof()
            return resp

    def start(self) -> FaultRelay:
        ready = threading.Event()

        async def serve() -> None:
            self._stop = asyncio.Event()
            self._session = aiohttp.ClientSession(auto_decompress=False)
            app = web.Application()
            app.router.add_route("*", "/v2/{name:.+}/{kind:manifests|blobs}/{ref}", self._handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            await self._stop.wait()
            await asyncio.sleep(0.2)  # let stalled bodies close
            await runner.cleanup()
            await self._session.close()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(serve())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)


class FixedSource:
    """A blob's seeder (``agent.seeder_client.BlobSource``) at ``peers`` that answers no
    further torrent request: what a puller asks again fails."""

    def __init__(self, peers: list[tuple[str, int]]) -> None:
        self.peers = peers
        self.asked = 0

    async def failed(self, url: str) -> None:
        pass

    async def torrent(self, index: int, bt_port: int):
        from p2p_mirror.agent.seeder_client import Fallback

        self.asked += 1
        raise Fallback("seeder", "this stand-in answers only once")


class LiarRegistry(BaseHTTPRequestHandler):
    """A registry that claims every blob: ``HEAD`` 200 to anyone with ``size`` bytes, and a
    ``GET`` of that many zero bytes. Set ``size`` on a subclass; ``seen`` records requests."""

    size = 0
    seen: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)

    def _answer(self, body: bool) -> None:
        self.seen.append((self.command, self.path, self.headers.get("Authorization")))
        digest = self.path.rsplit("/", 1)[-1]
        self.send_response(200)
        self.send_header("Content-Length", str(self.size))
        self.send_header("Docker-Content-Digest", digest)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(bytes(self.size))

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def log_message(self, *args: object) -> None:
        pass
