"""The lab's real parts: origin registry, generated images, a private containerd.

Every other integration test and the benchmark trust these numbers (egress bytes, digests,
unpacked files), so they are checked here against the real binaries.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from lab.containerd import Containerd, _gone, write_hosts_toml
from lab.images import OCI_LAYER_TAR, OCI_MANIFEST, PushedImage, build_image, push_image
from lab.registry import Registry, parse_access_log

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
FAKE_REGISTRY = "registry.example.test"  # never resolvable: .test is reserved (RFC 2606)


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def direct_hosts(certs_dir: Path, reg: Registry) -> Path:
    """certs.d/registry.example.test/hosts.toml pointing at the lab registry, over http."""
    write_hosts_toml(certs_dir, FAKE_REGISTRY, server=reg.url, hosts=[reg.url])
    return certs_dir


# -- images --------------------------------------------------------------------------------


def test_build_image_is_deterministic_incompressible_and_complete(tmp_path: Path) -> None:
    a = build_image(tmp_path / "a", [300_000, 70_000], seed=5)
    b = build_image(tmp_path / "b", [300_000, 70_000], seed=5)
    c = build_image(tmp_path / "c", [300_000, 70_000], seed=6)
    assert a.manifest_digest == b.manifest_digest
    assert [x.digest for x in a.layers] == [x.digest for x in b.layers]
    assert a.manifest_digest != c.manifest_digest
    assert len({x.digest for x in a.layers}) == 2  # layers differ from each other too

    for layer, size in zip(a.layers, [300_000, 70_000], strict=True):
        blob = a.blob_path(layer.digest).read_bytes()
        assert f"sha256:{hashlib.sha256(blob).hexdigest()}" == layer.digest
        assert len(blob) == layer.size
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            data = tar.extractfile(layer.data_file).read()  # type: ignore[union-attr]
            text = tar.extractfile(layer.text_file).read()  # type: ignore[union-attr]
        assert len(data) == size
        assert text == layer.text
        assert len(zlib.compress(data)) > 0.99 * size  # incompressible: gzip can't cheat

    manifest = a.manifest()
    assert manifest["mediaType"] == OCI_MANIFEST
    assert [x["mediaType"] for x in manifest["layers"]] == [OCI_LAYER_TAR] * 2
    config = json.loads(a.blob_path(a.config_digest).read_bytes())
    assert config["rootfs"]["diff_ids"] == [x.digest for x in a.layers]
    index = json.loads((a.path / "index.json").read_text())
    assert index["manifests"][0]["digest"] == a.manifest_digest
    assert a.total_size == a.manifest_size + a.config_size + sum(x.size for x in a.layers)


# -- registry ------------------------------------------------------------------------------


def test_parse_access_log_keeps_only_request_records() -> None:
    blob = "sha256:" + "ab" * 32
    text = "\n".join(
        [
            '{"level":"info","msg":"listening on 127.0.0.1:1"}',
            '{"http.request.method":"GET","msg":"response completed","http.response.written":9}',
            f'127.0.0.1 - - [28/Nov/2026:16:37:41 +0000] "GET /v2/a/blobs/{blob}?ns=x HTTP/1.1"'
            ' 200 42 "" "containerd/1.6.20~ds1"',
            f'10.0.0.9 - - [28/Nov/2026:16:37:41 +0000] "HEAD /v2/a/blobs/{blob} HTTP/1.1"'
            ' 404 157 "" "skopeo/1.9.3"',
            '127.0.0.1 - - [28/Nov/2026:16:37:29 +0000] "GET /v2/a/manifests/v1 HTTP/1.1"'
            ' 401 152 "" "Python-urllib/3.11"',
        ]
    )
    recs = parse_access_log(text)
    assert [(r.method, r.status, r.written) for r in recs] == [
        ("GET", 200, 42),
        ("HEAD", 404, 157),
        ("GET", 401, 152),
    ]
    assert recs[0].blob_digest == blob and recs[0].path == f"/v2/a/blobs/{blob}"
    assert recs[0].remote_addr == "127.0.0.1" and recs[1].remote_addr == "10.0.0.9"
    assert recs[0].user_agent == "containerd/1.6.20~ds1"
    assert recs[1].body_bytes == 0  # a HEAD never carries a body on the wire
    assert recs[2].is_manifest and recs[2].blob_digest is None


def test_registry_serves_and_logs_requests(registry: Registry) -> None:
    since = registry.mark()
    status, headers, body = http_get(f"{registry.url}/v2/")
    assert status == 200 and body == b"{}"
    assert headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    registry.settle()
    recs = registry.requests(since)
    assert [(r.method, r.path, r.status, r.written) for r in recs] == [("GET", "/v2/", 200, 2)]
    assert recs[0].remote_addr == "127.0.0.1"


def test_push_preserves_digests(registry: Registry, image: PushedImage) -> None:
    layout = image.layout
    status, headers, body = http_get(
        f"{registry.url}/v2/{image.repo}/manifests/{image.tag}", {"Accept": OCI_MANIFEST}
    )
    assert status == 200
    assert headers["Docker-Content-Digest"] == layout.manifest_digest
    assert f"sha256:{hashlib.sha256(body).hexdigest()}" == layout.manifest_digest
    manifest = json.loads(body)
    assert manifest["config"]["digest"] == layout.config_digest
    assert [x["digest"] for x in manifest["layers"]] == [x.digest for x in layout.layers]
    assert [x["mediaType"] for x in manifest["layers"]] == [OCI_LAYER_TAR] * 3  # not gzipped
    assert [x.data_size for x in layout.layers] == [1 * MiB, 2 * MiB, 3 * MiB]
    for layer in layout.layers:
        assert layer.data_size < layer.size < layer.data_size + 64 * 1024  # + tar overhead
        status, _, blob = http_get(f"{registry.url}/v2/{image.repo}/blobs/{layer.digest}")
        assert status == 200 and hashlib.sha256(blob).hexdigest() == layer.digest[7:]


def test_blob_fetch_adds_exactly_its_size(registry: Registry, image: PushedImage) -> None:
    layer = image.layout.layers[1]
    url = f"{registry.url}/v2/{image.repo}/blobs/{layer.digest}"
    since = registry.mark()
    status, _, body = http_get(url)
    assert status == 200 and len(body) == layer.size
    status, _, part = http_get(url, {"Range": "bytes=100-1099"})
    assert status == 206 and len(part) == 1000 and part == body[100:1100]
    registry.settle()
    fetches = registry.blob_fetches(since)
    assert [(f.blob_digest, f.status, f.written) for f in fetches] == [
        (layer.digest, 200, layer.size),
        (layer.digest, 206, 1000),
    ]
    assert registry.egress_bytes(since) == layer.size + 1000
    assert registry.blob_egress_bytes(since) == layer.size + 1000


def test_htpasswd_registry_rejects_unauthenticated(
    registry_factory, image_layout, containerd: Containerd, tmp_path: Path, require
) -> None:
    require("skopeo")
    reg: Registry = registry_factory(users={"alice": "s3cret"})
    status, headers, _ = http_get(f"{reg.url}/v2/")
    assert status == 401
    assert headers["Www-Authenticate"].startswith("Basic realm=")
    with pytest.raises(RuntimeError, match="(?i)unauthorized|authentication"):
        push_image(image_layout, reg.hostport, "private/app", "v1")
    push_image(image_layout, reg.hostport, "private/app", "v1", creds=("alice", "s3cret"))

    certs = direct_hosts(tmp_path / "certs.d", reg)
    ref = f"{FAKE_REGISTRY}/private/app:v1"
    since = reg.mark()
    denied = containerd.pull(ref, certs, check=False, timeout=60)
    assert denied.returncode != 0
    reg.settle()
    assert reg.blob_fetches(since) == []
    assert {r.status for r in reg.requests(since)} == {401}
    wrong = containerd.pull(ref, certs, user="alice:wrong", check=False, timeout=60)
    assert wrong.returncode != 0
    containerd.pull(ref, certs, user="alice:s3cret")
    assert containerd.image_digest(ref) == image_layout.manifest_digest


def test_proxy_registry_fetches_from_origin_only_on_a_miss(
    registry_factory, image: PushedImage, registry: Registry
) -> None:
    """The pull-through cache ("cache" benchmark mode): origin egress only on the first miss.

    distribution 2.8's proxy fetches a missed blob from the origin twice (one stream for the
    client, one to store), so the miss costs 2x the blob at the origin; later hits cost 0.
    """
    cache: Registry = registry_factory(proxy_remote_url=registry.url)
    layer = image.layout.layers[0]
    url = f"{cache.url}/v2/{image.repo}/blobs/{layer.digest}"
    origin_since = registry.mark()
    status, _, body = http_get(url)
    assert status == 200 and hashlib.sha256(body).hexdigest() == layer.digest[7:]
    registry.settle()
    miss = registry.blob_fetches(origin_since)
    assert miss and {f.blob_digest for f in miss} == {layer.digest}
    assert all(f.written == layer.size for f in miss)
    assert len(miss) <= 2
    after_miss = registry.mark()
    for _ in range(2):
        status, _, body = http_get(url)
        assert status == 200 and hashlib.sha256(body).hexdigest() == layer.digest[7:]
    cache.settle()
    registry.settle()
    assert registry.blob_fetches(after_miss) == []
    assert [f.written for f in cache.blob_fetches()] == [layer.size] * 3


# -- containerd ----------------------------------------------------------------------------


def test_containerd_config_has_private_paths_and_config_path(containerd: Containerd) -> None:
    text = containerd.config_path.read_text()
    assert text.startswith("version = 2")
    dump = containerd.config_dump()
    assert re.search(rf'config_path = "{re.escape(str(containerd.certs_dir))}"', dump)
    assert f'address = "{containerd.socket}"' in dump
    assert f'root = "{containerd.root}"' in dump
    assert len(str(containerd.socket)) <= 100
    assert containerd.ctr("version").returncode == 0


def test_containerd_pulls_directly_from_registry(
    containerd: Containerd, registry: Registry, image: PushedImage, tmp_path: Path
) -> None:
    layout = image.layout
    certs = direct_hosts(tmp_path / "certs.d", registry)
    ref = f"{FAKE_REGISTRY}/{image.name}"
    since = registry.mark()
    bars = containerd.pull(ref, certs)  # no --plain-http: hosts.toml says http://
    registry.settle()
    assert "elapsed:" in bars.stdout  # ctr's progress bars, by default

    assert containerd.image_digest(ref) == layout.manifest_digest
    for layer in layout.layers:
        assert containerd.read_file(ref, layer.text_file) == layer.text
        data = containerd.read_file(ref, layer.data_file)
        tar_bytes = layout.blob_path(layer.digest).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            assert data == tar.extractfile(layer.data_file).read()  # type: ignore[union-attr]

    fetched = registry.blob_fetches(since)
    assert sorted(f.blob_digest for f in fetched) == sorted(
        [layout.config_digest, *(x.digest for x in layout.layers)]
    )
    assert all(f.uri.endswith(f"?ns={FAKE_REGISTRY}") for f in fetched)
    assert registry.egress_bytes(since) == layout.total_size

    # a second pull after removal really goes back to the registry for every blob
    containerd.remove_image(ref)
    assert ref not in containerd.images()
    assert not containerd.content_digests() & {x.digest for x in layout.layers}
    since = registry.mark()
    quiet = containerd.pull(ref, certs, progress=False)  # as the cluster's nodes pull
    registry.settle()
    assert "elapsed:" not in quiet.stdout
    assert registry.blob_egress_bytes(since) == layout.total_size - layout.manifest_size
    assert containerd.read_file(ref, layout.layers[2].text_file) == layout.layers[2].text


def test_pull_through_loopback_host_never_resolves_the_name(
    containerd: Containerd, registry_factory, image_layout, tmp_path: Path, require
) -> None:
    """In a netns with only ``lo``, under strace: no DNS socket, no connect but the registry."""
    require("strace", "ip", "nsenter", "skopeo")
    netns = f"labdns{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
    reg: Registry | None = None
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        links = subprocess.run(["ip", "-n", netns, "-o", "link"], check=True, text=True,
                               capture_output=True).stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        reg = registry_factory(netns=netns)
        nsenter = ["nsenter", f"--net=/run/netns/{netns}"]
        # the registry is reachable only inside the netns: push from there too
        push_image(image_layout, reg.hostport, "library/demo", "v1", netns=netns)
        certs = direct_hosts(tmp_path / "certs.d", reg)
        trace = tmp_path / "ctr.strace"
        ref = f"{FAKE_REGISTRY}/library/demo:v1"
        argv = ["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,openat",
                "-o", str(trace), *nsenter,
                *containerd.ctr_argv(*containerd.pull_args(ref, certs))]
        pulled = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert pulled.returncode == 0, pulled.stderr
        assert containerd.image_digest(ref) == image_layout.manifest_digest
        calls = trace.read_text()
        inet = re.findall(r"connect\(\d+, \{sa_family=AF_INET6?, ([^}]*)\}", calls)
        assert inet, "strace saw no TCP connect at all: the trace is not working"
        ports = {re.search(r"htons\((\d+)\)", c).group(1) for c in inet}  # type: ignore[union-attr]
        assert ports == {str(reg.port)}, inet
        assert all("127.0.0.1" in c for c in inet), inet
        assert "resolv.conf" not in calls
        assert "htons(53)" not in calls

        # control: without a hosts.toml the same pull resolves the name, and the trace sees it
        # (the netns has no route out, so the lookup dies at connect(): no packet leaves)
        empty = tmp_path / "empty-certs.d"
        empty.mkdir()
        control = tmp_path / "control.strace"
        argv = ["strace", "-f", "-qq", "-e", "trace=connect,openat", "-o", str(control),
                *nsenter, *containerd.ctr_argv(*containerd.pull_args(ref, empty))]
        failed = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert failed.returncode != 0
        assert "resolv.conf" in control.read_text() or "htons(53)" in control.read_text()
    finally:
        if reg is not None:
            reg.stop()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def test_a_stopped_child_is_reaped_not_left_a_zombie(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_gone`` reaps a child that died: a zombie found on the state read is waited for.

    A non-blocking wait is made to miss (as when the child dies just after it): the old
    check then saw the zombie, called it gone, and left it for CI to find in /proc.
    """
    real_waitpid = os.waitpid

    def late_waitpid(pid: int, options: int) -> tuple[int, int]:
        return (0, 0) if options & os.WNOHANG else real_waitpid(pid, options)

    monkeypatch.setattr(os, "waitpid", late_waitpid)
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not _gone(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        status = Path(f"/proc/{child.pid}/status")
        while "\nState:\tZ" not in status.read_text():  # dead, not yet reaped
            time.sleep(0.01)
        assert _gone(child.pid)
        assert not status.exists()  # reaped
    finally:
        child.kill()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, 0)


