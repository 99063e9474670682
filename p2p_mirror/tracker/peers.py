"""The tracker's memory: which peers are in which swarm, and who gets whom.

Pure state, no I/O, with an injectable clock so expiry is testable without sleeping.
Each side of a swarm (seeders, leechers) is a list plus a key -> index map, so an announce
costs O(numwant), not O(swarm): add, remove and random sampling never walk the swarm.
Stale peers are dropped when a sample meets them and by a periodic ``expire`` sweep.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from p2p_mirror.tracker.params import Announce, IPAddress, swarm_key

# A peer is one (peer_id, address family): libtorrent 2 announces once per listen socket,
# so a dual-stack node is two entries with the same peer_id.
PeerKey = tuple[bytes, int]


@dataclass
class Peer:
    peer_id: bytes
    ip: IPAddress
    port: int
    seeder: bool
    last_seen: float
    completed: bool = False

    @property
    def key(self) -> PeerKey:
        return (self.peer_id, self.ip.version)


class PeerSet:
    """Peers with O(1) put/remove by key and O(k) random sampling."""

    def __init__(self) -> None:
        self.items: list[Peer] = []
        self.index: dict[PeerKey, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def put(self, peer: Peer) -> None:
        i = self.index.get(peer.key)
        if i is None:
            self.index[peer.key] = len(self.items)
            self.items.append(peer)
        else:
            self.items[i] = peer

    def remove(self, key: PeerKey) -> Peer | None:
        i = self.index.pop(key, None)
        if i is None:
            return None
        peer, last = self.items[i], self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.index[last.key] = i
        return peer

    def sample(self, rng: random.Random, k: int) -> list[Peer]:
        return list(self.items) if k >= len(self.items) else rng.sample(self.items, k)


@dataclass
class TorrentPeers:
    """The peers of one info-hash, and how many finished a download here."""

    seeders: PeerSet = field(default_factory=PeerSet)
    leechers: PeerSet = field(default_factory=PeerSet)
    endpoints: dict[tuple[IPAddress, int], PeerKey] = field(default_factory=dict)
    downloaded: int = 0

    def __len__(self) -> int:
        return len(self.seeders) + len(self.leechers)

    def add(self, peer: Peer) -> None:
        """Insert or update; a different peer on the same ip:port is replaced: that is a
        client restarted with a new peer_id."""
        stale = self.endpoints.get((peer.ip, peer.port))
        if stale is not None and stale != peer.key:
            self.pop(stale)
        (self.seeders if peer.seeder else self.leechers).put(peer)
        self.endpoints[(peer.ip, peer.port)] = peer.key

    def pop(self, key: PeerKey) -> Peer | None:
        peer = self.seeders.remove(key) or self.leechers.remove(key)
        if peer is not None and self.endpoints.get((peer.ip, peer.port)) == key:
            del self.endpoints[(peer.ip, peer.port)]
        return peer

    def expire(self, cutoff: float) -> int:
        """Drop peers last seen before ``cutoff`` (walks the swarm); returns how many."""
        stale = [p for side in (self.seeders, self.leechers) for p in side.items]
        stale = [p for p in stale if p.last_seen < cutoff]
        for p in stale:
            self.pop(p.key)
        return len(stale)


@dataclass(frozen=True)
class AnnounceResult:
    peers: list[Peer]
    complete: int
    incomplete: int


@dataclass(frozen=True)
class ScrapeEntry:
    complete: int
    incomplete: int
    downloaded: int


class PeerTable:
    """All swarms. ``announce`` updates the caller and picks peers for it."""

    def __init__(
        self,
        peer_ttl: float,
        default_numwant: int = 50,
        max_numwant: int = 200,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.peer_ttl = peer_ttl
        self.default_numwant = default_numwant
        self.max_numwant = max_numwant
        self.clock = clock
        self.rng = rng or random.Random()
        self.swarms: dict[bytes, TorrentPeers] = {}
        self.expired_total = 0

    def announce(self, req: Announce) -> AnnounceResult:
        now = self.clock()
        swarm = self.swarms.get(req.info_hash)
        if swarm is None:
            if req.event == "stopped":
                return AnnounceResult([], 0, 0)
            swarm = self.swarms[req.info_hash] = TorrentPeers()
        cutoff = now - self.peer_ttl
        key: PeerKey = (req.peer_id, req.ip.version)
        old = swarm.pop(key)
        if req.event == "stopped":
            if not swarm:
                del self.swarms[req.info_hash]
            return AnnounceResult([], len(swarm.seeders), len(swarm.leechers))
        peer = Peer(req.peer_id, req.ip, req.port, req.seeder, now)
        peer.completed = old.completed if old else False
        if req.event == "completed" and not peer.completed:
            swarm.downloaded += 1
            peer.completed = True
        swarm.add(peer)
        wanted = self.default_numwant if req.numwant is None else req.numwant
        picked = self._pick(swarm, peer, min(wanted, self.max_numwant), cutoff)
        return AnnounceResult(picked, len(swarm.seeders), len(swarm.leechers))

    def _pick(self, swarm: TorrentPeers, me: Peer, numwant: int, cutoff: float) -> list[Peer]:
        """Peers for ``me``: never itself; seeders get leechers only; leechers get a mix
        that favours seeders (up to half the answer, more if leechers run short)."""
        if numwant <= 0:
            return []
        if me.seeder:
            return self._sample(swarm, swarm.leechers, me, numwant, cutoff)
        n_leech = len(swarm.leechers) - 1
        n_seed = max(math.ceil(numwant / 2), numwant - n_leech)
        picked = self._sample(swarm, swarm.seeders, me, n_seed, cutoff)
        picked += self._sample(swarm, swarm.leechers, me, numwant - len(picked), cutoff)
        return picked

    def _sample(
        self, swarm: TorrentPeers, side: PeerSet, me: Peer, k: int, cutoff: float
    ) -> list[Peer]:
        """Up to ``k`` live peers of ``side`` other than ``me``; stale ones met are dropped."""
        out: list[Peer] = []
        while k > len(out) and len(side) > 0:
            # a few extra to cover ``me`` (and its other address family) being drawn
            batch = side.sample(self.rng, k - len(out) + 2)
            stale = [p for p in batch if p.last_seen < cutoff]
            for p in stale:
                swarm.pop(p.key)
            self.expired_total += len(stale)
            seen = {id(p) for p in out}
            out += [p for p in batch if p.last_seen >= cutoff and p.peer_id != me.peer_id
                    and id(p) not in seen]  # fmt: skip
            if not stale:
                break
        return out[:k]

    def scrape(self, info_hashes: Iterable[bytes]) -> dict[bytes, ScrapeEntry]:
        """Counts per requested hash (as requested, 20 or 32 bytes); unknown hashes are 0."""
        cutoff = self.clock() - self.peer_ttl
        out: dict[bytes, ScrapeEntry] = {}
        for ih in info_hashes:
            swarm = self.swarms.get(swarm_key(ih))
            if swarm is None:
                out[ih] = ScrapeEntry(0, 0, 0)
                continue
            self.expired_total += swarm.expire(cutoff)
            out[ih] = ScrapeEntry(len(swarm.seeders), len(swarm.leechers), swarm.downloaded)
        return out

    def scrape_all(self, limit: int) -> dict[bytes, ScrapeEntry]:
        """Counts for every swarm, at most ``limit`` of them."""
        self.expire()
        return self.scrape(list(self.swarms)[:limit])

    def expire(self) -> int:
        """Drop stale peers everywhere and forget empty swarms; returns peers dropped."""
        cutoff = self.clock() - self.peer_ttl
        dropped = 0
        for ih in list(self.swarms):
            swarm = self.swarms[ih]
            dropped += swarm.expire(cutoff)
            if not swarm:
                del self.swarms[ih]
        self.expired_total += dropped
        return dropped

    def counts(self) -> tuple[int, int, int]:
        """(torrents, seeders, leechers) right now."""
        seeders = sum(len(s.seeders) for s in self.swarms.values())
        leechers = sum(len(s.leechers) for s in self.swarms.values())
        return len(self.swarms), seeders, leechers
