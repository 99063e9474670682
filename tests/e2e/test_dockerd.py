"""dockerd end to end: `p2p-mirror install --runtime dockerd` into a node root, then a real
dockerd (Debian docker.io 20.10) started with that root's daemon.json, drop-in environment and
certs.d pulls through the agent: Docker Hub names via registry-mirrors, any other registry via
the agent's proxy, from an HTTPS origin (Debian docker-registry, certificate from a test CA).

No DNS: ``registry.example.test`` reaches the agent's proxy as a CONNECT name, and the agent
maps it to the loopback origin; Docker Hub is mapped with ``--registry docker.io=URL``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import SUPPORT, failed, require_binaries, require_root, snapshot

from lab.dockerd import Dockerd, drop_in_environment
from lab.images import ImageLayout, build_image, push_image
from lab.procs import port_open, wait_for
from lab.registry import Registry, write_test_tls
from lab.stack import AgentProc, LocalStack

REG = "registry.example.test"
REPO, TAG = "team/app", "1.0"
HUB_REPO, HUB_TAG = "library/hubdemo", "v1"
DROP_IN = "etc/systemd/system/docker.service.d/p2p-mirror.conf"
MiB = 1024 * 1024
CLI = [sys.executable, "-m", "p2p_mirror"]


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Path, Path]]:
    """An HTTPS origin (test CA) holding REPO:TAG and HUB_REPO:HUB_TAG: (registry, CA, chain)."""
    require_root()
    require_binaries("docker-registry", "skopeo", "dockerd", "unshare")
    work = tmp_path_factory.mktemp("tls-origin")
    ca, chain, key = write_test_tls(work / "tls")
    reg = Registry(work / "registry", tls=(chain, key)).start()
    try:
        yield reg, ca, chain
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def layout(origin: tuple[Registry, Path, Path],
           tmp_path_factory: pytest.TempPathFactory) -> ImageLayout:
    lay = build_image(tmp_path_factory.mktemp("img") / "oci", [1 * MiB, 3 * MiB], 4321)
    push_image(lay, origin[0].hostport, REPO, TAG)
    push_image(lay, origin[0].hostport, HUB_REPO, HUB_TAG)
    return lay


@pytest.fixture
def stack(tmp_path: Path, origin: tuple[Registry, Path, Path], layout: ImageLayout,
          request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    reg, ca, _ = origin
    spec = {"url": reg.url, "ca_file": str(ca)}
    with LocalStack(tmp_path / "stack", {REG: spec, "docker.io": spec},
                    segment_size="2MiB") as st:
        yield st
        if failed(request):
            st.dump_logs()


def start_agent(stack: LocalStack, name: str) -> AgentProc:
    agent = stack.add_agent(name)
    wait_for(lambda: port_open("127.0.0.1", agent.proxy_port), 30, f"{name} proxy")
    return agent


def blob_digests(lay: ImageLayout) -> list[str]:
    return [layer.digest for layer in lay.layers] + [lay.config_digest]


def blob_total(lay: ImageLayout) -> int:
    return sum(layer.size for layer in lay.layers) + lay.config_size


def install_node(root: Path, agent: AgentProc, origin_url: str) -> subprocess.CompletedProcess:
    return cli("install", "--runtime", "dockerd", "--root", root, "--no-restart",
               "--mirror", agent.url, "--proxy", f"http://127.0.0.1:{agent.proxy_port}",
               "--no-proxy", "10.96.0.0/12,10.244.0.0/16",
               "--registry", f"{REG}={origin_url}", "--registry", f"docker.io={origin_url}",
               "--ca-cert", agent.data_dir / "proxy-ca" / "ca.crt")


def node_root(tmp_path: Path, name: str, test_ca: Path) -> Path:
    """A node as an operator left it: a daemon.json of their own, their CA for REG."""
    root = tmp_path / name
    (root / "etc/docker").mkdir(parents=True)
    (root / "etc/docker/daemon.json").write_text('{\n  "max-concurrent-downloads": 4\n}\n')
    (root / f"etc/docker/certs.d/{REG}").mkdir(parents=True)
    (root / f"etc/docker/certs.d/{REG}/ca.crt").write_bytes(test_ca.read_bytes())
    return root


@pytest.fixture
def dockerds() -> Iterator[list[Dockerd]]:
    started: list[Dockerd] = []
    try:
        yield started
    finally:
        for d in started:
            d.stop()


def start_dockerd(dockerds: list[Dockerd], root: Path, env: dict[str, str]) -> Dockerd:
    d = Dockerd(root, env)
    dockerds.append(d)
    return d.start()


def test_dockerd_pulls_any_registry_through_the_agent_and_the_swarm(
    tmp_path: Path, origin: tuple[Registry, Path, Path], layout: ImageLayout,
    stack: LocalStack, dockerds: list[Dockerd],
) -> None:
    reg, test_ca, _ = origin
    agents = [start_agent(stack, "node1"), start_agent(stack, "node2")]
    roots = [node_root(tmp_path, f"root{i}", test_ca) for i in (1, 2)]
    before = [snapshot(r) for r in roots]
    for root, agent in zip(roots, agents, strict=True):
        res = install_node(root, agent, reg.url)
        assert res.returncode == 0, res.stdout + res.stderr
        agent_ca = (agent.data_dir / "proxy-ca" / "ca.crt").read_bytes()
        certs = (root / f"etc/docker/certs.d/{REG}/ca.crt").read_bytes()
        assert certs == test_ca.read_bytes() + agent_ca  # the operator's CA kept, ours added
        assert not (root / "etc/docker/certs.d/docker.io").exists()
    env = [drop_in_environment((r / DROP_IN).read_text()) for r in roots]
    assert env[0]["HTTPS_PROXY"] == f"http://127.0.0.1:{agents[0].proxy_port}"
    assert env[0]["NO_PROXY"] == "localhost,127.0.0.0/8,::1,10.96.0.0/12,10.244.0.0/16"

    nodes = [start_dockerd(dockerds, r, e) for r, e in zip(roots, env, strict=True)]
    info = nodes[0].info()
    assert info["RegistryConfig"]["Mirrors"] == [agents[0].url + "/"]
    assert info["HttpsProxy"] == env[0]["HTTPS_PROXY"]

    # Any registry, through the proxy: node 1 first, then node 2 from the swarm.
    mark = reg.mark()
    nodes[0].pull(f"{REG}/{REPO}:{TAG}")
    nodes[1].pull(f"{REG}/{REPO}:{TAG}")
    for node in nodes:
        assert node.image(f"{REG}/{REPO}:{TAG}") is not None
    reg.settle()
    fetches = reg.blob_fetches(since=mark)
    for digest in blob_digests(layout):
        getters = [r.user_agent for r in fetches if r.blob_digest == digest]
        assert len(getters) == 1, f"{digest} fetched {len(getters)} times from the origin"
    assert sum(r.written for r in fetches) == blob_total(layout)  # origin blob egress 1x
    assert not any("docker/" in r.user_agent for r in reg.requests(since=mark))  # never direct
    for agent in agents:
        assert agent.blob_sources().get("swarm") == blob_total(layout)
        assert agent.metric("proxy_connections_total", mode="intercept") >= 1

    # A Docker Hub name, through registry-mirrors (docker.io is mapped to the origin).
    mark = reg.mark()
    nodes[0].pull(f"hubdemo:{HUB_TAG}")
    assert nodes[0].image(f"hubdemo:{HUB_TAG}") is not None
    reg.settle()
    hub = [r for r in reg.requests(since=mark) if r.path.startswith(f"/v2/{HUB_REPO}/")]
    assert hub and all("p2p-mirror/" in r.user_agent for r in hub)

    # Uninstall gives back every byte; a dockerd started on the restored files has neither
    # mirror nor proxy and pulls from the origin itself (its CA is the operator's again).
    for d in nodes:
        d.stop()
    for root, original in zip(roots, before, strict=True):
        res = cli("uninstall", "--root", root, "--no-restart")
        assert res.returncode == 0, res.stdout + res.stderr
        assert snapshot(root) == original
    (roots[0] / f"etc/docker/certs.d/{reg.hostport}").mkdir()
    (roots[0] / f"etc/docker/certs.d/{reg.hostport}/ca.crt").write_bytes(test_ca.read_bytes())
    plain = start_dockerd(dockerds, roots[0], {})
    info = plain.info()
    assert not info["RegistryConfig"]["Mirrors"] and not info.get("HttpsProxy")
    mark = reg.mark()
    plain.pull(f"{reg.hostport}/{REPO}:{TAG}")
    reg.settle()
    direct = reg.blob_fetches(since=mark)
    assert direct and all("docker/" in r.user_agent for r in direct)


def _through_proxy(proxy_port: int, authority: str, ctx: ssl.SSLContext,
                   server_name: str) -> bytes:
    """CONNECT through the agent's proxy, then TLS: the DER certificate the client sees."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as raw:
        raw.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(1024)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def test_unconfigured_hosts_are_tunnelled_untouched_and_the_ca_key_is_private(
    origin: tuple[Registry, Path, Path], stack: LocalStack
) -> None:
    reg, test_ca, chain = origin
    agent = start_agent(stack, "node1")
    agent_ca = agent.data_dir / "proxy-ca" / "ca.crt"

    # 127.0.0.1:<port> is not a configured registry: the client sees the origin's certificate.
    origin_der = ssl.PEM_cert_to_DER_cert(chain.read_text().split("-----END CERTIFICATE-----")[0]
                                          + "-----END CERTIFICATE-----\n")
    seen = _through_proxy(agent.proxy_port, reg.hostport,
                          ssl.create_default_context(cafile=str(test_ca)), "127.0.0.1")
    assert seen == origin_der
    # The configured name gets a certificate from the agent's CA, for that name only.
    seen = _through_proxy(agent.proxy_port, f"{REG}:443",
                          ssl.create_default_context(cafile=str(agent_ca)), REG)
    assert seen != origin_der
    with pytest.raises(ssl.SSLCertVerificationError):
        _through_proxy(agent.proxy_port, f"{REG}:443",
                       ssl.create_default_context(cafile=str(test_ca)), REG)

    key = agent.data_dir / "proxy-ca" / "ca.key"
    st = key.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, os.geteuid())
    denied = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "cat", str(key)], capture_output=True, text=True, timeout=30)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert b"PRIVATE KEY" not in denied.stdout.encode()