def test_containerd_restart_command_rereads_edited_config(containerd: Containerd) -> None:
    """The installer edits config.toml then runs a restart command: both must take effect."""
    new_opt = containerd.workdir / "opt-after-restart"
    text = containerd.config_path.read_text()
    text = re.sub(r'(\[plugins\."io\.containerd\.internal\.v1\.opt"\]\n\s*path = )"[^"]*"',
                  rf'\1"{new_opt}"', text)
    assert str(new_opt) in text
    containerd.config_path.write_text(text)
    assert not new_opt.exists()
    old_pid = containerd.proc.pid  # type: ignore[union-attr]
    done = subprocess.run(containerd.restart_argv(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert new_opt.is_dir()  # the opt plugin of the new daemon created it
    new_pid = int(containerd.pidfile.read_text())
    assert new_pid != old_pid
    assert containerd.ctr("version").returncode == 0
    containerd.stop()
    assert not Path(f"/proc/{new_pid}").exists()  # stopped by PID and reaped
    containerd.restart()  # and the in-process restart works too
    assert containerd.ctr("version").returncode == 0


def test_seeded_data_is_fast_for_big_layers(tmp_path: Path) -> None:
    """A 64 MiB layer builds in seconds, so the benchmark can afford GiB images."""
    import time

    t0 = time.monotonic()
    layout = build_image(tmp_path / "big", [64 * MiB], seed=1234)
    elapsed = time.monotonic() - t0
    assert layout.layers[0].size > 64 * MiB
    assert elapsed < 10, f"64 MiB took {elapsed:.1f}s"
    shutil.rmtree(tmp_path / "big")
