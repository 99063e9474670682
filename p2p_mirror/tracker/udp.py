"""The tracker's UDP face (BEP 15), on the same port number as HTTP.

An announce is one datagram each way: no handshake, accept, connection objects or close per
announce, which is most of what an HTTP announce costs. A client first gets a connection ID
(``connect``) and then announces with it; the ID is a keyed MAC of the client's address and
a one-minute window, so nothing is stored per client and a spoofed source address never
learns one: requests without a valid ID get no answer at all, and only the 16-byte connect
answer (the size of its request) goes to unverified addresses, so the tracker amplifies
nothing. The cluster token comes in BEP 41 URL data (the tracker URL's path and query, which
libtorrent sends as ``/announce?token=...``); everything after parsing (rate limit, token,
``ip`` trust, caps, metrics) is ``TrackerService``'s, shared with HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Protocol

from p2p_mirror.core.clusterauth import UDP_CONNECTION_ID, ClusterAuth
from p2p_mirror.core.config import HostPort
from p2p_mirror.tracker.params import (
    MAX_SCRAPE_HASHES,
    V1_HASH_LEN,
    Announce,
    IPAddress,
    Refusal,
    RequestError,
    Scrape,
    make_announce,
    parse_ip,
    url_data_token,
)
from p2p_mirror.tracker.peers import AnnounceResult, ScrapeEntry
from p2p_mirror.tracker.sockets import bound_socket

log = logging.getLogger("tracker")

PROTOCOL_ID = 0x41727101980
CONNECT, ANNOUNCE, SCRAPE, ERROR = 0, 1, 2, 3
EVENTS = ("", "completed", "started", "stopped")  # BEP 15 event numbers 0-3
WINDOW = 60.0  # a connection ID is good for this window and the next: 1-2 minutes
MAX_DATAGRAM = 2048  # announce 98 bytes + options (libtorrent: <= 257); scrape 16 + 20 x N
DATAGRAMS_PER_WAKEUP = 256
RECEIVE_BUFFER = 4 << 20  # bytes queued for the tracker (capped by net.core.rmem_max)

HEADER = struct.Struct(">QII")  # connection_id (or protocol id), action, transaction id
ANNOUNCE_REQ = struct.Struct(">QII20s20sqqqiIIiH")
REPLY_HEAD = struct.Struct(">II")  # action, transaction id
ANNOUNCE_HEAD = struct.Struct(">IIIII")  # action, transaction, interval, leechers, seeders
SCRAPE_ENTRY = struct.Struct(">III")  # seeders, completed, leechers
ERROR_MAX = 200  # bytes of message in an error datagram
MAX_ANSWER = 1400  # bytes: an answer fits one 1500-byte IP packet (IPv6: 76 peers, IPv4: 230)


class Service(Protocol):
    """What the UDP face needs of ``server.TrackerService`` (which also serves HTTP)."""

    auth: ClusterAuth

    def serve_announce(self, source: IPAddress | None, parse: Callable[[], Announce]
                       ) -> tuple[Announce, AnnounceResult, int]: ...  # fmt: skip

    def serve_scrape(self, source: IPAddress | None, parse: Callable[[], Scrape]
                     ) -> dict[bytes, ScrapeEntry]: ...  # fmt: skip


class ConnectionIds:
    """Connection IDs nobody can forge or replay from another address: the first 8 bytes of
    a keyed BLAKE2b of (address, window); the current and the previous window are valid.

    libtorrent caches one ID per tracker IP address (not port), for 60 s, and keeps using it
    when the tracker stays silent; so the key comes from the cluster secret when there is
    one, and a restarted tracker or a second one on the same address accepts its siblings'
    IDs. Without a secret (a one-machine lab) it is random per process."""

    def __init__(self, secret: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.secret = secret or os.urandom(32)
        self.clock = clock

    def _mac(self, addr: bytes, window: int) -> bytes:
        return hashlib.blake2b(addr + window.to_bytes(8, "big"), key=self.secret,
                               digest_size=8).digest()  # fmt: skip

    def issue(self, addr: bytes) -> bytes:
        return self._mac(addr, int(self.clock() // WINDOW))

    def valid(self, addr: bytes, cid: bytes) -> bool:
        window = int(self.clock() // WINDOW)
        return cid == self._mac(addr, window) or cid == self._mac(addr, window - 1)


@functools.lru_cache(maxsize=65536)  # parsing the address was 8% of an announce
def source_of(host: str) -> tuple[IPAddress, bytes]:
    """A datagram's source as (address, packed address); IPv4-mapped IPv6 is IPv4."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr, addr.packed


def url_data(options: bytes) -> bytes:
    """BEP 41: the URL data (type 2) options concatenated, up to end of options (type 0)."""
    out = b""
    i, n = 0, len(options)
    while i < n:
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= n:
            raise RequestError("truncated option")
        length = options[i + 1]
        if kind == 2:
            out += options[i + 2 : i + 2 + length]
        i += 2 + length
    return out


