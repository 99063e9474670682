"""The tracker's HTTP face: ``/announce``, ``/scrape``, ``/healthz``, ``/metrics`` (aiohttp).

Malformed requests are answered ``200`` with a bencoded ``failure reason`` (what BitTorrent
clients understand), never a 500. Bencoding is libtorrent's own ``lt.bencode``, fed bytes
keys and bytes values only (it sorts keys itself and deprecates str input).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import libtorrent as lt
from aiohttp import web

from p2p_mirror.core.config import ConfigError, HostPort, TrackerConfig
from p2p_mirror.tracker.params import RequestError, parse_announce, parse_scrape
from p2p_mirror.tracker.peers import AnnounceResult, Peer, Tracker

log = logging.getLogger("tracker")

DEFAULT_NUMWANT = 50
SCRAPE_ALL_LIMIT = 1000
BENCODE_TYPE = "text/plain"

TRACKER_KEY = web.AppKey("tracker", Tracker)
STATS_KEY = web.AppKey("stats", dict)
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
    stats = app[STATS_KEY]
    try:
        req = parse_announce(_raw_query(request), request.remote)
        result = app[TRACKER_KEY].announce(req)
    except RequestError as e:
        stats["failures"] += 1
        log.debug("bad announce from %s: %s", request.remote, e)
        return failure(str(e))
    except Exception:
        stats["failures"] += 1
        log.exception("announce from %s failed", request.remote)
        return failure("internal tracker error")
    stats["announces"] += 1
    interval = max(1, round(app[INTERVAL_KEY]))
    body = announce_body(result, interval, req.compact, req.no_peer_id)
    return web.Response(body=bencode(body), content_type=BENCODE_TYPE)


async def handle_scrape(request: web.Request) -> web.Response:
    app = request.app
    stats = app[STATS_KEY]
    try:
        hashes = parse_scrape(_raw_query(request))
        tracker = app[TRACKER_KEY]
        entries = tracker.scrape(hashes) if hashes else tracker.scrape_all(SCRAPE_ALL_LIMIT)
    except RequestError as e:
        stats["failures"] += 1
        return failure(str(e))
    except Exception:
        stats["failures"] += 1
        log.exception("scrape from %s failed", request.remote)
        return failure("internal tracker error")
    stats["scrapes"] += 1
    files = {
        ih: {b"complete": e.complete, b"incomplete": e.incomplete, b"downloaded": e.downloaded}
        for ih, e in entries.items()
    }
    return web.Response(body=bencode({b"files": files}), content_type=BENCODE_TYPE)


async def handle_healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def handle_metrics(request: web.Request) -> web.Response:
    app = request.app
    tracker = app[TRACKER_KEY]
    tracker.expire()
    torrents, seeders, leechers = tracker.counts()
    stats = app[STATS_KEY]
    lines = [
        "# HELP p2p_tracker_torrents Swarms with at least one live peer.",
        "# TYPE p2p_tracker_torrents gauge",
        f"p2p_tracker_torrents {torrents}",
        "# HELP p2p_tracker_peers Live peers by role.",
        "# TYPE p2p_tracker_peers gauge",
        f'p2p_tracker_peers{{role="seeder"}} {seeders}',
        f'p2p_tracker_peers{{role="leecher"}} {leechers}',
        "# HELP p2p_tracker_announces_total Valid announces answered.",
        "# TYPE p2p_tracker_announces_total counter",
        f"p2p_tracker_announces_total {stats['announces']}",
        "# HELP p2p_tracker_scrapes_total Scrapes answered.",
        "# TYPE p2p_tracker_scrapes_total counter",
        f"p2p_tracker_scrapes_total {stats['scrapes']}",
        "# HELP p2p_tracker_failures_total Requests answered with a failure reason.",
        "# TYPE p2p_tracker_failures_total counter",
        f"p2p_tracker_failures_total {stats['failures']}",
        "# HELP p2p_tracker_expired_peers_total Peers dropped for missing announces.",
        "# TYPE p2p_tracker_expired_peers_total counter",
        f"p2p_tracker_expired_peers_total {tracker.expired_total}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    """Forget stale peers and empty swarms even when nobody announces to them any more."""
    tracker = app[TRACKER_KEY]
    period = max(0.5, min(tracker.peer_ttl / 2, 60.0))

    async def loop() -> None:
        while True:
            await asyncio.sleep(period)
            dropped = tracker.expire()
            if dropped:
                log.debug("expired %d peers", dropped)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app(cfg: TrackerConfig) -> web.Application:
    """The tracker application (state lives in the app; one app, one tracker)."""
    check_config(cfg)
    app = web.Application()
    app[TRACKER_KEY] = Tracker(
        peer_ttl=peer_ttl(cfg),
        default_numwant=min(DEFAULT_NUMWANT, cfg.max_numwant),
        max_numwant=cfg.max_numwant,
    )
    app[STATS_KEY] = {"announces": 0, "scrapes": 0, "failures": 0}
    app[INTERVAL_KEY] = cfg.interval
    app.cleanup_ctx.append(_sweeper)
    app.router.add_get("/announce", handle_announce)
    app.router.add_get("/scrape", handle_scrape)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/metrics", handle_metrics)
    return app


def announce_url(listen: HostPort) -> str:
    return f"http://{listen}/announce"


def _bound(runner: web.AppRunner, fallback: HostPort) -> HostPort:
    """The address actually bound (port 0 in the config means "any free port")."""
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            host = str(ipaddress.ip_address(addr[0])) if addr[0] else fallback.host
            return HostPort(host, int(addr[1]))
    return fallback


async def serve(cfg: TrackerConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then close the listener and drain."""
    app = make_app(cfg)
    access_log = logging.getLogger("aiohttp.access") if cfg.log_level == "DEBUG" else None
    runner = web.AppRunner(app, access_log=access_log, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.listen.host, cfg.listen.port, reuse_address=True)
        await site.start()
        log.info("tracker ready on %s", announce_url(_bound(runner, cfg.listen)))
        await stop.wait()
        log.info("tracker stopping")
    finally:
        await runner.cleanup()


def run_tracker(cfg: TrackerConfig) -> None:
    """Run the tracker until SIGTERM or SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop)

    asyncio.run(main())
