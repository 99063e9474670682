"""Counters and gauges exposed in the Prometheus text format (``prometheus_client``), and the
one parser of that format that everything reading metrics back uses."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

Labels = tuple[tuple[str, str], ...]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """A role's registry: ``inc`` counters, ``gauge`` callbacks, ``render`` the exposition text.

    Counters live here rather than in ``prometheus_client.Counter`` objects because their label
    names are not declared up front and callers read them back with ``value``.
    """

    def __init__(self, prefix: str = "p2p_mirror") -> None:
        self.prefix = prefix
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._help: dict[str, str] = {}
        self._gauges: dict[str, dict[Labels, Callable[[], float]]] = defaultdict(dict)
        self._registry = CollectorRegistry(auto_describe=False)
        # Not ``register(self)``: the registry would take ``describe`` for the collector's own.
        self._registry.register(_Collector(self))

    def describe(self, name: str, help_text: str) -> None:
        self._help[name] = help_text

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = _key(labels)
        series = self._counters[name]
        series[key] = series.get(key, 0) + amount

    def value(self, name: str, **labels: str) -> float:
        return self._counters.get(name, {}).get(_key(labels), 0)

    def gauge(self, name: str, read: Callable[[], float], help_text: str, **labels: str) -> None:
        """A gauge read at render time; several calls with different labels make its series."""
        self._gauges[name][_key(labels)] = read
        self._help[name] = help_text

    def families(self) -> Iterator[Metric]:
        for name, series in sorted(self._counters.items()):
            # CounterMetricFamily drops a trailing "_total" and the exposition adds it back.
            family = CounterMetricFamily(
                f"{self.prefix}_{name}", self._help.get(name, name), labels=_names(series)
            )
            for labels, value in sorted(series.items()):
                family.add_metric([v for _, v in labels], value)
            yield family
        for name, reads in sorted(self._gauges.items()):
            gauge = GaugeMetricFamily(f"{self.prefix}_{name}", self._help[name],
                                      labels=_names(reads))  # fmt: skip
            for labels, read in sorted(reads.items(), key=lambda kv: kv[0]):
                gauge.add_metric([v for _, v in labels], float(read()))
            yield gauge

    def render(self) -> str:
        return generate_latest(self._registry).decode()

    async def handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.render().encode(), headers={"Content-Type": CONTENT_TYPE})


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.families()


def _key(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _names(series: Iterable[Labels]) -> list[str]:
    for labels in series:
        return [k for k, _ in labels]
    return []


def parse_samples(text: str) -> list[Sample]:
    """Every sample in Prometheus text (``name``, ``labels`` dict, ``value``); raises
    ``ValueError`` on text that is not the exposition format."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def sample_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        s.value for s in parse_samples(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )  # fmt: skip


def sample_key(sample: Sample) -> str:
    """``name{k="v",...}``, labels sorted: one line of a human-readable listing."""
    if not sample.labels:
        return sample.name
    body = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
    return f"{sample.name}{{{body}}}"
