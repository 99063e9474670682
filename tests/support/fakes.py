"""Stand-ins for collaborators that tests fake: a scripted HTTP origin on loopback."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
