"""Ranges of a file sent with sendfile(2) on a duplicate of a client connection's socket,
to real clients on loopback: whole and in order however slowly the client reads, short only
where the file ends, an error where the client leaves; TLS keeps asyncio's path."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from p2p_mirror.core.file_sender import FileSender

MiB = 1024 * 1024
DATA = os.urandom(8 * MiB + 777)


async def serve_once(
    handler: Callable[[asyncio.StreamWriter], Awaitable[object]],
) -> tuple[asyncio.Server, int, asyncio.Future[object]]:
    """A server whose first connection runs ``handler``; its outcome lands in the future."""
    outcome: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            outcome.set_result(await handler(writer))
        except Exception as e:  # noqa: BLE001 - the test looks at it
            outcome.set_exception(e)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], outcome


async def read_slowly(port: int, limit: int | None = None) -> bytes:
    """A client with a small receive buffer that reads in small steps with pauses (so the
    sender's socket fills and it must wait), up to ``limit`` bytes or the end."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    got = bytearray()
    try:
        while limit is None or len(got) < limit:
            part = await reader.read(256 * 1024)
            if not part:
                break
            got += part
            await asyncio.sleep(0.001)
    finally:
        writer.close()
    return bytes(got)


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "segment"
    path.write_bytes(DATA)
    return path


async def test_a_range_reaches_a_slow_client_whole_and_in_order(
    blob: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits = []
    wake = FileSender._wake
    monkeypatch.setattr(FileSender, "_wake", lambda self: (waits.append(1), wake(self)))
    offset, count = 12345, 6 * MiB

    async def send(writer: asyncio.StreamWriter) -> int:
        sender = FileSender.for_transport(writer.transport)
        assert sender is not None
        try:
            with open(blob, "rb") as f:
                return await sender.send(f.fileno(), offset, count)
        finally:
            sender.close()

    server, port, outcome = await serve_once(send)
    async with server:
        got = await read_slowly(port)
        assert await outcome == count
    assert got == DATA[offset : offset + count]
    assert waits  # the socket filled: it waited for room at least once


async def test_a_file_shorter_than_the_range_gives_what_it_has(blob: Path) -> None:
    async def send(writer: asyncio.StreamWriter) -> int:
        sender = FileSender.for_transport(writer.transport)
        assert sender is not None
        try:
            with open(blob, "rb") as f:
                return await sender.send(f.fileno(), len(DATA) - 1000, 5000)
        finally:
            sender.close()

    server, port, outcome = await serve_once(send)
    async with server:
        got = await read_slowly(port)
        assert await outcome == 1000
    assert got == DATA[-1000:]


async def test_a_client_that_leaves_mid_range_is_an_error(blob: Path) -> None:
    async def send(writer: asyncio.StreamWriter) -> int:
        sender = FileSender.for_transport(writer.transport)
        assert sender is not None
        try:
            with open(blob, "rb") as f:
                for _ in range(20):  # far more than the client takes
                    await sender.send(f.fileno(), 0, len(DATA))
        finally:
            sender.close()
        return 0

    server, port, outcome = await serve_once(send)
    async with server:
        got = await read_slowly(port, limit=MiB)
        with pytest.raises(OSError):
            await asyncio.wait_for(outcome, 10)
    assert got[:MiB] == DATA[:MiB]


class _Transport(asyncio.WriteTransport):
    def __init__(self, extra: dict[str, object], buffered: int = 0) -> None:
        super().__init__(extra)
        self.buffered = buffered

    def get_write_buffer_size(self) -> int:
        return self.buffered


def test_tls_or_bytes_still_buffered_keep_asyncios_path() -> None:
    with socket.socket() as sock:
        tls = {"socket": sock, "sslcontext": object()}
        assert FileSender.for_transport(_Transport(tls)) is None
        assert FileSender.for_transport(_Transport({"socket": sock}, buffered=10)) is None
        assert FileSender.for_transport(_Transport({})) is None
