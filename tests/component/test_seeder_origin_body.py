"""The seeder receives a plain-HTTP origin body in its segment writer's thread
(``seeder/body_receiver.py``), against the real registry and against origins that cut,
overrun or stall the body; TLS and encoded bodies keep the aiohttp path."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support.roles import running_seeder

from lab.registry import Registry, write_test_tls
from p2p_mirror.core.oci import Digest
from p2p_mirror.seeder import body_receiver
from p2p_mirror.seeder.body_receiver import RECV_BYTES
from p2p_mirror.seeder.ingest import NEXT_REQUEST_LEAD_BYTES
from p2p_mirror.seeder.server import Seeder

MiB = 1024 * 1024
REPO = "team/app"
BT = {"bt_port": "1", "wait": "20"}


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def put_blob(registry: Registry, data: bytes, digest: str | None = None) -> str:
    """Store ``data`` in ``registry``'s storage as blob ``digest`` (default: its own) of
    ``REPO``, as a push would; with another digest, the registry serves bytes that fail it."""
    digest = digest or digest_of(data)
    hex_ = digest.split(":", 1)[1]
    root = registry.storage / "docker/registry/v2"
    blob = root / "blobs/sha256" / hex_[:2] / hex_ / "data"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = root / "repositories" / REPO / "_layers/sha256" / hex_ / "link"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.write_text(digest)
    return digest


def readers(seeder: Seeder) -> dict[str, float]:
    return {r: seeder.metrics.value("origin_bodies_total", reader=r) for r in ("thread", "aiohttp")}


async def ingest(client: TestClient, reg: str, digest: str) -> dict:
    """The blob's info, then every segment's torrent (the last one: the whole blob matched)."""
    resp = await client.get(f"/v1/blobs/{digest}", params={"registry": reg, "repo": REPO})
    assert resp.status == 200, await resp.text()
    info = await resp.json()
    last = await client.get(f"/v1/blobs/{digest}/torrents/{info['segments'] - 1}", params=BT)
    return {**info, "status": last.status}


def segment_bytes(seeder: Seeder, digest: str) -> bytes:
    job = seeder.ingest.job(Digest.parse(digest))
    assert job is not None and job.layout is not None
    return b"".join(job.layout.segment_path(i).read_bytes() for i in range(job.layout.count))


async def test_a_registry_blob_is_received_in_the_writer_thread(
    tmp_path: Path, registry: Registry
) -> None:
    """A blob of several segments from the real registry: taken off aiohttp and received in
    the writer's thread (not through aiohttp), in more than one receive; every segment
    published, the files are the blob, and the origin bytes are counted."""
    data = os.urandom(6 * MiB + 12345)
    digest = put_blob(registry, data)
    async with running_seeder(tmp_path, {registry.hostport: registry.url},
                              segment_size="1MiB") as (seeder, client):  # fmt: skip
        info = await ingest(client, registry.hostport, digest)
        assert info["status"] == 200 and info["segments"] >= 6
        assert segment_bytes(seeder, digest) == data
        assert readers(seeder) == {"thread": 1, "aiohttp": 0}
        assert len(data) > 4 * RECV_BYTES  # more than the head aiohttp had buffered
        assert seeder.origin_bytes == len(data)
        job = seeder.ingest.job(Digest.parse(digest))
        assert job is not None and job._task is not None
        await asyncio.wait_for(job._task, 10)  # the commit after the last segment
        assert seeder.metrics.value("seed_jobs_total", result="ok") == 1


async def test_registry_bytes_that_fail_the_digest_fail_the_job(
    tmp_path: Path, registry: Registry
) -> None:
    """The registry serves other bytes than the digest's (a corrupt store): the job fails
    with a digest mismatch and its last segment is never published."""
    wanted = os.urandom(3 * MiB)
    digest = put_blob(registry, os.urandom(len(wanted)), digest_of(wanted))
    async with running_seeder(tmp_path, {registry.hostport: registry.url},
                              segment_size="1MiB") as (seeder, client):  # fmt: skip
        info = await ingest(client, registry.hostport, digest)
        assert info["status"] >= 400
        assert seeder.metrics.value("seed_jobs_total", result="digest_mismatch") == 1
        assert readers(seeder) == {"thread": 1, "aiohttp": 0}


async def test_a_tls_registry_keeps_the_aiohttp_path(
    tmp_path: Path, registry_factory: Callable[..., Registry]
) -> None:
    """HTTPS: the socket carries TLS records, not the body: aiohttp reads it, as before."""
    ca, chain, key = write_test_tls(tmp_path / "tls")
    registry = registry_factory(tls=(chain, key))
    data = os.urandom(3 * MiB)
    digest = put_blob(registry, data)
    spec = {"url": registry.url, "ca_file": str(ca)}
    async with running_seeder(tmp_path / "seeder", {registry.hostport: spec},
                              segment_size="1MiB") as (seeder, client):  # fmt: skip
        info = await ingest(client, registry.hostport, digest)
        assert info["status"] == 200
        assert segment_bytes(seeder, digest) == data
        assert readers(seeder) == {"thread": 0, "aiohttp": 1}


async def test_an_encoded_body_keeps_the_aiohttp_path(tmp_path: Path) -> None:
    """A body with a Content-Encoding is not taken off aiohttp (the seeder stores what the
    origin sends, undecoded, as before)."""
    data = os.urandom(2 * MiB)
    digest = digest_of(data)

    async def blob(request: web.Request) -> web.Response:
        return web.Response(body=data, headers={"Content-Encoding": "identity"})

    app = web.Application()
    app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", blob)
    async with TestServer(app, host="127.0.0.1") as server, running_seeder(
        tmp_path, {"reg.test": str(server.make_url("")).rstrip("/")}, segment_size="1MiB"
    ) as (seeder, client):
        info = await ingest(client, "reg.test", digest)
        assert info["status"] == 200
        assert segment_bytes(seeder, digest) == data
        assert readers(seeder) == {"thread": 0, "aiohttp": 1}


# --- a raw-socket origin: the body exactly as the test writes it


class RawOrigin:
    """Answers HEAD with ``size``; a GET with the headers and ``send(writer)``'s bytes,
    then holds the connection until the seeder closes it."""

    def __init__(self, size: int, send: Callable[[asyncio.StreamWriter], object],
                 headers: str = "") -> None:  # fmt: skip
        self.size = size
        self.send = send
        self.headers = headers  # more header lines, each ending in CRLF
        self.gets = 0
        self.closed_by_seeder = asyncio.Event()  # a GET's connection ended from the other side

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            head = (f"HTTP/1.1 200 OK\r\nContent-Length: {self.size}\r\n"
                    f"Content-Type: application/octet-stream\r\n{self.headers}")  # fmt: skip
            if request.startswith(b"HEAD"):
                writer.write(f"{head}Connection: close\r\n\r\n".encode())
                await writer.drain()
                return
            self.gets += 1
            writer.write(f"{head}\r\n".encode())
            await self.send(writer)  # type: ignore[misc]
            if await reader.read(1) == b"":
                self.closed_by_seeder.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_by_seeder.set()
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def raw_origin(origin: RawOrigin) -> AsyncIterator[str]:
    server = await asyncio.start_server(origin.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


# an encoded body is read through aiohttp (test_an_encoded_body_keeps_the_aiohttp_path)
HEADERS_FOR_READER = {"thread": "", "aiohttp": "Content-Encoding: identity\r\n"}


async def failed_ingest(tmp_path: Path, origin: RawOrigin, digest: str, reader: str = "thread",
                        **extra: object) -> Seeder:  # fmt: skip
    """Ingest ``digest`` from ``origin``, which fails, read by ``reader``; the seeder closes
    the connection."""
    async with raw_origin(origin) as url, running_seeder(
        tmp_path, {"reg.test": url}, segment_size="1MiB", **extra
    ) as (seeder, client):
        info = await ingest(client, "reg.test", digest)
        assert info["status"] >= 400
        assert readers(seeder) == {r: float(r == reader) for r in ("thread", "aiohttp")}
        await asyncio.wait_for(origin.closed_by_seeder.wait(), 10)  # never reused
        return seeder


@pytest.mark.parametrize("reader", ["thread", "aiohttp"])
async def test_a_body_cut_short_fails_the_job_as_incomplete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, reader: str
) -> None:
    data = os.urandom(4 * MiB)

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(data[: 3 * MiB])
        await writer.drain()
        writer.close()

    origin = RawOrigin(len(data), send, HEADERS_FOR_READER[reader])
    seeder = await failed_ingest(tmp_path, origin, digest_of(data), reader)
    assert seeder.metrics.value("seed_jobs_total", result="origin_incomplete") == 1
    # aiohttp drops what it held when the cut is seen: at most the bytes sent are counted
    counted = re.search(rf"origin sent (\d+) of {len(data)} bytes", caplog.text)
    assert counted is not None
    assert int(counted[1]) == 3 * MiB if reader == "thread" else 0 < int(counted[1]) <= 3 * MiB


async def test_a_body_longer_than_announced_fails_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The announced bytes match the digest, but more follow in the same write: refused."""
    data = os.urandom(3 * MiB)

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(data + b"x" * 1000)
        await writer.drain()  # and the connection stays open

    seeder = await failed_ingest(tmp_path, RawOrigin(len(data), send), digest_of(data))
    assert seeder.metrics.value("seed_jobs_total", result="digest_mismatch") == 1
    assert "origin sent more bytes than announced" in caplog.text


