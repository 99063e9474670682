"""The BitTorrent HTTP tracker: protocol over real HTTP, a real libtorrent swarm, the CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import random
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import aiohttp
import libtorrent as lt
import pytest
import yarl
from support import require_binaries, until

from lab.procs import Proc, free_port, port_open
from p2p_mirror.core.clusterauth import TRACKER, ClusterAuth
from p2p_mirror.core.config import HostPort, TrackerConfig
from p2p_mirror.core.metrics import parse_samples, sample_sum
from p2p_mirror.tracker import server
from p2p_mirror.tracker.params import Announce
from p2p_mirror.tracker.peers import PeerTable
from p2p_mirror.tracker.server import TrackerService

IH = bytes(range(20))
IH2 = hashlib.sha1(b"other").digest()


def pid(n: int) -> bytes:
    return b"-TT0001-" + n.to_bytes(12, "big")


def query(**params: Any) -> str:
    """A raw query string; bytes are percent-encoded byte by byte like a BitTorrent client."""
    parts = []
    for name, value in params.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            raw = v if isinstance(v, bytes) else str(v).encode()
            parts.append(f"{name}={quote_from_bytes(raw, safe='')}")
    return "&".join(parts)


SECRET = b"s3cret-s3cret-s3cret"


class Client:
    """Announce/scrape over real HTTP to an in-process tracker; ``token`` is added to every
    announce and scrape unless a call passes its own."""

    def __init__(self, http: aiohttp.ClientSession, base: str, svc: TrackerService,
                 token: str = "") -> None:  # fmt: skip
        self.http = http
        self.base = base
        self.svc = svc
        self.token = token

    async def get(self, path: str, raw_query: str = "") -> dict[bytes, Any]:
        if self.token and path in ("/announce", "/scrape") and "token=" not in raw_query:
            raw_query = "&".join(q for q in (raw_query, f"token={self.token}") if q)
        url = yarl.URL(self.base + (f"{path}?{raw_query}" if raw_query else path), encoded=True)
        async with self.http.get(url) as resp:
            assert resp.status == 200, await resp.text()
            return lt.bdecode(await resp.read())

    async def announce(
        self, info_hash: bytes = IH, n: int = 1, port: int | None = None, left: int = 100, **kw: Any
    ) -> dict[bytes, Any]:
        params: dict[str, Any] = {
            "info_hash": info_hash,
            "peer_id": pid(n),
            "port": port if port is not None else 10000 + n,
            "uploaded": 0,
            "downloaded": 0,
            "left": left,
        }
        params.update(kw)
        body = await self.get("/announce", query(**params))
        assert b"failure reason" not in body, body
        return body

    async def scrape(self, *hashes: bytes) -> dict[bytes, Any]:
        body = await self.get("/scrape", query(info_hash=list(hashes)))
        assert b"failure reason" not in body, body
        return body[b"files"]

    async def metric(self, name: str, **labels: str) -> float:
        async with self.http.get(self.base + "/metrics") as resp:
            text = await resp.text()
        assert [s for s in parse_samples(text) if s.name == name], f"metric {name} missing"
        return sample_sum(text, name, **labels)


@asynccontextmanager
async def tracker_client(secret: bytes | None = None, **cfg: Any) -> AsyncIterator[Client]:
    auth = ClusterAuth(secret, "tracker")
    running = await server.start(TrackerConfig(listen=HostPort("127.0.0.1", 0), **cfg), auth)
    try:
        async with aiohttp.ClientSession() as http:
            yield Client(http, f"http://127.0.0.1:{running.listen.port}", running.service,
                         auth.token(TRACKER))  # fmt: skip
    finally:
        await running.close()


def compact4(blob: bytes) -> list[tuple[str, int]]:
    assert len(blob) % 6 == 0
    return [
        (str(ipaddress.IPv4Address(blob[i : i + 4])), int.from_bytes(blob[i + 4 : i + 6], "big"))
        for i in range(0, len(blob), 6)
    ]


def compact6(blob: bytes) -> list[tuple[str, int]]:
    assert len(blob) % 18 == 0
    return [
        (str(ipaddress.IPv6Address(blob[i : i + 16])), int.from_bytes(blob[i + 16 : i + 18], "big"))
        for i in range(0, len(blob), 18)
    ]


# --- announce -------------------------------------------------------------------------------


async def test_compact_announce_returns_other_peers_not_self() -> None:
    async with tracker_client(interval=20.0) as c:
        first = await c.announce(n=1, left=0, event="started")
        assert first[b"peers"] == b""
        body = await c.announce(n=2, event="started")
        assert body[b"interval"] == 20
        assert 1 <= body[b"min interval"] <= 20
        assert compact4(body[b"peers"]) == [("127.0.0.1", 10001)]
        assert (body[b"complete"], body[b"incomplete"]) == (1, 1)
        assert b"peers6" not in body
        # the seeder hears about the leecher, never about itself
        again = await c.announce(n=1, left=0)
        assert compact4(again[b"peers"]) == [("127.0.0.1", 10002)]


async def test_dict_form_with_and_without_peer_id() -> None:
    async with tracker_client() as c:
        await c.announce(n=1, left=0)
        # peer ids are not kept (clients learn them in the handshake): never in the answer
        body = await c.announce(n=2, compact=0)
        assert body[b"peers"] == [{b"ip": b"127.0.0.1", b"port": 10001}]
        body = await c.announce(n=2, compact=0, no_peer_id=1)
        assert body[b"peers"] == [{b"ip": b"127.0.0.1", b"port": 10001}]


async def test_numwant_default_explicit_zero_and_cap() -> None:
    async with tracker_client(max_numwant=30) as c:
        for n in range(1, 71):
            await c.announce(n=n, left=n % 2 * 100)
        assert len(compact4((await c.announce(n=100))[b"peers"])) == 30  # default 50, cap 30
        assert len(compact4((await c.announce(n=100, numwant=7))[b"peers"])) == 7
        assert len(compact4((await c.announce(n=100, numwant=500))[b"peers"])) == 30
        assert (await c.announce(n=100, numwant=0))[b"peers"] == b""
    async with tracker_client() as c:
        for n in range(1, 71):
            await c.announce(n=n)
        assert len(compact4((await c.announce(n=100))[b"peers"])) == 50


async def test_leechers_get_seeders_first_and_seeders_get_only_leechers() -> None:
    async with tracker_client() as c:
        seeders = {10000 + n for n in range(1, 11)}
        leechers = {10000 + n for n in range(11, 21)}
        for n in range(1, 21):
            await c.announce(n=n, left=0 if n <= 10 else 50)
        for _ in range(5):  # half seeders (rounded up), half leechers
            got = {port for _, port in compact4((await c.announce(n=50, numwant=4))[b"peers"])}
            assert len(got & seeders) == 2 and len(got & leechers) == 2
            got = {port for _, port in compact4((await c.announce(n=50, numwant=15))[b"peers"])}
            assert len(got & seeders) == 8 and len(got & leechers) == 7
        # more wanted than there are: everyone but the asker
        got = {port for _, port in compact4((await c.announce(n=50, numwant=30))[b"peers"])}
        assert got == seeders | leechers
        got = {port for _, port in compact4((await c.announce(n=1, left=0))[b"peers"])}
        assert got == leechers | {10050}


async def test_stopped_removes_peer_and_completed_counts_once() -> None:
    async with tracker_client() as c:
        await c.announce(n=1, left=0, event="started")
        await c.announce(n=2, event="started")
        await c.announce(n=2, left=0, event="completed")
        await c.announce(n=2, left=0, event="completed")  # a repeat must not count twice
        assert (await c.scrape(IH))[IH] == {b"complete": 2, b"incomplete": 0, b"downloaded": 1}
        body = await c.announce(n=1, left=0, event="stopped")
        assert body[b"peers"] == b""
        body = await c.announce(n=3)
        assert compact4(body[b"peers"]) == [("127.0.0.1", 10002)]
        assert (await c.scrape(IH))[IH][b"complete"] == 1


async def test_restarted_client_on_same_endpoint_replaces_old_entry() -> None:
    async with tracker_client() as c:
        await c.announce(n=1, port=7000, left=0)
        await c.announce(n=2, port=7000, left=0)  # same ip:port, new peer_id
        body = await c.announce(n=3)
        assert compact4(body[b"peers"]) == [("127.0.0.1", 7000)]
        assert (await c.scrape(IH))[IH][b"complete"] == 1


async def test_peers_expire_after_ttl() -> None:
    async with tracker_client(interval=1.0, peer_ttl=0.4, seed_peer_ttl=0.4) as c:
        await c.announce(n=1, left=0)
        await asyncio.sleep(0.15)
        assert compact4((await c.announce(n=2))[b"peers"]) == [("127.0.0.1", 10001)]
        await asyncio.sleep(0.3)
        await c.announce(n=1, left=0)  # peer 1 re-announces in time, peer 2 does not
        await asyncio.sleep(0.3)
        assert compact4((await c.announce(n=3))[b"peers"]) == [("127.0.0.1", 10001)]
        await asyncio.sleep(0.6)
        assert (await c.announce(n=3))[b"peers"] == b""
        assert await c.metric("p2p_tracker_expired_peers_total") >= 2


def ann_req(n: int, left: int = 1, numwant: int | None = None, event: str = "",
            ip: str | None = None) -> Announce:  # fmt: skip
    addr = ipaddress.ip_address(ip or f"10.0.{n // 250}.{n % 250 + 1}")
    return Announce(IH, pid(n), addr, 6000 + n % 1000, left, 0, 0, event, numwant, True, False)


def ports(result: Any) -> list[int]:
    return [port for _, port in compact4(result.peers)]


def test_expiry_with_fake_clock_and_default_ttl() -> None:
    now = [1000.0]
    cfg = TrackerConfig(interval=30.0)
    t = PeerTable(peer_ttl=server.peer_ttl(cfg), seed_ttl=server.seed_ttl(cfg),
                  clock=lambda: now[0])  # fmt: skip
    assert (t.peer_ttl, t.seed_ttl) == (90.0, 5400.0)
    t.announce(ann_req(1))
    now[0] += 89.0
    assert ports(t.announce(ann_req(2))) == [6001]
    now[0] += 2.0  # peer 1 silent for 91 s
    assert ports(t.announce(ann_req(3))) == [6002]
    now[0] += 200.0
    assert t.expire() == 2
    assert t.counts() == (0, 0, 0) and t.swarms == {}


def test_seeds_get_the_long_ttl_leechers_the_short_one() -> None:
    now = [0.0]
    t = PeerTable(peer_ttl=90.0, seed_ttl=5400.0, clock=lambda: now[0])
    t.announce(ann_req(1, left=0))
    t.announce(ann_req(2))
    now[0] = 1000.0  # past a leecher's TTL, well within a seed's
    assert t.expire() == 1 and t.counts() == (1, 1, 0)
    now[0] = 5401.0
    assert t.expire() == 1 and t.counts() == (0, 0, 0)


async def test_seeds_are_told_the_long_interval_leechers_the_short_one() -> None:
    async with tracker_client(interval=30.0, seed_interval=1800.0) as c:
        seed = await c.announce(n=1, left=0)
        leech = await c.announce(n=2, left=5)
        assert (seed[b"interval"], leech[b"interval"]) == (1800, 30)
        assert seed[b"min interval"] <= 1800 and leech[b"min interval"] <= 30
        done = await c.announce(n=2, left=0, event="completed")  # a finished leecher is a seed
        assert done[b"interval"] == 1800


async def test_sweeper_forgets_silent_swarms_without_any_request() -> None:
    async with tracker_client(interval=1.0, peer_ttl=0.2) as c:
        await c.announce(n=1)
        table = c.svc.table
        assert table.counts() == (1, 0, 1)
        await asyncio.sleep(1.2)  # no request in between: only the background sweep runs
        assert table.swarms == {} and table.expired_total == 1


def test_large_swarm_sample_is_distinct_live_and_never_self() -> None:
    now = [0.0]
    t = PeerTable(peer_ttl=100.0, max_numwant=200, clock=lambda: now[0], rng=random.Random(7))
    for n in range(300):
        t.announce(ann_req(n, left=0 if n < 30 else 1))
    now[0] = 50.0
    for n in range(100, 300):  # peers 0-99 (all 30 seeders among them) go quiet
        t.announce(ann_req(n, left=1))
    now[0] = 120.0  # 0-99 are now stale
    live = {(f"10.0.{n // 250}.{n % 250 + 1}", 6000 + n) for n in range(100, 300)}
    for n in range(150, 300):
        got = compact4(t.announce(ann_req(n, left=1, numwant=60)).peers)
        me = (f"10.0.{n // 250}.{n % 250 + 1}", 6000 + n)
        assert len(got) == 60 and len(set(got)) == 60 and me not in got
        assert set(got) <= live
    assert t.counts()[1] == 0  # stale seeders met by the samples were dropped


def test_caps_refuse_new_swarms_and_peers_but_refresh_known_ones() -> None:
    t = PeerTable(peer_ttl=100.0, max_torrents=2, max_peers_per_torrent=3, max_peers=5)
    other = [hashlib.sha1(bytes([i])).digest() for i in range(3)]

    def on(ih: bytes, n: int) -> str:
        return t.announce(dataclasses.replace(ann_req(n), info_hash=ih)).refused

    assert [on(other[0], n) for n in range(4)] == ["", "", "", "torrent_peers"]
    assert on(other[0], 1) == ""  # a known peer is always refreshed
    assert on(other[1], 10) == "" and on(other[2], 20) == "torrents"
    assert on(other[1], 11) == "" and on(other[1], 12) == "peers"  # 5 peers in all
    assert t.counts() == (2, 0, 5) and t.peers == 5


async def test_ip_param_ipv6_peers6_and_ipv4_mapped_when_authenticated() -> None:
    async with tracker_client(secret=SECRET) as c:
        await c.announce(n=1, left=0, ip="10.1.2.3")
        await c.announce(n=2, left=0, ip="2001:db8::7")
        await c.announce(n=3, left=0, ip="::ffff:10.9.9.9")
        body = await c.announce(n=4)
        assert sorted(compact4(body[b"peers"])) == [("10.1.2.3", 10001), ("10.9.9.9", 10003)]
        assert compact6(body[b"peers6"]) == [("2001:db8::7", 10002)]
        body = await c.announce(n=4, compact=0, no_peer_id=1)
        ips = sorted(p[b"ip"] for p in body[b"peers"])
        assert ips == [b"10.1.2.3", b"10.9.9.9", b"2001:db8::7"]


async def test_ip_param_is_ignored_without_a_cluster_secret() -> None:
    async with tracker_client() as c:
        await c.announce(n=1, left=0, ip="169.254.169.254", port=6881)
        body = await c.announce(n=2)
        assert compact4(body[b"peers"]) == [("127.0.0.1", 6881)]


async def test_secret_refuses_missing_and_wrong_tokens_and_accepts_the_right_one() -> None:
    async with tracker_client(secret=SECRET) as c:
        wrong = ClusterAuth(b"another-secret-entirely", "agent").token(TRACKER)
        right, c.token = c.token, ""  # send exactly what each case says
        for token in ("", "token=", f"token={wrong}", f"token={right[:-1]}"):
            params = "&".join(q for q in (query(**GOOD), token) if q)
            body = await c.get("/announce", params)
            assert b"token" in body[b"failure reason"], token
            scrape = await c.get("/scrape", "&".join(q for q in (query(info_hash=IH), token) if q))
            assert b"token" in scrape[b"failure reason"], token
        # an unauthenticated ip= is not even considered: refused before it counts
        assert c.svc.table.counts() == (0, 0, 0)
        assert await c.metric("p2p_tracker_refused_total", reason="auth") == 8
        c.token = right
        await c.announce(n=1, left=0, ip="10.7.7.7")
        assert compact4((await c.announce(n=2))[b"peers"]) == [("10.7.7.7", 10001)]
        assert (await c.scrape(IH))[IH][b"complete"] == 1


async def test_full_scrape_is_refused() -> None:
    async with tracker_client() as c:
        await c.announce(n=1)
        body = await c.get("/scrape")
        assert b"info_hash" in body[b"failure reason"] and b"files" not in body
        body = await c.get("/scrape", "other=1")
        assert b"failure reason" in body


async def test_rate_limit_per_source_with_metric() -> None:
    async with tracker_client(announce_rate=1.0, announce_burst=5) as c:
        answers = [await c.get("/announce", query(**{**GOOD, "peer_id": pid(n)}))
                   for n in range(8)]  # fmt: skip
        refused = [a for a in answers if b"failure reason" in a]
        assert len(refused) == 3 and all(a[b"retry in"] >= 1 for a in refused)
        assert await c.metric("p2p_tracker_refused_total", reason="rate") == 3


async def test_caps_are_refused_with_a_reason_and_counted() -> None:
    async with tracker_client(max_torrents=1, max_peers_per_torrent=2) as c:
        await c.announce(n=1)
        await c.announce(n=2)
        body = await c.get("/announce", query(**{**GOOD, "peer_id": pid(3), "port": 3}))
        assert b"swarm full" in body[b"failure reason"]
        body = await c.get("/announce", query(**{**GOOD, "info_hash": IH2}))
        assert b"too many torrents" in body[b"failure reason"]
        assert await c.metric("p2p_tracker_refused_total", reason="torrent_peers") == 1
        assert await c.metric("p2p_tracker_refused_total", reason="torrents") == 1


async def test_v2_hash_shares_swarm_with_its_truncation() -> None:
    v2 = hashlib.sha256(b"v2 info dict").digest()
    async with tracker_client() as c:
        await c.announce(info_hash=v2, n=1, left=0)
        body = await c.announce(info_hash=v2[:20], n=2)
        assert compact4(body[b"peers"]) == [("127.0.0.1", 10001)]
        files = await c.scrape(v2, v2[:20])
        assert files[v2] == files[v2[:20]] == {b"complete": 1, b"incomplete": 1, b"downloaded": 0}


async def test_raw_bytes_in_info_hash_survive() -> None:
    """Bytes a str-decoding query parser would corrupt: a bare '+' (kept by some clients)
    must not become a space, '%2541' is the bytes '%41' (not 'A'), NUL, 0xFF, '&', '='."""
    nasty = b"%41+" + b"\x00\xff&= ?#/abcdefgh"
    assert len(nasty) == 20
    raw = "%2541+" + quote_from_bytes(nasty[4:], safe="")
    async with tracker_client() as c:
        body = await c.get("/announce", f"info_hash={raw}&" + query(peer_id=pid(1), port=1, left=0))
        assert b"failure reason" not in body
        assert list(c.svc.table.swarms) == [nasty]
        assert (await c.scrape(nasty))[nasty][b"complete"] == 1


# --- scrape ---------------------------------------------------------------------------------


async def test_scrape_several_and_unknown() -> None:
    unknown = hashlib.sha1(b"nobody").digest()
    async with tracker_client() as c:
        await c.announce(info_hash=IH, n=1, left=0)
        await c.announce(info_hash=IH, n=2)
        await c.announce(info_hash=IH2, n=3)
        files = await c.scrape(IH, IH2, unknown)
        assert files == {
            IH: {b"complete": 1, b"incomplete": 1, b"downloaded": 0},
            IH2: {b"complete": 0, b"incomplete": 1, b"downloaded": 0},
            unknown: {b"complete": 0, b"incomplete": 0, b"downloaded": 0},
        }
        many = [hashlib.sha1(bytes([i])).digest() for i in range(129)]
        body = await c.get("/scrape", query(info_hash=many))
        assert b"too many info_hash" in body[b"failure reason"]


# --- malformed requests ---------------------------------------------------------------------

GOOD = {"info_hash": IH, "peer_id": pid(1), "port": 6881, "left": 0}
BAD = [
    ({"info_hash": None}, "info_hash"),
    ({"info_hash": IH[:19]}, "info_hash"),
    ({"info_hash": IH + b"x"}, "info_hash"),
    ({"info_hash": [IH, IH2]}, "info_hash"),
    ({"peer_id": None}, "peer_id"),
    ({"peer_id": b"short"}, "peer_id"),
    ({"port": None}, "port"),
    ({"port": "abc"}, "port"),
    ({"port": 0}, "port"),
    ({"port": 70000}, "port"),
    ({"port": "1e3"}, "port"),
    ({"left": None}, "left"),
    ({"left": "lots"}, "left"),
    ({"left": -5}, "left"),
    ({"uploaded": "x"}, "uploaded"),
    ({"numwant": "many"}, "numwant"),
    ({"numwant": "9" * 40}, "numwant"),
    ({"event": "exploded"}, "event"),
    ({"ip": "example.com"}, "ip"),
    ({"ip": "0.0.0.0"}, "ip"),
    ({"ip": "10.0.0.1; rm"}, "ip"),
    ({"compact": "2"}, "compact"),
    ({"event": b"\xff"}, "event"),
]


async def test_malformed_announces_get_failure_reason_not_500() -> None:
    async with tracker_client() as c:
        for change, key in BAD:
            params = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
            body = await c.get("/announce", query(**params))
            reason = body.get(b"failure reason", b"").decode()
            assert key in reason, (change, body)
        scrape = await c.get("/scrape", query(info_hash=b"short"))
        assert b"info_hash" in scrape[b"failure reason"]
        assert await c.metric("p2p_tracker_failures_total") == len(BAD) + 1
        assert await c.metric("p2p_tracker_announces_total") == 0
        assert c.svc.table.counts() == (0, 0, 0)  # nothing bad got in
        await c.announce(n=1)  # and the tracker still works


async def test_healthz_and_metrics() -> None:
    async with tracker_client() as c:
        async with c.http.get(c.base + "/healthz") as resp:
            assert resp.status == 200 and await resp.text() == "ok\n"
        await c.announce(info_hash=IH, n=1, left=0)
        await c.announce(info_hash=IH, n=2)
        await c.announce(info_hash=IH2, n=2)
        await c.scrape(IH)
        async with c.http.get(c.base + "/metrics") as resp:
            text = await resp.text()
            assert resp.content_type == "text/plain"
        assert "# TYPE p2p_tracker_announces_total counter" in text
        assert await c.metric("p2p_tracker_torrents") == 2
        assert await c.metric("p2p_tracker_peers", role="seeder") == 1
        assert await c.metric("p2p_tracker_peers", role="leecher") == 2
        assert await c.metric("p2p_tracker_announces_total") == 3
        assert await c.metric("p2p_tracker_scrapes_total") == 1
        assert await c.metric("p2p_tracker_failures_total") == 0


# --- a real swarm: two libtorrent sessions that only know the tracker -----------------------


def lt_session(port: int) -> lt.session:
    return lt.session(
        {
            "listen_interfaces": f"127.0.0.1:{port}",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_incoming_utp": False,
            "enable_outgoing_utp": False,
            "allow_multiple_connections_per_ip": True,
            "min_announce_interval": 1,
            "alert_mask": lt.alert_category.error | lt.alert_category.status,
        }
    )


def make_torrent(path: Path, announce: str, kind: str) -> lt.torrent_info:
    flags = {"v1": lt.create_torrent.v1_only, "v2": lt.create_torrent.v2_only, "hybrid": 0}[kind]
    ct = lt.create_torrent(lt.list_files(str(path)), 32 * 1024, flags=flags)
    ct.add_tracker(announce)
    lt.set_piece_hashes(ct, str(path.parent))
    return lt.torrent_info(ct.generate())


def add(ses: lt.session, ti: lt.torrent_info, save_path: Path) -> lt.torrent_handle:
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = str(save_path)
    atp.flags &= ~(lt.torrent_flags.paused | lt.torrent_flags.auto_managed)
    return ses.add_torrent(atp)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("kind", "secret"), [("v1", None), ("v2", None), ("hybrid", None), ("v1", SECRET)]
)
async def test_libtorrent_swarm_finds_peers_through_tracker(
    tmp_path: Path, kind: str, secret: bytes | None
) -> None:
    from p2p_mirror.tracker.params import parse_query

    auth = ClusterAuth(secret, "tracker")
    cfg = TrackerConfig(listen=HostPort("127.0.0.1", 0), interval=1.0, peer_ttl=5.0,
                        seed_interval=1.0, seed_peer_ttl=5.0)  # fmt: skip
    running = await server.start(cfg, auth)
    svc = running.service
    queries: list[str] = []  # raw announce queries as libtorrent sent them
    handle = svc.handle

    def record(path: bytes, raw_query: str, source: Any) -> Any:
        if path == b"/announce":
            queries.append(raw_query)
        return handle(path, raw_query, source)

    svc.handle = record  # type: ignore[method-assign]
    announce = running.url + (f"?token={auth.token(TRACKER)}" if secret else "")
    seed_dir, leech_dir = tmp_path / "seed", tmp_path / "leech"
    seed_dir.mkdir()
    leech_dir.mkdir()
    data = random.randbytes(3 * 1024 * 1024 + 777)
    (seed_dir / "blob").write_bytes(data)
    ti = make_torrent(seed_dir / "blob", announce, kind)
    hashes = ti.info_hashes()
    expected = set()
    if hashes.has_v1():
        expected.add(hashes.v1.to_bytes())
    if hashes.has_v2():
        expected.add(hashes.v2.to_bytes()[:20])
    table = svc.table
    seeder = lt_session(free_port())
    leecher = lt_session(free_port())
    try:
        add(seeder, ti, seed_dir)
        await until(
            lambda: all(ih in table.swarms and table.swarms[ih].seeders for ih in expected),
            20, "the seeder's announce",
        )  # fmt: skip
        handle_ = add(leecher, lt.torrent_info(ti), leech_dir)
        await until(lambda: handle_.status().is_seeding, 60, "the leecher to finish")
        assert (leech_dir / "blob").read_bytes() == data
        # the leecher announces completed; both peers are then seeders in every swarm
        await until(
            lambda: all(
                table.swarms[ih].seeders == 2 and table.swarms[ih].downloaded == 1
                for ih in expected
            ),
            20, "the completed announce",
        )  # fmt: skip
        seen = [ih for q in queries for ih in parse_query(q).get("info_hash", [])]
        # what libtorrent 2.1 sends: 20-byte hashes only, v2 truncated (BEP 52)
        assert set(seen) == expected and all(len(ih) == 20 for ih in seen)
        if secret:
            # libtorrent appends "&info_hash=..." to a URL that already has a query
            assert all(parse_query(q)["token"] == [auth.token(TRACKER).encode()]
                       for q in queries)  # fmt: skip
            assert svc.metrics.value("refused_total", reason="auth") == 0
        if kind == "v1":
            # peers stay alive across several intervals: they re-announce before the TTL
            # (libtorrent's min_announce_interval, default 300 s, must be <= the interval)
            await asyncio.sleep(6)
            assert all(table.swarms[ih].seeders == 2 for ih in expected)
    finally:
        for ses in (leecher, seeder):
            for h in ses.get_torrents():
                ses.remove_torrent(h)
        del seeder, leecher
        await running.close()


# over UDP on an address of its own: libtorrent caches a UDP connection ID per tracker IP
@pytest.mark.integration
@pytest.mark.parametrize(("scheme", "host"), [("http", "127.0.0.1"), ("udp", "127.0.0.7")])
async def test_libtorrent_swarm_through_debian_opentracker(
    tmp_path: Path, scheme: str, host: str
) -> None:
    """Operators may run Debian's C opentracker in place of ours, over HTTP or UDP (what the
    rollouts announce with): a seeder and a leecher session that only know it exchange a
    torrent (opentracker is whitelist-only here)."""
    require_binaries("opentracker")
    seed_dir, leech_dir = tmp_path / "seed", tmp_path / "leech"
    seed_dir.mkdir()
    leech_dir.mkdir()
    data = random.randbytes(2 * 1024 * 1024 + 99)
    (seed_dir / "blob").write_bytes(data)
    port = free_port()
    ti = make_torrent(seed_dir / "blob", f"{scheme}://{host}:{port}/announce", "v1")
    # opentracker drops to user nobody, who cannot enter pytest's tmp_path (mode 0700)
    readable = Path(tempfile.mkdtemp(prefix="opentracker-"))
    readable.chmod(0o755)
    whitelist = readable / "whitelist"
    whitelist.write_text(ti.info_hashes().v1.to_bytes().hex() + "\n")
    whitelist.chmod(0o644)
    tracker = Proc(["opentracker", "-i", host, "-p", str(port), "-P", str(port),
                    "-w", str(whitelist)], tmp_path / "opentracker.log")  # fmt: skip
    seeder = lt_session(free_port())
    leecher = lt_session(free_port())
    try:
        tracker.wait_ready(lambda: port_open(host, port), 20, "opentracker listening")
        ih = ti.info_hashes().v1.to_bytes()

        def seeds_known() -> int:
            url = f"http://{host}:{port}/scrape?{query(info_hash=ih)}"
            with urllib.request.urlopen(url, timeout=5) as r:
                return lt.bdecode(r.read())[b"files"].get(ih, {}).get(b"complete", 0)

        add(seeder, ti, seed_dir)
        await until(lambda: seeds_known() == 1, 20, "the seeder's announce")
        handle = add(leecher, lt.torrent_info(ti), leech_dir)
        await until(lambda: handle.status().is_seeding, 60, "the leecher to finish")
        assert (leech_dir / "blob").read_bytes() == data
        await until(lambda: seeds_known() == 2, 20, "the leecher's completed announce")
    finally:
        for ses in (leecher, seeder):
            for h in ses.get_torrents():
                ses.remove_torrent(h)
        del seeder, leecher
        tracker.stop()
        shutil.rmtree(readable)


# --- the command ----------------------------------------------------------------------------


def tracker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2p_mirror", "tracker", *args]


@pytest.mark.integration
def test_cli_serves_logs_ready_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "tracker.yaml"
    cfg.write_text(f"listen: 127.0.0.1:{port}\ninterval: 7\nmax-numwant: 5\n")
    proc = Proc(tracker_cmd("--config", str(cfg), "--peer-ttl", "30"), tmp_path / "t.log")
    try:
        ready = f"tracker ready on http://127.0.0.1:{port}"
        proc.wait_ready(lambda: ready in proc.log_text(), 20, "tracker ready line")
        q = query(info_hash=IH, peer_id=pid(1), port=6881, left=1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/announce?{q}", timeout=5) as r:
            body = lt.bdecode(r.read())
        assert body[b"interval"] == 7 and body[b"peers"] == b""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.read() == b"ok\n"
        assert proc.log_text().count("tracker ready") == 1
    finally:
        code = proc.stop()
    assert code == 0, proc.tail()
    assert "Traceback" not in proc.log_text()


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--listen", "nonsense"], "listen"),
        (["--interval", "-3"], "interval"),
        (["--peer-ttl", "-1"], "peer_ttl"),
        (["--max-numwant", "0"], "max_numwant"),
        (["--log-level", "loud"], "log_level"),
    ],
)
def test_cli_bad_values_exit_nonzero_naming_the_key(args: list[str], key: str) -> None:
    res = subprocess.run(
        tracker_cmd(*args), capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 2, res
    assert f"tracker config: {key}" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_unknown_config_key(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("listen: 127.0.0.1:1\nannounce_every: 3\n")
    res = subprocess.run(
        tracker_cmd("--config", str(cfg)), capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 2 and "announce_every" in res.stderr


def test_listen_hostport_in_ready_url() -> None:
    assert server.announce_url(HostPort("::", 6969)) == "http://[::]:6969/announce"
