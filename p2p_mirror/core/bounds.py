"""Bounds on what a peer, an origin or a client can make us hold or wait for.

Sizes are checked before anything is allocated; deadlines are absolute, so no chain of
individually patient waits can add up to a request that never ends.
"""

from __future__ import annotations

from collections.abc import Mapping

MiB = 1024 * 1024
GiB = 1024 * MiB

# containerd refuses manifests above 4 MiB too (remotes/docker: MaxManifestSize)
MAX_MANIFEST_BYTES = 4 * MiB
# segments whose torrents an agent asks for ahead of the one it reads: joining early saves
# ~1 s per segment, but one task per segment of a huge blob would be millions of tasks
JOIN_AHEAD_SEGMENTS = 64


class TooLarge(ValueError):
    """A size above its configured bound; the message names the bound."""

    def __init__(self, what: str, size: int, limit: int, key: str) -> None:
        super().__init__(f"{what} of {size} bytes is larger than {key} ({limit} bytes)")
        self.size, self.limit, self.key = size, limit, key


def check_size(what: str, size: int, limit: int, key: str) -> int:
    """``size`` if it is within ``limit`` (0: no bound), else ``TooLarge``."""
    if limit and size > limit:
        raise TooLarge(what, size, limit, key)
    return size


def content_length(headers: Mapping[str, str]) -> int | None:
    """A response's Content-Length as a non-negative int, or None if absent or malformed."""
    text = headers.get("Content-Length", "")
    if not text or len(text) > 20 or not text.isascii() or not text.strip().isdigit():
        return None
    return int(text)


def transfer_deadline(start: float, patience: float, nbytes: int, min_rate: int) -> float:
    """When a transfer of ``nbytes`` begun at ``start`` must be over: ``patience`` to get
    going plus the bytes at ``min_rate`` (bytes/s; 0: no deadline, infinity)."""
    if not min_rate:
        return float("inf")
    return start + patience + nbytes / min_rate