@pytest.mark.parametrize("reader", ["thread", "aiohttp"])
async def test_an_origin_that_stalls_fails_the_job_after_its_read_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, reader: str
) -> None:
    data = os.urandom(4 * MiB)

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(data[: 2 * MiB + 1])
        await writer.drain()  # and nothing more

    loop = asyncio.get_running_loop()
    start = loop.time()
    origin = RawOrigin(len(data), send, HEADERS_FOR_READER[reader])
    seeder = await failed_ingest(tmp_path, origin, digest_of(data), reader, origin_timeout=1.0)
    assert 1.0 <= loop.time() - start < 15
    assert seeder.metrics.value("seed_jobs_total", result="origin_unavailable") == 1
    assert f"origin sent nothing for 1s after {2 * MiB + 1} of {len(data)} bytes" in caplog.text


@pytest.mark.parametrize("held_from", ["segment", "lead"])
async def test_a_held_body_publishes_its_segments_and_nears_its_end_without_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held_from: str
) -> None:
    """The origin holds the body just past the 1st segment, or NEXT_REQUEST_LEAD_BYTES / 2
    before the end: a receive ends at each segment's end and at the lead, so the segments
    before are published and the progress reaches the lead (the next blob's request may
    go), where a receive that waited for a whole buffer would still wait (30 s here)."""
    monkeypatch.setattr(body_receiver, "WAKE_SECONDS", 30.0)
    data = os.urandom(4 * MiB)
    sent = MiB + 1000 if held_from == "segment" else len(data) - NEXT_REQUEST_LEAD_BYTES // 2

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(data[:sent])
        await writer.drain()

    digest = digest_of(data)
    async with raw_origin(RawOrigin(len(data), send)) as url, running_seeder(
        tmp_path, {"reg.test": url}, segment_size="1MiB", segment_parts=4
    ) as (seeder, client):
        resp = await client.get(f"/v1/blobs/{digest}",
                                params={"registry": "reg.test", "repo": REPO})  # fmt: skip
        info = await resp.json()
        assert info["segment_size"] == MiB and info["segments"] == 4
        for index in range(sent // MiB):
            resp = await client.get(f"/v1/blobs/{digest}/torrents/{index}",
                                    params={**BT, "wait": "10"})  # fmt: skip
            assert resp.status == 200
        reported = MiB if held_from == "segment" else len(data) - NEXT_REQUEST_LEAD_BYTES
        for _ in range(200):
            if seeder.origin_bytes >= reported:
                break
            await asyncio.sleep(0.05)
        assert reported <= seeder.origin_bytes <= sent
        assert readers(seeder)["thread"] == 1


async def test_a_cancelled_ingest_stops_its_thread_and_closes_the_connection(
    tmp_path: Path,
) -> None:
    """The seeder shuts down while a body is half way: the receiving thread ends and the
    origin sees its connection closed, long before the read timeout."""
    data = os.urandom(4 * MiB)
    sent = asyncio.Event()

    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(data[: 2 * MiB])
        await writer.drain()
        sent.set()

    origin = RawOrigin(len(data), send)
    async with raw_origin(origin) as url:
        async with running_seeder(tmp_path, {"reg.test": url},
                                  segment_size="1MiB") as (seeder, client):  # fmt: skip
            resp = await client.get(f"/v1/blobs/{digest_of(data)}",
                                    params={"registry": "reg.test", "repo": REPO})  # fmt: skip
            assert resp.status == 200
            await asyncio.wait_for(sent.wait(), 10)
            for _ in range(200):
                if seeder.origin_bytes >= 2 * MiB:
                    break
                await asyncio.sleep(0.05)
            assert readers(seeder)["thread"] == 1
            assert any(t.name == "segment-writer" for t in threading.enumerate())
        await asyncio.wait_for(origin.closed_by_seeder.wait(), 5)
        for _ in range(100):
            if not any(t.name == "segment-writer" for t in threading.enumerate()):
                break
            await asyncio.sleep(0.05)
        assert not any(t.name == "segment-writer" for t in threading.enumerate())
