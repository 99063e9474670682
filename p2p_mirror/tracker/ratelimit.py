"""Requests per second per source address: one token bucket each, the map itself bounded."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class SourceRateLimit:
    """``allow(source)`` takes one token from that source's bucket (``burst`` deep, refilled
    at ``rate`` per second). At most ``max_sources`` buckets exist; ``forget_idle`` drops the
    full ones. When the map is full, an unknown source is refused until a sweep makes room:
    holding a connection open costs a real address, so in a cluster this stays far off."""

    def __init__(
        self,
        rate: float,
        burst: int,
        max_sources: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self.clock = clock
        self.buckets: dict[Hashable, list[float]] = {}  # source -> [tokens, last refill]

    def allow(self, source: Hashable) -> bool:
        now = self.clock()
        bucket = self.buckets.get(source)
        if bucket is None:
            if len(self.buckets) >= self.max_sources:
                return False
            self.buckets[source] = [self.burst - 1, now]
            return True
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True

    def forget_idle(self) -> int:
        """Drop the buckets that have refilled (their source is as new again)."""
        now = self.clock()
        full = [s for s, (tokens, last) in self.buckets.items()
                if tokens + (now - last) * self.rate >= self.burst]  # fmt: skip
        for s in full:
            del self.buckets[s]
        return len(full)
