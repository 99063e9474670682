"""``splice_to_file``: a run received from a socket straight into a file, with its end, its
cut and its stall each told apart, and nothing left open."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from p2p_mirror.agent.splice_run import PIPE_SIZE, splice_to_file

DATA = os.urandom(3 * PIPE_SIZE + 12345)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def feed(sock: socket.socket, data: bytes, close: bool) -> None:
    loop = asyncio.get_running_loop()
    for at in range(0, len(data), 200_000):
        await loop.sock_sendall(sock, data[at : at + 200_000])
        await asyncio.sleep(0)
    if close:
        sock.close()


async def receive(tmp_path: Path, data: bytes, count: int, close: bool,
                  idle_timeout: float = 5.0) -> tuple[bytes, list[int]]:  # fmt: skip
    """What ``splice_to_file`` wrote at offset 7 of a file, and its progress calls."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    path = tmp_path / "segment"
    path.write_bytes(b"x" * 7)
    fd = os.open(path, os.O_WRONLY)
    progress: list[int] = []
    sender = asyncio.create_task(feed(theirs, data, close))
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
    written, progress = await receive(tmp_path, DATA, len(DATA), close=False)
    assert written == b"x" * 7 + DATA
    assert sum(progress) == len(DATA) and max(progress) <= PIPE_SIZE
    assert open_fds() == before  # the pipe is closed


async def test_bytes_past_the_count_stay_in_the_socket(tmp_path: Path) -> None:
    written, _ = await receive(tmp_path, DATA, len(DATA) - 100, close=False)
    assert written == b"x" * 7 + DATA[:-100]


async def test_a_run_cut_short_raises_after_writing_what_came(tmp_path: Path) -> None:
    before = open_fds()
    with pytest.raises(asyncio.IncompleteReadError) as cut:
        await receive(tmp_path, DATA[:PIPE_SIZE + 5], len(DATA), close=True)
    assert cut.value.expected == len(DATA) - PIPE_SIZE - 5
    assert (tmp_path / "segment").read_bytes() == b"x" * 7 + DATA[:PIPE_SIZE + 5]
    assert open_fds() == before


async def test_a_silent_socket_times_out(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError):
        await receive(tmp_path, DATA[:1000], len(DATA), close=False, idle_timeout=0.3)
    assert (tmp_path / "segment").read_bytes() == b"x" * 7 + DATA[:1000]


async def test_a_slow_but_steady_run_outlasting_the_idle_timeout_completes(
    tmp_path: Path,
) -> None:
    """The idle timeout is per silence, not per run: parts 0.15 s apart for over a second,
    with 0.4 s allowed between bytes."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    data = DATA[: 8 * 1000]
    path = tmp_path / "segment"
    path.write_bytes(b"")
    fd = os.open(path, os.O_WRONLY)

    async def trickle() -> None:
        loop = asyncio.get_running_loop()
        for at in range(0, len(data), 1000):
            await asyncio.sleep(0.15)
            await loop.sock_sendall(theirs, data[at : at + 1000])

    sender = asyncio.create_task(trickle())
    started = asyncio.get_running_loop().time()
    try:
        await splice_to_file(ours.fileno(), fd, 0, len(data), 0.4, lambda n: None)
    finally:
        await sender
        os.close(fd)
        ours.close()
        theirs.close()
    assert asyncio.get_running_loop().time() - started > 1.0
    assert path.read_bytes() == data


async def test_a_run_that_goes_silent_times_out_after_its_last_byte(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    path = tmp_path / "segment"
    path.write_bytes(b"")
    fd = os.open(path, os.O_WRONLY)
    loop = asyncio.get_running_loop()

    async def then_silence() -> None:
        await asyncio.sleep(0.2)
        theirs.sendall(DATA[:1000])

    sender = asyncio.create_task(then_silence())
    started = loop.time()
    try:
        with pytest.raises(TimeoutError):
            await splice_to_file(ours.fileno(), fd, 0, len(DATA), 0.3, lambda n: None)
    finally:
        await sender
        os.close(fd)
        ours.close()
        theirs.close()
    assert loop.time() - started >= 0.45  # 0.2 s to the byte, then 0.3 s of silence
    assert path.read_bytes() == DATA[:1000]
