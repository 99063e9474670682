"""Each segment torrent names 2 of the trackers (rendezvous on its info-hash); libtorrent
announces to both, so with either one stopped a new peer still finds the swarm."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from pathlib import Path

import libtorrent as lt
from support import until

from p2p_mirror.core.clusterauth import TRACKER, ClusterAuth
from p2p_mirror.core.config import HostPort, TrackerConfig
from p2p_mirror.core.swarm import Metainfo, TorrentSession, make_torrent
from p2p_mirror.seeder import tracker_shard
from p2p_mirror.tracker import server


def test_shards_are_two_distinct_trackers_spread_evenly_and_keep_the_info_hash(
    tmp_path: Path,
) -> None:
    trackers = [f"http://198.18.0.{i}:6969/announce" for i in range(2, 6)]
    path = tmp_path / "segment"
    path.write_bytes(random.Random(1).randbytes(100_000))
    plain = make_torrent(path, (), 32 * 1024)
    sharded = tracker_shard.shard(plain, trackers)
    meta = Metainfo.parse(sharded)
    assert meta.info_hash == Metainfo.parse(plain).info_hash
    tiers = lt.bdecode(sharded)[b"announce-list"]
    assert [[t.decode() for t in tier] for tier in tiers] == [
        [url] for url in tracker_shard.trackers_for(meta.info_hash, trackers)]  # fmt: skip
    load = Counter(
        url for i in range(4000)
        for url in tracker_shard.trackers_for(f"{i:040x}", trackers)
    )  # fmt: skip
    assert set(load) == set(trackers)
    assert all(abs(n - 2000) < 200 for n in load.values()), load  # 2 of 4 each: half
    assert tracker_shard.trackers_for("ab" * 20, trackers[:1]) == trackers[:1]


async def test_either_tracker_of_a_torrent_finds_its_swarm(tmp_path: Path) -> None:
    trackers = [await server.start(TrackerConfig(listen=HostPort("127.0.0.1", 0), interval=1.0,
                                                 peer_ttl=30.0)) for _ in range(3)]  # fmt: skip
    urls = [t.url for t in trackers]
    (tmp_path / "seed").mkdir()
    (tmp_path / "leech").mkdir()
    data = random.randbytes(512 * 1024 + 17)
    (tmp_path / "seed" / "blob").write_bytes(data)
    meta = Metainfo.parse(tracker_shard.shard(
        make_torrent(tmp_path / "seed" / "blob", (), 64 * 1024), urls))  # fmt: skip
    chosen = tracker_shard.trackers_for(meta.info_hash, urls)
    ih = bytes.fromhex(meta.info_hash)
    swarms = [t.service.table.swarms for t in trackers]
    seeder = TorrentSession(HostPort("127.0.0.1", 0))
    leecher = TorrentSession(HostPort("127.0.0.1", 0))
    try:
        await seeder.start()
        await leecher.start()
        seeder.add(meta, tmp_path / "seed", seed=True)
        # both chosen trackers know the seed; the third tracker never hears of the torrent
        await until(lambda: all(ih in swarms[urls.index(u)] and swarms[urls.index(u)][ih].seeders
                                for u in chosen), 20, "announces to both trackers")  # fmt: skip
        other = next(u for u in urls if u not in chosen)
        assert ih not in swarms[urls.index(other)]
        # the shard is lost: a new peer still finds the seed through the standby
        await trackers[urls.index(chosen[0])].close()
        transfer = leecher.add(meta, tmp_path / "leech", seed=False)
        for piece in range(meta.num_pieces):
            assert await transfer.wait_piece(piece, timeout=20)
        assert await transfer.read_pieces(0, meta.num_pieces) == data
    finally:
        await leecher.close()
        await seeder.close()
        for t in trackers:
            await t.close()


async def test_the_tracker_records_the_announced_node_address(tmp_path: Path) -> None:
    """A session given ``announce_ip`` names it in its announces (``ip=``), so a tracker
    behind a NAT records the node, not the address the NAT made of it (the tracker believes
    ``ip=`` only from an announce with the cluster's token)."""
    auth = ClusterAuth(b"cluster secret of this test", "tracker")
    tracker = await server.start(TrackerConfig(listen=HostPort("127.0.0.1", 0), interval=1.0,
                                               peer_ttl=30.0), auth)  # fmt: skip
    (tmp_path / "blob").write_bytes(random.randbytes(100_000))
    url = f"{tracker.url}?token={auth.token(TRACKER)}"
    torrent = make_torrent(tmp_path / "blob", (), 32 * 1024)
    meta = Metainfo.parse(tracker_shard.shard(torrent, [url]))
    session = TorrentSession(HostPort("127.0.0.1", 0), announce_ip="198.18.0.77")
    swarms = tracker.service.table.swarms
    ih = bytes.fromhex(meta.info_hash)
    try:
        await session.start()
        session.add(meta, tmp_path, seed=True)
        await until(lambda: ih in swarms and swarms[ih].seeders, 20, "the announce")
        assert [ipaddress.ip_address(a[:4]) for a in swarms[ih].seeds4.addresses()] == [
            ipaddress.ip_address("198.18.0.77")]
    finally:
        await session.close()
        await tracker.close()
