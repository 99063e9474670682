"""``p2p-mirror status``: a role's health and its main counters, for a human at a terminal."""

from __future__ import annotations

import re
import urllib.request

_SAMPLE = re.compile(r"^(?P<name>[a-z_:][a-z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` from the Prometheus text format (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m and not line.startswith("#"):
            key = m.group("name") + (f"{{{m.group('labels')}}}" if m.group("labels") else "")
            out[key] = float(m.group("value"))
    return out


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
