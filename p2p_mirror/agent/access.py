"""Which registry a cached blob may be served for (docs/security.md, rule 2).

The cache records the registries each blob's bytes were verified from. A request naming
another (configured) registry gets the cached bytes only once that registry's origin sent the
same bytes to this client's credentials: its ``HEAD`` alone proves nothing, a lying registry
answers yes to anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from p2p_mirror.agent.blob_download import BlobDownload
from p2p_mirror.core.config import Upstream
from p2p_mirror.core.oci import Digest, OCIError
from p2p_mirror.core.origin import Origin, error_for_status, forward_headers
from p2p_mirror.core.provenance import origin_has_bytes
from p2p_mirror.core.store import BlobLayout, BlobStore


async def confirm_source(
    store: BlobStore, origin: Origin, layout: BlobLayout, upstream: Upstream, name: str,
    digest: Digest, client_headers: Mapping[str, str],
) -> None:
    """Record ``upstream`` as a source of the cached blob once its origin sent the blob's
    bytes to the client's credentials; ``OCIError`` (nothing recorded) otherwise."""
    if upstream.name in store.sources(layout):
        return
    status = await origin_has_bytes(origin, upstream, name, digest, layout.size,
                                    forward_headers(client_headers))  # fmt: skip
    if status in (401, 403):
        raise error_for_status(status, "blobs")
    if status != 200:
        raise OCIError("BLOB_UNKNOWN", "blob unknown to registry")
    await asyncio.to_thread(store.add_source, layout, upstream.name)


async def after_other_registry(download: BlobDownload | None, upstream: Upstream) -> None:
    """Wait for a running download of the blob from another registry to end (cached, its
    source recorded, or failed): its bytes are not this registry's until confirmed (then
    from the cache, ``confirm_source``)."""
    if download is None or download.upstream.name == upstream.name:
        return
    await download.ended()
