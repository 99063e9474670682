"""``metrics_listen``: a real agent process serves /metrics and /healthz on an extra address
for Prometheus, and nothing of the registry API there."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lab.cluster import p2p_mirror_argv
from lab.procs import ProcGroup, free_port, port_open


def status_and_body(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.integration
def test_the_metrics_listener_serves_only_metrics_and_health(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    with ProcGroup() as procs:
        agent = procs.start(
            [*p2p_mirror_argv(), "agent", "--listen", f"127.0.0.1:{port}",
             "--data-dir", str(tmp_path / "data"), "--proxy-listen", "",
             "--metrics-listen", f"127.0.0.1:{metrics_port}"],
            tmp_path / "agent.log",
        )  # fmt: skip
        agent.wait_ready(lambda: port_open("127.0.0.1", metrics_port), 30, "metrics listener")
        base = f"http://127.0.0.1:{metrics_port}"
        health = status_and_body(f"{base}/healthz")
        metrics = status_and_body(f"{base}/metrics")
        registry_api = status_and_body(f"{base}/v2/")
        main_api = status_and_body(f"http://127.0.0.1:{port}/v2/")
    assert health == (200, "ok\n")
    assert metrics[0] == 200 and "p2p_mirror_cache_bytes" in metrics[1]
    assert registry_api[0] == 404
    assert main_api[0] == 200
