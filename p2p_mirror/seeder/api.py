"""The seeder's HTTP API (``p2p_mirror.core.protocol``): blob info, segment torrents with
the agent's dealt run of pieces (inline after the torrent, or on request), and the pieces.

The only place where ingest failures become OCI errors."""

from __future__ import annotations

import contextlib
import os

from aiohttp import web

from p2p_mirror.core import protocol
from p2p_mirror.core.clusterauth import SEEDER_API, TOKEN_HEADER, ClusterAuth
from p2p_mirror.core.file_sender import FileSender, send_file_range
from p2p_mirror.core.metrics import Metrics
from p2p_mirror.core.oci import Digest, OCIError, oci_http_errors, validate_name
from p2p_mirror.core.origin import error_for_status
from p2p_mirror.core.service import healthz
from p2p_mirror.core.swarm import Metainfo, TorrentSession
from p2p_mirror.seeder.dealing import Dealer
from p2p_mirror.seeder.ingest import Ingest, IngestError, IngestJob

WRITE_BYTES = 1024 * 1024  # bytes of whole pieces per write of a dealt run (at least one)


def oci_error_for(error: IngestError) -> OCIError:
    """The answer an agent gets for a failed ingest: a fixed message per reason, never the
    origin's address or an exception's text (those go to the seeder's log)."""
    if error.reason == IngestError.ORIGIN_REFUSED and error.origin_status is not None:
        return error_for_status(error.origin_status, "blobs")
    if error.reason == IngestError.TOO_LARGE:
        return OCIError("SIZE_INVALID", error.message)
    if error.reason == IngestError.DIGEST_MISMATCH:
        return OCIError("DIGEST_INVALID", "origin bytes do not match the digest")
    return OCIError("UNAVAILABLE", PUBLIC_MESSAGES.get(error.reason, "seeder error"))


PUBLIC_MESSAGES = {
    IngestError.ORIGIN_UNAVAILABLE: "origin registry unavailable",
    IngestError.ORIGIN_INCOMPLETE: "origin sent an incomplete blob",
}


def parameter_error(error: protocol.ProtocolError) -> OCIError:
    return OCIError("PARAMETER_INVALID", str(error))


def _index(text: str) -> int:
    """A segment or piece index from the path (the route allows digits only)."""
    if len(text) > 9:
        raise protocol.ProtocolError(f"index {text[:20]}...: too large")
    return int(text)


