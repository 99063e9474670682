"""The tracker's memory: which peer addresses are in which swarm, and who gets whom.

Pure state, no I/O, with an injectable clock so expiry is testable without sleeping.
A peer is its compact address (BEP 23: 4-byte IPv4 or 16-byte IPv6, then a 2-byte port), and
nothing else is kept: no peer id, no per-peer object. Each side of a swarm (seeds, leechers)
and address family is a ``CompactPeers``: the addresses back to back in one bytearray, their
expiry times in a parallel array, and an address -> slot dict; add, remove and a random
window of k peers cost O(1) and O(k), and a compact answer is a slice of the bytearray.
"""

from __future__ import annotations

import math
import random
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from p2p_mirror.tracker.params import Announce, swarm_key

V4_LEN = 6
V6_LEN = 18


def compact_address(req: Announce) -> bytes:
    return req.ip.packed + req.port.to_bytes(2, "big")


class CompactPeers:
    """Fixed-width compact addresses with expiry times: O(1) put/remove, O(k) windows."""

    __slots__ = ("width", "addrs", "expiry", "slots")

    def __init__(self, width: int) -> None:
        self.width = width
        self.addrs = bytearray()
        self.expiry = array("d")
        self.slots: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.expiry)

    def __contains__(self, addr: bytes) -> bool:
        return addr in self.slots

    def put(self, addr: bytes, expires: float) -> None:
        i = self.slots.get(addr)
        if i is None:
            self.slots[addr] = len(self.expiry)
            self.addrs += addr
            self.expiry.append(expires)
        else:
            self.expiry[i] = expires

    def remove(self, addr: bytes) -> bool:
        i = self.slots.pop(addr, None)
        if i is None:
            return False
        w, last = self.width, len(self.expiry) - 1
        if i != last:  # move the last peer into the hole
            moved = bytes(self.addrs[last * w : last * w + w])
            self.addrs[i * w : i * w + w] = moved
            self.expiry[i] = self.expiry[last]
            self.slots[moved] = i
        del self.addrs[last * w :]
        self.expiry.pop()
        return True

    def window(self, rng: random.Random, k: int, now: float, skip: bytes | None) -> bytes:
        """Up to ``k`` live addresses other than ``skip``, consecutive from a random slot,
        concatenated. Stale ones met on the way are removed."""
        if skip is not None and skip not in self.slots:
            skip = None
        exp = self.expiry
        while True:
            n = len(exp)
            take = min(n, k + (skip is not None))
            if k <= 0 or take <= 0:
                return b""
            start = rng.randrange(n) if take < n else 0
            end = start + take
            if end <= n and min(exp[start:end]) >= now:  # the common case, in C
                break
            stale = [i % n for i in range(start, end) if exp[i % n] < now]
            if not stale:
                break
            w = self.width
            for i in sorted(stale, reverse=True):
                self.remove(bytes(self.addrs[i * w : i * w + w]))
        w = self.width
        if end <= n:
            chunk = bytes(self.addrs[start * w : end * w])
        else:
            chunk = bytes(self.addrs[start * w :]) + bytes(self.addrs[: (end - n) * w])
        if skip is not None:
            for off in range(0, len(chunk), w):
                if chunk[off : off + w] == skip:
                    chunk = chunk[:off] + chunk[off + w :]
                    break
        return chunk[: k * w]

    def expire(self, now: float) -> int:
        """Drop every peer whose time ran out (walks this side); returns how many."""
        w = self.width
        stale = [bytes(self.addrs[i * w : i * w + w]) for i, t in enumerate(self.expiry)
                 if t < now]  # fmt: skip
        for addr in stale:
            self.remove(addr)
        return len(stale)

    def addresses(self) -> list[bytes]:
        w = self.width
        return [bytes(self.addrs[i : i + w]) for i in range(0, len(self.addrs), w)]


class TorrentPeers:
    """The peers of one info-hash by role and address family, and how many finished here."""

    __slots__ = ("seeds4", "leechers4", "seeds6", "leechers6", "downloaded")

    def __init__(self) -> None:
        self.seeds4, self.leechers4 = CompactPeers(V4_LEN), CompactPeers(V4_LEN)
        self.seeds6, self.leechers6 = CompactPeers(V6_LEN), CompactPeers(V6_LEN)
        self.downloaded = 0

    def sides(self, addr: bytes) -> tuple[CompactPeers, CompactPeers]:
        """(seeds, leechers) of ``addr``'s family."""
        if len(addr) == V4_LEN:
            return self.seeds4, self.leechers4
        return self.seeds6, self.leechers6

    @property
    def seeders(self) -> int:
        return len(self.seeds4) + len(self.seeds6)

    @property
    def leechers(self) -> int:
        return len(self.leechers4) + len(self.leechers6)

    def __len__(self) -> int:
        return self.seeders + self.leechers

    def expire(self, now: float) -> int:
        return sum(side.expire(now) for side in
                   (self.seeds4, self.leechers4, self.seeds6, self.leechers6))  # fmt: skip


@dataclass(frozen=True)
class AnnounceResult:
    peers: bytes  # BEP 23 compact IPv4
    peers6: bytes  # BEP 7 compact IPv6
    complete: int
    incomplete: int
    refused: str = ""  # non-empty: a cap refused the peer; it was not added


@dataclass(frozen=True)
class ScrapeEntry:
    complete: int
    incomplete: int
    downloaded: int


