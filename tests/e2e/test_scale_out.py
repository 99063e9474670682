"""Scale-out on real parts (netns nodes, docker-registry, containerd, agents, seeders,
trackers): several seeders share the origin fetches, losing a seeder and a tracker mid-pull
costs no pull, and nodes behind a NAT still find each other by their announced addresses."""

from __future__ import annotations

import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import libtorrent as lt
import pytest
from support import failed, require_binaries, require_root

from lab.cluster import TRACKER_PORT, Cluster
from lab.images import build_image
from lab.stack import metric_sum
from p2p_mirror.agent.seeder_set import member_key
from p2p_mirror.core.clusterauth import TRACKER, ClusterAuth, load_secret
from p2p_mirror.core.rendezvous import rank
from p2p_mirror.core.swarm import Metainfo

MiB = 1024 * 1024
TOOLS = ("ip", "tc", "nsenter", "containerd", "ctr", "docker-registry", "skopeo", "curl")
LAYERS = [3 * MiB, 2 * MiB, 2 * MiB, MiB, MiB, MiB // 2]


def dump(cluster: Cluster) -> None:
    for name, tail in cluster.logs():
        print(f"----- {name} -----\n{tail}")


def test_three_seeders_fetch_each_blob_from_the_origin_once(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """3 seeders, 2 trackers, 8 nodes pull one 6-layer image at once: every blob leaves the
    origin once, to its owning seeder, and the seeders share the blobs out."""
    require_root()
    require_binaries(*TOOLS)
    layout = build_image(tmp_path / "image", LAYERS, seed=21)
    with Cluster(tmp_path / "cluster", 8, mode="p2p", rate_mbit=200, seeders=3,
                 trackers=2) as cluster:  # fmt: skip
        ref = cluster.push(layout, "ci/app", "v1")
        mark = cluster.origin_mark()
        results = cluster.pull_all(ref, expected_digest=layout.manifest_digest, timeout=120)
        egress = cluster.origin_egress(mark)
        assert cluster.origin is not None
        fetches = cluster.origin.blob_fetches(mark)
        seeder_ips = {cluster.ip(n): n for n in cluster.seeder_names}
        origin_bytes = {n: metric_sum(cluster.role_metrics(n), "origin_bytes_total")
                        for n in cluster.seeder_names}  # fmt: skip
        if failed(request) or not all(r.ok for r in results):
            dump(cluster)

    assert [r.ok for r in results] == [True] * 8, [r.error for r in results]
    blobs = {layer.digest for layer in layout.layers} | {layout.config_digest}
    per_blob = Counter(r.blob_digest for r in fetches)
    assert set(per_blob) == blobs and set(per_blob.values()) == {1}, per_blob
    assert {r.remote_addr for r in fetches} <= set(seeder_ips)  # only seeders asked the origin
    assert egress <= 1.05 * layout.total_size, (egress, layout.total_size)
    # rendezvous spread 7 blobs over the seeders; what they fetched adds up to the blobs
    assert sum(1 for v in origin_bytes.values() if v > 0) >= 2, origin_bytes
    blob_bytes = sum(layer.size for layer in layout.layers) + layout.config_size
    assert sum(origin_bytes.values()) == blob_bytes
    for r in results:
        assert r.sources.get("origin", 0) == 0, f"{r.node} fetched from the origin"


def test_losing_a_seeder_and_a_tracker_mid_pull_costs_no_pull(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A seeder and a tracker are killed once the nodes have a fifth of the image: the
    blobs that seeder owned move to the next seeder, the torrents that tracker held are
    still announced to their standby, and the origin sends at most 1.5 images."""
    require_root()
    require_binaries(*TOOLS)
    layout = build_image(tmp_path / "image", [4 * MiB, 4 * MiB, 3 * MiB, 3 * MiB, 2 * MiB],
                         seed=22)  # fmt: skip
    with Cluster(tmp_path / "cluster", 6, mode="p2p", rate_mbit=60, seeders=3,
                 trackers=2) as cluster:  # fmt: skip
        ref = cluster.push(layout, "ci/app", "v1")
        mark = cluster.origin_mark()
        results: list = []
        puller = threading.Thread(target=lambda: results.extend(cluster.pull_all(
            ref, expected_digest=layout.manifest_digest, timeout=150)))  # fmt: skip
        base = sum(cluster.rx_bytes(n) for n in cluster.node_names)
        puller.start()
        deadline = time.monotonic() + 60
        goal = base + 6 * layout.total_size // 5
        while sum(cluster.rx_bytes(n) for n in cluster.node_names) < goal:
            assert time.monotonic() < deadline, "the pull never got going"
            time.sleep(0.05)
        # the owner of the largest layer, so the kill surely leaves some blob ownerless
        largest = max(layout.layers, key=lambda layer: layer.size).digest
        owner = rank([member_key(url) for url in cluster.seeder_urls], largest)[0]
        victim = next(n for n in cluster.seeder_names if owner.startswith(f"{cluster.ip(n)}:"))
        cluster.stop_role(victim)
        cluster.stop_role("tracker1")
        killed_at = sum(cluster.rx_bytes(n) for n in cluster.node_names) - base
        puller.join(170)
        egress = cluster.origin_egress(mark)
        print(f"killed at {killed_at / (6 * layout.total_size):.0%} of the pull; origin egress "
              f"{egress / layout.total_size:.2f}x; "
              f"{max((r.seconds for r in results), default=0):.1f} s")  # fmt: skip
        if failed(request) or not (results and all(r.ok for r in results)):
            dump(cluster)

    assert len(results) == 6 and all(r.ok for r in results), [r.error for r in results]
    assert {r.digest for r in results} == {layout.manifest_digest}
    assert egress <= 1.5 * layout.total_size, (egress / layout.total_size)


def announce_peers(tracker_ip: str, info_hash: str, secret: Path) -> list[str]:
    """The peer addresses the tracker gives a new leecher of ``info_hash`` (dict form),
    announcing with the cluster's token; the probe then leaves the swarm."""
    token = ClusterAuth(load_secret(secret), "probe").token(TRACKER)
    peers = []
    for event in ("started", "stopped"):
        query = urllib.parse.urlencode({
            "info_hash": bytes.fromhex(info_hash), "peer_id": b"-XX0000-probe0000000",
            "port": 1, "uploaded": 0, "downloaded": 0, "left": 1, "compact": 0,
            "numwant": 50, "event": event, "token": token,
        })  # fmt: skip
        url = f"http://{tracker_ip}:{TRACKER_PORT}/announce?{query}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = lt.bdecode(resp.read())
        peers += [p[b"ip"].decode() for p in body.get(b"peers", [])]
    return peers


@pytest.mark.parametrize("scheme", ["udp", "http"])
def test_nodes_behind_a_nat_find_each_other_by_their_announced_addresses(
    tmp_path: Path, request: pytest.FixtureRequest, scheme: str
) -> None:
    """The nodes' traffic to the tracker leaves through a MASQUERADE: the tracker sees one
    source address for all of them. They announce their own (``--announce-ip``: the UDP
    announce's IP field, HTTP's ``ip=``), so the tracker hands out node addresses and the
    nodes exchange pieces among themselves."""
    require_root()
    require_binaries(*TOOLS, "iptables")
    layout = build_image(tmp_path / "image", [4 * MiB, 2 * MiB], seed=23)
    with Cluster(tmp_path / "cluster", 3, mode="p2p", rate_mbit=200,
                 nat_to_trackers=True, tracker_scheme=scheme) as cluster:  # fmt: skip
        ref = cluster.push(layout, "ci/app", "v1")
        results = cluster.pull_all(ref, expected_digest=layout.manifest_digest, timeout=120)
        torrent = next((tmp_path / "cluster" / "node1" / "agent").rglob("*.torrent"))
        info_hash = Metainfo.parse(torrent.read_bytes()).info_hash
        peers = announce_peers(cluster.ip("tracker"), info_hash, cluster.cluster_secret)
        nat_rule = cluster.net.run("nat", ["iptables", "-t", "nat", "-L", "POSTROUTING",
                                           "-v", "-x", "-n"]).stdout  # fmt: skip
        swarm_bytes = {n: metric_sum(cluster.agent_metrics(n), "swarm_download_bytes")
                       for n in cluster.node_names}  # fmt: skip
        node_ips = {cluster.ip(n) for n in cluster.node_names}
        nat_ip = cluster.ip("nat")
        if failed(request) or not all(r.ok for r in results):
            dump(cluster)

    assert all(r.ok for r in results), [r.error for r in results]
    # the NAT really rewrote the nodes' announces (packets went through its rule)
    masquerade = next(line for line in nat_rule.splitlines() if "MASQUERADE" in line)
    assert int(masquerade.split()[0]) > 0, nat_rule
    # the tracker recorded the nodes' own addresses, never the NAT's
    assert peers and set(peers) <= node_ips and nat_ip not in peers, (peers, nat_ip)
    # and the nodes found each other there: pieces went between them
    assert sum(swarm_bytes.values()) > 0, swarm_bytes