def _manifest(agent: AgentProc, registry: str) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"{agent.url}/v2/{REPO}/manifests/{TAG}?ns={registry}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_an_origin_with_an_untrusted_certificate_is_refused_unless_configured_insecure(
    origin: tuple[Registry, Path, Path], layout: ImageLayout, stack: LocalStack
) -> None:
    reg, _, _ = origin
    # bad.example.test is the same origin, configured without its CA: refused.
    strict = stack.add_agent("strict", registries={**stack.registries,
                                                   "bad.example.test": reg.url})
    insecure = stack.add_agent("insecure", registries={
        **stack.registries, "bad.example.test": {"url": reg.url, "insecure": True}})
    status, body = _manifest(strict, REG)
    assert status == 200
    manifest_digest = hashlib.sha256(body).hexdigest()
    status, body = _manifest(strict, "bad.example.test")
    assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert "certificate verify failed" in strict.proc.log_text()
    status, body = _manifest(insecure, "bad.example.test")
    assert status == 200 and hashlib.sha256(body).hexdigest() == manifest_digest


def test_install_restarts_a_live_restore_dockerd_checks_it_and_rolls_back(
    tmp_path: Path, origin: tuple[Registry, Path, Path], layout: ImageLayout,
    stack: LocalStack, dockerds: list[Dockerd],
) -> None:
    """The real restart path: the restart command restarts dockerd from the node root's files
    (as systemd would), and the health check reads the running dockerd's /info."""
    reg, test_ca, _ = origin
    agent = start_agent(stack, "node1")
    root = tmp_path / "root"
    (root / "etc/docker").mkdir(parents=True)
    (root / "etc/docker/daemon.json").write_text('{\n  "live-restore": true\n}\n')
    original = snapshot(root)
    d = start_dockerd(dockerds, root, {})
    restart = d.restart_command()
    args = ["--runtime", "dockerd", "--root", root, "--mirror", agent.url,
            "--proxy", f"http://127.0.0.1:{agent.proxy_port}", "--registry", f"{REG}={reg.url}",
            "--ca-cert", agent.data_dir / "proxy-ca" / "ca.crt", "--docker-socket", d.socket,
            "--health-timeout", "60"]

    # The first restart fails: the files are put back and dockerd restarted on them.
    marker = tmp_path / "failed-once"
    flaky = f"{sys.executable} {SUPPORT / 'installer_restart.py'} " \
            f"fail-once --marker {marker} -- {restart}"
    res = cli("install", *args, "--restart-command", flaky)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "rolled back" in res.stdout
    # Only the record of the failed attempt is new; it stops a blind retry.
    assert snapshot(root, skip="var/lib/p2p-mirror/installer") == original
    assert (root / "var/lib/p2p-mirror/installer/failed.json").is_file()
    assert not d.info()["RegistryConfig"]["Mirrors"]

    res = cli("install", *args, "--restart-command", restart, "--force")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "reloading systemd" not in res.stdout  # a restart command does its own reload
    assert "dockerd is healthy" in res.stdout
    info = d.info()
    assert info["HttpsProxy"] == f"http://127.0.0.1:{agent.proxy_port}"
    mark = reg.mark()
    d.pull(f"{REG}/{REPO}:{TAG}")
    reg.settle()
    assert not any("docker/" in r.user_agent for r in reg.requests(since=mark))

    res = cli("uninstall", "--root", root, "--docker-socket", d.socket,
              "--restart-command", restart)
    assert res.returncode == 0, res.stdout + res.stderr
    assert snapshot(root) == original
    info = d.info()
    assert not info["RegistryConfig"]["Mirrors"] and not info.get("HttpsProxy")
