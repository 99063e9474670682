"""The tracker's per-source token bucket: burst, refill, and a bounded map of sources."""

from __future__ import annotations

from p2p_mirror.tracker.ratelimit import SourceRateLimit


def test_burst_then_rate_per_source() -> None:
    now = [0.0]
    limit = SourceRateLimit(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limit.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limit.allow("b")  # another source has its own bucket
    now[0] = 0.5  # one token back
    assert [limit.allow("a") for _ in range(2)] == [True, False]
    now[0] = 100.0  # refilled, never beyond the burst
    assert [limit.allow("a") for _ in range(4)] == [True, True, True, False]


def test_source_map_is_bounded_and_idle_buckets_are_forgotten() -> None:
    now = [0.0]
    limit = SourceRateLimit(rate=1.0, burst=2, max_sources=2, clock=lambda: now[0])
    assert limit.allow("a") and limit.allow("b")
    assert not limit.allow("c")  # full: a new source waits for a sweep
    assert limit.forget_idle() == 0  # a and b still owe tokens
    now[0] = 5.0
    assert limit.forget_idle() == 2 and limit.buckets == {}
    assert limit.allow("c")
