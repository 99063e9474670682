"""Counters and gauges rendered in the Prometheus text format, with no client library."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

from aiohttp import web

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """A tiny registry: ``inc`` counters, ``gauge`` callbacks, ``render`` the exposition text."""

    def __init__(self, prefix: str = "p2p_mirror") -> None:
        self.prefix = prefix
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._help: dict[str, str] = {}
        self._gauges: dict[str, Callable[[], float]] = {}

    def describe(self, name: str, help_text: str) -> None:
        self._help[name] = help_text

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._counters[name]
        series[key] = series.get(key, 0) + amount

    def value(self, name: str, **labels: str) -> float:
        return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def gauge(self, name: str, read: Callable[[], float], help_text: str) -> None:
        self._gauges[name] = read
        self._help[name] = help_text

    def render(self) -> str:
        lines: list[str] = []
        for name, series in sorted(self._counters.items()):
            full = f"{self.prefix}_{name}"
            if name in self._help:
                lines.append(f"# HELP {full} {_help(self._help[name])}")
            lines.append(f"# TYPE {full} counter")
            for labels, value in sorted(series.items()):
                lines.append(f"{full}{_labels(labels)} {_number(value)}")
        for name, read in sorted(self._gauges.items()):
            full = f"{self.prefix}_{name}"
            lines.append(f"# HELP {full} {_help(self._help[name])}")
            lines.append(f"# TYPE {full} gauge")
            lines.append(f"{full} {_number(read())}")
        return "\n".join(lines) + "\n"

    async def handler(self, request: web.Request) -> web.Response:
        return web.Response(text=self.render(), content_type="text/plain", charset="utf-8")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _help(text: str) -> str:
    """HELP text escapes only backslash and newline (the exposition format's rule)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return str(int(value)) if number.is_integer() else repr(number)
