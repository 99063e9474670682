"""Blob store contract: any store the agent and seeder use must pass this whole class.

To check another implementation, add its builder to ``STORE_BUILDERS``: the tests only use
the public interface (begin/commit/layout/recover/discard/touch/entries/usage/gc/blob_dir).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import pytest

from p2p_mirror.core import store as store_mod
from p2p_mirror.core.oci import Digest, OCIError
from p2p_mirror.core.store import MARKER, BlobLayout, BlobStore, segment_name

StoreBuilder = Callable[[Path], BlobStore]
STORE_BUILDERS: dict[str, StoreBuilder] = {"BlobStore": BlobStore}

DiskUsage = namedtuple("DiskUsage", "total used free percent")
ROOMY = DiskUsage(total=100 * 2**30, used=10 * 2**30, free=90 * 2**30, percent=10.0)


@pytest.fixture(params=sorted(STORE_BUILDERS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    return STORE_BUILDERS[request.param](tmp_path / "store")


@pytest.fixture
def roomy_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real disk may be nearly full: size-cap tests must not depend on it."""
    monkeypatch.setattr(store_mod.psutil, "disk_usage", lambda path: ROOMY)


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


def put(store: BlobStore, data: bytes, segment_size: int = 10, mtime: float | None = None):
    """Write, verify and commit one blob, as the fetcher and seeder do."""
    digest = Digest.of(data)
    layout = store.begin(digest, len(data), segment_size)
    layout.write(0, data)
    store.commit(layout)
    if mtime is not None:
        os.utime(layout.dir / MARKER, (mtime, mtime))
    return digest


