"""The pull path end to end with real parts: registry, tracker, seeder, agents, containerd, skopeo.

Every upstream name resolves to loopback through the agent's ``--registry`` map and the
hosts.toml ``server``: nothing here needs DNS.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from support import failed, require_binaries
from support.fakes import http_server

from lab.cluster import p2p_mirror_argv
from lab.containerd import Containerd
from lab.images import PushedImage, build_image, push_image
from lab.procs import wait_for
from lab.registry import Registry
from lab.stack import AgentProc, LocalStack, metric_sum
from p2p_mirror.installer.hosts import render_new
from p2p_mirror.seeder.sizing import piece_size_for, segment_size_for

PIECE = 128 * 1024  # the seeder's default piece size

REG = "registry.example.test"
REF = f"{REG}/library/demo:v1"
MiB = 1024 * 1024


def blob_digests(image: PushedImage) -> list[str]:
    return [layer.digest for layer in image.layout.layers] + [image.layout.config_digest]


def blob_total(image: PushedImage) -> int:
    return sum(layer.size for layer in image.layout.layers) + image.layout.config_size


def point_at(containerd: Containerd, mirror: str, server: str) -> Path:
    """hosts.toml for REG: the agent first, the (loopback) origin as fallback server."""
    hosts = containerd.certs_dir / REG / "hosts.toml"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(render_new(mirror, server))
    return containerd.certs_dir


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET"):
    """(status, headers, body) without raising on HTTP errors."""
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


@pytest.fixture
def stack(
    tmp_path: Path, registry: Registry, image: PushedImage, request: pytest.FixtureRequest
) -> Iterator[LocalStack]:
    require_binaries("docker-registry")
    # 2 MiB segments: the 3 MiB layer is cut in two torrents, exercising the segment path.
    with LocalStack(tmp_path / "stack", {REG: registry.url}, segment_size="2MiB") as st:
        yield st
        if failed(request):
            st.dump_logs()


def check_unpacked(containerd: Containerd, image: PushedImage) -> None:
    assert containerd.image_digest(REF) == image.layout.manifest_digest
    for layer in image.layout.layers:
        assert containerd.read_file(REF, layer.text_file) == layer.text


def test_containerd_pulls_layers_from_the_swarm(
    stack: LocalStack, registry: Registry, image: PushedImage, containerd: Containerd
) -> None:
    agent = stack.add_agent("agent1")
    hosts_dir = point_at(containerd, agent.url, registry.url)
    mark = registry.mark()

    containerd.pull(REF, hosts_dir)

    check_unpacked(containerd, image)
    registry.settle()
    fetches = registry.blob_fetches(since=mark)
    for digest in blob_digests(image):
        getters = [r.user_agent for r in fetches if r.blob_digest == digest]
        assert len(getters) == 1, f"{digest} fetched {len(getters)} times from the origin"
        assert "(seeder)" in getters[0]
    assert not any("(agent)" in r.user_agent or "containerd" in r.user_agent for r in fetches)
    sources = agent.blob_sources()
    assert sources.get("swarm") == blob_total(image)
    assert sources.get("origin", 0) == 0
    # the only agent was dealt every segment whole: written straight into its files
    assert agent.metric("dealt_segments_total") >= len(blob_digests(image))

    # A second node (own agent, own cache): the layers come from peers, the origin sends none.
    agent2 = stack.add_agent("agent2")
    containerd.remove_image(REF)
    point_at(containerd, agent2.url, registry.url)
    mark = registry.mark()
    containerd.pull(REF, hosts_dir)
    check_unpacked(containerd, image)
    registry.settle()
    assert registry.blob_fetches(since=mark) == []
    assert agent2.blob_sources().get("swarm") == blob_total(image)
    # the first node's directly written segments, served by its libtorrent
    assert agent.metric("swarm_upload_bytes") >= blob_total(image) // 2


def seeder_metric(stack: LocalStack, name: str) -> int:
    """A counter or gauge of the seeder's /metrics (summed over labels)."""
    with urllib.request.urlopen(f"{stack.seeder_url}/metrics", timeout=10) as resp:
        return int(metric_sum(resp.read().decode(), name))


