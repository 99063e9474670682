"""Disk space held for downloads in flight, so that a burst of large pulls cannot fill the
disk: a download reserves its blob's size before it starts, and the cache's size cap and
free-disk floor count every reservation (``BlobStore.reserve``).

A reservation's ``written`` bytes are on disk already (the free space shows them), so only
the rest is subtracted from the free space; against the cache's size cap the whole of it
counts, since the blob becomes a cache entry of that size.
"""

from __future__ import annotations

from dataclasses import dataclass


class NoSpace(Exception):
    """No room for a download, even after evicting every unprotected cache entry."""


@dataclass(eq=False)
class Reservation:
    size: int
    written: int = 0  # the download's bytes on disk so far

    @property
    def outstanding(self) -> int:
        return max(0, self.size - self.written)


class DiskLedger:
    """The reservations of the downloads in flight (bounded by them: one each)."""

    def __init__(self) -> None:
        self._held: set[Reservation] = set()

    def add(self, size: int) -> Reservation:
        reservation = Reservation(size)
        self._held.add(reservation)
        return reservation

    def release(self, reservation: Reservation) -> None:
        self._held.discard(reservation)

    @property
    def reserved(self) -> int:
        """Bytes the downloads in flight will add to the cache."""
        return sum(r.size for r in self._held)

    @property
    def outstanding(self) -> int:
        """Bytes the downloads in flight have still to write."""
        return sum(r.outstanding for r in self._held)

    def __len__(self) -> int:
        return len(self._held)