class PeerTable:
    """All swarms. ``announce`` updates the caller and picks peers for it.

    Seeds and leechers have their own TTL; the caps bound memory whatever clients send: a new
    swarm beyond ``max_torrents``, or a new peer beyond ``max_peers_per_torrent`` or
    ``max_peers``, is refused (peers already in are always refreshed).
    """

    def __init__(
        self,
        peer_ttl: float,
        seed_ttl: float | None = None,
        default_numwant: int = 50,
        max_numwant: int = 200,
        max_torrents: int = 100_000,
        max_peers_per_torrent: int = 20_000,
        max_peers: int = 2_000_000,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.peer_ttl = peer_ttl
        self.seed_ttl = peer_ttl if seed_ttl is None else seed_ttl
        self.default_numwant = default_numwant
        self.max_numwant = max_numwant
        self.max_torrents = max_torrents
        self.max_peers_per_torrent = max_peers_per_torrent
        self.max_peers = max_peers
        self.clock = clock
        self.rng = rng or random.Random()
        self.swarms: dict[bytes, TorrentPeers] = {}
        self.peers = 0
        self.expired_total = 0

    def announce(self, req: Announce) -> AnnounceResult:
        now = self.clock()
        swarm = self.swarms.get(req.info_hash)
        if swarm is None:
            if req.event == "stopped":
                return AnnounceResult(b"", b"", 0, 0)
            if len(self.swarms) >= self.max_torrents:
                return AnnounceResult(b"", b"", 0, 0, refused="torrents")
            swarm = self.swarms[req.info_hash] = TorrentPeers()
        addr = compact_address(req)
        seeds, leechers = swarm.sides(addr)
        was_seed = addr in seeds
        known = was_seed or addr in leechers
        if req.event == "stopped":
            self._forget(req.info_hash, swarm, addr)
            return AnnounceResult(b"", b"", swarm.seeders, swarm.leechers)
        if not known and (len(swarm) >= self.max_peers_per_torrent
                          or self.peers >= self.max_peers):  # fmt: skip
            if not swarm:
                del self.swarms[req.info_hash]
            reason = "peers" if self.peers >= self.max_peers else "torrent_peers"
            return AnnounceResult(b"", b"", swarm.seeders, swarm.leechers, refused=reason)
        if req.seeder:
            if req.event == "completed" and not was_seed:
                swarm.downloaded += 1
            if leechers.remove(addr):
                self.peers -= 1
            self.peers += not was_seed
            seeds.put(addr, now + self.seed_ttl)
        else:
            if seeds.remove(addr):
                self.peers -= 1
            self.peers += addr not in leechers
            leechers.put(addr, now + self.peer_ttl)
        wanted = self.default_numwant if req.numwant is None else req.numwant
        v4, v6 = self._pick(swarm, addr, req.seeder, min(wanted, self.max_numwant), now)
        return AnnounceResult(v4, v6, swarm.seeders, swarm.leechers)

    def _forget(self, info_hash: bytes, swarm: TorrentPeers, addr: bytes) -> None:
        seeds, leechers = swarm.sides(addr)
        self.peers -= seeds.remove(addr) + leechers.remove(addr)
        if not swarm:
            del self.swarms[info_hash]

    def _pick(
        self, swarm: TorrentPeers, me: bytes, seeder: bool, numwant: int, now: float
    ) -> tuple[bytes, bytes]:
        """Peers for ``me``, never itself: seeds get leechers only; leechers get a mix that
        favours seeds (up to half the answer, more if leechers run short). IPv4 first."""
        if numwant <= 0:
            return b"", b""
        before = len(swarm)
        out: list[bytes] = []
        left = numwant
        for seeds, leechers in ((swarm.seeds4, swarm.leechers4), (swarm.seeds6, swarm.leechers6)):
            skip = me if len(me) == seeds.width else None
            got = b""
            if seeder:
                got = leechers.window(self.rng, left, now, skip)
            else:
                others = len(leechers) - (skip is not None and skip in leechers)
                n_seed = max(math.ceil(left / 2), left - others)
                got = seeds.window(self.rng, n_seed, now, skip)
                got += leechers.window(self.rng, left - len(got) // seeds.width, now, skip)
            out.append(got)
            left -= len(got) // seeds.width
        self._count_expired(swarm, before)
        return out[0], out[1]

    def _count_expired(self, swarm: TorrentPeers, before: int) -> None:
        dropped = before - len(swarm)
        self.peers -= dropped
        self.expired_total += dropped

    def scrape(self, info_hashes: Iterable[bytes]) -> dict[bytes, ScrapeEntry]:
        """Counts per requested hash (as requested, 20 or 32 bytes); unknown hashes are 0."""
        now = self.clock()
        out: dict[bytes, ScrapeEntry] = {}
        for ih in info_hashes:
            swarm = self.swarms.get(swarm_key(ih))
            if swarm is None:
                out[ih] = ScrapeEntry(0, 0, 0)
                continue
            dropped = swarm.expire(now)
            self.peers -= dropped
            self.expired_total += dropped
            out[ih] = ScrapeEntry(swarm.seeders, swarm.leechers, swarm.downloaded)
        return out

    def expire(self) -> int:
        """Drop stale peers everywhere and forget empty swarms; returns peers dropped."""
        now = self.clock()
        dropped = 0
        for ih in list(self.swarms):
            swarm = self.swarms[ih]
            dropped += swarm.expire(now)
            if not swarm:
                del self.swarms[ih]
        self.peers -= dropped
        self.expired_total += dropped
        return dropped

    def counts(self) -> tuple[int, int, int]:
        """(torrents, seeders, leechers) right now."""
        seeders = sum(s.seeders for s in self.swarms.values())
        return len(self.swarms), seeders, self.peers - seeders
