"""Stored blobs and their torrents kept in step, for agent and seeder alike: a verified blob
is seeded, every stored blob whose torrents are saved is seeded again at start, and a blob
stops being seeded before the store evicts its files."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from p2p_mirror.core.oci import Digest
from p2p_mirror.core.store import BlobLayout, BlobStore
from p2p_mirror.core.swarm import Metainfo, SwarmError, TorrentSession, Transfer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredTorrents:
    """A stored blob seeded again at start, with its segments' torrents (bytes and parsed)."""

    digest: Digest
    layout: BlobLayout
    torrents: list[bytes]
    metas: list[Metainfo]


class SeededBlobs:
    """The transfers that seed each stored blob. ``announce``: whether they announce to the
    tracker (the seeder's do not: only agents told about it connect)."""

    def __init__(self, store: BlobStore, session: TorrentSession, announce: bool = True) -> None:
        self.store = store
        self.session = session
        self.announce = announce
        self.transfers: dict[Digest, list[Transfer]] = {}

    def seed(self, digest: Digest, layout: BlobLayout, metas: list[Metainfo]) -> None:
        """Seed a verified blob, keeping the session's healthy transfers of its torrents."""
        transfers = []
        for meta in metas:
            current = self.session.get(meta.info_hash)
            if current is None or current.error:
                current = self.session.add(meta, layout.dir, seed=True, announce=self.announce)
            transfers.append(current)
        self.transfers[digest] = transfers

    def seed_segment(self, digest: Digest, layout: BlobLayout, meta: Metainfo) -> Transfer:
        """Seed one verified segment of a blob still arriving (the rest follow)."""
        transfer = self.session.add(meta, layout.dir, seed=True, announce=self.announce)
        self.transfers.setdefault(digest, []).append(transfer)
        return transfer

    def reseed_all(self) -> list[StoredTorrents]:
        """At start: seed every stored blob whose segment torrents are saved beside it."""
        seeded = []
        for entry in self.store.entries():
            layout = self.store.layout(entry.digest)
            torrents = layout.saved_torrents() if layout is not None else None
            if layout is None or torrents is None:
                continue
            try:
                metas = [Metainfo.parse(data) for data in torrents]
            except SwarmError as e:
                log.warning("not seeding %s: %s", entry.digest, e)
                continue
            self.transfers[entry.digest] = [
                self.session.add(m, layout.dir, seed=True, announce=self.announce) for m in metas
            ]
            seeded.append(StoredTorrents(entry.digest, layout, torrents, metas))
        return seeded

    def stop(self, digest: Digest) -> None:
        """Stop seeding a blob (its files stay); the store's ``before_evict`` hook."""
        for transfer in self.transfers.pop(digest, []):
            self.session.remove(transfer)
