"""The agent's bounds in process, against an origin stand-in that holds its body: a download
nobody reads any more is cancelled, and its disk reservation and files go with it."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from p2p_mirror.agent import pull
from p2p_mirror.agent.server import Agent
from p2p_mirror.core.config import AgentConfig, load_config

REG = "reg.test"
BLOB = os.urandom(1024 * 1024)
DIGEST = f"sha256:{hashlib.sha256(BLOB).hexdigest()}"


async def test_a_download_whose_reader_left_is_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pull, "ORPHAN_GRACE", 0.3)
    release = asyncio.Event()

    async def blob(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(BLOB))})
        await resp.prepare(request)
        if request.method == "GET":
            await resp.write(BLOB[:65536])
            await release.wait()  # the rest never comes while the test runs
        return resp

    app = web.Application()
    app.router.add_route("*", "/v2/library/demo/blobs/{digest}", blob)
    origin = TestServer(app, host="127.0.0.1")
    await origin.start_server()
    cfg = load_config(AgentConfig, None, {
        "data_dir": str(tmp_path / "data"), "registries": {REG: str(origin.make_url(""))},
        "stall_timeout": 60,
    })  # fmt: skip
    agent = Agent(cfg)
    await agent.start()
    server = TestServer(agent.app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = server.make_url(f"/v2/library/demo/blobs/{DIGEST}?ns={REG}")
            async with session.get(url) as resp:
                assert resp.status == 200
                assert await resp.content.readexactly(65536) == BLOB[:65536]
                assert len(agent.puller.active) == 1 and len(agent.store.ledger) == 1
            # the client left: nobody else reads it
            for _ in range(50):
                await asyncio.sleep(0.1)
                if not agent.puller.active:
                    break
        assert not agent.puller.active
        assert len(agent.store.ledger) == 0
        assert agent.metrics.value("orphaned_downloads_total") == 1
        assert not list((tmp_path / "data" / "blobs").rglob(f"{DIGEST[7:]}*"))
    finally:
        release.set()
        await server.close()
        await agent.close()
        await origin.close()
