"""Rendezvous (highest-random-weight) hashing: which members of a set own a key.

Every member gets a weight per key, a hash of (member, key); the members in descending
weight order are the key's owners, first choice first. Unlike a hash ring (Kraken's
seeders), no virtual nodes are needed for balance, and when a member leaves only the keys it
owned move (each to its own next member), so the other members' caches stay valid.
Members are named by a stable string (``host:port``), never by their place in a list, so
every agent that knows the same set picks the same owner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(member: str, key: str) -> int:
    """The member's weight for ``key``: 64 bits of BLAKE2b over both (fast, well mixed)."""
    data = member.encode() + b"\0" + key.encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def rank(members: Iterable[str], key: str) -> list[str]:
    """``members`` (duplicates dropped) in owner order for ``key``: the owner first."""
    # Ties (astronomically rare) break on the name, so the order never depends on the input's.
    return sorted(set(members), key=lambda m: (weight(m, key), m), reverse=True)


def owners(members: Iterable[str], key: str, count: int) -> list[str]:
    """The first ``count`` owners of ``key`` (fewer if the set is smaller)."""
    return rank(members, key)[:count]
