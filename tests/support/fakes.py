"""Stand-ins for collaborators that tests fake: a scripted HTTP origin on loopback, a blob's
seeder that cannot be asked again."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` served on a loopback port from a thread while the block runs: its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
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
