"""The blob store shared by agent and seeder: blobs by digest, cut into segment files.

Each download of a blob gets a private directory ``blobs/<alg>/<hex>/<id>/`` holding one
file per segment (each segment is one torrent, so the swarm reads and writes these files in
place). A download directory only counts as the cached blob once its ``verified`` marker
exists; the marker is written atomically after the whole blob matched its digest. Without
the marker it is a download in progress (or a crash leftover, removed at start) and is never
served from the cache. Private directories mean a failed download's late readers, or a
retried download, can never see each other's bytes.

Next to the marker, ``sources.json`` lists the registries the blob's bytes were verified
from (docs/security.md, rule 2): a blob is served for another registry only once that one
has shown it has the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from p2p_mirror.core.diskspace import DiskLedger, NoSpace, Reservation
from p2p_mirror.core.durable import fsync_path, write_durably
from p2p_mirror.core.oci import Digest, OCIError

MARKER = "verified"
SOURCES = "sources.json"
MAX_SOURCES = 64  # registries recorded per blob at most (the oldest are dropped)


def segment_name(digest: Digest, index: int, count: int) -> str:
    """Deterministic file name of a segment, so torrents of the same bytes share an info-hash."""
    return digest.hex if count == 1 else f"{digest.hex}.{index:04d}"


@dataclass(frozen=True)
class BlobLayout:
    """Where a blob's bytes are: ``size`` bytes in segments of ``segment_size``."""

    digest: Digest
    size: int
    segment_size: int
    dir: Path

    @property
    def count(self) -> int:
        return max(1, -(-self.size // self.segment_size))

    def segment_path(self, index: int) -> Path:
        return self.dir / segment_name(self.digest, index, self.count)

    def torrent_path(self, index: int) -> Path:
        return self.dir / (segment_name(self.digest, index, self.count) + ".torrent")

    def saved_torrents(self) -> list[bytes] | None:
        """Every segment's torrent as saved beside it, or None if any is missing."""
        try:
            return [self.torrent_path(i).read_bytes() for i in range(self.count)]
        except OSError:
            return None

    def segment_len(self, index: int) -> int:
        return min(self.segment_size, self.size - index * self.segment_size)

    def paths(self) -> list[Path]:
        return [self.segment_path(i) for i in range(self.count)]

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` across segment files (blocking: use a thread)."""
        index, inner = divmod(offset, self.segment_size)
        if inner + length <= self.segment_len(index):  # the common case: one file, no copy
            with open(self.segment_path(index), "rb", buffering=0) as f:
                chunk = os.pread(f.fileno(), length, inner)
            if len(chunk) != length:
                raise OSError(f"short read in {self.segment_path(index)}")
            return chunk
        out = bytearray()
        while length > 0:
            index, inner = divmod(offset, self.segment_size)
            take = min(length, self.segment_len(index) - inner)
            fd = os.open(self.segment_path(index), os.O_RDONLY)
            try:
                chunk = os.pread(fd, take, inner)
            finally:
                os.close(fd)
            if len(chunk) != take:
                raise OSError(f"short read in {self.segment_path(index)}")
            out += chunk
            offset += take
            length -= take
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Write bytes at ``offset`` across segment files (origin fallback; blocking)."""
        view = memoryview(data)
        if not view and self.size == 0:
            # An empty blob still has its (empty) segment file, or commit() cannot find it.
            os.close(os.open(self.segment_path(0), os.O_WRONLY | os.O_CREAT, 0o644))
        while view:
            index, inner = divmod(offset, self.segment_size)
            take = min(len(view), self.segment_len(index) - inner)
            fd = os.open(self.segment_path(index), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                written = os.pwrite(fd, view[:take], inner)
            finally:
                os.close(fd)
            view = view[written:]
            offset += written

    def detach_from(self, offset: int) -> None:
        """Give every segment from ``offset`` on a new file, keeping the bytes before it.

        Used when the origin takes over from the swarm: a torrent being removed may still
        flush blocks into its old files, and those writes must land in inodes nobody reads.
        """
        first = offset // self.segment_size
        for index in range(first, self.count):
            path = self.segment_path(index)
            keep = offset - index * self.segment_size if index == first else 0
            prefix = b""
            if keep > 0 and path.exists():
                with open(path, "rb") as f:
                    prefix = f.read(keep)
                if len(prefix) != keep:
                    raise OSError(f"short read in {path}")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            if prefix:
                with open(path, "wb") as f:
                    f.write(prefix)


@dataclass(frozen=True)
class Entry:
    digest: Digest
    size: int
    last_used: float


class BlobStore:
    """Blobs by digest under one root; nothing is read or written outside it."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.ledger = DiskLedger()

    def blob_dir(self, digest: Digest) -> Path:
        # Digest.parse allowed only [a-z0-9] algorithms and hex values: no path tricks.
        return self.blobs / digest.algorithm / digest.hex

    def recover(self) -> list[Digest]:
        """Remove unverified leftovers of interrupted downloads (call at start only)."""
        removed = []
        for digest, path in self._dirs():
            for download in _subdirs(path):
                if not (download / MARKER).exists():
                    shutil.rmtree(download, ignore_errors=True)
                    removed.append(digest)
            with contextlib.suppress(OSError):
                path.rmdir()  # only if nothing verified is left in it
        return removed

    def layout(self, digest: Digest) -> BlobLayout | None:
        """The verified blob, or None."""
        for download in _subdirs(self.blob_dir(digest)):
            layout = self._verified(digest, download)
            if layout is not None:
                return layout
        return None

    def _verified(self, digest: Digest, path: Path) -> BlobLayout | None:
        try:
            meta = json.loads((path / MARKER).read_text())
            layout = BlobLayout(digest, int(meta["size"]), int(meta["segment_size"]), path)
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no marker, or a damaged one: not a verified blob
        if layout.segment_size <= 0 or layout.size < 0:
            return None
        if not all(p.exists() for p in layout.paths()):
            return None
        return layout

    def begin(self, digest: Digest, size: int, segment_size: int) -> BlobLayout:
        """A new private, empty, unverified download directory (segment files appear later)."""
        path = self.blob_dir(digest) / secrets.token_hex(6)
        path.mkdir(parents=True)
        return BlobLayout(digest, size, segment_size, path)

    def commit(self, layout: BlobLayout) -> None:
        """Mark a fully verified blob as cached, durably: the segments and their torrents
        reach the disk first, then the marker (temp, fsync, rename), then the directories
        that name them, so after a power loss an entry is whole or absent."""
        for seg in layout.paths():
            fsync_path(seg)
        for index in range(layout.count):
            with contextlib.suppress(FileNotFoundError):  # an origin-only blob has none
                fsync_path(layout.torrent_path(index))
        meta = {"digest": str(layout.digest), "size": layout.size,
                "segment_size": layout.segment_size, "verified_at": time.time()}
        write_durably(layout.dir / MARKER, json.dumps(meta).encode())
        # begin() may have created the digest and algorithm directories too
        for directory in (layout.dir.parent, layout.dir.parent.parent):
            fsync_path(directory)

    def discard(self, digest: Digest) -> None:
        """Forget a blob: every download directory of it, verified or not."""
        shutil.rmtree(self.blob_dir(digest), ignore_errors=True)

    def abandon(self, layout: BlobLayout) -> None:
        """Drop one failed download (others of the same blob are left alone)."""
        shutil.rmtree(layout.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            layout.dir.parent.rmdir()

    def touch(self, digest: Digest) -> None:
        layout = self.layout(digest)
        if layout is not None:
            with contextlib.suppress(OSError):
                os.utime(layout.dir / MARKER)

    def entries(self) -> list[Entry]:
        out = []
        for digest, _ in self._dirs():
            layout = self.layout(digest)
            if layout is None:
                continue
            with contextlib.suppress(OSError):
                out.append(Entry(digest, layout.size, (layout.dir / MARKER).stat().st_mtime))
        return out

    def usage(self) -> int:
        return sum(e.size for e in self.entries())

    def _short(self, total: int, need: int, max_bytes: int, min_free: float) -> bool:
        """Whether ``need`` more bytes, on top of the cache's ``total`` and every download
        in flight, would break the size cap or the free-disk floor."""
        if max_bytes and total + self.ledger.reserved + need > max_bytes:
            return True
        if not min_free:
            return False
        disk = psutil.disk_usage(str(self.root))
        return disk.free - self.ledger.outstanding - need < min_free * disk.total

    def reserve(
        self,
        size: int,
        max_bytes: int,
        min_free: float,
        protected: Iterable[Digest] = (),
        before_evict: Callable[[Digest], None] = lambda digest: None,
    ) -> Reservation:
        """Hold ``size`` bytes for a download, evicting LRU entries if that makes room;
        ``NoSpace`` if it cannot. Release it when the download is committed or dropped."""
        total = self.usage()
        if self._short(total, size, max_bytes, min_free):
            self.gc(max_bytes, min_free, protected, before_evict, need=size)
            if self._short(self.usage(), size, max_bytes, min_free):
                raise NoSpace(f"no room for {size} bytes in {self.root} (cache_max_bytes "
                              f"{max_bytes}, min_free_disk {min_free:g}, "
                              f"{self.ledger.reserved} bytes in flight)")  # fmt: skip
        return self.ledger.add(size)

    def gc(
        self,
        max_bytes: int,
        min_free: float,
        protected: Iterable[Digest] = (),
        before_evict: Callable[[Digest], None] = lambda digest: None,
        need: int = 0,
    ) -> list[Digest]:
        """Evict least recently used blobs while over ``max_bytes`` or under ``min_free`` disk,
        counting the downloads in flight and ``need`` more bytes.

        ``before_evict`` runs first for each victim (stop seeding it before its files go).
        """
        keep = set(protected)
        entries = sorted(self.entries(), key=lambda e: e.last_used)
        total = sum(e.size for e in entries)
        evicted: list[Digest] = []
        for entry in entries:
            if not self._short(total, need, max_bytes, min_free):
                break
            if entry.digest in keep:
                continue
            before_evict(entry.digest)
            self.discard(entry.digest)
            total -= entry.size
            evicted.append(entry.digest)
        return evicted

    def sources(self, layout: BlobLayout) -> frozenset[str]:
        """The registries ``layout``'s bytes were verified from (none if unreadable)."""
        try:
            names = json.loads((layout.dir / SOURCES).read_text())
        except (OSError, ValueError):
            return frozenset()
        if not isinstance(names, list):
            return frozenset()
        return frozenset(n for n in names if isinstance(n, str))

    def add_source(self, layout: BlobLayout, registry: str) -> None:
        """Record that ``registry`` served (or confirmed by its bytes) this blob; durable
        (write, fsync, rename) before it is relied on."""
        try:
            names = json.loads((layout.dir / SOURCES).read_text())
            names = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
        except (OSError, ValueError):
            names = []
        if registry in names:
            return
        names = [*names, registry][-MAX_SOURCES:]
        tmp = layout.dir / f".{SOURCES}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(names))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, layout.dir / SOURCES)

    def _dirs(self) -> list[tuple[Digest, Path]]:
        out = []
        for alg_dir in self.blobs.iterdir():
            if not alg_dir.is_dir():
                continue
            for path in alg_dir.iterdir():
                try:
                    digest = Digest.parse(f"{alg_dir.name}:{path.name}")
                except OCIError:  # a foreign file in our tree: leave it alone
                    continue
                out.append((digest, path))
        return out


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except OSError:
        return []
