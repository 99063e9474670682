"""Stand-ins for collaborators that tests fake: scripted HTTP origins on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiohttp import web


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
        app.router.add_get("/v2/", lambda request: web.json_response({}))
        return app
