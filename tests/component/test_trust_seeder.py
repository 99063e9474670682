"""Issue 19 at the seeder: it fetches only configured registries, and its errors say nothing
about internal hosts (probe 4: SSRF through ``registry=``)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support.fakes import http_server
from support.roles import running_seeder
from test_seeder_unit import REG, HeldOrigin, seeder_of, served

from p2p_mirror.core import protocol, redirects
from p2p_mirror.core.clusterauth import SEEDER_API, TOKEN_HEADER, ClusterAuth

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


# --- the seeder's own credentials, the token dance, the cluster token ---------------------


class BearerRegistry:
    """A registry that wants a bearer token, which its token endpoint gives for alice's
    Basic credentials only (the dance of Docker Hub, GHCR, Harbor)."""

    def __init__(self) -> None:
        self.token_requests: list[dict[str, str]] = []
        self.url = ""

    async def blob(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer tok-123":
            return web.Response(status=401, headers={"WWW-Authenticate": (
                f'Bearer realm="{self.url}/token",service="reg.test",'
                f'scope="repository:{request.match_info["name"]}:pull"')})
        if request.match_info["digest"] != DIGEST:
            return web.Response(status=404)
        return web.Response(body=BLOB, headers={"Docker-Content-Digest": DIGEST})

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests.append(dict(request.query))
        alice = "Basic " + base64.b64encode(b"alice:s3cret").decode()
        if request.headers.get("Authorization") != alice:
            return web.Response(status=401)
        return web.json_response({"token": "tok-123", "expires_in": 300})


@contextlib.asynccontextmanager
async def bearer_registry() -> AsyncIterator[BearerRegistry]:
    registry = BearerRegistry()
    app = web.Application()
    app.router.add_get("/token", registry.token)
    app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", registry.blob)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    registry.url = str(server.make_url("")).rstrip("/")
    try:
        yield registry
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def seeder_with(tmp_path: Path, registry_url: str, **extra: object) -> AsyncIterator[
    TestClient
]:
    registries = extra.pop("registries", {REG: registry_url})
    async with running_seeder(tmp_path / "seeder", registries, **extra) as (_, client):  # type: ignore[arg-type]
        yield client


def docker_config(tmp_path: Path, auth: str) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {REG: {"auth": auth}}}))
    return path


async def test_seeder_uses_its_own_credentials_and_the_token_dance(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    creds = docker_config(tmp_path, base64.b64encode(b"alice:s3cret").decode())
    async with bearer_registry() as registry, seeder_with(
        tmp_path, registry.url, registry_auth=str(creds)
    ) as client:
        # A client's credentials sent along are not what gets the seeder in.
        resp = await client.get(f"/v1/blobs/{DIGEST}", params={"registry": REG,
                                "repo": "team/app"}, headers={"Authorization": "Basic eDp5"})
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["size"] == len(BLOB)
        assert registry.token_requests[0]["scope"] == "repository:team/app:pull"
        assert registry.token_requests[0]["service"] == "reg.test"
    assert "s3cret" not in caplog.text and "tok-123" not in caplog.text
    assert base64.b64encode(b"alice:s3cret").decode() not in caplog.text


async def test_origin_refusing_the_seeder_is_a_distinct_answer(tmp_path: Path) -> None:
    creds = docker_config(tmp_path, base64.b64encode(b"alice:wrong").decode())
    async with bearer_registry() as registry:
        for extra in ({}, {"registry_auth": str(creds)}):
            async with seeder_with(tmp_path, registry.url, **extra) as client:
                alice = "Basic " + base64.b64encode(b"alice:s3cret").decode()
                resp = await client.get(f"/v1/blobs/{DIGEST}", params={
                    "registry": REG, "repo": "team/app"}, headers={"Authorization": alice})
                assert resp.status == 401, await resp.text()
                assert resp.headers[protocol.REFUSED_HEADER] == "1"


async def test_seeder_api_needs_the_cluster_token(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x" * 32)
    secret.chmod(0o600)
    origin = HeldOrigin([BLOB], held=0)
    async with served(origin) as origin_server, seeder_with(
        tmp_path, str(origin_server.make_url("")), cluster_secret=str(secret)
    ) as client:
        params = {"registry": REG, "repo": "library/demo"}
        paths = [f"/v1/blobs/{DIGEST}", f"/v1/blobs/{DIGEST}/torrents/0",
                 f"/v1/blobs/{DIGEST}/segments/0/pieces/0"]
        for path in paths:
            for headers in ({}, {TOKEN_HEADER: "0" * 64},
                            {TOKEN_HEADER: ClusterAuth(b"y" * 32, "t").token(SEEDER_API)}):
                resp = await client.get(path, params=params, headers=headers)
                assert resp.status == 401, (path, headers)
        assert origin.gets == []
        good = {TOKEN_HEADER: ClusterAuth(b"x" * 32, "test").token(SEEDER_API)}
        resp = await client.get(paths[0], params=params, headers=good)
        assert resp.status == 200, await resp.text()
        assert (await client.get("/healthz")).status == 200


class CountingOrigin:
    """Answers every HEAD for DIGEST with its size; a GET sends ``body`` (counted)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.gets = 0

    async def handle(self, request: web.Request) -> web.Response:
        headers = {"Docker-Content-Digest": DIGEST}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(BLOB))})
        self.gets += 1
        return web.Response(body=self.body, headers=headers)


async def test_a_job_answers_for_another_registry_only_once_it_sent_the_bytes(
    tmp_path: Path,
) -> None:
    import asyncio

    liar, mirror = CountingOrigin(bytes(len(BLOB))), CountingOrigin(BLOB)
    servers = []
    for fake in (liar, mirror):
        app = web.Application()
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", fake.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
    origin = HeldOrigin([BLOB], held=0)
    try:
        async with served(origin) as origin_server, seeder_with(
            tmp_path, str(origin_server.make_url("")),
            registries={REG: str(origin_server.make_url("")),
                        "liar.test": str(servers[0].make_url("")),
                        "mirror.test": str(servers[1].make_url(""))},
        ) as client:  # fmt: skip
            assert (await blob_info(client, REG))[0] == 200
            answers = await asyncio.gather(*(blob_info(client, "liar.test") for _ in range(5)))
            assert all(status == 503 for status, _ in answers), answers
            assert liar.gets == 1  # the five asked at once shared one check
            answers = await asyncio.gather(*(blob_info(client, "mirror.test") for _ in range(5)))
            assert all(status == 200 for status, _ in answers), answers
            assert mirror.gets == 1
            assert (await blob_info(client, "mirror.test"))[0] == 200
            assert mirror.gets == 1  # confirmed: a HEAD is enough from now on
    finally:
        for server in servers:
            await server.close()
