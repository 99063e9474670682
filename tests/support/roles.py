"""Real roles run in-process for component tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from p2p_mirror.core.config import SeederConfig, load_config
from p2p_mirror.seeder.server import Seeder


@contextlib.asynccontextmanager
async def running_seeder(
    data_dir: Path, registries: dict[str, str], **extra: object
) -> AsyncIterator[tuple[Seeder, TestClient]]:
    """A real seeder (libtorrent on loopback, never announcing) fetching from ``registries``,
    with a test client for its API."""
    cfg = load_config(SeederConfig, None, {
        "data_dir": str(data_dir), "tracker": ["http://127.0.0.1:9/announce"],
        "bt_listen": "127.0.0.1:0", "registries": registries, **extra,
    })  # fmt: skip
    seeder = Seeder(cfg)
    await seeder.start()
    client = TestClient(TestServer(seeder.app(), host="127.0.0.1"))
    await client.start_server()
    try:
        yield seeder, client
    finally:
        await client.close()
        await seeder.close()