def get_all(agents: list[AgentProc], digest: str) -> list[bytes]:
    """Every agent GETs the blob at the same time; each must answer 200."""
    def one(agent: AgentProc) -> bytes:
        status, _, data = get(f"{agent.url}/v2/library/demo/blobs/{digest}?ns={REG}")
        assert status == 200
        return data

    with ThreadPoolExecutor(len(agents)) as pool:
        return list(pool.map(one, agents))


@contextlib.contextmanager
def throttled(upstream: str, rate: int) -> Iterator[str]:
    """``upstream`` behind a proxy that sends response bodies at ``rate`` bytes/s: an origin
    as slow as a real link, so the seeder publishes segments while every agent waits."""

    class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: each response ends with its connection
        def _forward(self) -> None:
            sent = {k: v for k, v in self.headers.items() if k.lower() in ("authorization",
                                                                        "accept", "range")}
            req = urllib.request.Request(upstream + self.path, method=self.command, headers=sent)
            try:
                resp = urllib.request.urlopen(req, timeout=30)
            except urllib.error.HTTPError as e:
                resp = e
            with resp:
                self.send_response(resp.status)
                for key, value in resp.headers.items():
                    if key.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(key, value)
                self.end_headers()
                while self.command == "GET" and (chunk := resp.read(32 * 1024)):
                    self.wfile.write(chunk)
                    time.sleep(len(chunk) / rate)

        do_GET = do_HEAD = _forward  # the names http.server calls

        def log_message(self, *args: object) -> None:
            pass

    with http_server(Handler) as url:
        yield url


