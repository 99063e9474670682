"""One blob being downloaded onto this node, shared by every client response that reads it.

The download produces the blob's bytes in order into its store directory and advances
``available`` as a contiguous, already-hashed prefix grows; readers wait for bytes beyond
their offset with ``wait_beyond``, and get the download's error if it fails first.

Readers get only ``releasable`` bytes: the last ``HOLD_BACK`` bytes of a blob wait until the
whole blob matched its digest, so a mismatch can only end in a cut response, never in a
complete one with wrong bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from p2p_mirror.core.config import Upstream
from p2p_mirror.core.oci import Digest, OCIError
from p2p_mirror.core.store import BlobLayout
from p2p_mirror.core.swarm import Metainfo, Transfer

HOLD_BACK = 64 * 1024  # bytes of a blob released only once its digest matched


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
    verified: bool = False  # the whole blob matched its digest (maybe not yet committed)
    error: OCIError | None = None
    metas: list[Metainfo] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    watchers: list[asyncio.Task[None]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def releasable(self) -> int:
        """Bytes readers may have: all once verified, else all but the last ``HOLD_BACK``."""
        if self.done or self.verified:
            return self.available
        return max(0, min(self.available, self.size - HOLD_BACK))

    def advance(self, n: int) -> None:
        self.available += n
        self._changed.set()
        self._changed = asyncio.Event()

    def digest_matched(self) -> None:
        """Release the held-back tail: readers need not wait for the commit's fsync."""
        self.verified = True
        self._changed.set()
        self._changed = asyncio.Event()

    def finish(self, error: OCIError | None = None) -> None:
        self.error = error
        self.done = error is None
        self._changed.set()

    async def ended(self) -> None:
        """Until the download is cached (and its source recorded) or failed."""
        while not self.done and self.error is None:
            await self._changed.wait()

    async def wait_beyond(self, offset: int) -> None:
        """Until bytes past ``offset`` are releasable; the download's error if it failed
        (even with bytes left, unless they matched the digest: a failed blob's held-back
        tail must never go out)."""
        while self.releasable <= offset and not self.done and self.error is None:
            await self._changed.wait()
        if self.error is not None and not (self.verified and self.available > offset):
            raise self.error
