"""Issue 19, probe 3 on real libtorrent: a plain BitTorrent client that knows only a
segment's info-hash connects straight to an agent and gets no byte (no metadata exchange).
The control run gives the same client the torrent file and shows the agent does serve a
peer that has it, so the first result is not a dead connection."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import libtorrent as lt
import pytest

from p2p_mirror.core.config import HostPort
from p2p_mirror.core.swarm import Metainfo, TorrentSession, make_torrent

PIECE = 32 * 1024


def intruder() -> lt.session:
    """A stock libtorrent session: default plugins (ut_metadata, ut_pex), as an attacker has."""
    return lt.session({
        "listen_interfaces": "127.0.0.1:0", "enable_dht": False, "enable_lsd": False,
        "enable_upnp": False, "enable_natpmp": False, "enable_outgoing_utp": False,
        "enable_incoming_utp": False, "allow_multiple_connections_per_ip": True,
    })  # fmt: skip


async def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.2)
    return predicate()


def public_torrent(path: Path) -> bytes:
    """A torrent without the private flag, as agents cached before torrents were private."""
    ct = lt.create_torrent([lt.create_file_entry(path.name, path.stat().st_size)], PIECE,
                           lt.create_torrent.v1_only)  # fmt: skip
    lt.set_piece_hashes(ct, str(path.parent))
    return lt.bencode(ct.generate())


@pytest.mark.parametrize("private", [True, False], ids=["private", "old-public-torrent"])
async def test_probe3_an_info_hash_alone_gets_no_byte_from_an_agent(
    tmp_path: Path, private: bool
) -> None:
    """Private torrents keep ut_metadata off for them; a session without the default plugins
    keeps it off for a torrent made before that (re-seeded from the cache)."""
    src = tmp_path / "agent"
    src.mkdir()
    (src / "segment").write_bytes(os.urandom(16 * PIECE))
    data = (make_torrent(src / "segment", ["http://127.0.0.1:9/announce"], PIECE) if private
            else public_torrent(src / "segment"))  # fmt: skip
    meta = Metainfo.parse(data)
    assert lt.torrent_info(lt.bdecode(meta.data)).priv() == private
    agent = TorrentSession(HostPort("127.0.0.1", 0))
    await agent.start()
    try:
        agent.add(meta, src, seed=True, announce=False)

        stranger = intruder()
        params = lt.add_torrent_params()
        params.info_hashes = lt.info_hash_t(lt.sha1_hash(bytes.fromhex(meta.info_hash)))
        params.save_path = str(tmp_path / "stranger")
        handle = stranger.add_torrent(params)
        handle.connect_peer(("127.0.0.1", agent.port))
        connected = await wait_for(lambda: bool(handle.get_peer_info()), 10)
        await asyncio.sleep(5)  # time enough for a metadata exchange on loopback
        status = handle.status()
        assert not status.has_metadata
        assert status.total_payload_download == 0
        assert not (tmp_path / "stranger" / meta.name).exists()

        # Control: the same client with the torrent file gets the bytes.
        holder = intruder()
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(lt.bdecode(meta.data))
        params.save_path = str(tmp_path / "holder")
        got = holder.add_torrent(params)
        got.connect_peer(("127.0.0.1", agent.port))
        assert await wait_for(lambda: got.status().is_seeding, 20)
        assert connected or got.status().total_payload_download > 0
    finally:
        await agent.close()


def test_announce_urls_carry_the_tracker_token_and_keep_the_info_hash(tmp_path: Path) -> None:
    from urllib.parse import parse_qs, urlsplit

    from p2p_mirror.core.clusterauth import TRACKER, ClusterAuth
    from p2p_mirror.seeder.server import with_tracker_token

    token = ClusterAuth(b"k" * 32, "test").token(TRACKER)
    url = with_tracker_token("http://10.0.0.1:6969/announce?token=old&x=1", token)
    assert parse_qs(urlsplit(url).query) == {"token": [token], "x": ["1"]}
    assert with_tracker_token("http://10.0.0.1:6969/announce", "") == \
        "http://10.0.0.1:6969/announce"  # fmt: skip
    (tmp_path / "segment").write_bytes(os.urandom(4 * PIECE))
    plain = Metainfo.parse(make_torrent(tmp_path / "segment", ["http://t/announce"], PIECE))
    signed = make_torrent(tmp_path / "segment", [with_tracker_token("http://t/announce", token)],
                          PIECE)  # fmt: skip
    assert Metainfo.parse(signed).info_hash == plain.info_hash
    decoded = lt.bdecode(signed)
    assert decoded[b"announce"] == f"http://t/announce?token={token}".encode()

