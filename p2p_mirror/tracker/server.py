"""The tracker's HTTP face: ``/announce``, ``/scrape``, ``/healthz``, ``/metrics`` (aiohttp).

Malformed requests are answered ``200`` with a bencoded ``failure reason`` (what BitTorrent
clients understand), never a 500. Bencoding is libtorrent's own ``lt.bencode``, fed bytes
keys and bytes values only (it sorts keys itself and deprecates str input).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import libtorrent as lt
from aiohttp import web

from p2p_mirror.core import service
from p2p_mirror.core.config import ConfigError, HostPort, TrackerConfig
from p2p_mirror.core.metrics import Metrics
from p2p_mirror.tracker.params import RequestError, parse_announce, parse_scrape
from p2p_mirror.tracker.peers import AnnounceResult, Peer, PeerTable

log = logging.getLogger("tracker")

DEFAULT_NUMWANT = 50
SCRAPE_ALL_LIMIT = 1000
BENCODE_TYPE = "text/plain"

TRACKER_KEY = web.AppKey("tracker", PeerTable)
METRICS_KEY = web.AppKey("metrics", Metrics)
INTERVAL_KEY = web.AppKey("interval", float)


def check_config(cfg: TrackerConfig) -> None:
    """Reject values the generic config parsers let through; messages name the key."""
    if cfg.peer_ttl < 0:
        raise ConfigError("tracker config: peer_ttl: must not be negative (0: 3 x interval)")
    if cfg.max_numwant < 1:
        raise ConfigError("tracker config: max_numwant: must be at least 1")


def peer_ttl(cfg: TrackerConfig) -> float:
    return cfg.peer_ttl if cfg.peer_ttl > 0 else 3 * cfg.interval


def bencode(value: dict[bytes, Any]) -> bytes:
    return bytes(lt.bencode(value))


def failure(reason: str) -> web.Response:
    body = bencode({b"failure reason": reason.encode()})
    return web.Response(body=body, content_type=BENCODE_TYPE)


def compact_peers(peers: list[Peer]) -> tuple[bytes, bytes]:
    """BEP 23 ``peers`` (IPv4, 6 bytes each) and BEP 7 ``peers6`` (IPv6, 18 bytes each)."""
    v4, v6 = bytearray(), bytearray()
    for p in peers:
        (v4 if p.ip.version == 4 else v6).extend(p.ip.packed + p.port.to_bytes(2, "big"))
    return bytes(v4), bytes(v6)


def dict_peers(peers: list[Peer], no_peer_id: bool) -> list[dict[bytes, Any]]:
    out = []
    for p in peers:
        entry: dict[bytes, Any] = {b"ip": str(p.ip).encode(), b"port": p.port}
        if not no_peer_id:
            entry[b"peer id"] = p.peer_id
        out.append(entry)
    return out


def announce_body(
    result: AnnounceResult, interval: int, compact: bool, no_peer_id: bool
) -> dict[bytes, Any]:
    body: dict[bytes, Any] = {
        b"interval": interval,
        b"min interval": max(1, interval // 2),
        b"complete": result.complete,
        b"incomplete": result.incomplete,
    }
    if compact:
        body[b"peers"], peers6 = compact_peers(result.peers)
        if peers6:
            body[b"peers6"] = peers6
    else:
        body[b"peers"] = dict_peers(result.peers, no_peer_id)
    return body


def _raw_query(request: web.Request) -> str:
    # Not request.query_string: yarl returns that percent-decoded, which corrupts raw bytes.
    return request.rel_url.raw_query_string


async def handle_announce(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS_KEY]
    try:
        req = parse_announce(_raw_query(request), request.remote)
        result = app[TRACKER_KEY].announce(req)
    except RequestError as e:
        metrics.inc("failures_total")
        log.debug("bad announce from %s: %s", request.remote, e)
        return failure(str(e))
    metrics.inc("announces_total")
    interval = max(1, round(app[INTERVAL_KEY]))
    body = announce_body(result, interval, req.compact, req.no_peer_id)
    return web.Response(body=bencode(body), content_type=BENCODE_TYPE)


async def handle_scrape(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS_KEY]
    try:
        hashes = parse_scrape(_raw_query(request))
        tracker = app[TRACKER_KEY]
        entries = tracker.scrape(hashes) if hashes else tracker.scrape_all(SCRAPE_ALL_LIMIT)
    except RequestError as e:
        metrics.inc("failures_total")
        return failure(str(e))
    metrics.inc("scrapes_total")
    files = {
        ih: {b"complete": e.complete, b"incomplete": e.incomplete, b"downloaded": e.downloaded}
        for ih, e in entries.items()
    }
    return web.Response(body=bencode({b"files": files}), content_type=BENCODE_TYPE)


def tracker_metrics(tracker: PeerTable) -> Metrics:
    """The tracker's counters and gauges, all named ``p2p_tracker_*``."""
    metrics = Metrics(prefix="p2p_tracker")
    metrics.describe("announces_total", "Valid announces answered.")
    metrics.describe("scrapes_total", "Scrapes answered.")
    metrics.describe("failures_total", "Requests answered with a failure reason.")
    for name in ("announces_total", "scrapes_total", "failures_total"):
        metrics.inc(name, 0)
    metrics.gauge("torrents", lambda: tracker.counts()[0],
                  "Swarms with at least one live peer.")  # fmt: skip
    metrics.gauge("peers", lambda: tracker.counts()[1], "Live peers by role.", role="seeder")
    metrics.gauge("peers", lambda: tracker.counts()[2], "Live peers by role.", role="leecher")
    metrics.describe("expired_peers_total", "Peers dropped for missing announces.")
    metrics.inc("expired_peers_total", 0)
    return metrics


