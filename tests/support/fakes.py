"""Stand-ins for collaborators that tests fake: a scripted HTTP origin on loopback, a blob's
seeder that cannot be asked again."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiohttp import web
from aiohttp.test_utils import TestServer


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
