"""Start two sessions, pass a torrent from one to the other, close both; N times over.

``python tests/support/swarm_cycles.py DIR N`` exits 0 when all N cycles ended. A shutdown that
deadlocks (libtorrent's alert lock against the GIL) cannot be interrupted from inside the
process, so the shutdown test runs this in a subprocess with a time limit.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from p2p_mirror.core.config import HostPort
from p2p_mirror.core.swarm import Metainfo, TorrentSession, make_torrent

PIECE = 32 * 1024


async def cycle(workdir: Path) -> None:
    src, dst = workdir / "src", workdir / "dst"
    src.mkdir(parents=True)
    dst.mkdir()
    (src / "segment").write_bytes(os.urandom(8 * PIECE))
    meta = Metainfo.parse(make_torrent(src / "segment", ["http://127.0.0.1:9/announce"], PIECE))
    seeder, agent = (
        TorrentSession(HostPort("127.0.0.1", 0)),
        TorrentSession(HostPort("127.0.0.1", 0)),
    )
    await seeder.start()
    await agent.start()
    try:
        seeder.add(meta, src, seed=True, announce=False)
        got = agent.add(meta, dst, seed=False, announce=False, peers=[("127.0.0.1", seeder.port)])
        for piece in range(meta.num_pieces):
            if not await got.wait_piece(piece, timeout=10):
                raise SystemExit(f"piece {piece} never came")
    finally:
        # Closing while the download's last alerts are still being posted is the race.
        await agent.close()
        await seeder.close()


async def main(workdir: Path, cycles: int) -> None:
    for i in range(cycles):
        await cycle(workdir / str(i))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