class SeederAPI:
    def __init__(self, ingest: Ingest, dealer: Dealer, session: TorrentSession,
                 metrics: Metrics, cluster: ClusterAuth | None = None) -> None:  # fmt: skip
        self.cluster = cluster if cluster is not None else ClusterAuth(None, "seeder")
        self.ingest = ingest
        self.dealer = dealer
        self.session = session
        self.metrics = metrics
        metrics.describe("piece_bytes_total", "Bytes of dealt pieces sent to agents")

    async def handle_blob(self, request: web.Request) -> web.Response:
        try:
            digest = Digest.parse(request.match_info["digest"])
            name = validate_name(request.query.get(protocol.REPO_PARAM, ""))
            upstream = self.ingest.upstream(request.query.get(protocol.REGISTRY_PARAM, ""))
            job = await self.ingest.ensure(digest, upstream, name)
        except OCIError as e:
            return e.response()
        except IngestError as e:
            # Refused the seeder's own credentials: the agent fetches from the origin itself.
            return oci_error_for(e).response(
                {protocol.REFUSED_HEADER: "1"} if e.credentials_refused else None)  # fmt: skip
        layout = job.layout
        assert layout is not None
        info = protocol.BlobInfo(str(digest), layout.size, layout.segment_size, layout.count,
                                 self.session.port, self.ingest.cfg.announce_ip or "")  # fmt: skip
        return web.json_response(info.to_json())

    async def handle_torrent(self, request: web.Request) -> web.StreamResponse:
        try:
            digest = Digest.parse(request.match_info["digest"])
            index = _index(request.match_info["index"])
            query = protocol.TorrentQuery.parse(request.query)
        except protocol.ProtocolError as e:
            return parameter_error(e).response()
        except OCIError as e:
            return e.response()
        job = self.ingest.job(digest)
        if job is None or not job.has_segment(index):
            return OCIError("BLOB_UNKNOWN", "no such blob or segment").response()
        agent = protocol.agent_key(request.remote, query.bt_port)
        try:
            data, run = await self.ingest.torrent_for(job, index, agent, query.wait)
        except IngestError as e:
            return oci_error_for(e).response()
        except TimeoutError:
            # Not published yet (queued, or still arriving): this blob's progress tells the
            # agent a busy seeder from a stuck (or trickling) origin body.
            blob_bytes, queue_bytes = self.ingest.progress(job)
            return web.json_response(protocol.not_yet_body(blob_bytes, queue_bytes), status=202)
        if not query.inline:
            return web.Response(body=data, headers=protocol.offer_headers(run))
        # The run follows the torrent in this response: a second request would reach us a
        # round trip after the segment is out, and until then the uplink may idle.
        resp = web.StreamResponse(headers=protocol.offer_headers(run, len(data)))
        meta = job.metas[index]
        pieces = range(run[0], run[-1] + 1) if run else range(0)
        resp.content_length = len(data) + _run_bytes(meta, pieces)
        await resp.prepare(request)
        await resp.write(data)
        return await self._send_pieces(request, resp, job, index, pieces)

    async def handle_pieces(self, request: web.Request) -> web.StreamResponse:
        """``count`` (default 1) consecutive pieces of a published segment, for the agent
        they were dealt to (one that did not ask for them inline), streamed piece by piece."""
        try:
            digest = Digest.parse(request.match_info["digest"])
            index, first = _index(request.match_info["index"]), _index(request.match_info["piece"])
            count = protocol.parse_piece_count(request.query.get(protocol.COUNT_PARAM))
        except protocol.ProtocolError as e:
            return parameter_error(e).response()
        except OCIError as e:
            return e.response()
        job = self.ingest.job(digest)
        meta = job.metas.get(index) if job is not None else None
        if (job is None or job.layout is None or meta is None
                or first + count > meta.num_pieces):  # fmt: skip
            return OCIError("BLOB_UNKNOWN", "no such blob, segment or pieces").response()
        pieces = range(first, first + count)
        resp = web.StreamResponse(headers={"Content-Type": protocol.BYTES_CONTENT_TYPE})
        resp.content_length = _run_bytes(meta, pieces)
        return await self._send_pieces(request, resp, job, index, pieces)

    async def _send_pieces(
        self, request: web.Request, resp: web.StreamResponse, job: IngestJob, index: int,
        pieces: range,
    ) -> web.StreamResponse:
        """Stream ``pieces`` of segment ``index`` on ``resp`` (prepared here if not yet), in
        the send queue with the other runs."""
        assert job.layout is not None
        meta, path = job.metas[index], job.layout.segment_path(index)
        sent = 0
        what = f"pieces {pieces.start}+{len(pieces)} of {job.digest}"
        # an inline response without a run only ends: no slot to wait for
        slot = (self.dealer.send_queue.slot(lambda: sent, what, _run_bytes(meta, pieces))
                if pieces else contextlib.nullcontext())  # fmt: skip
        async with slot:
            try:
                file = open(path, "rb")  # noqa: SIM115 - closed below, after the sends
            except OSError as e:  # evicted meanwhile
                if not resp.prepared:
                    return OCIError("BLOB_UNKNOWN", f"segment gone: {e}").response()
                raise
            with file:
                if pieces and os.fstat(file.fileno()).st_size < meta.piece_range(pieces[-1])[1]:
                    raise OSError(f"{path} is shorter than its torrent")
                if not resp.prepared:
                    await resp.prepare(request)
                transport = request.transport
                sender = None
                if pieces and transport is not None:
                    sender = FileSender.for_transport(transport)  # None: TLS, bytes buffered
                per_write = max(1, WRITE_BYTES // meta.piece_length) if pieces else 1
                try:
                    # whole pieces up to WRITE_BYTES a sendfile (page cache -> socket, no copy
                    # through Python): the send queue sees progress at each
                    for part in _chunks(pieces, per_write):
                        start, end = meta.piece_range(part[0])[0], meta.piece_range(part[-1])[1]
                        if transport is None or transport.is_closing():
                            raise ConnectionResetError("the agent closed the connection")
                        if await send_file_range(transport, sender, file, start,
                                                 end - start) < end - start:  # fmt: skip
                            raise OSError(f"{path} ended before its pieces")
                        sent += end - start
                finally:
                    if sender is not None:
                        sender.close()
            await resp.write_eof()
        self.metrics.inc("piece_bytes_total", sent)
        return resp

    @web.middleware
    async def authenticate(self, request: web.Request, handler) -> web.StreamResponse:
        """Blob endpoints only for holders of the cluster secret (health and metrics stay
        open: they carry no blob data)."""
        if request.path.startswith("/v1/") and not self.cluster.accepts(
            SEEDER_API, request.headers.get(TOKEN_HEADER)
        ):
            return OCIError("UNAUTHORIZED", "cluster token required").response()
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[oci_http_errors, self.authenticate])
        # GET only: a HEAD would be dealt pieces, and get their bytes after its headers
        app.router.add_get(protocol.BLOB_INFO_ROUTE, self.handle_blob, allow_head=False)
        app.router.add_get(protocol.TORRENT_ROUTE, self.handle_torrent, allow_head=False)
        app.router.add_get(protocol.PIECES_ROUTE, self.handle_pieces, allow_head=False)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", self.metrics.handler)
        return app


def _chunks(pieces: range, size: int) -> list[range]:
    """``pieces`` in consecutive slices of at most ``size`` pieces."""
    return [pieces[i : i + size] for i in range(0, len(pieces), size)]


def _run_bytes(meta: Metainfo, pieces: range) -> int:
    """Bytes of a run of consecutive pieces."""
    return meta.piece_range(pieces[-1])[1] - meta.piece_range(pieces[0])[0] if pieces else 0
