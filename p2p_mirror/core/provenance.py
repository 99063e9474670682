"""Whether a registry really has a blob: its origin sends bytes that match the digest.

A registry's ``HEAD`` says yes to anything if the registry lies; only the bytes prove it. A
blob cached from one registry is served for another only after this (docs/security.md,
rule 2). Rare in practice: the same blob behind two configured registries.
"""

from __future__ import annotations

import logging

from multidict import CIMultiDict

from p2p_mirror.core.config import Upstream
from p2p_mirror.core.oci import Digest
from p2p_mirror.core.origin import Origin, OriginUnavailable

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024


async def origin_has_bytes(
    origin: Origin, upstream: Upstream, name: str, digest: Digest, size: int,
    headers: CIMultiDict,
) -> int:
    """200 if ``upstream`` sent ``size`` bytes for ``name``'s ``digest`` that match it; else
    the origin's refusal status, or 0 (unavailable, or bytes that are not the blob)."""
    try:
        resp = await origin.open_blob(upstream, name, digest, headers)
    except OriginUnavailable as e:
        log.warning("blob %s: confirming at %s: %s", digest, upstream.name, e)
        return 0
    try:
        if resp.status != 200:
            return resp.status
        hasher = digest.hasher()
        received = 0
        async for chunk in resp.content.iter_chunked(CHUNK):
            received += len(chunk)
            if received > size:
                break
            hasher.update(chunk)
    finally:
        resp.release()
    if received != size or hasher.hexdigest() != digest.hex:
        log.warning("blob %s: %s sent bytes that are not the blob", digest, upstream.name)
        return 0
    return 200
