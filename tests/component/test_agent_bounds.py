"""The agent's bounds in process, against origin stand-ins that hold or trickle their body: a
download nobody reads any more is cancelled, and its disk reservation and files go with it;
one whose origin body is slower than ``origin_min_rate`` fails by its deadline."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from support.fakes import FaultRelay, StaticOrigin, aiohttp_servers
from yarl import URL

from p2p_mirror.agent import pull
from p2p_mirror.agent.server import Agent
from p2p_mirror.core.config import AgentConfig, load_config
from p2p_mirror.core.oci import Digest

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
    try:
        async with running_agent(tmp_path, str(origin.make_url("")), stall_timeout=60) as (
                agent, session, url):  # fmt: skip
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
            release.set()
    finally:
        release.set()
        await origin.close()


@contextlib.asynccontextmanager
async def running_agent(
    tmp_path: Path, origin_url: str, **settings: object
) -> AsyncIterator[tuple[Agent, aiohttp.ClientSession, URL]]:
    """A real agent in process for the registry ``REG`` at ``origin_url``, a client session,
    and the test blob's URL at the agent."""
    cfg = load_config(AgentConfig, None, {
        "data_dir": str(tmp_path / "data"), "registries": {REG: origin_url}, **settings,
    })  # fmt: skip
    agent = Agent(cfg)
    await agent.start()
    server = TestServer(agent.app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield agent, session, server.make_url(f"/v2/library/demo/blobs/{DIGEST}?ns={REG}")
    finally:
        await server.close()
        await agent.close()


@contextlib.asynccontextmanager
async def behind_a_trickling_origin(
    tmp_path: Path, **settings: object
) -> AsyncIterator[tuple[Agent, FaultRelay, aiohttp.ClientSession, URL]]:
    """An agent whose origin sends its first GET at 16 KiB/s, with a client session and the
    blob's URL at the agent."""
    async with aiohttp_servers() as serve:
        relay = FaultRelay(await serve(StaticOrigin([BLOB]).app()), fault="slow",
                           rate=16 * 1024).start()  # fmt: skip
        try:
            async with running_agent(tmp_path, relay.url, stall_timeout=2,
                                     origin_min_rate="1MiB", **settings) as (
                    agent, session, url):  # fmt: skip
                yield agent, relay, session, url
        finally:
            relay.stop()


async def cut_after(session: aiohttp.ClientSession, url: URL) -> float:
    """Seconds until the agent cut the response (headers go at the first byte)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with session.get(url) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    return loop.time() - started


async def test_a_trickling_origin_body_fails_by_its_deadline(tmp_path: Path) -> None:
    """The origin sends a 16 KiB chunk every second: never a stall, but 1 MiB would take a
    minute. The download fails once ``stall_timeout`` + size / ``origin_min_rate`` is past, the
    reader's response is cut (never a complete 200), nothing enters the cache, and the next
    request (the origin no longer trickling) completes."""
    async with behind_a_trickling_origin(tmp_path) as (agent, relay, session, url):
        took = await cut_after(session, url)
        assert 2.5 < took < 10, took
        assert agent.metrics.value("origin_deadlines_total") == 1
        assert agent.metrics.value("blob_failures_total", code="UNAVAILABLE") == 1
        assert not agent.puller.active and len(agent.store.ledger) == 0
        assert agent.store.layout(Digest.parse(DIGEST)) is None
        assert not list((tmp_path / "data" / "blobs").rglob(f"{DIGEST[7:]}*"))
        async with session.get(url) as resp:  # the relay trickles the first GET only
            assert resp.status == 200 and await resp.read() == BLOB
        assert relay.faults == 1


async def test_a_trickling_origin_body_streamed_uncached_is_cut_by_its_deadline(
    tmp_path: Path,
) -> None:
    """With no room in the cache the blob streams from the origin uncached: the same
    deadline cuts a trickling body there (never a complete 200), and nothing is written."""
    async with behind_a_trickling_origin(tmp_path, cache_max_bytes="256KiB") as (
            agent, _, session, url):  # fmt: skip
        took = await cut_after(session, url)
        assert 2.5 < took < 10, took
        assert agent.metrics.value("uncached_blobs_total") == 1
        assert agent.metrics.value("origin_deadlines_total") == 1
        assert not list((tmp_path / "data" / "blobs").rglob(f"{DIGEST[7:]}*"))
        async with session.get(url) as resp:  # the relay trickles the first GET only
            assert resp.status == 200 and await resp.read() == BLOB
