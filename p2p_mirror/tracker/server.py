"""The tracker's HTTP face: ``/announce``, ``/scrape``, ``/healthz``, ``/metrics``.

Bad and refused requests are answered ``200`` with a bencoded ``failure reason`` (what
BitTorrent clients understand and back off from), never a 5xx; only HTTP-level garbage gets a
4xx. With a cluster secret, announces and scrapes must carry ``token=``; only then is ``ip=``
believed. Without one no ``ip=`` is believed at all: the peer is where its packets come from.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import random
import resource
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import libtorrent as lt

from p2p_mirror.core import service
from p2p_mirror.core.clusterauth import TRACKER, ClusterAuth
from p2p_mirror.core.config import ConfigError, HostPort, TrackerConfig
from p2p_mirror.core.metrics import CONTENT_TYPE, Metrics
from p2p_mirror.tracker.http import Connections, HttpProtocol, Response
from p2p_mirror.tracker.params import (
    Announce,
    IPAddress,
    Refusal,
    RequestError,
    Scrape,
    parse_announce,
    parse_scrape,
)
from p2p_mirror.tracker.peers import V4_LEN, V6_LEN, AnnounceResult, PeerTable, ScrapeEntry
from p2p_mirror.tracker.ratelimit import SourceRateLimit
from p2p_mirror.tracker.sockets import Listener, bound_socket
from p2p_mirror.tracker.udp import UdpEndpoint, UdpTracker, udp_socket

Request = TypeVar("Request", Announce, Scrape)

log = logging.getLogger("tracker")

DEFAULT_NUMWANT = 50
IDLE_TIMEOUT = 120.0  # keep-alive connections with no request for this long are closed
RETRY_RATE = 10  # BEP 31 "retry in" told to a source over its rate
REFUSALS = {
    "auth": "missing or wrong token",
    "rate": "too many requests from this address",
    "torrents": "tracker full: too many torrents",
    "torrent_peers": "swarm full: too many peers in this torrent",
    "peers": "tracker full: too many peers",
}


def check_config(cfg: TrackerConfig) -> None:
    """Reject values the generic config parsers let through; messages name the key."""
    if cfg.peer_ttl < 0:
        raise ConfigError("tracker config: peer_ttl: must not be negative (0: 3 x interval)")
    if cfg.seed_peer_ttl < 0:
        raise ConfigError(
            "tracker config: seed_peer_ttl: must not be negative (0: 3 x seed_interval)"
        )
    if cfg.max_numwant < 1:
        raise ConfigError("tracker config: max_numwant: must be at least 1")


def peer_ttl(cfg: TrackerConfig) -> float:
    return cfg.peer_ttl if cfg.peer_ttl > 0 else 3 * cfg.interval


def seed_ttl(cfg: TrackerConfig) -> float:
    return cfg.seed_peer_ttl if cfg.seed_peer_ttl > 0 else 3 * cfg.seed_interval


def bencode(value: dict[bytes, Any]) -> bytes:
    return bytes(lt.bencode(value))


def failure(reason: str, retry_in: int | None = None) -> Response:
    body: dict[bytes, Any] = {b"failure reason": reason.encode()}
    if retry_in is not None:
        body[b"retry in"] = retry_in  # BEP 31: libtorrent waits this long
    return Response(200, bencode(body))


def compact_body(
    result: AnnounceResult, interval: int, min_interval: int
) -> bytes:
    """The compact answer, bencoded by hand (keys in bencode's sorted order): it is most of
    the tracker's traffic."""
    out = b"d8:completei%de10:incompletei%de8:intervali%de12:min intervali%de5:peers%d:%s" % (
        result.complete, result.incomplete, interval, min_interval, len(result.peers),
        result.peers)  # fmt: skip
    if result.peers6:
        out += b"6:peers6%d:%s" % (len(result.peers6), result.peers6)
    return out + b"e"


def dict_peers(result: AnnounceResult) -> list[dict[bytes, Any]]:
    """BEP 3's dict form. Peer ids are not kept, so entries hold ``ip`` and ``port`` only
    (as with ``no_peer_id=1``); clients learn the id in the peer handshake."""
    out = []
    for blob, width in ((result.peers, V4_LEN), (result.peers6, V6_LEN)):
        for i in range(0, len(blob), width):
            ip, port = blob[i : i + width - 2], blob[i + width - 2 : i + width]
            out.append({b"ip": str(ipaddress.ip_address(ip)).encode(),
                        b"port": int.from_bytes(port, "big")})  # fmt: skip
    return out


def tracker_metrics(table: PeerTable) -> Metrics:
    """The tracker's counters and gauges, all named ``p2p_tracker_*``."""
    metrics = Metrics(prefix="p2p_tracker")
    metrics.describe("announces_total", "Valid announces answered.")
    metrics.describe("scrapes_total", "Scrapes answered.")
    metrics.describe("failures_total", "Requests answered with a failure reason.")
    metrics.describe("expired_peers_total", "Peers dropped for missing announces.")
    metrics.describe("refused_total", "Announces and scrapes refused, by cap or check.")
    for name in ("announces_total", "scrapes_total", "failures_total", "expired_peers_total"):
        metrics.inc(name, 0)
    for reason in REFUSALS:
        metrics.inc("refused_total", 0, reason=reason)
    metrics.gauge("torrents", lambda: table.counts()[0], "Swarms with at least one live peer.")
    metrics.gauge("peers", lambda: table.counts()[1], "Live peers by role.", role="seeder")
    metrics.gauge("peers", lambda: table.counts()[2], "Live peers by role.", role="leecher")
    return metrics


class TrackerService:
    """The tracker's state and request handling, with no sockets (``handle`` is called by
    the HTTP protocol, or directly by tests)."""

    def __init__(
        self,
        cfg: TrackerConfig,
        auth: ClusterAuth,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        check_config(cfg)
        self.auth = auth
        self.interval = max(1, round(cfg.interval))
        self.seed_interval = max(1, round(cfg.seed_interval))
        self.table = PeerTable(
            peer_ttl=peer_ttl(cfg),
            seed_ttl=seed_ttl(cfg),
            default_numwant=min(DEFAULT_NUMWANT, cfg.max_numwant),
            max_numwant=cfg.max_numwant,
            max_torrents=cfg.max_torrents,
            max_peers_per_torrent=cfg.max_peers_per_torrent,
            max_peers=cfg.max_peers,
            clock=clock,
            rng=rng,
        )
        self.limiter = SourceRateLimit(cfg.announce_rate, cfg.announce_burst, clock=clock)
        self.metrics = tracker_metrics(self.table)

    def handle(self, path: bytes, raw_query: str, source: IPAddress | None) -> Response:
        if path == b"/announce":
            return self.announce(raw_query, source)
        if path == b"/scrape":
            return self.scrape(raw_query, source)
        if path == b"/healthz":
            return Response(200, b"ok\n")
        if path == b"/metrics":
            return Response(200, self.render_metrics().encode(), CONTENT_TYPE.encode())
        return Response(404, b"not found\n")

    def _refuse(self, reason: str, retry_in: int | None = None) -> Refusal:
        self.metrics.inc("refused_total", reason=reason)
        return Refusal(REFUSALS[reason], retry_in)

    def _fail(self, error: RequestError, source: IPAddress | None) -> Refusal:
        self.metrics.inc("failures_total")
        log.debug("bad request from %s: %s", source, error)
        return Refusal(str(error))

    def serve_announce(
        self, source: IPAddress | None, parse: Callable[[], Announce]
    ) -> tuple[Announce, AnnounceResult, int]:
        """Rate limit, ``parse()``, token and caps, whatever protocol carried the announce:
        (the announce, its peers, the interval to tell it), or ``Refusal``."""
        req = self._admit(source, parse)
        if req.claimed_ip is not None and self.auth.enabled:
            req = dataclasses.replace(req, ip=req.claimed_ip)
        result = self.table.announce(req)
        if result.refused:
            raise self._refuse(result.refused, self.interval)
        self.metrics.inc("announces_total")
        return req, result, self.seed_interval if req.seeder else self.interval

    def serve_scrape(
        self, source: IPAddress | None, parse: Callable[[], Scrape]
    ) -> dict[bytes, ScrapeEntry]:
        """Counts for the scraped hashes (only those: there is no full scrape), or
        ``Refusal``."""
        req = self._admit(source, parse)
        self.metrics.inc("scrapes_total")
        return self.table.scrape(req.info_hashes)

    def _admit(self, source: IPAddress | None, parse: Callable[[], Request]) -> Request:
        """The parsed request of a source within its rate that presented the token."""
        if not self.limiter.allow(source):
            raise self._refuse("rate", RETRY_RATE)
        try:
            req = parse()
        except RequestError as e:
            raise self._fail(e, source) from None
        if not self.auth.accepts(TRACKER, req.token):
            raise self._refuse("auth")
        return req

    def announce(self, raw_query: str, source: IPAddress | None) -> Response:
        try:
            req, result, interval = self.serve_announce(
                source, lambda: parse_announce(raw_query, source))
        except Refusal as r:
            return failure(r.message, r.retry_in)
        if req.compact:
            return Response(200, compact_body(result, interval, max(1, interval // 2)))
        return Response(200, bencode({
            b"interval": interval, b"min interval": max(1, interval // 2),
            b"complete": result.complete, b"incomplete": result.incomplete,
            b"peers": dict_peers(result),
        }))  # fmt: skip

    def scrape(self, raw_query: str, source: IPAddress | None) -> Response:
        try:
            counts = self.serve_scrape(source, lambda: parse_scrape(raw_query))
        except Refusal as r:
            return failure(r.message, r.retry_in)
        files = {
            ih: {b"complete": e.complete, b"incomplete": e.incomplete, b"downloaded": e.downloaded}
            for ih, e in counts.items()
        }
        return Response(200, bencode({b"files": files}))

    def housekeeping(self) -> None:
        """Forget stale peers, empty swarms and idle rate buckets."""
        dropped = self.table.expire()
        self.limiter.forget_idle()
        if dropped:
            log.debug("expired %d peers", dropped)

    def render_metrics(self) -> str:
        self.table.expire()
        # the peer table counts expiries itself (it has no metrics); bring the counter level
        level = self.table.expired_total - self.metrics.value("expired_peers_total")
        self.metrics.inc("expired_peers_total", level)
        return self.metrics.render()


def announce_url(listen: HostPort, scheme: str = "http") -> str:
    return f"{scheme}://{listen}/announce"


def connection_limit() -> int:
    """Open connections allowed: what the file-descriptor limit leaves, at most 10,000."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(10_000, soft - 64))


class RunningTracker:
    """A listening tracker; ``close()`` stops it."""

    def __init__(self, svc: TrackerService, listener: Listener, udp: UdpEndpoint,
                 conns: Connections, listen: HostPort) -> None:  # fmt: skip
        self.service = svc
        self.listener = listener
        self.udp = udp
        self.connections = conns
        self.listen = listen
        sweep = max(0.5, min(svc.table.peer_ttl / 2, 60.0))
        self._sweeper = asyncio.create_task(service.every(sweep, self._sweep, log))

    def _sweep(self) -> None:
        self.service.housekeeping()
        self.connections.close_idle()

    @property
    def url(self) -> str:
        return announce_url(self.listen)

    @property
    def udp_url(self) -> str:
        return announce_url(self.listen, "udp")

    async def close(self) -> None:
        self._sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sweeper
        self.listener.close()
        self.udp.close()
        self.connections.close_all()


def listen_socket(listen: HostPort) -> socket.socket:
    """A bound, listening TCP socket (an IPv6 wildcard also takes IPv4)."""
    sock = bound_socket(
        listen,
        socket.SOCK_STREAM,
        lambda s: s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1),
    )
    try:
        sock.listen(service.LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def bind_both(listen: HostPort) -> tuple[socket.socket, socket.socket]:
    """A listening TCP socket and a UDP socket on the same port number (port 0: a free
    one both protocols have)."""
    for _ in range(20 if listen.port == 0 else 1):
        tcp = listen_socket(listen)
        try:
            return tcp, udp_socket(HostPort(listen.host, tcp.getsockname()[1]))
        except OSError:
            tcp.close()
            if listen.port != 0:
                raise
    raise OSError(f"no port free for both TCP and UDP on {listen.host}")


async def start(cfg: TrackerConfig, auth: ClusterAuth | None = None) -> RunningTracker:
    """Listen on ``cfg.listen`` (port 0: any free port), HTTP and UDP, and serve."""
    svc = TrackerService(cfg, auth or ClusterAuth.from_file(cfg.cluster_secret, "tracker"))
    conns = Connections(connection_limit(), IDLE_TIMEOUT)
    loop = asyncio.get_running_loop()
    tcp, udp = bind_both(cfg.listen)
    listener = Listener(loop, tcp, lambda: HttpProtocol(svc.handle, conns))
    endpoint = UdpEndpoint(loop, udp, UdpTracker(svc))
    return RunningTracker(svc, listener, endpoint, conns,
                          HostPort(cfg.listen.host, listener.port))  # fmt: skip


async def serve(cfg: TrackerConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then close the listener and every connection."""
    running = await start(cfg)
    log.info("tracker ready on %s and %s", running.url, running.udp_url)
    try:
        await stop.wait()
        log.info("tracker stopping")
    finally:
        await running.close()


def run_tracker(cfg: TrackerConfig) -> None:
    """Run the tracker until SIGTERM or SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        waiter = asyncio.create_task(service.wait_for_signal())
        waiter.add_done_callback(lambda _: stop.set())
        await serve(cfg, stop)

    asyncio.run(main())
