"""A blob's requests go to its owning seeder (rendezvous over the set), all of them to the
same one; a seeder that is down (refused, 5xx) hands the blob to the next owner, half way
through a blob too; a seeder's final answer (4xx) is not asked of another."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from support.fakes import aiohttp_servers

from p2p_mirror.agent.seeder_client import Fallback, SeederClient
from p2p_mirror.agent.seeder_set import SeederSet
from p2p_mirror.core.oci import Digest
from p2p_mirror.core.protocol import PIECES_HEADER, BlobInfo

# 48 blobs: the chance that one of 3 seeders owns none is 3 x (2/3)^48, about 1e-8.
DIGESTS = [Digest.parse(f"sha256:{i:064x}") for i in range(1, 49)]
INFO = BlobInfo("", 1000, 100, 10, 6882, "198.18.0.9")


class StandIn:
    """A seeder stand-in: blob info and torrents; counts what it was asked; ``status`` is
    what it answers (200, or an error)."""

    def __init__(self, status: int = 200, oci_error: bool = False) -> None:
        self.status = status
        self.oci_error = oci_error
        self.infos: list[str] = []
        self.torrents: list[tuple[str, int]] = []

    async def info(self, request: web.Request) -> web.Response:
        self.infos.append(request.match_info["digest"])
        if self.status != 200 and self.oci_error:
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": "origin answered 502"}]},
                status=self.status,
            )
        if self.status != 200:
            return web.Response(status=self.status, text="no")
        return web.json_response(INFO.to_json())

    async def torrent(self, request: web.Request) -> web.Response:
        self.torrents.append((request.match_info["digest"], int(request.match_info["index"])))
        if self.status != 200:
            return web.Response(status=self.status)
        return web.Response(body=b"torrent", headers={PIECES_HEADER: "0"})


@pytest.fixture
async def serve() -> AsyncIterator:
    async with aiohttp_servers() as start_app:

        async def start(stand_in: StandIn) -> str:
            app = web.Application()
            app.router.add_get("/v1/blobs/{digest}", stand_in.info)
            app.router.add_get("/v1/blobs/{digest}/torrents/{index}", stand_in.torrent)
            return await start_app(app)

        yield start


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_every_blob_goes_to_its_owner_and_only_there(serve) -> None:
    stand_ins = [StandIn() for _ in range(3)]
    urls = [await serve(s) for s in stand_ins]
    seeders = SeederSet(urls)
    client = SeederClient(seeders, timeout=5)
    try:
        for digest in DIGESTS:
            owner = (await seeders.ranked(str(digest)))[0]
            source = client.source(digest, "registry.test", "app")
            url, info = await source.open()
            assert url == owner and info == INFO
            assert source.peers == [("198.18.0.9", 6882)]  # the seeder's advertised address
            for index in range(3):
                got, offer = await source.torrent(index, 6881)
                offer.close()
                assert got == owner
    finally:
        await client.close()
    asked = {url: s.infos for url, s in zip(urls, stand_ins, strict=True)}
    assert sorted(d for infos in asked.values() for d in infos) == sorted(map(str, DIGESTS))
    assert all(asked.values())  # each seeder owns some of the blobs
    for s in stand_ins:  # each seeder got the torrent requests of its own blobs only
        assert {d for d, _ in s.torrents} == set(s.infos)


@pytest.mark.parametrize("down", ["refused", "503"])
async def test_a_down_owner_passes_its_blobs_to_the_next_one(serve, down: str) -> None:
    live = [StandIn(), StandIn()]
    dead = StandIn(503)
    urls = [await serve(s) for s in live]
    dead_url = closed_port_url() if down == "refused" else await serve(dead)
    seeders = SeederSet([*urls, dead_url])
    client = SeederClient(seeders, timeout=5)
    try:
        owned = [d for d in DIGESTS if (await seeders.ranked(str(d)))[0] == dead_url]
        assert owned
        digest = owned[0]
        second = (await seeders.ranked(str(digest)))[1]
        url, _ = await client.source(digest, "registry.test", "app").open()
        assert url == second
        # marked down: the next blob it owns goes straight to its successor
        assert (await seeders.ranked(str(owned[-1])))[-1] == dead_url
    finally:
        await client.close()
    if down == "503":
        assert dead.infos == [str(digest)]


async def test_a_seeder_dying_half_way_hands_the_rest_of_the_blob_on(serve) -> None:
    first, second = StandIn(), StandIn()
    urls = [await serve(first), await serve(second)]
    seeders = SeederSet(urls)
    client = SeederClient(seeders, timeout=5)
    try:
        digest = DIGESTS[0]
        order = await seeders.ranked(str(digest))
        owner, successor = (first, second) if order[0] == urls[0] else (second, first)
        source = client.source(digest, "registry.test", "app")
        url, offer = await source.torrent(0, 6881)
        offer.close()
        assert url == order[0]
        owner.status = 503  # the owner fails from now on
        url, offer = await source.torrent(1, 6881)
        offer.close()
        assert url == order[1]
        assert successor.infos == [str(digest)]  # asked for the blob (it ingests it) first
        assert successor.torrents == [(str(digest), 1)]
    finally:
        await client.close()


@pytest.mark.parametrize("status", [404, 503])
async def test_a_refusal_is_final_and_no_other_seeder_is_asked(serve, status: int) -> None:
    """A 4xx, or a 5xx with the seeder's own OCI error (the origin failed it): another
    seeder would get the same from the origin."""
    refusing, other = StandIn(status, oci_error=True), StandIn()
    urls = [await serve(refusing), await serve(other)]
    seeders = SeederSet(urls)
    client = SeederClient(seeders, timeout=5)
    try:
        digest = [d for d in DIGESTS if (await seeders.ranked(str(d)))[0] == urls[0]][0]
        with pytest.raises(Fallback, match=str(status)):
            await client.source(digest, "registry.test", "app").open()
        assert (await seeders.ranked(str(digest)))[0] == urls[0]  # not marked down
    finally:
        await client.close()
    assert other.infos == []
