"""Property-based fuzzing of the tracker: whatever arrives, the answer is a well-formed
bencoded failure (HTTP 200) or an HTTP 4xx; never a 5xx, a traceback or unbounded state."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from typing import Any
from urllib.parse import quote_from_bytes

import libtorrent as lt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p_mirror.core.clusterauth import TRACKER, ClusterAuth
from p2p_mirror.core.config import TrackerConfig
from p2p_mirror.tracker.http import MAX_HEAD, Connections, HttpProtocol
from p2p_mirror.tracker.params import RequestError, parse_announce, parse_scrape
from p2p_mirror.tracker.server import TrackerService

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
SOURCE = ipaddress.ip_address("192.0.2.9")
SECRET = b"fuzz-secret-fuzz-secret"
TOKEN = ClusterAuth(SECRET, "t").token(TRACKER)
NAMES = ["info_hash", "peer_id", "port", "left", "uploaded", "downloaded", "event", "numwant",
         "ip", "compact", "no_peer_id", "token", "key", "trackerid", "x"]  # fmt: skip


def raw_bytes(max_size: int = 40) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=max_size),
        st.sampled_from([b"", b"0", b"-1", b"1e3", b"9" * 400, b"65536", b"6881", b"started",
                         b"stopped", b"completed", b"empty", b"169.254.169.254", b"::1",
                         b"[::1]", b"0.0.0.0", b"\xff\xfe", b"%", b"%zz", b"%2", bytes(20),
                         bytes(32), b"a" * 20]),  # fmt: skip
    )


def encoded(value: bytes) -> st.SearchStrategy[str]:
    """Properly percent-encoded, or raw with broken escapes."""
    return st.sampled_from([
        quote_from_bytes(value, safe=""),
        value.decode("latin-1").replace("&", "%26"),
        quote_from_bytes(value, safe="") + "%",
        "%" + quote_from_bytes(value, safe="")[1:],
    ])  # fmt: skip


@st.composite
def queries(draw: st.DrawFn) -> str:
    """Query strings built from plausible and hostile pieces: repeated, missing, huge."""
    parts = []
    for _ in range(draw(st.integers(0, 14))):
        name = draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=8)))
        value = draw(encoded(draw(raw_bytes())))
        parts.append(f"{quote_from_bytes(name.encode(), safe='')}={value}")
    if draw(st.booleans()):  # often a nearly valid announce, so deep paths get reached
        parts += [f"info_hash={quote_from_bytes(bytes(20), safe='')}",
                  "peer_id=" + "a" * 20, "port=6881", "left=0"]  # fmt: skip
    draw(st.randoms()).shuffle(parts)
    return "&".join(parts)


@FUZZ
@given(queries())
def test_announce_parser_accepts_or_names_the_problem(raw: str) -> None:
    try:
        req = parse_announce(raw, SOURCE)
    except RequestError as e:
        assert str(e)
        return
    assert len(req.info_hash) == 20 and len(req.peer_id) == 20
    assert 1 <= req.port <= 65535 and req.left >= 0
    assert req.numwant is None or req.numwant >= 0


@FUZZ
@given(queries())
def test_scrape_parser_accepts_or_names_the_problem(raw: str) -> None:
    try:
        req = parse_scrape(raw)
    except RequestError as e:
        assert str(e)
        return
    assert 1 <= len(req.info_hashes) <= 128
    assert all(len(h) in (20, 32) for h in req.info_hashes)


def make_service(secret: bytes | None) -> TrackerService:
    cfg = TrackerConfig(max_torrents=50, max_peers_per_torrent=20, max_peers=200,
                        announce_rate=1e9, announce_burst=10**9)  # fmt: skip
    return TrackerService(cfg, ClusterAuth(secret, "t"))


SERVICES = {"open": make_service(None), "secret": make_service(SECRET)}


@FUZZ
@given(st.sampled_from(["/announce", "/scrape"]), queries(), st.sampled_from(list(SERVICES)),
       st.booleans())  # fmt: skip
def test_service_answers_bencoded_success_or_failure(
    path: str, raw: str, which: str, with_token: bool
) -> None:
    svc = SERVICES[which]
    if with_token:
        raw = f"{raw}&token={TOKEN}"
    resp = svc.handle(path.encode(), raw, SOURCE)
    assert resp.status == 200
    body: Any = lt.bdecode(resp.body)
    assert isinstance(body, dict), resp.body[:200]
    if b"failure reason" not in body:
        assert (b"interval" in body) if path == "/announce" else (b"files" in body)
    # caps hold whatever was sent
    table = svc.table
    assert len(table.swarms) <= 50 and table.peers <= 200
    assert all(len(s) <= 20 for s in table.swarms.values())
    if which == "secret" and not with_token:
        assert b"failure reason" in body
    if which == "open" and b"peers" in body:
        # without a secret no ip= is believed: every peer is the one source address
        assert all(ipaddress.ip_address(body[b"peers"][i : i + 4]) == SOURCE
                   for i in range(0, len(body[b"peers"]), 6))  # fmt: skip


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.9", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]+\r\n")


def responses(out: bytes) -> list[tuple[int, bytes]]:
    """Split the bytes written into (status, body) pairs, checking the framing."""
    got = []
    while out:
        m = STATUS.match(out)
        assert m, out[:200]
        head, sep, rest = out.partition(b"\r\n\r\n")
        assert sep
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        got.append((int(m.group(1)), rest[:length]))
        out = rest[length:]
    return got


def feed(chunks: list[bytes]) -> tuple[list[tuple[int, bytes]], FakeTransport]:
    transport = FakeTransport()
    proto = HttpProtocol(SERVICES["open"].handle, Connections(100, 60.0))
    proto.connection_made(transport)
    for chunk in chunks:
        if transport.closed:
            break
        proto.data_received(chunk)
    proto.connection_lost(None)
    return responses(bytes(transport.out)), transport


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST", b"get", b"", b"GET GET"]))
    path = draw(st.sampled_from([b"/announce", b"/scrape", b"/metrics", b"/healthz", b"/",
                                 b"/../etc/passwd", b"/announce%2f..", b"*"]))  # fmt: skip
    query = draw(queries()).encode("latin-1")
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b""]))
    headers = draw(st.lists(st.sampled_from([
        b"Host: x", b"Connection: close", b"Connection: keep-alive", b"Content-Length: 5",
        b"Content-Length: 0", b"Transfer-Encoding: chunked", b"X: " + b"y" * 300, b"\x00",
        b"no colon",
    ]), max_size=4))  # fmt: skip
    head = b" ".join(p for p in (method, path + b"?" + query, version) if p)
    return b"\r\n".join([head, *headers]) + b"\r\n\r\n"


@FUZZ
@given(st.lists(requests(), min_size=1, max_size=4), st.integers(1, 64), st.binary(max_size=64))
def test_http_layer_answers_every_request_with_200_or_4xx(
    reqs: list[bytes], chunk: int, tail: bytes
) -> None:
    data = b"".join(reqs) + tail
    errors = Recorder()
    logging.getLogger("tracker").addHandler(errors)
    try:
        got, _ = feed([data[i : i + chunk] for i in range(0, len(data), chunk)])
    finally:
        logging.getLogger("tracker").removeHandler(errors)
    assert not errors.records, errors.records[0].getMessage()
    assert got, "no answer at all"
    for status, body in got:
        assert status == 200 or 400 <= status < 500, (status, body[:200])


def test_http_keep_alive_pipelining_and_bounds() -> None:
    ok = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    got, transport = feed([ok * 3])
    assert got == [(200, b"ok\n")] * 3 and not transport.closed
    got, transport = feed([b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n" + ok])
    assert got == [(200, b"ok\n")] and transport.closed
    got, transport = feed([b"GET /" + b"a" * (MAX_HEAD + 10)])
    assert [s for s, _ in got] == [431] and transport.closed
    got, _ = feed([b"GET /nowhere HTTP/1.1\r\n\r\n"])
    assert got[0][0] == 404
    got, transport = feed([b"POST /announce HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"])
    assert [s for s, _ in got] == [413] and transport.closed
