"""``p2p-mirror status``: a role's health and its main counters, for a human at a terminal."""

from __future__ import annotations

import urllib.request

from p2p_mirror.core.metrics import parse_samples, sample_key


def parse_metrics(text: str) -> dict[str, float]:
    """``{'name{k="v"}': value}`` from the Prometheus text format."""
    return {sample_key(s): s.value for s in parse_samples(text)}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fetch_status(base: str, timeout: float) -> list[str]:
    """Lines to print; raises OSError if the role does not answer."""
    with urllib.request.urlopen(f"{base}/healthz", timeout=timeout) as resp:
        health = resp.read().decode().strip()
    with urllib.request.urlopen(f"{base}/metrics", timeout=timeout) as resp:
        metrics = parse_metrics(resp.read().decode())
    lines = [f"{base}: {health}"]
    for key, value in sorted(metrics.items()):
        shown = human_bytes(value) if "bytes" in key else f"{value:g}"
        lines.append(f"  {key:<60} {shown}")
    return lines
