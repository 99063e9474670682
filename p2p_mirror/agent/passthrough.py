"""A blob straight from the origin to the client, without caching it: what the agent does
when the cache has no room for it (``NoSpace``), so a full disk costs P2P, not the pull.

A whole-blob response is hashed on the way and cut (never finished) if the bytes do not
match the digest, exactly as a streamed download is; and, as a download's origin part, it is
cut when a read waits ``stall_timeout`` or the body is not over by its deadline (the bytes at
``origin_min_rate``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from aiohttp import web

from p2p_mirror.core.bounds import transfer_deadline
from p2p_mirror.core.config import Upstream
from p2p_mirror.core.metrics import Metrics
from p2p_mirror.core.oci import Digest, OCIError
from p2p_mirror.core.origin import Origin, error_for_status, forward_headers

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024


class StreamAborted(Exception):
    """A blob failed after its response started; aiohttp drops the connection."""


async def stream_uncached(
    request: web.Request, origin: Origin, upstream: Upstream, name: str, digest: Digest,
    size: int, byte_range: tuple[int, int] | None, headers: Mapping[str, str], metrics: Metrics,
    stall_timeout: float, min_rate: int,
) -> web.StreamResponse:
    start, end = byte_range or (0, size)
    loop = asyncio.get_running_loop()
    deadline = transfer_deadline(loop.time(), stall_timeout, end - start, min_rate)
    try:
        async with asyncio.timeout_at(None if deadline == float("inf") else deadline):
            upstream_resp = await origin.open_blob(upstream, name, digest,
                                                   forward_headers(request.headers), start)
    except TimeoutError:
        metrics.inc("origin_deadlines_total")
        raise OCIError("UNAVAILABLE", "origin did not answer by its deadline") from None
    try:
        if upstream_resp.status not in (200, 206):
            return error_for_status(upstream_resp.status, "blobs").response(dict(headers))
        skip = start if upstream_resp.status == 200 else 0
        resp = web.StreamResponse(status=206 if byte_range else 200, headers=headers)
        resp.content_length = end - start
        if byte_range:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        await resp.prepare(request)
        hasher = digest.hasher() if byte_range is None else None
        pos = start
        while pos < end:
            try:
                async with asyncio.timeout_at(min(loop.time() + stall_timeout, deadline)):
                    chunk = await upstream_resp.content.read(CHUNK)
            except TimeoutError:
                late = loop.time() >= deadline
                if late:
                    metrics.inc("origin_deadlines_total")
                log.warning("aborting uncached %s after %d bytes: %s", digest, pos - start,
                            "past its deadline" if late else "origin stalled")  # fmt: skip
                raise StreamAborted("origin body too slow") from None
            if not chunk:
                break
            if skip:
                drop = min(skip, len(chunk))
                chunk, skip = chunk[drop:], skip - drop
            chunk = chunk[: end - pos]
            if not chunk:
                continue
            if hasher is not None:
                hasher.update(chunk)
            await resp.write(chunk)
            pos += len(chunk)
            metrics.inc("blob_bytes_total", len(chunk), source="origin_uncached")
            metrics.inc("served_bytes_total", len(chunk))
        if pos != end or (hasher is not None and hasher.hexdigest() != digest.hex):
            log.warning("aborting uncached %s after %d bytes: short or wrong", digest, pos - start)
            raise StreamAborted(f"origin sent {pos - start} of {end - start} bytes, or wrong ones")
        await resp.write_eof()
        return resp
    finally:
        upstream_resp.release()
