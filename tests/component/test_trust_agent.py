"""Issue 19 at the agent, on a real agent app and real HTTP origins on loopback: a digest
mismatch cuts the response (probe: a lying origin)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from p2p_mirror.agent.blob_download import HOLD_BACK
from p2p_mirror.agent.server import Agent
from p2p_mirror.core.config import AgentConfig, Upstream
from p2p_mirror.core.oci import Digest

REG = "reg.test"
BLOB = os.urandom(1_000_000)
DIGEST = f"sha256:{hashlib.sha256(BLOB).hexdigest()}"
DIGEST_OBJ = Digest.parse(DIGEST)


def origin_app(body: Callable[[], bytes]) -> web.Application:
    """A registry that says it has ``DIGEST`` to anyone and sends ``body()`` for it."""

    async def blob(request: web.Request) -> web.StreamResponse:
        if request.match_info["digest"] != DIGEST:
            return web.Response(status=404)
        data = body()
        headers = {"Docker-Content-Digest": DIGEST}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        return web.Response(body=data, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", blob)
    return app


@pytest.fixture
async def served() -> AsyncIterator[Callable]:
    servers: list[TestServer] = []
    agents: list[Agent] = []
    clients: list[TestClient] = []

    async def serve(body: Callable[[], bytes], tmp: os.PathLike) -> TestClient:
        origin = TestServer(origin_app(body), host="127.0.0.1")
        await origin.start_server()
        servers.append(origin)
        cfg = AgentConfig(data_dir=tmp, registries={REG: Upstream(REG, str(origin.make_url("")))})
        agent = Agent(cfg)
        await agent.start()
        agents.append(agent)
        client = TestClient(TestServer(agent.app(), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield serve
    for client in clients:
        await client.close()
    for agent in agents:
        await agent.close()
    for server in servers:
        await server.close()


async def test_a_digest_mismatch_never_completes_the_response(served, tmp_path) -> None:
    wrong = bytearray(BLOB)
    wrong[-1] ^= 0xFF  # only the very last byte lies
    client = await served(lambda: bytes(wrong), tmp_path)
    resp = await client.get(f"/v2/team/app/blobs/{DIGEST}?ns={REG}")
    got = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in resp.content.iter_any():
            got += chunk
    assert len(got) <= len(BLOB) - HOLD_BACK  # the tail waited for the digest, and never came
    assert bytes(got) == BLOB[: len(got)]


async def test_a_matching_blob_completes(served, tmp_path) -> None:
    client = await served(lambda: BLOB, tmp_path)
    resp = await client.get(f"/v2/team/app/blobs/{DIGEST}?ns={REG}")
    assert resp.status == 200
    assert await resp.read() == BLOB


async def test_a_download_for_one_registry_is_never_shared_with_another(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race behind probe 1: registry R's download has sent its last byte (the digest
    matched) but is not yet committed, and a request names a lying registry X. It must not
    get R's download; X is asked for its own bytes (zeros here), and fails."""
    import time

    from p2p_mirror.core.store import BlobStore

    commit = BlobStore.commit

    def slow_commit(self, layout) -> None:
        time.sleep(1.0)  # a slow fsync: the window in which the download is still active
        commit(self, layout)

    monkeypatch.setattr(BlobStore, "commit", slow_commit)
    good = TestServer(origin_app(lambda: BLOB), host="127.0.0.1")
    liar = TestServer(origin_app(lambda: bytes(len(BLOB))), host="127.0.0.1")
    await good.start_server()
    await liar.start_server()
    cfg = AgentConfig(data_dir=tmp_path, registries={
        REG: Upstream(REG, str(good.make_url(""))),
        "liar.test": Upstream("liar.test", str(liar.make_url(""))),
    })  # fmt: skip
    agent = Agent(cfg)
    await agent.start()
    client = TestClient(TestServer(agent.app(), host="127.0.0.1"))
    await client.start_server()
    try:
        resp = await client.get(f"/v2/team/app/blobs/{DIGEST}?ns={REG}")
        assert await resp.read() == BLOB
        assert DIGEST_OBJ in agent.puller.active  # still committing
        resp = await client.get(f"/v2/team/app/blobs/{DIGEST}?ns=liar.test")
        got = b""
        with contextlib.suppress(aiohttp.ClientPayloadError):
            got = await resp.read()
        assert resp.status != 200 or got != BLOB
        assert BLOB[:65536] not in got
    finally:
        await client.close()
        await agent.close()
        await good.close()
        await liar.close()
