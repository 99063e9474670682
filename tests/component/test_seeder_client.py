"""How long an agent waits for a segment torrent (as long as the seeder makes progress), and
how it reads a torrent response that goes on with its dealt pieces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from support.fakes import aiohttp_servers

from p2p_mirror.agent.seeder_client import Fallback, SeederClient
from p2p_mirror.core import protocol
from p2p_mirror.core.oci import Digest
from p2p_mirror.core.protocol import PIECES_HEADER, TORRENT_LENGTH_HEADER

DIGEST = Digest.parse("sha256:" + "ab" * 32)


class QueueingSeeder:
    """A seeder stand-in: answers 202 (not published yet) ``busy_polls`` times, then the
    torrent; ``advancing`` says whether its origin byte count moves between polls."""

    def __init__(self, busy_polls: int, advancing: bool) -> None:
        self.busy_polls = busy_polls
        self.advancing = advancing
        self.polls = 0

    async def handle(self, request: web.Request) -> web.Response:
        assert request.query["pieces"] == "inline"  # this seeder ignores it, as older ones do
        self.polls += 1
        if self.polls > self.busy_polls:
            return web.Response(body=b"torrent", headers={PIECES_HEADER: "0,2"})
        await asyncio.sleep(float(request.query["wait"]))
        return web.json_response(
            protocol.not_yet_body(self.polls * 1000 if self.advancing else 1000, None), status=202
        )


class InlineSeeder:
    """A seeder stand-in whose torrent response goes on with the dealt pieces ``0,1``; its
    length header may lie (``length``), its body may stop short (``cut`` bytes less), or
    come 25 bytes at a time, ``gap`` seconds apart (a congested link)."""

    def __init__(self, length: str | None = None, cut: int = 0, gap: float = 0.0) -> None:
        self.length, self.cut, self.gap = length, cut, gap

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = (b"torrent" + b"a" * 100 + b"b" * 50)[: 157 - self.cut]
        headers = {PIECES_HEADER: "0,1", TORRENT_LENGTH_HEADER: self.length or "7"}
        if not self.gap:
            return web.Response(body=body, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        for start in range(0, len(body), 25):
            await resp.write(body[start : start + 25])
            await asyncio.sleep(self.gap)
        await resp.write_eof()
        return resp


class SilentSeeder:
    """A seeder stand-in that takes the first ``silent`` requests and never answers them (a
    stalled connection), then answers with the torrent."""

    def __init__(self, silent: int) -> None:
        self.silent = silent
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.requests <= self.silent:
            await asyncio.sleep(3600)
        return web.Response(body=b"torrent", headers={PIECES_HEADER: "1"})


@pytest.fixture
async def serve() -> AsyncIterator:
    async with aiohttp_servers() as start_app:

        async def start(seeder: QueueingSeeder | InlineSeeder | SilentSeeder) -> str:
            app = web.Application()
            app.router.add_get("/v1/blobs/{digest}/torrents/{index}", seeder.handle)
            return await start_app(app)

        yield start


async def test_a_queued_segment_is_waited_for_while_the_seeder_advances(serve) -> None:
    seeder = QueueingSeeder(busy_polls=8, advancing=True)
    client = SeederClient([], timeout=0.3)
    try:
        started = asyncio.get_running_loop().time()
        offer = await client.torrent(await serve(seeder), DIGEST, 0, 6881)
        waited = asyncio.get_running_loop().time() - started
    finally:
        await client.close()
    assert (offer.torrent, offer.dealt, offer.body) == (b"torrent", [0, 2], None)
    assert waited > 0.6  # twice the timeout: progress kept it waiting


async def test_a_seeder_that_stopped_advancing_is_given_up(serve) -> None:
    seeder = QueueingSeeder(busy_polls=1000, advancing=False)
    client = SeederClient([], timeout=0.3)
    try:
        with pytest.raises(Fallback, match="no origin progress"):
            await client.torrent(await serve(seeder), DIGEST, 0, 6881)
    finally:
        await client.close()
    assert seeder.polls < 10


async def test_dealt_pieces_follow_the_torrent_in_its_response(serve) -> None:
    client = SeederClient([], timeout=5)
    try:
        offer = await client.torrent(await serve(InlineSeeder()), DIGEST, 0, 6881)
        assert (offer.torrent, offer.dealt) == (b"torrent", [0, 1])
        assert [p async for b in offer.inline_pieces([100, 50]) for p in b] == [(0, b"a" * 100),
                                                                     (1, b"b" * 50)]  # fmt: skip
        offer.close()
        short = await client.torrent(await serve(InlineSeeder(cut=10)), DIGEST, 0, 6881)
        with pytest.raises(asyncio.IncompleteReadError):
            _ = [p async for b in short.inline_pieces([100, 50]) for p in b]
        short.close()
        for lie in ("x", "500"):  # not a number; longer than the body
            with pytest.raises(Fallback, match="torrent 0"):
                await client.torrent(await serve(InlineSeeder(length=lie)), DIGEST, 0, 6881)
    finally:
        await client.close()


async def test_a_slow_run_is_read_while_it_moves_and_given_up_when_it_stops(serve) -> None:
    """The run after the torrent goes at the pace of the agent's link: a body that takes
    longer than the timeout is read as long as bytes keep coming (here 7 parts 0.15 s apart,
    1 s against a timeout of 0.4 s); one silent for longer than that is a failure."""
    client = SeederClient([], timeout=0.3)
    try:
        started = asyncio.get_running_loop().time()
        offer = await client.torrent(await serve(InlineSeeder(gap=0.15)), DIGEST, 0, 6881)
        pieces = [p async for b in offer.inline_pieces([100, 50]) for p in b]
        assert asyncio.get_running_loop().time() - started > 0.8
        assert pieces == [(0, b"a" * 100), (1, b"b" * 50)]
        offer.close()
        stalled = await client.torrent(await serve(InlineSeeder(gap=0.6)), DIGEST, 0, 6881)
        with pytest.raises(TimeoutError):
            _ = [p async for b in stalled.inline_pieces([100, 50]) for p in b]
        stalled.close()
    finally:
        await client.close()


async def test_a_torrent_request_that_gets_no_answer_is_asked_again_once(serve) -> None:
    """One silent connection costs a second request, not the blob (the agent would fetch
    the rest of it from the origin); two in a row are a seeder failure."""
    client = SeederClient([], timeout=0.3)
    try:
        once = SilentSeeder(silent=1)
        offer = await client.torrent(await serve(once), DIGEST, 0, 6881)
        assert (offer.torrent, offer.dealt, once.requests) == (b"torrent", [1], 2)
        twice = SilentSeeder(silent=2)
        with pytest.raises(Fallback, match="torrent 0"):
            await client.torrent(await serve(twice), DIGEST, 0, 6881)
        assert twice.requests == 2
    finally:
        await client.close()
