"""Metrics: the text Prometheus scrapes must parse, label values must be escaped."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from p2p_mirror.core.metrics import Metrics, parse_samples, sample_key, sample_sum

# Prometheus text exposition format 0.0.4, one regex per line kind.
METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_VALUE = r'"(?:[^"\\\n]|\\\\|\\"|\\n)*"'
LABEL = rf"[a-zA-Z_][a-zA-Z0-9_]*={LABEL_VALUE}"
LABELS = rf"\{{{LABEL}(?:,{LABEL})*\}}"
NUMBER = r"(?:[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|[+-]Inf|NaN)"
SAMPLE = re.compile(rf"^({METRIC_NAME})({LABELS})? ({NUMBER})(?: -?\d+)?$")
HELP = re.compile(rf"^# HELP ({METRIC_NAME}) ((?:[^\\\n]|\\\\|\\n)*)$")
TYPE = re.compile(rf"^# TYPE ({METRIC_NAME}) (counter|gauge|histogram|summary|untyped)$")


def parse_exposition(text: str) -> dict[str, dict[str, Any]]:
    """Check every line; return ``{name: {labels text: value}}`` and the TYPE of each name."""
    assert text.endswith("\n")
    samples: dict[str, dict[str, Any]] = {}
    types: dict[str, str] = {}
    for line in text.rstrip("\n").split("\n"):
        if m := SAMPLE.match(line):
            name = m.group(1)
            assert name in types, f"sample before its TYPE: {line!r}"
            assert m.group(2) not in samples.setdefault(name, {}), f"duplicate: {line!r}"
            samples[name][m.group(2) or ""] = float(m.group(3))
        elif m := TYPE.match(line):
            assert m.group(1) not in types, f"TYPE twice: {line!r}"
            types[m.group(1)] = m.group(2)
        elif HELP.match(line):
            pass
        else:
            pytest.fail(f"not a Prometheus exposition line: {line!r}")
    samples["__types__"] = types
    return samples


def test_counters_with_labels_add_up() -> None:
    m = Metrics()
    m.describe("blob_bytes_total", "Blob bytes by source")
    m.inc("blob_bytes_total", 100, source="swarm")
    m.inc("blob_bytes_total", 50, source="swarm")
    m.inc("blob_bytes_total", 7, source="origin")
    m.inc("requests_total", kind="blobs", status="200")
    m.inc("requests_total", status="200", kind="blobs")  # label order does not matter
    assert m.value("blob_bytes_total", source="swarm") == 150
    assert m.value("blob_bytes_total", source="origin") == 7
    assert m.value("blob_bytes_total", source="cache") == 0
    assert m.value("requests_total", status="200", kind="blobs") == 2
    assert m.value("never_seen") == 0
    got = parse_exposition(m.render())
    assert got["p2p_mirror_blob_bytes_total"] == {
        '{source="origin"}': 7,
        '{source="swarm"}': 150,
    }
    assert got["p2p_mirror_requests_total"] == {'{kind="blobs",status="200"}': 2}
    assert got["__types__"]["p2p_mirror_blob_bytes_total"] == "counter"
    assert "# HELP p2p_mirror_blob_bytes_total Blob bytes by source\n" in m.render()


def test_label_values_are_escaped() -> None:
    m = Metrics(prefix="t")
    nasty = 'a"b\\c\nd'
    m.inc("x_total", reason=nasty)
    text = m.render()
    assert 't_x_total{reason="a\\"b\\\\c\\nd"} 1.0\n' in text
    got = parse_exposition(text)
    assert list(got["t_x_total"].values()) == [1]
    assert [s.labels for s in parse_samples(text)] == [{"reason": nasty}]


def test_help_text_is_escaped() -> None:
    m = Metrics(prefix="t")
    m.describe("x_total", "line one\nline two \\ backslash")
    m.inc("x_total")
    text = m.render()
    assert "# HELP t_x_total line one\\nline two \\\\ backslash\n" in text
    parse_exposition(text)


def test_gauge_callbacks_are_read_at_render_time() -> None:
    m = Metrics()
    level = {"v": 3}
    m.gauge("cache_bytes", lambda: level["v"], "Bytes cached")
    assert parse_exposition(m.render())["p2p_mirror_cache_bytes"] == {"": 3}
    level["v"] = 4096
    got = parse_exposition(m.render())
    assert got["p2p_mirror_cache_bytes"] == {"": 4096}
    assert got["__types__"]["p2p_mirror_cache_bytes"] == "gauge"


@pytest.mark.parametrize(
    "value", [0, 5, 5.0, 2**40 + 1, 0.25, -1.5, float("inf"), float("-inf"), float("nan")]
)
def test_numbers_round_trip(value: float) -> None:
    m = Metrics(prefix="t")
    m.gauge("g", lambda: value, "g")
    m.inc("c_total", value)
    got = parse_exposition(m.render())
    for shown in (got["t_g"][""], got["t_c_total"][""]):
        assert shown == value or (math.isnan(value) and math.isnan(shown))


def test_full_exposition_parses() -> None:
    m = Metrics()
    for name in ("a_total", "b_total"):
        m.describe(name, f"help for {name}")
    m.inc("a_total", 3, kind="blobs", status="200")
    m.inc("a_total", 1, kind="manifests", status="401")
    m.inc("b_total", 0.5)
    m.inc("undescribed_total")
    m.gauge("g1", lambda: 1.25, "a gauge")
    m.gauge("g2", lambda: 0, "another")
    got = parse_exposition(m.render())
    assert set(got["__types__"]) == {
        "p2p_mirror_a_total", "p2p_mirror_b_total", "p2p_mirror_undescribed_total",
        "p2p_mirror_g1", "p2p_mirror_g2",
    }
    assert got["p2p_mirror_b_total"] == {"": 0.5}
    assert got["p2p_mirror_g1"] == {"": 1.25}


async def test_handler_serves_text_plain() -> None:
    m = Metrics()
    m.inc("x_total")
    resp = await m.handler(make_mocked_request("GET", "/metrics"))
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert resp.charset == "utf-8"
    assert resp.body.decode() == m.render()
    parse_exposition(resp.body.decode())


def test_gauge_series_by_label() -> None:
    m = Metrics(prefix="t")
    m.gauge("peers", lambda: 3, "peers", role="seeder")
    m.gauge("peers", lambda: 5, "peers", role="leecher")
    got = parse_exposition(m.render())
    assert got["t_peers"] == {'{role="leecher"}': 5, '{role="seeder"}': 3}


def test_one_parser_reads_back_what_is_rendered() -> None:
    m = Metrics()
    m.inc("blob_bytes_total", 100, source="swarm")
    m.inc("blob_bytes_total", 20, source="origin")
    m.gauge("cache_bytes", lambda: 7, "c")
    text = m.render()
    assert sample_sum(text, "p2p_mirror_blob_bytes_total") == 120
    assert sample_sum(text, "p2p_mirror_blob_bytes_total", source="origin") == 20
    assert sample_sum(text, "p2p_mirror_nothing_total") == 0
    keys = {sample_key(s): s.value for s in parse_samples(text)}
    assert keys == {
        'p2p_mirror_blob_bytes_total{source="origin"}': 20,
        'p2p_mirror_blob_bytes_total{source="swarm"}': 100,
        "p2p_mirror_cache_bytes": 7,
    }


def test_parser_rejects_what_is_not_prometheus_text() -> None:
    with pytest.raises(ValueError):
        parse_samples('x{a="unterminated} 1\n')