class UdpTracker:
    """``answer(datagram, source)``: the datagram to send back, or None for none. No I/O."""

    def __init__(self, svc: Service, ids: ConnectionIds | None = None) -> None:
        self.svc = svc
        key = svc.auth.token(UDP_CONNECTION_ID)
        self.ids = ids or ConnectionIds(bytes.fromhex(key) if key else None)

    def answer(self, data: bytes, host: str) -> bytes | None:
        if len(data) < HEADER.size:
            return None
        cid, action, txn = HEADER.unpack_from(data)
        try:
            source, packed = source_of(host)
        except ValueError:
            return None
        if action == CONNECT:
            if cid != PROTOCOL_ID:
                return None
            return REPLY_HEAD.pack(CONNECT, txn) + self.ids.issue(packed)
        # below, the source has proven it receives at its address: answers may be larger
        if not self.ids.valid(packed, data[:8]):
            return None
        try:
            if action == ANNOUNCE:
                return self._announce(data, txn, source)
            if action == SCRAPE:
                return self._scrape(data, txn, source)
        except Refusal as r:
            return error(txn, r.message)
        return error(txn, f"unknown action {action}")

    def _announce(self, data: bytes, txn: int, source: IPAddress) -> bytes:
        def parse() -> Announce:
            if len(data) < ANNOUNCE_REQ.size:
                raise RequestError(f"announce too short: {len(data)} bytes")
            (_, _, _, info_hash, peer_id, downloaded, left, uploaded, event, ip, _key,
             numwant, port) = ANNOUNCE_REQ.unpack_from(data)  # fmt: skip
            if event >= len(EVENTS) or event < 0:
                raise RequestError(f"invalid event {event}: expected 0-3")
            token = url_data_token(url_data(data[ANNOUNCE_REQ.size :]))
            return make_announce(
                info_hash=info_hash, peer_id=peer_id, source_ip=source,
                claimed_ip=parse_ip(str(ipaddress.IPv4Address(ip))) if ip else None,
                port=port, left=left, uploaded=uploaded, downloaded=downloaded,
                event=EVENTS[event], numwant=numwant, token=token,
            )  # fmt: skip

        _, result, interval = self.svc.serve_announce(source, parse)
        # BEP 15: the socket's family sets the peer format (6- or 18-byte entries)
        peers, width = (result.peers, 6) if source.version == 4 else (result.peers6, 18)
        room = (MAX_ANSWER - ANNOUNCE_HEAD.size) // width * width
        return ANNOUNCE_HEAD.pack(ANNOUNCE, txn, interval, result.incomplete,
                                  result.complete) + peers[:room]  # fmt: skip

    def _scrape(self, data: bytes, txn: int, source: IPAddress) -> bytes:
        body = data[HEADER.size : HEADER.size + (MAX_SCRAPE_HASHES + 1) * V1_HASH_LEN]
        hashes = [body[i : i + V1_HASH_LEN] for i in range(0, len(body), V1_HASH_LEN)]

        def parse() -> Scrape:
            if not body or len(body) % V1_HASH_LEN:
                raise RequestError("scrape needs whole 20-byte info-hashes")
            if len(hashes) > MAX_SCRAPE_HASHES:
                raise RequestError(f"too many info-hashes: at most {MAX_SCRAPE_HASHES}")
            return Scrape(hashes, None)  # BEP 41 options come with announces only

        counts = self.svc.serve_scrape(source, parse)
        out = [REPLY_HEAD.pack(SCRAPE, txn)]
        for ih in hashes:  # BEP 15: one entry per requested hash, in order, repeats too
            e = counts[ih]
            out.append(SCRAPE_ENTRY.pack(e.complete, e.downloaded, e.incomplete))
        return b"".join(out)


def error(txn: int, message: str) -> bytes:
    text = message.encode("utf-8", "replace")[:ERROR_MAX].decode("utf-8", "ignore")
    return REPLY_HEAD.pack(ERROR, txn) + text.encode()


class UdpEndpoint:
    """A UDP socket read on the event loop's selector; each datagram answered at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 tracker: UdpTracker) -> None:  # fmt: skip
        self.loop = loop
        self.sock = sock
        self.tracker = tracker
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        recvfrom, sendto, answer = self.sock.recvfrom, self.sock.sendto, self.tracker.answer
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. an ICMP error queued for an earlier answer
                log.debug("udp receive: %s", e)
                continue
            try:
                reply = answer(data, addr[0])
            except Exception:  # a bug, not the client's fault: keep serving the others
                log.exception("udp request from %s failed", addr[0])
                continue
            if reply is not None:
                try:
                    sendto(reply, addr)
                except OSError as e:  # a full buffer or gone route: UDP clients retry
                    log.debug("udp send to %s: %s", addr[0], e)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


def udp_socket(listen: HostPort) -> socket.socket:
    """A bound UDP socket (an IPv6 wildcard also takes IPv4)."""
    # a burst of announces waits here instead of being dropped (clients retry in 15 s)
    return bound_socket(
        listen,
        socket.SOCK_DGRAM,
        lambda s: s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER),
    )