def test_each_piece_leaves_the_seeder_once(
    tmp_path: Path, registry: Registry, image: PushedImage
) -> None:
    """Agents pulling at once: the seeder deals each segment's pieces out over the agents
    waiting for it, and every agent gets the other pieces from its peers, so the seeder's
    link carries the blob ~once and every agent uploads. The origin sends at 1 MiB/s: from
    a loopback registry the seeder could publish every segment before the last agent asked,
    and an agent that waited for none is dealt none."""
    layer = image.layout.layers[2]  # 3 MiB: several segments
    with (
        throttled(registry.url, 1 * MiB) as origin,
        LocalStack(tmp_path / "stack", {REG: origin}, segment_size="2MiB") as stack,
    ):
        agents = [stack.add_agent(f"agent{i}") for i in range(4)]
        for data in get_all(agents, layer.digest):
            assert hashlib.sha256(data).hexdigest() == layer.digest[7:]

        segment = segment_size_for(layer.size, 2 * MiB, PIECE)
        piece = piece_size_for(segment, PIECE)
        segments = -(-layer.size // segment)
        pieces = sum(-(-min(segment, layer.size - i * segment) // piece)
                     for i in range(segments))  # fmt: skip
        assert segments > 1
        # Each piece dealt to exactly one agent (a segment nobody waited for goes whole to the
        # first agent that asks), and every agent had some to share.
        dealt = [a.metric("seeder_pieces_total") for a in agents]
        assert sum(dealt) == pieces and all(n > 0 for n in dealt), dealt
        assert sum(a.metric("seeder_segments_total", reason="stalled") for a in agents) == 0
        assert all(a.blob_sources() == {"swarm": layer.size} for a in agents)
        # Every payload byte received was either a byte of the blob or counted as wasted; the
        # dealt pieces came over HTTP, not as swarm payload. libtorrent adds a peer's bytes to
        # its torrent's totals once a second: wait for the last second's to be counted.
        def received(a: AgentProc) -> float:
            return a.metric("swarm_download_bytes") - a.metric("swarm_wasted_bytes")

        for a, n in zip(agents, dealt, strict=True):
            least = layer.size - n * piece
            wait_for(lambda a=a, least=least: received(a) >= least, 3,
                     f"{a.name}'s payload counted")  # fmt: skip
            assert least <= received(a) <= layer.size
        # 4 agents, yet exactly one copy left the seeder (dealt pieces, over HTTP), not four;
        # the other three copies went from agent to agent.
        assert seeder_metric(stack, "piece_bytes_total") == layer.size
        assert seeder_metric(stack, "upload_bytes") == 0
        assert sum(a.metric("swarm_upload_bytes") for a in agents) >= 3 * layer.size


def test_without_a_tracker_agents_still_get_blobs_from_the_seeder(
    stack: LocalStack, registry: Registry, image: PushedImage
) -> None:
    """Peers cannot find each other, so non-designated segments stall and each agent asks
    the seeder directly after ``seeder_grace``: slower, but still no origin traffic."""
    assert stack.tracker is not None
    stack.tracker.stop()
    layer = image.layout.layers[2]
    agents = [stack.add_agent(f"agent{i}", seeder_grace=0.5) for i in range(2)]
    mark = registry.mark()

    for data in get_all(agents, layer.digest):
        assert hashlib.sha256(data).hexdigest() == layer.digest[7:]

    stalled = sum(a.metric("seeder_segments_total", reason="stalled") for a in agents)
    assert stalled >= 1
    assert all(a.blob_sources() == {"swarm": layer.size} for a in agents)
    registry.settle()
    assert all("(seeder)" in f.user_agent for f in registry.blob_fetches(since=mark))


def test_cached_blob_is_served_again_from_disk(
    stack: LocalStack, registry: Registry, image: PushedImage
) -> None:
    agent = stack.add_agent("agent1")
    layer = image.layout.layers[2]
    url = f"{agent.url}/v2/library/demo/blobs/{layer.digest}?ns={REG}"
    first = get(url)
    # The blob enters the cache once verified and synced (just after its last byte went out).
    wait_for(lambda: agent.metric("cache_bytes") >= layer.size, 10, "blob cached")
    second = get(url)
    assert first[0] == second[0] == 200
    assert hashlib.sha256(second[2]).hexdigest() == layer.digest.split(":")[1]
    assert agent.blob_sources().get("cache") == layer.size
    # Range on a cached, multi-segment blob: exactly the bytes asked for.
    status, headers, body = get(url, {"Range": "bytes=2097100-2097199"})
    assert status == 206
    assert body == first[2][2097100:2097200]
    assert headers["Content-Range"] == f"bytes 2097100-2097199/{layer.size}"

    # The operator's view of the same agent.
    shown = subprocess.run(
        [*p2p_mirror_argv(), "status", "--agent", agent.url],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert shown.splitlines()[0] == f"{agent.url}: ok"
    assert 'p2p_mirror_blob_bytes_total{source="cache"}' in shown


def test_skopeo_copies_through_a_registries_conf_mirror(
    stack: LocalStack, registry: Registry, image: PushedImage, tmp_path: Path
) -> None:
    require_binaries("skopeo")
    agent = stack.add_agent("agent1")
    conf = tmp_path / "registries.conf"
    conf.write_text(
        f'[[registry]]\nprefix = "{REG}"\nlocation = "{registry.hostport}"\ninsecure = true\n\n'
        f'[[registry.mirror]]\nlocation = "127.0.0.1:{agent.port}/{REG}"\ninsecure = true\n'
    )
    mark = registry.mark()
    out = tmp_path / "copy"
    subprocess.run(
        # skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF; the (hidden) global flag works.
        ["skopeo", "--registries-conf", str(conf), "copy", "--preserve-digests",
         f"docker://{REF}", f"dir:{out}"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    for digest in blob_digests(image):
        data = (out / digest.split(":")[1]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest.split(":")[1]
    registry.settle()
    assert not any("skopeo" in r.user_agent for r in registry.requests(since=mark))
    assert agent.blob_sources().get("swarm") == blob_total(image)


def test_pull_succeeds_from_origin_when_the_seeder_is_down(
    stack: LocalStack, registry: Registry, image: PushedImage, containerd: Containerd
) -> None:
    stack.stop_seeder()
    agent = stack.add_agent("agent1", swarm_timeout=3)
    hosts_dir = point_at(containerd, agent.url, registry.url)
    containerd.pull(REF, hosts_dir)
    check_unpacked(containerd, image)
    assert agent.blob_sources().get("origin") == blob_total(image)
    assert agent.metric("fallbacks_total") == len(blob_digests(image))


def test_corrupt_seeder_data_is_never_served(
    stack: LocalStack, registry: Registry, image: PushedImage
) -> None:
    """A lying peer: the seeder's files are damaged after it made the torrents."""
    layer = image.layout.layers[1]
    params = f"registry={REG}&repo=library/demo"
    status, _, body = get(f"{stack.seeder_url}/v1/blobs/{layer.digest}?{params}")
    assert status == 200, body
    # Wait until the last segment is published (the seeder verified the whole blob).
    info = json.loads(body)
    last = info["segments"] - 1
    assert get(f"{stack.seeder_url}/v1/blobs/{layer.digest}/torrents/{last}?bt_port=1")[0] == 200
    blob_dir = stack.workdir / "seeder" / "blobs" / "sha256" / layer.digest.split(":")[1]
    segments = [p for p in blob_dir.glob(f"*/{layer.digest[7:]}*") if p.suffix != ".torrent"]
    assert len(segments) == info["segments"] >= 2
    for segment in segments:
        with open(segment, "r+b") as f:
            f.write(b"\0" * 4096)
    agent = stack.add_agent("agent1", stall_timeout=3)
    status, _, data = get(f"{agent.url}/v2/library/demo/blobs/{layer.digest}?ns={REG}")
    assert status == 200
    assert hashlib.sha256(data).hexdigest() == layer.digest.split(":")[1]
    assert agent.metric("fallbacks_total") >= 1


def test_oci_errors(stack: LocalStack, registry: Registry, image: PushedImage) -> None:
    agent = stack.add_agent("agent1")
    base = agent.url
    status, headers, body = get(f"{base}/v2/")
    assert status == 200 and headers["Docker-Distribution-API-Version"] == "registry/2.0"
    cases = [
        (f"/v2/Library/Demo/manifests/v1?ns={REG}", 400, "NAME_INVALID"),
        ("/v2/library/demo/manifests/v1?ns=bad%2Fhost", 400, "NAME_INVALID"),
        (f"/v2/library/..%2F..%2Fetc/blobs/sha256:{'a' * 64}?ns={REG}", 400, "NAME_INVALID"),
        (f"/v2/library/demo/blobs/sha256:abc?ns={REG}", 400, "DIGEST_INVALID"),
        (f"/v2/library/demo/blobs/md5:{'a' * 32}?ns={REG}", 400, "DIGEST_INVALID"),
        (f"/v2/library/demo/blobs/sha256:{'A' * 64}?ns={REG}", 400, "DIGEST_INVALID"),
        (f"/v2/library/demo/blobs/sha256:{'a' * 64}?ns={REG}", 404, "BLOB_UNKNOWN"),
        (f"/v2/library/demo/manifests/nope?ns={REG}", 404, "MANIFEST_UNKNOWN"),
        (f"/v2/library/missing/manifests/v1?ns={REG}", 404, "MANIFEST_UNKNOWN"),  # origin's
    ]
    for path, want_status, want_code in cases:
        status, _, body = get(base + path)
        assert (status, error_code(body)) == (want_status, want_code), path
    status, _, body = get(f"{base}/v2/library/demo/manifests/v1?ns={REG}", method="DELETE")
    assert (status, error_code(body)) == (405, "UNSUPPORTED")
    # Nothing outside the cache directory was created or read.
    assert not (agent.data_dir.parent / "etc").exists()

    layer = image.layout.layers[0]
    blob_url = f"{base}/v2/library/demo/blobs/{layer.digest}?ns={REG}"
    status, headers, body = get(blob_url, method="HEAD")
    assert status == 200 and body == b""
    assert int(headers["Content-Length"]) == layer.size
    assert headers["Docker-Content-Digest"] == layer.digest
    status, _, body = get(blob_url, {"Range": "bytes=10-19"})
    assert status == 206 and len(body) == 10
    status, _, body = get(blob_url, {"Range": f"bytes={layer.size + 5}-"})
    assert (status, error_code(body)) == (416, "RANGE_INVALID")

    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    url = f"{base}/v2/library/demo/manifests/v1?ns={REG}"
    status, headers, body = get(url, accept, method="HEAD")
    assert status == 200 and body == b""
    assert headers["Docker-Content-Digest"] == image.layout.manifest_digest
    assert int(headers["Content-Length"]) == image.layout.manifest_size
    status, headers, body = get(url, accept)
    assert "sha256:" + hashlib.sha256(body).hexdigest() == image.layout.manifest_digest


def test_private_repository_needs_credentials_the_origin_accepts(
    tmp_path: Path, registry_factory, containerd: Containerd
) -> None:
    require_binaries("skopeo")
    private = registry_factory(users={"alice": "s3cret"})
    layout = build_image(tmp_path / "oci", [1 * MiB, 2 * MiB], seed=99)
    push_image(layout, private.hostport, "team/app", "v1", creds=("alice", "s3cret"))
    # The seeder pulls with its own credentials (the client's never leave the node).
    seeder_auth = tmp_path / "seeder-auth.json"
    seeder_auth.write_text(json.dumps(
        {"auths": {REG: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    with LocalStack(tmp_path / "stack", {REG: private.url},
                    seeder_args=("--registry-auth", str(seeder_auth))) as stack:
        agent: AgentProc = stack.add_agent("agent1")
        good = {
            "Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode(),
            "Accept": "application/vnd.oci.image.manifest.v1+json",
        }
        bad = {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}
        manifest = f"{agent.url}/v2/team/app/manifests/v1?ns={REG}"
        status, headers, body = get(manifest)
        assert status == 401 and "Basic" in headers["WWW-Authenticate"]
        assert get(manifest, good)[0] == 200

        layer = layout.layers[1]
        blob = f"{agent.url}/v2/team/app/blobs/{layer.digest}?ns={REG}"
        status, headers, body = get(blob)
        assert status == 401 and error_code(body) == "UNAUTHORIZED"
        assert "Basic" in headers["WWW-Authenticate"]
        status, _, body = get(blob, good)
        assert status == 200 and hashlib.sha256(body).hexdigest() == layer.digest[7:]
        # Now cached on this node: still no bytes without (or with wrong) credentials.
        for headers in ({}, bad):
            status, _, body = get(blob, headers)
            assert status == 401 and layer.digest.encode() not in body
            assert len(body) < 1000
        assert agent.blob_sources().get("swarm") == layer.size

        hosts_dir = point_at(containerd, agent.url, private.url)
        containerd.pull(f"{REG}/team/app:v1", hosts_dir, user="alice:s3cret")
        assert containerd.image_digest(f"{REG}/team/app:v1") == layout.manifest_digest


def test_restarted_seeder_seeds_its_cache_without_the_origin(
    stack: LocalStack, registry: Registry, image: PushedImage
) -> None:
    layer = image.layout.layers[2]
    first = stack.add_agent("agent1")
    assert get(f"{first.url}/v2/library/demo/blobs/{layer.digest}?ns={REG}")[0] == 200
    first.proc.stop()  # only the seeder will hold the blob
    stack.stop_seeder()
    stack.start_seeder()  # same data dir: re-seeds from its saved torrents
    mark = registry.mark()
    agent = stack.add_agent("agent2")
    status, _, data = get(f"{agent.url}/v2/library/demo/blobs/{layer.digest}?ns={REG}")
    assert status == 200 and hashlib.sha256(data).hexdigest() == layer.digest[7:]
    registry.settle()
    assert registry.blob_fetches(since=mark) == []
    assert agent.blob_sources().get("swarm") == layer.size
