"""Which trackers a segment torrent announces to: 2 of the configured ones, chosen by
rendezvous hashing of its info-hash (a shard and a standby).

Every torrent's swarm is then known to two trackers, and libtorrent announces to both
(``announce_to_all_tiers``), so losing one tracker loses no swarm, while each tracker
holds only about 2/M of the swarms. The info-hash does not depend on the announce list,
so the torrent is made first and its trackers chosen from its hash.
"""

from __future__ import annotations

from collections.abc import Sequence

from p2p_mirror.core.rendezvous import owners
from p2p_mirror.core.swarm import Metainfo, set_trackers

TRACKERS_PER_TORRENT = 2


def trackers_for(info_hash: str, trackers: Sequence[str]) -> list[str]:
    """The torrent's shard first, then its standby (fewer if fewer are configured)."""
    return owners(trackers, info_hash, TRACKERS_PER_TORRENT)


def shard(torrent: bytes, trackers: Sequence[str]) -> bytes:
    """``torrent`` announcing to its own trackers out of ``trackers``."""
    return set_trackers(torrent, trackers_for(Metainfo.parse(torrent).info_hash, trackers))
