"""Shutting a libtorrent session down never hangs (real sessions on loopback): an agent or
seeder that hangs on SIGTERM holds its pod in Terminating and a rollout with it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from support import SUPPORT

from p2p_mirror.core.config import HostPort
from p2p_mirror.core.swarm import TorrentSession


async def test_close_ends_when_an_alert_wakes_the_loop_at_that_moment() -> None:
    """An alert's wake-up and shutdown in the same turn of the loop (an earlier pump task
    swallowed its cancellation then, and close() never returned); the alert pipe is closed
    and nothing reads it afterwards."""
    swarm = TorrentSession(HostPort("127.0.0.1", 0))
    await swarm.start()
    await asyncio.sleep(0.05)  # the loop is waiting for a wake-up
    swarm.session.post_session_stats()  # libtorrent writes to the alert pipe for it
    closing = asyncio.create_task(swarm.close())
    done, _ = await asyncio.wait([closing], timeout=5)
    assert closing in done
    await closing
    assert swarm._wake_fds is None


async def test_alerts_reach_the_loop_without_a_poll() -> None:
    """Each alert is dispatched as libtorrent queues it: the pipe wakes the loop (no timer
    would pop them within 0.2 s)."""
    swarm = TorrentSession(HostPort("127.0.0.1", 0))
    await swarm.start()
    try:
        for round_ in range(1, 4):
            swarm.session.post_session_stats()
            async with asyncio.timeout(0.2):
                while swarm.alert_counts["session_stats_alert"] < round_:
                    await asyncio.sleep(0.005)
    finally:
        await swarm.close()


def test_sessions_that_just_passed_a_torrent_close_every_time(tmp_path: Path) -> None:
    """40 times: seed, download, close both while the download's last alerts come in. The
    old close() deadlocked on libtorrent's alert lock in most runs of 20."""
    proc = subprocess.run(
        [sys.executable, str(SUPPORT / "swarm_cycles.py"), str(tmp_path), "40"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(tmp_path.iterdir())) == 40
