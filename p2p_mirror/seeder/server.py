"""The seeder: pulls each blob from the origin once, cuts it into segment torrents, and deals
each segment's pieces out over the agents waiting for it (wiring and ``run_seeder``).

- ``ingest``: origin -> segments -> torrents, with backpressure;
- ``dealing``: which agent takes which run of pieces, and the queue they are sent in;
- ``api``: the HTTP endpoints (``p2p_mirror.core.protocol``);
- ``sizing``: segment and piece sizes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

from p2p_mirror.core.clusterauth import TRACKER, TRACKER_PARAM, ClusterAuth
from p2p_mirror.core.config import SeederConfig
from p2p_mirror.core.metrics import Metrics
from p2p_mirror.core.origin import Origin
from p2p_mirror.core.seeding import SeededBlobs
from p2p_mirror.core.service import background, every, serve, wait_for_signal
from p2p_mirror.core.store import BlobStore
from p2p_mirror.core.swarm import TorrentSession
from p2p_mirror.seeder.api import SeederAPI
from p2p_mirror.seeder.credentials import RegistryAuth
from p2p_mirror.seeder.dealing import Dealer
from p2p_mirror.seeder.ingest import BACKLOG_SEGMENTS, Ingest

log = logging.getLogger("p2p_mirror.seeder")


class Seeder:
    def __init__(self, cfg: SeederConfig) -> None:
        self.cfg = cfg
        self.store = BlobStore(cfg.data_dir)
        self.origin = Origin(cfg.origin_timeout, "seeder")
        self.session = TorrentSession(
            cfg.bt_listen,
            cfg.upload_rate_limit,
            cfg.download_rate_limit,
            # Only designated and stalled agents connect, so every one of them gets a slot
            # (a choked one would wait for the next unchoke round).
            unchoke_slots=cfg.unchoke_slots,
            announce_ip=cfg.announce_ip,
        )
        self.metrics = Metrics()
        self.seeded = SeededBlobs(self.store, self.session, announce=False)
        self.dealer = Dealer(cfg.piece_sends)
        self.cluster = ClusterAuth.from_file(cfg.cluster_secret, "seeder")
        self.registry_auth = RegistryAuth.from_file(cfg.registry_auth)
        # The torrents' announce URLs carry the tracker token: agents announce with it.
        announce = [with_tracker_token(url, self.cluster.token(TRACKER)) for url in cfg.tracker]
        self.ingest = Ingest(dataclasses.replace(cfg, tracker=announce), self.store,
                             self.origin, self.seeded, self.dealer, self.metrics,
                             self.registry_auth)  # fmt: skip
        self.api = SeederAPI(self.ingest, self.dealer, self.session, self.metrics, self.cluster)

    async def start(self) -> None:
        self.store.recover()
        await self.session.start()
        for stored in self.seeded.reseed_all():
            self.ingest.restore(stored)
        self.metrics.gauge("torrents", lambda: len(self.session.transfers), "Torrents in session")
        self.metrics.gauge("upload_bytes", lambda: self.session.totals().uploaded,
                           "Payload seeded")  # fmt: skip
        self.metrics.gauge("dealt_backlog_bytes", lambda: self.dealer.send_queue.queued,
                           "Bytes of dealt pieces waiting for a send turn (above "
                           f"{BACKLOG_SEGMENTS} segments' worth, the origin download waits)")

    @property
    def origin_bytes(self) -> int:
        """Blob bytes received from origins so far."""
        return self.ingest.origin_bytes

    async def close(self) -> None:
        self.ingest.close()
        await self.session.close()
        await self.origin.close()
        await self.registry_auth.close()

    async def gc(self) -> None:
        self.store.gc(self.cfg.cache_max_bytes, self.cfg.min_free_disk, self.ingest.active(),
                      before_evict=self.ingest.evict)  # fmt: skip

    def app(self) -> web.Application:
        return self.api.app()


def with_tracker_token(url: str, token: str) -> str:
    """``url`` with ``token=`` (replacing any) in its query; unchanged for an empty token."""
    if not token:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k != TRACKER_PARAM]  # fmt: skip
    return urlunsplit(parts._replace(query=urlencode([*query, (TRACKER_PARAM, token)])))


async def _main(cfg: SeederConfig) -> None:
    seeder = Seeder(cfg)
    await seeder.start()
    runner = await serve(seeder.app(), cfg.listen.host, cfg.listen.port, "seeder", log,
                         cfg.drain_timeout)  # fmt: skip
    log.info("seeder BitTorrent on %s:%d", cfg.bt_listen.host, seeder.session.port)

    try:
        async with background(every(60, seeder.gc, log)):
            await wait_for_signal()
    finally:
        await runner.cleanup()
        await seeder.close()


def run_seeder(cfg: SeederConfig) -> None:
    asyncio.run(_main(cfg))
