"""``splice_to_file``: a run received from a socket straight into a file, with its end, its
cut and its stall each told apart, and nothing left open."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from p2p_mirror.agent.splice_run import PIPE_SIZE, splice_to_file

DATA = os.urandom(3 * PIPE_SIZE + 12345)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


Sender = Callable[[socket.socket], Awaitable[None]]


async def feed(sock: socket.socket, data: bytes, close: bool) -> None:
    loop = asyncio.get_running_loop()
    for at in range(0, len(data), 200_000):
        await loop.sock_sendall(sock, data[at : at + 200_000])
        await asyncio.sleep(0)
    if close:
        sock.close()


def feeding(data: bytes, close: bool) -> Sender:
    return lambda sock: feed(sock, data, close)


async def receive(tmp_path: Path, send: Sender, count: int,
                  idle_timeout: float = 5.0) -> tuple[bytes, list[int]]:  # fmt: skip
    """What ``splice_to_file`` wrote at offset 7 of a file while ``send`` wrote to the other
    end of its socket, and its progress calls."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    path = tmp_path / "segment"
    path.write_bytes(b"x" * 7)
    fd = os.open(path, os.O_WRONLY)
    progress: list[int] = []
    sender = asyncio.create_task(send(theirs))
    try:
        await splice_to_file(ours.fileno(), fd, 7, count, idle_timeout, progress.append)
    finally:
        await sender
        os.close(fd)
        ours.close()
        theirs.close()
    return path.read_bytes(), progress


async def test_the_run_lands_in_the_file_at_its_offset(tmp_path: Path) -> None:
    before = open_fds()
    written, progress = await receive(tmp_path, feeding(DATA, close=False), len(DATA))
    assert written == b"x" * 7 + DATA
    assert sum(progress) == len(DATA) and max(progress) <= PIPE_SIZE
    assert open_fds() == before  # the pipe is closed


async def test_bytes_past_the_count_stay_in_the_socket(tmp_path: Path) -> None:
    written, _ = await receive(tmp_path, feeding(DATA, close=False), len(DATA) - 100)
    assert written == b"x" * 7 + DATA[:-100]


async def test_a_run_cut_short_raises_after_writing_what_came(tmp_path: Path) -> None:
    before = open_fds()
    with pytest.raises(asyncio.IncompleteReadError) as cut:
        await receive(tmp_path, feeding(DATA[:PIPE_SIZE + 5], close=True), len(DATA))
    assert cut.value.expected == len(DATA) - PIPE_SIZE - 5
    assert (tmp_path / "segment").read_bytes() == b"x" * 7 + DATA[:PIPE_SIZE + 5]
    assert open_fds() == before


async def test_a_silent_socket_times_out(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError):
        await receive(tmp_path, feeding(DATA[:1000], close=False), len(DATA), idle_timeout=0.3)
    assert (tmp_path / "segment").read_bytes() == b"x" * 7 + DATA[:1000]


async def test_a_slow_but_steady_run_outlasting_the_idle_timeout_completes(
    tmp_path: Path,
) -> None:
    """The idle timeout is per silence, not per run: parts 0.15 s apart for over a second,
    with 0.4 s allowed between bytes."""
    data = DATA[: 8 * 1000]

    async def trickle(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for at in range(0, len(data), 1000):
            await asyncio.sleep(0.15)
            await loop.sock_sendall(sock, data[at : at + 1000])

    loop = asyncio.get_running_loop()
    started = loop.time()
    written, _ = await receive(tmp_path, trickle, len(data), idle_timeout=0.4)
    assert loop.time() - started > 1.0
    assert written == b"x" * 7 + data


async def test_a_run_that_goes_silent_times_out_after_its_last_byte(tmp_path: Path) -> None:
    async def then_silence(sock: socket.socket) -> None:
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().sock_sendall(sock, DATA[:1000])

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await receive(tmp_path, then_silence, len(DATA), idle_timeout=0.3)
    assert loop.time() - started >= 0.45  # 0.2 s to the byte, then 0.3 s of silence
    assert (tmp_path / "segment").read_bytes() == b"x" * 7 + DATA[:1000]
