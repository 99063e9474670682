"""The node agent: an OCI distribution pull API on 127.0.0.1:5004 for the local runtime.

Manifests pass through to the origin with the client's credentials; blobs come from the
local cache or the swarm (``p2p_mirror.agent.pull``), after the origin confirmed that this client
may read them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from p2p_mirror.agent.access import after_other_registry, confirm_source
from p2p_mirror.agent.blob_download import BlobDownload
from p2p_mirror.agent.node_address import bt_listen_for
from p2p_mirror.agent.passthrough import StreamAborted, stream_uncached
from p2p_mirror.agent.pull import BlobPuller
from p2p_mirror.agent.seeder_client import SeederClient
from p2p_mirror.agent.seeder_set import SeederSet
from p2p_mirror.core.bounds import MAX_MANIFEST_BYTES, TooLarge, check_size, content_length
from p2p_mirror.core.clusterauth import SEEDER_API, ClusterAuth
from p2p_mirror.core.config import AgentConfig, Upstream, parse_registry_name
from p2p_mirror.core.diskspace import NoSpace, Reservation
from p2p_mirror.core.file_sender import FileSender, send_file_range
from p2p_mirror.core.metrics import Metrics
from p2p_mirror.core.oci import (
    Digest,
    OCIError,
    looks_like_registry,
    oci_http_errors,
    validate_name,
    validate_reference,
)
from p2p_mirror.core.origin import (
    Origin,
    OriginBodyTooLarge,
    OriginUnavailable,
    error_for_status,
    forward_headers,
)
from p2p_mirror.core.seeding import SeededBlobs
from p2p_mirror.core.service import background, every, healthz, serve, wait_for_signal
from p2p_mirror.core.store import BlobLayout, BlobStore
from p2p_mirror.core.swarm import TorrentSession
from p2p_mirror.core.tls import TLSError

log = logging.getLogger("p2p_mirror.agent")
ROUTE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}


@dataclass(frozen=True)
class Target:
    upstream: Upstream
    name: str
    kind: str
    ref: str


@dataclass(frozen=True)
class Access:
    """What the origin said about a blob for one client's credentials."""

    status: int
    headers: CIMultiDict
    body: bytes
    size: int
    expires: float


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.store = BlobStore(cfg.data_dir)
        self.origin = Origin(cfg.origin_timeout, "agent")
        self.metrics = Metrics()
        self.session = (
            TorrentSession(bt_listen_for(cfg.bt_listen, cfg.announce_ip), cfg.upload_rate_limit,
                           cfg.download_rate_limit, tracker_peers=cfg.swarm_peers,
                           announce_ip=cfg.announce_ip)  # fmt: skip
            if cfg.seeder
            else None
        )
        self.cluster = ClusterAuth.from_file(cfg.cluster_secret, "agent")
        self.seeders = (
            SeederClient(SeederSet(cfg.seeder), cfg.swarm_timeout, self.cluster.token(SEEDER_API))
            if cfg.seeder else None
        )  # fmt: skip
        self.seeded = SeededBlobs(self.store, self.session) if self.session is not None else None
        self.puller = BlobPuller(
            self.store,
            self.origin,
            self.session,
            self.seeders,
            self.metrics,
            cfg.swarm_timeout,
            cfg.stall_timeout,
            cfg.seeder_grace,
            on_cached=lambda digest: self.gc(),
            seeded=self.seeded,
            swarm_min_rate=cfg.swarm_min_rate,
            origin_min_rate=cfg.origin_min_rate,
            reserve=self.reserve,
        )
        self.access: dict[tuple[str, ...], Access] = {}
        self.in_use: Counter[Digest] = Counter()  # requests per blob now
        self.flights: dict[tuple, asyncio.Future] = {}
        for name, text in (
            ("blob_bytes_total", "Blob bytes obtained, by source (swarm, origin, cache)"),
            ("served_bytes_total", "Blob bytes sent to clients"),
            ("fallbacks_total", "Swarm fetches that fell back to the origin, by reason"),
            ("requests_total", "Requests by kind and HTTP status"),
            ("blob_failures_total", "Blob fetches that failed, by OCI error code"),
            ("seeder_pieces_total", "Pieces the seeder dealt to this agent, fetched over HTTP"),
            ("seeder_segments_total", "Segments taken from the seeder's swarm: stalled, or a "
             "dealt piece failed"),
            ("dealt_segments_total", "Segments the seeder dealt to this agent whole, written "
             "straight into their files and checked there"),
            ("uncached_blobs_total", "Blobs streamed from the origin without caching (no room)"),
            ("orphaned_downloads_total", "Downloads cancelled because every reader had left"),
            ("origin_resumes_total", "Origin bodies cut or stalled and asked again from their "
             "offset"),
            ("origin_deadlines_total", "Downloads failed because the origin's part was not in "
             "by its deadline (origin_min_rate)"),
        ):
            self.metrics.describe(name, text)

    async def start(self) -> None:
        removed = self.store.recover()
        if removed:
            log.info("removed %d unverified leftovers from an earlier run", len(removed))
        if self.session is not None:
            await self.session.start()
            self.metrics.gauge("swarm_download_bytes", lambda: self.session.totals().downloaded,
                               "Payload downloaded from peers (live torrents)")
            self.metrics.gauge("swarm_upload_bytes", lambda: self.session.totals().uploaded,
                               "Payload uploaded to peers (live torrents)")
            self.metrics.gauge("swarm_wasted_bytes", lambda: self.session.totals().wasted,
                               "Payload received twice or failing its hash (live torrents)")
            self.metrics.gauge("torrents", lambda: len(self.session.transfers), "Torrents")
            assert self.seeded is not None
            log.info("re-seeding %d cached blobs", len(self.seeded.reseed_all()))
        self.metrics.gauge("cache_bytes", self.store.usage, "Bytes of verified cached blobs")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.seeders is not None:
            await self.seeders.close()
        await self.origin.close()

    def reserve(self, size: int) -> Reservation:
        """Disk space for a new download (``NoSpace`` when eviction cannot make room)."""
        return self.store.reserve(
            size, self.cfg.cache_max_bytes, self.cfg.min_free_disk, self.protected(),
            before_evict=self.seeded.stop if self.seeded is not None else lambda digest: None,
        )

    def gc(self) -> None:
        protected = self.protected()
        evicted = self.store.gc(
            self.cfg.cache_max_bytes,
            self.cfg.min_free_disk,
            protected,
            before_evict=self.seeded.stop if self.seeded is not None else lambda digest: None,
        )
        for digest in evicted:
            log.info("evicted %s from the cache", digest)

    # --- routing -------------------------------------------------------------------------

    def parse_target(self, request: web.Request) -> Target:
        m = ROUTE.fullmatch(request.path)
        if not m:
            raise OCIError("NAME_UNKNOWN", "unsupported path")
        name, kind, ref = m.group("name"), m.group("kind"), m.group("ref")
        ns = request.query.get("ns")
        if ns is not None:
            try:
                registry = parse_registry_name(ns)
            except ValueError:
                raise OCIError("NAME_INVALID", "invalid ns parameter", {"ns": ns[:200]}) from None
        else:
            first, _, rest = name.partition("/")
            if rest and looks_like_registry(first):
                try:
                    registry, name = parse_registry_name(first), rest
                except ValueError:
                    raise OCIError("NAME_INVALID", "invalid registry in path") from None
            else:
                registry = self.cfg.default_registry
        validate_name(name)
        if kind == "blobs":
            Digest.parse(ref)
        else:
            validate_reference(ref)
        upstream = self.cfg.upstream(registry)
        if upstream is None:
            # Not accelerated: a 404 sends the runtime on to its fallback host, and an image
            # name cannot make this agent connect anywhere (docs/security.md, rule 1).
            raise OCIError("NAME_UNKNOWN", "registry not served by this mirror")
        return Target(upstream, name, kind, ref)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        kind = "other"
        try:
            if request.method not in ("GET", "HEAD"):
                raise OCIError("UNSUPPORTED", "this mirror is pull-only")
            target = self.parse_target(request)
            kind = target.kind
            if target.kind == "manifests":
                resp = await self.manifest(request, target)
            else:
                resp = await self.blob(request, target)
        except OCIError as e:
            resp = e.response(API_HEADERS)
        except OriginBodyTooLarge as e:
            resp = OCIError("SIZE_INVALID", f"manifest too large: {e} (containerd's limit "
                            f"is {MAX_MANIFEST_BYTES})").response(API_HEADERS)  # fmt: skip
        except TooLarge as e:
            resp = OCIError("SIZE_INVALID", str(e)).response(API_HEADERS)
        except OriginUnavailable as e:
            log.warning("origin unavailable: %s", e)
            resp = OCIError("UNAVAILABLE", "origin registry unavailable").response(API_HEADERS)
        self.metrics.inc("requests_total", kind=kind, status=str(resp.status))
        return resp

    async def v2_root(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers=API_HEADERS)

    # --- manifests -----------------------------------------------------------------------

    async def manifest(self, request: web.Request, target: Target) -> web.Response:
        accept = [a.strip() for v in request.headers.getall("Accept", []) for a in v.split(",")]
        headers = forward_headers(request.headers, [a for a in accept if a])
        key = (request.method, target.upstream.name, target.name, target.ref,
               headers.get("Authorization", ""), tuple(headers.getall("Accept", [])))
        status, resp_headers, body = await self._coalesced(
            key,
            lambda: self.origin.request(
                request.method, target.upstream, target.name, "manifests", target.ref, headers,
                limit=MAX_MANIFEST_BYTES,
            ),
        )
        if status == 200 and request.method == "GET" and ":" in target.ref:
            digest = Digest.parse(target.ref)
            if hashlib.new(digest.algorithm, body).hexdigest() != digest.hex:
                raise OCIError("MANIFEST_INVALID", "origin manifest does not match its digest")
        out = CIMultiDict(resp_headers)
        out.update(API_HEADERS)
        if request.method == "HEAD":
            length = content_length(out)
            out.popall("Content-Length", None)
            head = web.StreamResponse(status=status, headers=out)
            if length is not None:
                head.content_length = length
            await head.prepare(request)
            await head.write_eof()
            return head
        out.popall("Content-Length", None)
        return web.Response(status=status, headers=out, body=body)

    async def _coalesced(self, key: tuple, call: Callable[[], Awaitable]) -> tuple:
        """Identical concurrent requests share one origin round trip."""
        flight = self.flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(call())
            self.flights[key] = flight
            flight.add_done_callback(lambda f: self.flights.pop(key, None))
        return await asyncio.shield(flight)

    # --- blobs ---------------------------------------------------------------------------

    async def check_access(self, request: web.Request, target: Target) -> Access:
        """Ask the origin (HEAD, client's credentials) whether this client may read the blob."""
        auth = request.headers.get("Authorization", "")
        auth_id = hashlib.sha256(auth.encode()).hexdigest()
        key = (target.upstream.name, target.name, target.ref, auth_id)
        now = time.monotonic()
        cached = self.access.get(key)
        if cached and cached.expires > now:
            return cached
        headers = forward_headers(request.headers)
        status, resp_headers, body = await self._coalesced(
            ("HEAD-blob", *key),
            lambda: self.origin.request("HEAD", target.upstream, target.name, "blobs",
                                        target.ref, headers),
        )
        length = content_length(resp_headers)
        size = -1 if length is None else length
        access = Access(status, resp_headers, body, size, now + self.cfg.auth_cache_ttl)
        if status == 200 and size >= 0:
            if len(self.access) > 10000:
                self.access.clear()
            self.access[key] = access
        return access

    async def blob(self, request: web.Request, target: Target) -> web.StreamResponse:
        # A blob some request is reading or confirming is not evicted under it (a new
        # download's reservation may evict, and would cut that response).
        digest = Digest.parse(target.ref)
        self.in_use[digest] += 1
        try:
            return await self._blob(request, target, digest)
        finally:
            self.in_use[digest] -= 1
            if not self.in_use[digest]:
                del self.in_use[digest]

    def protected(self) -> set[Digest]:
        """Blobs eviction must leave alone: being downloaded or being served."""
        return set(self.puller.active) | set(self.in_use)

    async def _blob(self, request: web.Request, target: Target,
                    digest: Digest) -> web.StreamResponse:  # fmt: skip
        access = await self.check_access(request, target)
        if access.status != 200:
            # The origin's refusal goes back with its challenge, so the client can log in.
            extra = {k: v for k, v in access.headers.items() if k.lower() == "www-authenticate"}
            return error_for_status(access.status, "blobs").response({**API_HEADERS, **extra})
        if access.size < 0:
            raise OCIError("UNAVAILABLE", "origin did not report the blob size")
        check_size("blob", access.size, self.cfg.max_blob_size, "max_blob_size")
        headers = {
            **API_HEADERS,
            "Docker-Content-Digest": str(digest),
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        byte_range = parse_range(request.headers.get("Range"), access.size)
        await after_other_registry(self.puller.active.get(digest), target.upstream)
        layout = self.store.layout(digest)
        if layout is not None:
            await self._coalesced(
                ("confirm", target.upstream.name, target.name, str(digest),
                 hashlib.sha256(request.headers.get("Authorization", "").encode()).hexdigest()),
                lambda: confirm_source(self.store, self.origin, layout, target.upstream,
                                       target.name, digest, request.headers),
            )  # fmt: skip
            self.store.touch(digest)
            return await self.serve_cached(request, layout, byte_range, headers)
        if request.method == "HEAD":
            head = web.StreamResponse(headers=headers)
            head.content_length = access.size
            await head.prepare(request)
            await head.write_eof()
            return head
        try:
            download = self.puller.start(digest, access.size, target.upstream, target.name,
                                         request.headers)  # fmt: skip
        except NoSpace as e:
            # No room in the cache: the pull goes on from the origin, only without P2P.
            log.warning("blob %s: %s; streaming it from the origin uncached", digest, e)
            self.metrics.inc("uncached_blobs_total")
            return await stream_uncached(request, self.origin, target.upstream, target.name,
                                         digest, access.size, byte_range, headers,
                                         self.metrics, self.cfg.stall_timeout,
                                         self.cfg.origin_min_rate)  # fmt: skip
        if download.upstream.name != target.upstream.name:
            # Never another registry's bytes (after_other_registry waited for that one to end).
            raise OCIError("UNAVAILABLE", "blob busy, try again")
        download.readers += 1
        try:
            return await self.stream(request, download, byte_range, headers)
        finally:
            download.readers -= 1
            self.puller.reader_left(download)

    async def serve_cached(
        self, request: web.Request, layout: BlobLayout, byte_range, headers: dict[str, str]
    ) -> web.StreamResponse:
        start, end = byte_range or (0, layout.size)
        if request.method == "GET":
            self.metrics.inc("blob_bytes_total", end - start, source="cache")
            self.metrics.inc("served_bytes_total", end - start)
        if layout.count == 1 and "Range" not in request.headers:
            # sendfile (aiohttp would parse a Range again, by other rules than parse_range)
            return web.FileResponse(layout.segment_path(0), headers=headers)
        return await self._send(request, layout, byte_range, headers, lambda pos: None,
                                lambda: layout.size)  # fmt: skip

    async def stream(
        self, request: web.Request, download: BlobDownload, byte_range, headers
    ) -> web.StreamResponse:
        """Send bytes as the download produces them; abort (never finish) if it fails."""
        await download.wait_beyond(byte_range[0] if byte_range else 0)  # fails before any byte
        assert download.layout is not None

        async def ready(pos: int) -> None:
            await download.wait_beyond(pos)

        return await self._send(request, download.layout, byte_range, headers, ready,
                                lambda: download.releasable)  # fmt: skip

    async def _send(
        self, request: web.Request, layout: BlobLayout, byte_range, headers: dict[str, str],
        ready: Callable[[int], Awaitable[None] | None], available: Callable[[], int],
    ) -> web.StreamResponse:
        """Send the blob's bytes from its segment files with sendfile (no copy through
        Python): each call sends what is ``available`` (verified) of one segment."""
        start, end = byte_range or (0, layout.size)
        resp = web.StreamResponse(status=206 if byte_range else 200, headers=headers)
        resp.content_length = end - start
        if byte_range:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{layout.size}"
        await resp.prepare(request)  # sends the headers at once
        if request.method == "HEAD":
            await resp.write_eof()
            return resp
        pos = start
        sender = None if request.transport is None else FileSender.for_transport(request.transport)
        try:
            while pos < end:
                waiting = ready(pos)
                if waiting is not None:
                    await waiting
                index, inner = divmod(pos, layout.segment_size)
                count = min(end, available(), (index + 1) * layout.segment_size) - pos
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("client went away")
                # opened per call: a fallback to the origin writes the rest into new files
                try:
                    with open(layout.segment_path(index), "rb") as f:
                        sent = await send_file_range(transport, sender, f, inner, count)
                except FileNotFoundError:
                    sent = 0
                if not sent:
                    raise OCIError("UNAVAILABLE", "blob source ended early")
                pos += sent
                self.metrics.inc("served_bytes_total", sent)
        except OCIError as e:
            # Headers are gone: cut the connection so the client never sees a complete blob.
            log.warning("aborting %s after %d bytes: %s", request.path, pos - start, e)
            raise StreamAborted(str(e)) from e
        finally:
            if sender is not None:
                sender.close()
        await resp.write_eof()
        return resp

    def app(self) -> web.Application:
        app = web.Application(middlewares=[oci_http_errors])
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", self.metrics.handler)
        app.router.add_route("GET", "/v2/", self.v2_root)
        app.router.add_route("GET", "/v2", self.v2_root)
        app.router.add_route("*", "/v2/{tail:.*}", self.handle)
        return app

    def metrics_app(self) -> web.Application:
        """What Prometheus scrapes on ``metrics_listen``: no registry API there."""
        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", self.metrics.handler)
        return app


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single ``bytes=a-b`` range as [start, end); None for no (or a multi-) range."""
    if not header:
        return None
    if not header.strip().startswith("bytes=") or "," in header:
        return None  # another unit, or several ranges: RFC 9110 lets us send the whole blob
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        raise OCIError("RANGE_INVALID", "invalid Range header")
    if not m.group(1):
        length = int(m.group(2))
        start, end = max(0, size - length), size
    else:
        start = int(m.group(1))
        end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    if start >= size or start >= end:
        raise OCIError("RANGE_INVALID", "range not satisfiable", {"size": size})
    return start, end


async def _main(cfg: AgentConfig) -> None:
    agent = Agent(cfg)
    await agent.start()
    proxy = None
    if cfg.proxy_listen is not None:  # before the mirror: its port open means all is up
        from p2p_mirror.agent.proxy import proxied_registries, start_proxy

        names = proxied_registries(cfg.registries, cfg.default_registry)
        try:
            proxy = await start_proxy(agent, cfg.proxy_listen, cfg.data_dir, names)
        except (TLSError, OSError) as e:
            await agent.close()
            raise SystemExit(f"agent: proxy on {cfg.proxy_listen}: {e}") from None
    runner = await serve(agent.app(), cfg.listen.host, cfg.listen.port, "agent", log,
                         cfg.drain_timeout)  # fmt: skip
    runners = [runner]
    if cfg.metrics_listen is not None:
        runners.append(await serve(agent.metrics_app(), cfg.metrics_listen.host,
                                   cfg.metrics_listen.port, "agent metrics", log, 1.0))  # fmt: skip
    if agent.session is not None:
        log.info("agent BitTorrent on %s:%d", agent.session.listen.host, agent.session.port)
    else:
        log.info("no seeder configured: blobs come from the origin (and the cache)")
    try:
        async with background(every(60, agent.gc, log)):
            await wait_for_signal()
    finally:
        if proxy is not None:
            await proxy.close()
        for each in runners:
            await each.cleanup()
        await agent.close()


def run_agent(cfg: AgentConfig) -> None:
    asyncio.run(_main(cfg))
