"""How long an agent waits for a segment torrent: as long as the seeder makes progress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirror.fetch import Fallback, SeederClient, parse_piece_list
from mirror.oci import Digest
from mirror.seeder import PIECES_HEADER

DIGEST = Digest.parse("sha256:" + "ab" * 32)


class QueueingSeeder:
    """A seeder stand-in: answers 202 (not published yet) ``busy_polls`` times, then the
    torrent; ``advancing`` says whether its origin byte count moves between polls."""

    def __init__(self, busy_polls: int, advancing: bool) -> None:
        self.busy_polls = busy_polls
        self.advancing = advancing
        self.polls = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.polls += 1
        if self.polls > self.busy_polls:
            return web.Response(body=b"torrent", headers={PIECES_HEADER: "0,2"})
        await asyncio.sleep(float(request.query["wait"]))
        return web.json_response(
            {"origin_bytes": self.polls * 1000 if self.advancing else 1000}, status=202
        )


@pytest.fixture
async def serve() -> AsyncIterator:
    servers: list[TestServer] = []

    async def start(seeder: QueueingSeeder) -> str:
        app = web.Application()
        app.router.add_get("/v1/blobs/{digest}/torrents/{index}", seeder.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def test_a_queued_segment_is_waited_for_while_the_seeder_advances(serve) -> None:
    seeder = QueueingSeeder(busy_polls=8, advancing=True)
    client = SeederClient([], timeout=0.3)
    try:
        started = asyncio.get_running_loop().time()
        data, pieces = await client.torrent(await serve(seeder), DIGEST, 0, 6881)
        waited = asyncio.get_running_loop().time() - started
    finally:
        await client.close()
    assert (data, pieces) == (b"torrent", [0, 2])
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


@pytest.mark.parametrize(
    ("header", "pieces"), [("", []), ("3", [3]), ("0,5,10", [0, 5, 10]), ("1,x", []), ("1;2", [])]
)
def test_dealt_pieces_header(header: str, pieces: list[int]) -> None:
    """A malformed list means no pieces: peers, or the seeder's swarm after a stall, cover it."""
    assert parse_piece_list(header) == pieces
