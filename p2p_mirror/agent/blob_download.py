"""One blob being downloaded onto this node, shared by every client response that reads it.

The download produces the blob's bytes in order into its store directory and advances
``available`` as a contiguous, already-hashed prefix grows; readers wait for bytes beyond
their offset with ``wait_beyond``, and get the download's error if it fails first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from p2p_mirror.core.config import Upstream
from p2p_mirror.core.oci import Digest, OCIError
from p2p_mirror.core.store import BlobLayout
from p2p_mirror.core.swarm import Metainfo, Transfer


@dataclass
class BlobDownload:
    """One blob being downloaded; readers wait on ``available`` bytes."""

    digest: Digest
    size: int
    upstream: Upstream
    name: str
    headers: Mapping[str, str]
    layout: BlobLayout | None = None
    available: int = 0
    done: bool = False
    error: OCIError | None = None
    metas: list[Metainfo] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    watchers: list[asyncio.Task[None]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def advance(self, n: int) -> None:
        self.available += n
        self._changed.set()
        self._changed = asyncio.Event()

    def finish(self, error: OCIError | None = None) -> None:
        self.error = error
        self.done = error is None
        self._changed.set()

    async def wait_beyond(self, offset: int) -> None:
        """Until bytes past ``offset`` are available, or the download ended."""
        while self.available <= offset and not self.done and self.error is None:
            await self._changed.wait()
        if self.error is not None and self.available <= offset:
            raise self.error
