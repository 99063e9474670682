"""The agent's proxy on a real loopback socket, with real TLS, against a stand-in mirror:
CONNECT interception, tunnels, plain-HTTP requests, and every bound and refusal."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from p2p_mirror.agent import proxy as proxy_mod
from p2p_mirror.agent.proxy import Proxy, mirror_handler
from p2p_mirror.core.config import HostPort
from p2p_mirror.core.tls import LeafCache, load_or_create_ca, mint, new_ca

REG = "registry.example.test"


async def _root(request: web.BaseRequest) -> web.Response:
    return web.json_response({"root": True})


async def _handle(request: web.BaseRequest) -> web.Response:
    """Stands in for Agent.handle: shows what the mirror would have been asked."""
    return web.json_response({
        "path": request.path, "ns": request.query.get("ns"),
        "query": sorted(request.query.keys()),
        "auth": request.headers.get("Authorization"),
    })


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[tuple[Proxy, str, Path]]:
    ca = load_or_create_ca(tmp_path / "agent")
    px = Proxy(mirror_handler(_root, _handle), {REG, "plain.test:5000"}, LeafCache(ca))
    port = await px.start(HostPort("127.0.0.1", 0))
    try:
        yield px, f"http://127.0.0.1:{port}", tmp_path / "agent" / "proxy-ca" / "ca.crt"
    finally:
        await px.close()


async def test_connect_to_a_configured_registry_is_served_by_the_mirror(proxy) -> None:
    px, url, ca_file = proxy
    ctx = ssl.create_default_context(cafile=str(ca_file))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://{REG}/v2/team/app/manifests/1.0?ns=evil.test&x=1",
                         proxy=url, ssl=ctx, headers={"Authorization": "Bearer t0k"}) as r:
            assert r.status == 200
            got = await r.json()
        async with s.get(f"https://{REG}/v2/", proxy=url, ssl=ctx) as r:
            assert await r.json() == {"root": True}
        async with s.get(f"https://{REG}/other", proxy=url, ssl=ctx) as r:
            assert r.status == 404
    # The client's own ns= cannot redirect it to another registry; credentials pass through.
    assert got == {"path": "/v2/team/app/manifests/1.0", "ns": REG, "query": ["ns", "x"],
                   "auth": "Bearer t0k"}
    assert len(px.leaves) == 1
    assert px.metrics.value("proxy_connections_total", mode="intercept") >= 1


async def _tls_server(tmp_path: Path) -> tuple[asyncio.AbstractServer, int, ssl.SSLContext]:
    """An HTTPS 'origin' on loopback with a certificate from its own CA."""
    other = new_ca()
    cert, key = mint(other, "127.0.0.1")
    (tmp_path / "origin.pem").write_bytes(key + cert)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "origin.pem")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\norigin")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    client_ctx = ssl.create_default_context()
    client_ctx.load_verify_locations(cadata=other.cert_pem.decode())
    return server, server.sockets[0].getsockname()[1], client_ctx


async def test_other_hosts_are_tunnelled_untouched(proxy, tmp_path: Path) -> None:
    px, url, ca_file = proxy
    server, port, origin_ctx = await _tls_server(tmp_path)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://127.0.0.1:{port}/", proxy=url, ssl=origin_ctx) as r:
                assert await r.text() == "origin"
            agent_ctx = ssl.create_default_context(cafile=str(ca_file))
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await s.get(f"https://127.0.0.1:{port}/", proxy=url, ssl=agent_ctx)
    finally:
        server.close()
        await server.wait_closed()
    assert len(px.leaves) == 0  # nothing was minted for a host that is not configured
    assert px.metrics.value("proxy_connections_total", mode="tunnel") >= 1


async def test_plain_http_requests(proxy) -> None:
    px, url, _ = proxy
    async with aiohttp.ClientSession() as s:
        async with s.get("http://plain.test:5000/v2/a/b/blobs/sha256:00", proxy=url) as r:
            assert (await r.json())["ns"] == "plain.test:5000"
        async with s.get("http://other.test/v2/", proxy=url) as r:
            assert r.status == 403
            assert "not a configured registry" in await r.text()


async def _raw(url: str, data: bytes, read_timeout: float = 10) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), read_timeout)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"CONNECT registry.example.test:443 HTTP/1.1\r\n\r\n\x16\x03\x01", b"400"),
        (b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET https://registry.example.test/v2/ HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT bad_host!:443 HTTP/1.1\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000, b"431"),
    ],
)
async def test_refusals(proxy, data: bytes, status: bytes) -> None:
    _, url, _ = proxy
    answer = await _raw(url, data)
    assert answer.startswith(b"HTTP/1.1 " + status), answer


async def test_unreachable_tunnel_target_is_a_502(proxy) -> None:
    _, url, _ = proxy
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    answer = await _raw(url, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502")


async def test_slow_request_head_times_out(proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_mod, "HEAD_TIMEOUT", 0.3)
    _, url, _ = proxy
    answer = await _raw(url, b"CONNECT registry.exa", read_timeout=5)
    assert answer.startswith(b"HTTP/1.1 408")


async def test_connections_are_bounded(tmp_path: Path) -> None:
    px = Proxy(mirror_handler(_root, _handle), {REG}, LeafCache(load_or_create_ca(tmp_path)),
               max_connections=1)
    port = await px.start(HostPort("127.0.0.1", 0))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        answer = await _raw(f"http://127.0.0.1:{port}", b"CONNECT a.test:443 HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503")
        writer.close()
        await asyncio.sleep(0.1)
        assert px.connections == set()  # released when the first client left
    finally:
        await px.close()

