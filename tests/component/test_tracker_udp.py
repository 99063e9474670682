"""The UDP tracker (BEP 15) on real sockets, and real libtorrent sessions announcing over
``udp://`` with the cluster token in BEP 41 URL data."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest
from support import until
from test_tracker import IH, add, compact4, lt_session, make_torrent, pid

from lab.procs import free_port
from p2p_mirror.core.clusterauth import TRACKER, ClusterAuth
from p2p_mirror.core.config import HostPort, TrackerConfig
from p2p_mirror.tracker import server
from p2p_mirror.tracker.server import RunningTracker
from p2p_mirror.tracker.udp import ANNOUNCE, CONNECT, ERROR, PROTOCOL_ID, SCRAPE

SECRET = b"s3cret-s3cret-s3cret"


class UdpClient:
    """A BEP 15 client on one socket bound to ``source``: connect once, reuse the ID."""

    def __init__(self, port: int, source: str = "127.0.0.1", tracker: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET,
                                  socket.SOCK_DGRAM)  # fmt: skip
        self.sock.bind((source, 0))
        self.sock.settimeout(2)
        self.target = (tracker, port)
        self.cid = b""
        self.txn = random.getrandbits(32)

    def close(self) -> None:
        self.sock.close()

    def ask(self, datagram: bytes) -> bytes | None:
        self.sock.sendto(datagram, self.target)
        try:
            return self.sock.recv(4096)
        except TimeoutError:
            return None

    def connect(self) -> bytes:
        reply = self.ask(struct.pack(">QII", PROTOCOL_ID, CONNECT, self.txn))
        assert reply is not None and len(reply) == 16
        assert struct.unpack(">II", reply[:8]) == (CONNECT, self.txn)
        self.cid = reply[8:]
        return self.cid

    def announce_datagram(self, info_hash: bytes = IH, n: int = 1, left: int = 100,
                          event: int = 0, ip: int = 0, port: int | None = None,
                          numwant: int = -1, url_data: bytes = b"") -> bytes:  # fmt: skip
        body = struct.pack(">II20s20sqqqiIIiH", ANNOUNCE, self.txn, info_hash, pid(n), 0, left,
                           0, event, ip, 0, numwant,
                           10000 + n if port is None else port)  # fmt: skip
        options = b"".join(b"\x02" + bytes([len(c)]) + c
                           for c in (url_data[i : i + 255] for i in range(0, len(url_data), 255)))
        return self.cid + body + options

    def announce(self, **kw: Any) -> tuple[int, int, int, bytes]:
        """(interval, leechers, seeders, compact peers); fails on an error answer."""
        reply = self.ask(self.announce_datagram(**kw))
        assert reply is not None, "no answer"
        action, txn = struct.unpack(">II", reply[:8])
        assert action == ANNOUNCE, reply[8:]
        assert txn == self.txn
        interval, leechers, seeders = struct.unpack(">III", reply[8:20])
        return interval, leechers, seeders, reply[20:]


@asynccontextmanager
async def udp_tracker(secret: bytes | None = None, host: str = "127.0.0.1",
                      **cfg: Any) -> AsyncIterator[RunningTracker]:  # fmt: skip
    running = await server.start(TrackerConfig(listen=HostPort(host, 0), **cfg),
                                 ClusterAuth(secret, "tracker"))  # fmt: skip
    try:
        yield running
    finally:
        await running.close()


async def in_thread(fn: Any, *args: Any, **kw: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kw)


async def test_udp_shares_the_http_port_and_swarm() -> None:
    async with udp_tracker(interval=30.0, seed_interval=1800.0) as running:
        port = running.listen.port
        assert running.udp_url == f"udp://127.0.0.1:{port}/announce"
        a, b = UdpClient(port), UdpClient(port, "127.0.0.2")
        try:
            await in_thread(a.connect)
            await in_thread(b.connect)
            interval, leechers, seeders, peers = await in_thread(a.announce, n=1, left=0,
                                                                 event=2)  # fmt: skip
            assert (interval, leechers, seeders, peers) == (1800, 0, 1, b"")  # seed: long one
            interval, leechers, seeders, peers = await in_thread(b.announce, n=2, left=5)
            assert (interval, leechers, seeders) == (30, 1, 1)
            assert compact4(peers) == [("127.0.0.1", 10001)]  # 6-byte peers on IPv4
            # the same swarm the HTTP side serves
            assert running.service.table.swarms[IH].seeders == 1
            # scrape names its hashes; seeders, completed, leechers
            reply = await in_thread(b.ask, b.cid + struct.pack(">II", SCRAPE, 7) + IH
                                    + bytes(20) + IH)  # fmt: skip
            assert reply is not None  # one entry per hash asked, in order, repeats too
            assert struct.unpack(">II9I", reply) == (SCRAPE, 7, 1, 0, 1, 0, 0, 0, 1, 0, 1)
        finally:
            a.close()
            b.close()


async def test_ipv6_clients_get_18_byte_peers_ipv4_ones_6_byte_on_a_dual_stack_port() -> None:
    async with udp_tracker(host="::") as running:
        port = running.listen.port
        v6a, v6b = UdpClient(port, "::1", "::1"), UdpClient(port, "::1", "::1")
        v4 = UdpClient(port)
        try:
            for c in (v6a, v6b, v4):
                await in_thread(c.connect)
            await in_thread(v6a.announce, n=1)
            await in_thread(v4.announce, n=3)
            _, leechers, _, peers = await in_thread(v6b.announce, n=2)
            assert leechers == 3 and len(peers) == 18  # only the IPv6 peer, 18 bytes
            assert peers[:16] == socket.inet_pton(socket.AF_INET6, "::1")
            assert int.from_bytes(peers[16:], "big") == 10001
            _, _, _, peers = await in_thread(v4.announce, n=3)
            assert compact4(peers) == []  # no IPv4 peer but itself
        finally:
            for c in (v6a, v6b, v4):
                c.close()


async def test_forged_stale_and_other_address_connection_ids_get_no_answer() -> None:
    async with udp_tracker() as running:
        port = running.listen.port
        a, b = UdpClient(port), UdpClient(port, "127.0.0.2")
        ids = running.udp.tracker.ids
        now = [6000.5]  # 0.5 s into a 60 s window
        ids.clock = lambda: now[0]
        try:
            await in_thread(a.connect)
            b.cid = bytes(8)
            assert await in_thread(b.ask, b.announce_datagram()) is None  # forged
            b.cid = a.cid  # a's ID from another address: a spoofer who saw it
            assert await in_thread(b.ask, b.announce_datagram()) is None
            # connect without the protocol id: silence (not a BEP 15 client)
            assert await in_thread(b.ask, struct.pack(">QII", 1, CONNECT, 5)) is None
            now[0] += 119  # the next window: the ID still works
            assert (await in_thread(a.announce))[1] == 1
            now[0] += 1  # two windows on: expired, no answer
            assert await in_thread(a.ask, a.announce_datagram()) is None
            assert running.service.table.swarms[IH].leechers == 1  # only the valid announce
        finally:
            a.close()
            b.close()


async def test_token_in_url_data_and_ip_field_only_believed_with_it() -> None:
    token = ClusterAuth(SECRET, "t").token(TRACKER)
    async with udp_tracker(SECRET) as running:
        c = UdpClient(running.listen.port)
        try:
            await in_thread(c.connect)
            # no token, wrong token: an error datagram with the reason, no peer recorded
            for data in (b"/announce", b"/announce?token=nope"):
                reply = await in_thread(c.ask, c.announce_datagram(url_data=data))
                assert reply is not None and struct.unpack(">I", reply[:4])[0] == ERROR
                assert b"token" in reply[8:]
            assert IH not in running.service.table.swarms
            assert running.service.metrics.value("refused_total", reason="auth") == 2
            # the right token; the IP field (10.9.8.7) is believed
            await in_thread(c.announce, ip=0x0A090807,
                            url_data=f"/announce?token={token}".encode())  # fmt: skip
            other = UdpClient(running.listen.port, "127.0.0.3")
            await in_thread(other.connect)
            _, _, _, peers = await in_thread(other.announce, n=2,
                                             url_data=f"/announce?token={token}".encode())
            other.close()
            assert compact4(peers) == [("10.9.8.7", 10001)]
            # scrapes carry no URL data: refused when a secret is set
            reply = await in_thread(c.ask, c.cid + struct.pack(">II", SCRAPE, 1) + IH)
            assert reply is not None and struct.unpack(">I", reply[:4])[0] == ERROR
        finally:
            c.close()


async def test_ip_field_ignored_without_a_secret_and_malformed_get_errors() -> None:
    async with udp_tracker() as running:
        c = UdpClient(running.listen.port)
        try:
            await in_thread(c.connect)
            await in_thread(c.announce, ip=0x0A090807)
            swarm = running.service.table.swarms[IH]
            assert b"\x0a\x09\x08\x07" not in bytes(swarm.leechers4.addrs)
            for bad in (c.announce_datagram()[:60],  # truncated
                        c.announce_datagram(port=0),
                        c.announce_datagram(event=9),
                        c.cid + struct.pack(">II", 77, 1),  # unknown action
                        c.cid + struct.pack(">II", SCRAPE, 1) + b"short"):  # fmt: skip
                reply = await in_thread(c.ask, bad)
                assert reply is not None and struct.unpack(">I", reply[:4])[0] == ERROR, bad
            assert await in_thread(c.ask, b"tiny") is None
            # still serving
            assert (await in_thread(c.announce, n=3))[1] == 2
        finally:
            c.close()


async def test_rate_limit_applies_per_source_after_the_connection_id() -> None:
    async with udp_tracker(announce_rate=0.001, announce_burst=2) as running:
        c = UdpClient(running.listen.port)
        try:
            await in_thread(c.connect)
            await in_thread(c.announce, n=1)
            await in_thread(c.announce, n=2)
            reply = await in_thread(c.ask, c.announce_datagram(n=3))
            assert reply is not None and struct.unpack(">I", reply[:4])[0] == ERROR
            assert running.service.metrics.value("refused_total", reason="rate") == 1
            # forged-ID datagrams claiming another source do not drain its bucket
            other = UdpClient(running.listen.port, "127.0.0.4")
            other.cid = bytes(8)
            for _ in range(5):
                assert await in_thread(other.ask, other.announce_datagram()) is None
            await in_thread(other.connect)
            await in_thread(other.announce, n=4)
            other.close()
        finally:
            c.close()


async def test_trackers_sharing_the_secret_accept_each_others_ids() -> None:
    """libtorrent reuses an ID per tracker address: a restarted tracker (or a sibling on the
    same address) must accept it, or the client hears nothing for a minute."""
    token = f"/announce?token={ClusterAuth(SECRET, 't').token(TRACKER)}".encode()
    async with udp_tracker(SECRET) as first:
        c = UdpClient(first.listen.port)
        await in_thread(c.connect)
    async with udp_tracker(SECRET) as restarted, udp_tracker() as open_one:
        try:
            c.target = ("127.0.0.1", restarted.listen.port)
            assert (await in_thread(c.announce, url_data=token))[1] == 1
            c.target = ("127.0.0.1", open_one.listen.port)  # another key: silence
            assert await in_thread(c.ask, c.announce_datagram()) is None
        finally:
            c.close()


# --- real libtorrent sessions over udp:// ---------------------------------------------------


# libtorrent caches a connection ID per tracker IP for 60 s in a process-wide map, so each
# case gets a tracker address of its own: a tracker with another key would drop the ID.
@pytest.mark.integration
@pytest.mark.parametrize(("secret", "host"), [(None, "127.0.0.5"), (SECRET, "127.0.0.6")])
async def test_libtorrent_swarm_over_udp(tmp_path: Path, secret: bytes | None, host: str) -> None:
    auth = ClusterAuth(secret, "tracker")
    cfg = TrackerConfig(listen=HostPort(host, 0), interval=1.0, peer_ttl=5.0,
                        seed_interval=1.0, seed_peer_ttl=5.0)  # fmt: skip
    running = await server.start(cfg, auth)
    svc = running.service
    udp = running.udp.tracker
    url_data: list[bytes] = []  # the BEP 41 URL data libtorrent sent
    answer = udp.answer

    def record(data: bytes, host: str) -> Any:
        if len(data) > 98 and data[8:12] == struct.pack(">I", ANNOUNCE):
            url_data.append(data[98:])
        return answer(data, host)

    udp.answer = record  # type: ignore[method-assign]
    http_requests: list[bytes] = []
    handle_http = svc.handle
    svc.handle = lambda p, q, s: http_requests.append(p) or handle_http(p, q, s)  # type: ignore
    announce = running.udp_url + (f"?token={auth.token(TRACKER)}" if secret else "")
    seed_dir, leech_dir, intruder_dir = tmp_path / "seed", tmp_path / "leech", tmp_path / "x"
    for d in (seed_dir, leech_dir, intruder_dir):
        d.mkdir()
    data = random.randbytes(2 * 1024 * 1024 + 321)
    (seed_dir / "blob").write_bytes(data)
    ti = make_torrent(seed_dir / "blob", announce, "v1")
    ih = ti.info_hashes().v1.to_bytes()
    table = svc.table
    seeder, leecher = lt_session(free_port()), lt_session(free_port())
    intruder = lt_session(free_port())
    try:
        add(seeder, ti, seed_dir)
        await until(lambda: ih in table.swarms and table.swarms[ih].seeders == 1, 40,
                    "the seeder's UDP announce")  # fmt: skip
        h = add(leecher, lt.torrent_info(ti), leech_dir)
        await until(lambda: h.status().is_seeding, 60, "the leecher to finish")
        assert (leech_dir / "blob").read_bytes() == data
        await until(lambda: table.swarms[ih].seeders == 2 and table.swarms[ih].downloaded == 1,
                    20, "the completed announce")  # fmt: skip
        assert http_requests == []  # it was all UDP
        if secret:
            # libtorrent sends the URL's path and query as one BEP 41 URL data option
            want = f"/announce?token={auth.token(TRACKER)}".encode()
            assert url_data and all(o == b"\x02" + bytes([len(want)]) + want for o in url_data)
            # an intruder that knows the tracker but not the token gets no peers
            bad = make_torrent(seed_dir / "blob", running.udp_url, "v1")  # same info-hash
            assert bad.info_hashes().v1.to_bytes() == ih
            ih_ = add(intruder, bad, intruder_dir)
            await until(lambda: svc.metrics.value("refused_total", reason="auth") >= 1, 20,
                        "the intruder's refused announce")  # fmt: skip
            await asyncio.sleep(1)
            assert ih_.status().num_peers == 0
            assert table.swarms[ih].seeders == 2 and table.swarms[ih].leechers == 0
    finally:
        for ses in (intruder, leecher, seeder):
            for t in ses.get_torrents():
                ses.remove_torrent(t)
        del seeder, leecher, intruder
        await running.close()
