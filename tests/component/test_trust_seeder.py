"""Issue 19 at the seeder: it fetches only configured registries, and its errors say nothing
about internal hosts (probe 4: SSRF through ``registry=``)."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support.fakes import http_server
from test_seeder_unit import REG, HeldOrigin, seeder_of, served

from p2p_mirror.core import redirects

BLOB = os.urandom(200_000)
DIGEST = f"sha256:{hashlib.sha256(BLOB).hexdigest()}"


class Internal(BaseHTTPRequestHandler):
    """An internal service on loopback: the SSRF target. Records every request it gets."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        Internal.seen.append(self.path)
        body = b"internal secret " * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def blob_info(client: TestClient, registry: str) -> tuple[int, str]:
    resp = await client.get(f"/v1/blobs/{DIGEST}", params={"registry": registry,
                                                           "repo": "library/demo"})
    return resp.status, await resp.text()


async def test_seeder_fetches_only_configured_registries(tmp_path: Path) -> None:
    origin = HeldOrigin([BLOB], held=0)
    Internal.seen.clear()
    async with served(origin) as origin_server:
        with http_server(Internal) as internal:
            hostport = internal.removeprefix("http://")
            async with seeder_of(tmp_path, origin_server) as (seeder, client):
                answers = {}
                closed = f"127.0.0.1:{closed_port()}"
                for registry in (f"{hostport}/v2/x#", f"{hostport}/", hostport,
                                 closed, "evil.test", "", "a%0Ab"):
                    status, text = await blob_info(client, registry)
                    answers[registry] = (status, text)
                    assert 400 <= status < 500, (registry, status, text)
                    assert "127.0.0.1" not in text and "evil" not in text
                # An open and a closed port get the same answer: no port scanner.
                assert answers[hostport] == answers[closed]
                assert Internal.seen == []
                assert origin.gets == []
                # The configured one still works.
                status, text = await blob_info(client, REG)
                assert status == 200, text
                assert seeder.cfg.registries.keys() == {REG}


async def test_redirects_into_internal_addresses_are_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configured registry redirects the blob to an internal service (on 127.0.0.2). The
    registry itself is on loopback here, which would allow loopback targets; the test makes
    its address (127.0.0.1) count as a public one, as a registry on the internet would be."""
    real = redirects.resolve

    async def resolve(host: str) -> list:
        if host == "127.0.0.1":
            return [ipaddress.ip_address("93.184.216.34")]
        return await real(host)

    monkeypatch.setattr(redirects, "resolve", resolve)
    monkeypatch.setattr(redirects.check_target, "__defaults__", (resolve,))
    Internal.seen.clear()
    with http_server(Internal, host="127.0.0.2") as internal:

        async def blob(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(f"{internal}/secret")

        app = web.Application()
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", blob)
        origin_server = TestServer(app, host="127.0.0.1")
        await origin_server.start_server()
        try:
            async with seeder_of(tmp_path, origin_server) as (seeder, client):
                status, text = await blob_info(client, REG)
        finally:
            await origin_server.close()
    assert status == 503, text
    assert "127.0.0" not in text and "secret" not in text
    assert Internal.seen == []