async def handle_metrics(request: web.Request) -> web.Response:
    tracker, metrics = request.app[TRACKER_KEY], request.app[METRICS_KEY]
    tracker.expire()
    # the peer table counts expiries itself (it has no metrics); bring the counter level
    metrics.inc("expired_peers_total", tracker.expired_total - metrics.value("expired_peers_total"))
    return await metrics.handler(request)


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    """Forget stale peers and empty swarms even when nobody announces to them any more."""
    tracker = app[TRACKER_KEY]
    period = max(0.5, min(tracker.peer_ttl / 2, 60.0))
    async with service.background(service.every(period, tracker.expire, log)):
        yield


def make_app(cfg: TrackerConfig) -> web.Application:
    """The tracker application (state lives in the app; one app, one tracker)."""
    check_config(cfg)
    app = web.Application()
    app[TRACKER_KEY] = PeerTable(
        peer_ttl=peer_ttl(cfg),
        default_numwant=min(DEFAULT_NUMWANT, cfg.max_numwant),
        max_numwant=cfg.max_numwant,
    )
    app[METRICS_KEY] = tracker_metrics(app[TRACKER_KEY])
    app[INTERVAL_KEY] = cfg.interval
    app.cleanup_ctx.append(_sweeper)
    app.router.add_get("/announce", handle_announce)
    app.router.add_get("/scrape", handle_scrape)
    app.router.add_get("/healthz", service.healthz)
    app.router.add_get("/metrics", handle_metrics)
    return app


def announce_url(listen: HostPort) -> str:
    return f"http://{listen}/announce"


async def serve(cfg: TrackerConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then close the listener."""
    runner = await service.serve(make_app(cfg), cfg.listen.host, cfg.listen.port, "tracker",
                                 log, drain=1.0)  # fmt: skip
    try:
        await stop.wait()
        log.info("tracker stopping")
    finally:
        await runner.cleanup()


def run_tracker(cfg: TrackerConfig) -> None:
    """Run the tracker until SIGTERM or SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        waiter = asyncio.create_task(service.wait_for_signal())
        waiter.add_done_callback(lambda _: stop.set())
        await serve(cfg, stop)

    asyncio.run(main())
