"""Several nodes (network namespaces, shaped links, own containerd and agent) pull at once."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from support import failed, require_binaries, require_root

from lab.cluster import Cluster, install_hosts
from lab.images import build_image
from lab.procs import lab_python

MiB = 1024 * 1024
TOOLS = ("ip", "tc", "nsenter", "containerd", "ctr", "docker-registry", "skopeo", "curl")


def leftover_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.startswith("p2pm")}


def test_four_nodes_pull_at_once_and_the_origin_sends_each_layer_once(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    require_root()
    require_binaries(*TOOLS)
    before = leftover_namespaces()
    layout = build_image(tmp_path / "image", [6 * MiB, 4 * MiB, 3 * MiB, 2 * MiB], seed=4)
    with Cluster(tmp_path / "cluster", 4, mode="p2p", rate_mbit=200,
                 write_hosts=install_hosts) as cluster:  # fmt: skip
        ref = cluster.push(layout, "ci/app", "v1")
        mark = cluster.origin_mark()
        results = cluster.pull_all(
            ref, expected_digest=layout.manifest_digest, expected_bytes=layout.total_size
        )
        egress = cluster.origin_egress(mark)
        assert cluster.origin is not None
        fetches = Counter(r.blob_digest for r in cluster.origin.blob_fetches(mark))
        pattern = "node*/ctd/host/etc/containerd/certs.d/*/hosts.toml"
        hosts = [p.read_text() for p in (tmp_path / "cluster").glob(pattern)]
        if failed(request) or not all(r.ok for r in results):
            for name, tail in cluster.logs():
                print(f"----- {name} -----\n{tail}")

    assert [r.ok for r in results] == [True] * 4, [r.error for r in results]
    assert {r.digest for r in results} == {layout.manifest_digest}
    # The installer wrote every node's hosts.toml: the agent first, the origin as fallback.
    assert len(hosts) == 4 and all('[host."http://127.0.0.1:5004"]' in h for h in hosts)
    # The origin sent each blob at most once (to the seeder), about one image in all.
    assert max(fetches.values()) == 1
    assert set(fetches) == {layer.digest for layer in layout.layers} | {layout.config_digest}
    assert egress <= 1.1 * layout.total_size
    layer_bytes = sum(layer.size for layer in layout.layers) + layout.config_size
    for r in results:
        assert r.sources.get("origin", 0) == 0, f"{r.node} fetched from the origin"
        assert r.sources.get("swarm", 0) + r.sources.get("cache", 0) == layer_bytes
    # Torn down: no namespace of this run is left.
    assert leftover_namespaces() <= before


def test_demo_runs_and_reports(tmp_path: Path) -> None:
    require_root()
    require_binaries(*TOOLS)
    before = leftover_namespaces()
    out = subprocess.run(
        [*lab_python(), "lab.demo", "--nodes", "2", "--layers", "4MiB,2MiB",
         "--rate-mbit", "200", "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "node1    yes" in text and "node2    yes" in text
    assert "origin served" in text and "all nodes done after" in text
    ratio = float(text.split("origin served")[1].split("(")[1].split(" x")[0])
    assert ratio <= 1.1
    assert leftover_namespaces() <= before


def test_a_pull_survives_its_agent_stopping_half_way(tmp_path: Path) -> None:
    """SIGTERM to the agent mid-pull (a DaemonSet update): it drains for ``drain_timeout``,
    cuts the running blob and exits; containerd takes the rest from the origin."""
    require_root()
    require_binaries(*TOOLS)
    layout = build_image(tmp_path / "image", [8 * MiB, 4 * MiB], seed=5)
    config = tmp_path / "agent.yaml"
    config.write_text("drain_timeout: 1\n")
    with Cluster(tmp_path / "cluster", 1, mode="p2p", rate_mbit=10,
                 agent_args=["--config", str(config)]) as cluster:  # fmt: skip
        ref = cluster.push(layout, "ci/app", "v1")
        mark = cluster.origin_mark()
        results: list = []
        puller = threading.Thread(target=lambda: results.extend(cluster.pull_all(
            ref, expected_digest=layout.manifest_digest, timeout=120)))  # fmt: skip
        puller.start()
        deadline = time.monotonic() + 30
        while cluster.rx_bytes("node1") < 2 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        agent = cluster.parts["node1"].agent
        assert agent is not None and agent.alive()
        start = time.monotonic()
        os.killpg(agent.pid, signal.SIGTERM)
        code = agent.popen.wait(timeout=30)
        took = time.monotonic() - start
        puller.join(150)
        egress = cluster.origin_egress(mark)
        logs = "" if results and results[0].ok else "\n".join(t for _, t in cluster.logs())

    assert code == 0 and took < 5, (code, took)
    assert results and results[0].ok, logs
    assert results[0].digest == layout.manifest_digest
    # The origin sent the blobs to the seeder and, after the agent left, the rest to the node.
    assert egress > layout.total_size
