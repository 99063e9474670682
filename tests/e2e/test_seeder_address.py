"""A seeder's advertised address (``announce_ip``): agents dial it for the seeder's swarm,
not the host of the seeder's URL, which (behind a Service) does not expose that port."""

from __future__ import annotations

import hashlib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import failed, require_binaries

from lab.images import PushedImage
from lab.registry import Registry
from lab.stack import AgentProc, LocalStack

REG = "registry.example.test"


def get_blob(agent: AgentProc, digest: str) -> bytes:
    url = f"{agent.url}/v2/library/demo/blobs/{digest}?ns={REG}"
    with urllib.request.urlopen(url, timeout=120) as resp:
        return resp.read()


def test_agents_reach_the_seeders_swarm_on_its_advertised_address(
    tmp_path: Path, registry: Registry, image: PushedImage, request: pytest.FixtureRequest
) -> None:
    """The seeder's API is on 127.0.0.1, its BitTorrent port only on 127.0.0.2, which it
    advertises. No tracker: each agent's segments that were dealt to the other one stall,
    and it asks the seeder's swarm, which it can reach only on the advertised address
    (dialling the URL's host would stall, and the blob would come from the origin)."""
    require_binaries("docker-registry")
    advertised = ["--bt-listen", "127.0.0.2:0", "--announce-ip", "127.0.0.2"]
    with LocalStack(tmp_path / "stack", {REG: registry.url}, segment_size="2MiB",
                    seeder_args=advertised) as stack:  # fmt: skip
        assert stack.tracker is not None
        stack.tracker.stop()
        layer = image.layout.layers[2]
        agents = [stack.add_agent(f"agent{i}", seeder_grace=0.5, stall_timeout=10)
                  for i in range(2)]  # fmt: skip
        with ThreadPoolExecutor(2) as pool:
            blobs = list(pool.map(lambda a: get_blob(a, layer.digest), agents))
        stalled = sum(a.metric("seeder_segments_total", reason="stalled") for a in agents)
        sources = [a.blob_sources() for a in agents]
        if failed(request):
            stack.dump_logs()

    assert all(hashlib.sha256(b).hexdigest() == layer.digest[7:] for b in blobs)
    assert stalled >= 1  # the seeder's swarm was needed
    assert sources == [{"swarm": layer.size}] * 2  # and reached: nothing from the origin
