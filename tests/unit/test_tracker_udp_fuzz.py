"""Property-based fuzzing of the UDP tracker: whatever datagram arrives, the answer is
nothing, a connect answer as small as its request, or (for a valid connection ID only) a
well-formed announce, scrape or error datagram; never an exception or unbounded state."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p_mirror.core.clusterauth import TRACKER, ClusterAuth
from p2p_mirror.core.config import TrackerConfig
from p2p_mirror.tracker.server import TrackerService
from p2p_mirror.tracker.udp import (
    ANNOUNCE,
    CONNECT,
    ERROR,
    ERROR_MAX,
    MAX_ANSWER,
    PROTOCOL_ID,
    SCRAPE,
    ConnectionIds,
    UdpTracker,
    url_data,
)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
SECRET = b"fuzz-secret-fuzz-secret"
TOKEN = ClusterAuth(SECRET, "t").token(TRACKER)
SOURCE = "192.0.2.9"


def make(secret: bytes | None) -> UdpTracker:
    cfg = TrackerConfig(max_torrents=50, max_peers_per_torrent=20, max_peers=200,
                        announce_rate=1e9, announce_burst=10**9)  # fmt: skip
    return UdpTracker(TrackerService(cfg, ClusterAuth(secret, "t")),
                      ConnectionIds(b"k" * 32, clock=lambda: 1000.0))  # fmt: skip


TRACKERS = {"open": make(None), "secret": make(SECRET)}
CID = TRACKERS["open"].ids.issue(ipaddress.ip_address(SOURCE).packed)


def options() -> st.SearchStrategy[bytes]:
    token = f"/announce?token={TOKEN}".encode()
    return st.one_of(
        st.binary(max_size=300),
        st.just(b"\x02" + bytes([len(token)]) + token),
        st.just(b"\x01\x01\x02\x05/anno\x02\x04unce\x00junk"),
        st.just(b"\x02\xff" + b"x" * 10),  # length past the end
        st.just(b"\x02"),  # truncated
    )


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "connect", "announce", "scrape", "action"]))
    cid = draw(st.sampled_from([CID, bytes(8), PROTOCOL_ID.to_bytes(8, "big")]))
    txn = draw(st.integers(0, 2**32 - 1))
    if kind == "random":
        return draw(st.binary(max_size=400))
    if kind == "connect":
        return struct.pack(">QII", draw(st.sampled_from([PROTOCOL_ID, 0])), CONNECT, txn)
    if kind == "action":
        return cid + struct.pack(">II", draw(st.integers(0, 2**32 - 1)), txn)
    if kind == "scrape":
        return cid + struct.pack(">II", SCRAPE, txn) + draw(st.binary(max_size=3000))
    body = struct.pack(
        ">II20s20sqqqiIIiH", ANNOUNCE, txn,
        draw(st.sampled_from([bytes(20), b"\x01" * 20, bytes(range(20))])),
        draw(st.sampled_from([b"-PP0001-" + bytes(12), b"x" * 20])),
        draw(st.integers(-(2**63), 2**63 - 1)), draw(st.integers(-1, 10**6)),
        draw(st.integers(0, 2**63 - 1)), draw(st.integers(-(2**31), 2**31 - 1)),
        draw(st.sampled_from([0, 0x0A000001, 0xFFFFFFFF, 0xE0000001])), 0,
        draw(st.integers(-(2**31), 2**31 - 1)), draw(st.integers(0, 65535)),
    )  # fmt: skip
    cut = draw(st.sampled_from([len(body), len(body), 50, 97]))
    return cid + body[:cut] + draw(options())


@FUZZ
@given(datagrams(), st.sampled_from(list(TRACKERS)))
def test_every_datagram_gets_a_well_formed_answer_or_none(data: bytes, which: str) -> None:
    tracker = TRACKERS[which]
    reply = tracker.answer(data, SOURCE)
    table = tracker.svc.table  # type: ignore[attr-defined]
    assert len(table.swarms) <= 50 and table.peers <= 200
    if reply is None:
        return
    action, txn = struct.unpack(">II", reply[:8])
    assert txn == struct.unpack(">I", data[12:16])[0]
    if action == CONNECT:
        assert len(reply) == 16 <= len(data)  # nothing amplified before the handshake
        return
    assert data[:8] == CID  # anything larger needs a valid connection ID
    if action == ERROR:
        assert 8 < len(reply) <= 8 + ERROR_MAX
        reply[8:].decode("utf-8")
    elif action == ANNOUNCE:
        assert (len(reply) - 20) % 6 == 0 and len(reply) <= MAX_ANSWER
        if which == "secret":
            assert f"token={TOKEN}".encode() in data
    else:
        assert action == SCRAPE and len(reply) == 8 + 12 * ((len(data) - 16) // 20)
        assert which == "open"  # scrapes carry no token


def test_url_data_joins_type_2_options_and_stops_at_end() -> None:
    assert url_data(b"\x01\x02\x03/an\x01\x02\x02no\x00\x02\x03xyz") == b"/anno"
    assert url_data(b"") == b""


def test_connection_ids_bind_address_and_window() -> None:
    now = [6000.0]
    ids = ConnectionIds(b"s" * 32, clock=lambda: now[0])
    cid = ids.issue(b"\x0a\x00\x00\x01")
    assert ids.valid(b"\x0a\x00\x00\x01", cid)
    assert not ids.valid(b"\x0a\x00\x00\x02", cid)
    assert not ConnectionIds(b"t" * 32, clock=lambda: now[0]).valid(b"\x0a\x00\x00\x01", cid)
    now[0] += 119.9
    assert ids.valid(b"\x0a\x00\x00\x01", cid)
    now[0] += 0.2
    assert not ids.valid(b"\x0a\x00\x00\x01", cid)


def test_answers_fit_one_packet_however_many_peers_are_asked_for() -> None:
    svc = TrackerService(TrackerConfig(max_numwant=1000), ClusterAuth(None, "t"))
    tracker = UdpTracker(svc, ConnectionIds(b"k" * 32, clock=lambda: 1000.0))
    cid = tracker.ids.issue(ipaddress.ip_address(SOURCE).packed)

    def announce(n: int, source: str = SOURCE) -> bytes:
        body = struct.pack(">II20s20sqqqiIIiH", ANNOUNCE, 1, bytes(20), b"-PP0001-" + bytes(12),
                           0, 1, 0, 0, 0, 0, 1000, 1000 + n)  # fmt: skip
        reply = tracker.answer(cid + body, source)
        assert reply is not None and reply[:4] == struct.pack(">I", ANNOUNCE)
        return reply

    for n in range(400):
        announce(n)
    reply = announce(400)
    assert len(reply) == 20 + (MAX_ANSWER - 20) // 6 * 6  # 230 of the 400 others
