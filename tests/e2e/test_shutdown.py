"""SIGTERM during a pull: the agent stops accepting, lets the running blob response go on for
``drain_timeout``, then cuts it and exits cleanly (real agent process; the origin is a slow
HTTP server here, so the stream outlasts any drain)."""

from __future__ import annotations

import http.client
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from support.fakes import http_server

from lab.procs import port_open
from lab.stack import LocalStack

REG = "slow.example.test"
DIGEST = "sha256:" + "5" * 64
SIZE = 1024 * 1024 * 1024  # never sent in full
CHUNK = 64 * 1024


@contextmanager
def slow_origin() -> Iterator[str]:
    """A registry whose blob GET sends 64 KiB every 0.1 s until told to stop."""
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def _head(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(SIZE))
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Docker-Content-Digest", DIGEST)
            self.end_headers()

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            self._head()

        def do_GET(self) -> None:  # noqa: N802
            self._head()
            try:
                while not stop.is_set():
                    self.wfile.write(b"x" * CHUNK)
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass  # the agent hung up

        def log_message(self, *args: object) -> None:
            pass

    with http_server(Handler) as url:
        try:
            yield url
        finally:
            stop.set()  # before the server stops: its handlers are still sending


def test_sigterm_drains_then_cuts_a_blob_stream(tmp_path: Path) -> None:
    with slow_origin() as origin:
        stack = LocalStack(tmp_path, {REG: origin})
        try:
            agent = stack.add_agent("a1", seeder=[], drain_timeout=2)
            resp = urllib.request.urlopen(f"{agent.url}/v2/demo/blobs/{DIGEST}?ns={REG}",
                                          timeout=30)  # fmt: skip
            assert resp.status == 200
            assert len(resp.read(CHUNK)) == CHUNK  # streaming from the origin
            start = time.monotonic()
            agent.proc.popen.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert not port_open("127.0.0.1", agent.port)  # no new pulls start here
            code = agent.proc.popen.wait(timeout=30)
            took = time.monotonic() - start
            assert code == 0, agent.proc.tail()
            assert 1.8 <= took < 5, took  # waited out the drain, then ended at once
            with pytest.raises(http.client.IncompleteRead):
                resp.read()  # cut: the runtime sees a short body, never a finished one
        finally:
            stack.close()