class TestBlobStoreContract:
    @pytest.mark.parametrize("size", [1, 9, 10, 11, 20, 25, 99, 100, 101])
    def test_write_read_across_segments(self, store: BlobStore, size: int) -> None:
        data = payload(size)
        digest = Digest.of(data)
        layout = store.begin(digest, size, 10)
        assert layout.count == -(-size // 10)
        # Write in odd-sized chunks that straddle segment boundaries.
        offset = 0
        for chunk in (7, 13, 3, 29, 1000):
            part = data[offset : offset + chunk]
            if not part:
                break
            layout.write(offset, part)
            offset += len(part)
        assert sum(p.stat().st_size for p in layout.paths()) == size
        assert [p.stat().st_size for p in layout.paths()] == [
            layout.segment_len(i) for i in range(layout.count)
        ]
        assert b"".join(p.read_bytes() for p in layout.paths()) == data
        for start in range(size):
            for length in (1, 9, 10, 11, size - start):
                length = min(length, size - start)
                assert layout.read(start, length) == data[start : start + length]

    def test_segment_file_names_are_deterministic(self, store: BlobStore) -> None:
        digest = Digest.of(b"abc")
        single = store.begin(digest, 3, 10)
        assert single.segment_path(0).name == digest.hex == segment_name(digest, 0, 1)
        multi = store.begin(digest, 25, 10)
        assert [p.name for p in multi.paths()] == [f"{digest.hex}.{i:04d}" for i in range(3)]
        assert multi.torrent_path(2).name == f"{digest.hex}.0002.torrent"

    def test_layout_is_none_until_commit(self, store: BlobStore) -> None:
        data = payload(25)
        digest = Digest.of(data)
        assert store.layout(digest) is None
        layout = store.begin(digest, len(data), 10)
        layout.write(0, data)
        assert store.layout(digest) is None
        assert store.entries() == []
        store.commit(layout)
        got = store.layout(digest)
        assert got is not None
        assert (got.size, got.segment_size, got.count) == (25, 10, 3)
        assert got.read(0, 25) == data

    def test_commit_writes_marker_atomically(
        self, store: BlobStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        data = payload(30)
        digest = Digest.of(data)
        layout = store.begin(digest, len(data), 10)
        layout.write(0, data)
        renames: list[tuple[str, str]] = []
        real_replace = os.replace

        def spy(src: str | Path, dst: str | Path) -> None:
            # At the moment of the rename the marker must not exist yet, the temp file must
            # hold the full metadata, and the layout must still read as absent.
            assert not (layout.dir / MARKER).exists()
            assert json.loads(Path(src).read_text())["size"] == 30
            assert store.layout(digest) is None
            renames.append((Path(src).name, Path(dst).name))
            real_replace(src, dst)

        monkeypatch.setattr(store_mod.os, "replace", spy)
        store.commit(layout)
        assert len(renames) == 1 and renames[0][1] == MARKER
        meta = json.loads((layout.dir / MARKER).read_text())
        assert meta["digest"] == str(digest)
        assert (meta["size"], meta["segment_size"]) == (30, 10)
        assert sorted(p.name for p in layout.dir.iterdir()) == sorted(
            [MARKER] + [p.name for p in layout.paths()]
        )

    def test_commit_fails_when_a_segment_is_missing(self, store: BlobStore) -> None:
        data = payload(25)
        layout = store.begin(Digest.of(data), 25, 10)
        layout.write(0, data[:10])
        with pytest.raises(OSError):
            store.commit(layout)
        assert store.layout(layout.digest) is None

    def test_empty_blob_round_trip(self, store: BlobStore) -> None:
        digest = Digest.of(b"")
        layout = store.begin(digest, 0, 10)
        layout.write(0, b"")  # what the fetcher does for a zero-byte blob
        store.commit(layout)
        got = store.layout(digest)
        assert got is not None and got.size == 0
        assert got.read(0, 0) == b""
        assert [e.size for e in store.entries()] == [0]

    def test_layout_none_when_a_segment_vanished(self, store: BlobStore) -> None:
        digest = put(store, payload(25))
        layout = store.layout(digest)
        assert layout is not None
        layout.segment_path(1).unlink()
        assert store.layout(digest) is None

    @pytest.mark.parametrize("marker", ["not json", "[]", "{}", '{"size": "x", "segment_size": 1}',
                                        '{"size": 5, "segment_size": 0}'])
    def test_damaged_marker_is_not_a_verified_blob(self, store: BlobStore, marker: str) -> None:
        digest = put(store, payload(5))
        layout = store.layout(digest)
        assert layout is not None
        (layout.dir / MARKER).write_text(marker)
        assert store.layout(digest) is None
        assert store.entries() == []

    def test_begin_replaces_an_old_partial_download(self, store: BlobStore) -> None:
        data = payload(20)
        digest = Digest.of(data)
        old = store.begin(digest, 20, 10)
        old.write(0, b"garbage!!!garbage!!!")
        (old.dir / "stray").write_text("x")
        new = store.begin(digest, 20, 10)
        assert list(new.dir.iterdir()) == []
        assert new.dir != old.dir  # a retry never shares files with the download it replaces
        store.abandon(old)
        assert not old.dir.exists() and new.dir.exists()

    def test_detach_from_keeps_the_prefix_in_new_files(self, store: BlobStore) -> None:
        data = payload(25)
        layout = store.begin(Digest.of(data), 25, 10)
        layout.write(0, data)
        old_inodes = [p.stat().st_ino for p in layout.paths()]
        held = [open(p, "r+b") for p in layout.paths()]  # noqa: SIM115 - held like a torrent
        try:
            layout.detach_from(13)
            for f in held[1:]:  # late writes of the removed torrent land in the old inodes
                f.write(b"X" * 5)
                f.flush()
        finally:
            for f in held:
                f.close()
        assert layout.paths()[0].stat().st_ino == old_inodes[0]
        assert layout.paths()[1].stat().st_ino != old_inodes[1]
        assert not layout.paths()[2].exists()
        assert layout.paths()[1].read_bytes() == data[10:13]
        layout.write(13, data[13:])
        assert layout.read(10, 15) == data[10:]

    def test_recover_removes_unverified_keeps_verified(self, store: BlobStore) -> None:
        kept = put(store, payload(15, 1))
        partial = Digest.of(payload(15, 2))
        store.begin(partial, 15, 10).write(0, payload(8, 2))
        empty = Digest.of(payload(3, 3))
        store.begin(empty, 3, 10)
        removed = store.recover()
        assert sorted(map(str, removed)) == sorted([str(partial), str(empty)])
        assert not store.blob_dir(partial).exists()
        assert not store.blob_dir(empty).exists()
        assert store.layout(kept) is not None
        assert store.recover() == []

    def test_discard(self, store: BlobStore) -> None:
        digest = put(store, payload(12))
        store.discard(digest)
        assert store.layout(digest) is None
        assert not store.blob_dir(digest).exists()
        store.discard(digest)  # idempotent
        store.discard(Digest.of(b"never stored"))

    def test_entries_and_usage(self, store: BlobStore) -> None:
        assert store.entries() == [] and store.usage() == 0
        a = put(store, payload(25, 1), mtime=1000)
        b = put(store, payload(7, 2), mtime=2000)
        store.begin(Digest.of(b"partial"), 7, 10)  # not counted
        entries = {e.digest: e for e in store.entries()}
        assert set(entries) == {a, b}
        assert (entries[a].size, entries[a].last_used) == (25, 1000)
        assert (entries[b].size, entries[b].last_used) == (7, 2000)
        assert store.usage() == 32

    def test_gc_evicts_least_recently_used_first(
        self, store: BlobStore, roomy_disk: None
    ) -> None:
        old = put(store, payload(10, 1), mtime=1000)
        mid = put(store, payload(10, 2), mtime=2000)
        new = put(store, payload(10, 3), mtime=3000)
        assert store.gc(max_bytes=30, min_free=0) == []
        assert store.gc(max_bytes=0, min_free=0) == []  # 0: no cap
        assert store.gc(max_bytes=25, min_free=0) == [old]
        assert store.layout(old) is None
        assert store.layout(mid) is not None and store.layout(new) is not None
        assert store.gc(max_bytes=10, min_free=0) == [mid]
        assert store.usage() == 10

    def test_touch_changes_eviction_order(self, store: BlobStore, roomy_disk: None) -> None:
        a = put(store, payload(10, 1), mtime=1000)
        b = put(store, payload(10, 2), mtime=2000)
        store.touch(a)  # now: a was used after b
        entry = {e.digest: e for e in store.entries()}[a]
        assert entry.last_used > time.time() - 60
        assert store.gc(max_bytes=15, min_free=0) == [b]
        assert store.layout(a) is not None
        store.touch(Digest.of(b"absent"))  # no error

    def test_gc_respects_protected(self, store: BlobStore, roomy_disk: None) -> None:
        a = put(store, payload(10, 1), mtime=1000)
        b = put(store, payload(10, 2), mtime=2000)
        c = put(store, payload(10, 3), mtime=3000)
        assert store.gc(max_bytes=15, min_free=0, protected={a, b}) == [c]
        assert store.layout(a) is not None and store.layout(b) is not None
        # Everything protected: over the cap, but nothing goes.
        assert store.gc(max_bytes=1, min_free=0, protected=[a, b]) == []
        assert store.usage() == 20

    def test_gc_calls_before_evict_before_deleting(
        self, store: BlobStore, roomy_disk: None
    ) -> None:
        a = put(store, payload(10, 1), mtime=1000)
        b = put(store, payload(10, 2), mtime=2000)
        seen: list[tuple[Digest, bool]] = []

        def before(digest: Digest) -> None:
            seen.append((digest, store.layout(digest) is not None))

        assert store.gc(max_bytes=5, min_free=0, before_evict=before) == [a, b]
        assert seen == [(a, True), (b, True)]

    def test_gc_free_disk_watermark(
        self, store: BlobStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Below ``min_free`` of the disk free, evict LRU until the watermark is met."""
        a = put(store, payload(10, 1), mtime=1000)
        b = put(store, payload(10, 2), mtime=2000)
        c = put(store, payload(10, 3), mtime=3000)
        total = 1000
        state = {"free": 85}  # 8.5% free; want 10%

        def disk_usage(path: str) -> DiskUsage:
            assert Path(path) == store.root
            return DiskUsage(total, total - state["free"], state["free"], 0.0)

        def before(digest: Digest) -> None:
            state["free"] += 10  # each eviction frees its 10 bytes

        monkeypatch.setattr(store_mod.psutil, "disk_usage", disk_usage)
        assert store.gc(max_bytes=0, min_free=0.10, before_evict=before) == [a, b]
        assert store.layout(c) is not None
        assert store.gc(max_bytes=0, min_free=0.10) == []
        assert store.gc(max_bytes=0, min_free=0, before_evict=before) == []

    def test_gc_watermark_with_real_disk(self, store: BlobStore) -> None:
        """Real psutil: a watermark of 0 never evicts, one the disk cannot meet evicts all."""
        a = put(store, payload(10, 1))
        assert store.gc(max_bytes=0, min_free=0) == []
        assert store.gc(max_bytes=0, min_free=0.999999) == [a]

    def test_foreign_files_in_blobs_are_ignored(self, store: BlobStore) -> None:
        real = put(store, payload(10))
        (store.blobs / "README").write_text("not a blob")
        (store.blobs / "md5").mkdir()
        (store.blobs / "md5" / hashlib.md5(b"x").hexdigest()).mkdir()
        (store.blobs / "sha256" / "not-a-digest").mkdir()
        (store.blobs / "sha256" / ("A" * 64)).mkdir()
        (store.blobs / "sha256" / "stray.txt").write_text("x")
        (store.blobs / "UPPER").mkdir()
        assert [e.digest for e in store.entries()] == [real]
        assert store.recover() == []
        for foreign in ("README", "md5", "sha256/not-a-digest", "sha256/" + "A" * 64,
                        "sha256/stray.txt", "UPPER"):
            assert (store.blobs / foreign).exists(), foreign

    def test_blob_dir_never_escapes_the_root(self, store: BlobStore) -> None:
        tricky = [
            "sha256:" + "0" * 64,
            "sha512:" + "f" * 128,
            "sha256:../../../../etc/passwd",
            "sha256:" + "../" * 21 + "a",
            "../sha256:" + "0" * 64,
            "sha256/../..:" + "0" * 64,
            "sha256:" + "0" * 63 + "/",
            "sha256:" + "0" * 63 + "\x00",
            "sha256:" + "0" * 64 + "\n",
            "sha256:/" + "0" * 63,
            "sha256:" + "." * 64,
            "sha256:" + "0" * 62 + "..",
            "./sha256:" + "0" * 64,
            "md5:" + "0" * 32,
            "sha256:" + "%2e%2e%2f" * 7 + "0",
            "sha256:~" + "0" * 63,
        ]
        root = store.blobs.resolve()
        accepted = 0
        for text in tricky:
            try:
                digest = Digest.parse(text)
            except OCIError:
                continue
            accepted += 1
            path = store.blob_dir(digest).resolve()
            assert path.parent.parent == root, text
            assert path.name == digest.hex and path.parent.name == digest.algorithm
        assert accepted == 2  # only the two well-formed digests get through

    def test_blob_dir_is_under_root_for_random_digests(self, store: BlobStore) -> None:
        root = store.blobs.resolve()
        for i in range(200):
            digest = Digest.of(os.urandom(8) + bytes([i]), "sha256" if i % 2 else "sha512")
            assert Digest.parse(str(digest)) == digest
            assert store.blob_dir(digest).resolve().parent.parent == root


def test_blob_layout_count_and_segment_len(tmp_path: Path) -> None:
    d = Digest.of(b"")
    assert BlobLayout(d, 0, 10, tmp_path).count == 1
    layout = BlobLayout(d, 25, 10, tmp_path)
    assert layout.count == 3
    assert [layout.segment_len(i) for i in range(3)] == [10, 10, 5]


def test_saved_torrents_need_every_segment(tmp_path: Path) -> None:
    data = payload(25)
    store = BlobStore(tmp_path)
    layout = store.begin(Digest.of(data), 25, 10)
    assert layout.saved_torrents() is None
    for i in range(layout.count - 1):
        layout.torrent_path(i).write_bytes(b"t%d" % i)
    assert layout.saved_torrents() is None  # one missing: not re-seedable
    layout.torrent_path(layout.count - 1).write_bytes(b"last")
    assert layout.saved_torrents() == [b"t0", b"t1", b"last"]


def test_sources_are_recorded_durably_and_survive_a_new_store(tmp_path: Path) -> None:
    data = b"provenance" * 100
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    store = BlobStore(tmp_path)
    layout = store.begin(digest, len(data), len(data))
    layout.write(0, data)
    store.commit(layout)
    assert store.sources(layout) == frozenset()  # nothing recorded: confirm before serving
    store.add_source(layout, "a.test")
    store.add_source(layout, "b.test")
    store.add_source(layout, "a.test")
    again = BlobStore(tmp_path).layout(digest)
    assert again is not None and BlobStore(tmp_path).sources(again) == {"a.test", "b.test"}
    (layout.dir / store_mod.SOURCES).write_text("{not json")
    assert store.sources(layout) == frozenset()
    for i in range(store_mod.MAX_SOURCES + 5):
        store.add_source(layout, f"r{i}.test")
    assert len(store.sources(layout)) == store_mod.MAX_SOURCES
