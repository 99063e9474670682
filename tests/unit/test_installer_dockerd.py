"""The dockerd installer: proxy drop-in, agent CA in certs.d, the live-restore guard, the
systemd reload, the /info health check, and byte-for-byte uninstall (a stand-in dockerd API)."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2p_mirror.cli.install import install, uninstall
from p2p_mirror.core.tls import load_or_create_ca
from p2p_mirror.installer.backup import under
from p2p_mirror.installer.dockerd import DROP_IN, DockerdAdapter, parse_no_proxy

MIRROR = "http://127.0.0.1:5004"
REG = "registry.example.test"
DAEMON = '{\n  "log-driver": "json-file"\n}\n'
LIVE = '{\n  "live-restore": true\n}\n'
CA_DIR = "/var/lib/p2p-mirror/agent/proxy-ca"
OK = f"{sys.executable} -c pass"


def snapshot(root: Path) -> dict[str, tuple[bytes | None, int, int]]:
    out: dict[str, tuple[bytes | None, int, int]] = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (None if p.is_dir() else p.read_bytes(),
                                         st.st_mode & 0o7777, st.st_uid)
    return out


def write(root: Path, host_path: str, text: str) -> Path:
    p = under(root, host_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def node(tmp_path: Path, daemon_json: str = DAEMON) -> Path:
    root = tmp_path / "host"
    write(root, "/etc/docker/daemon.json", daemon_json)
    return root


def run(cmd, *args: object):
    return CliRunner().invoke(cmd, [str(a) for a in args], catch_exceptions=False)


def test_install_writes_drop_in_certs_and_ca_then_uninstall_removes_it_all(
    tmp_path: Path,
) -> None:
    root = node(tmp_path)
    write(root, f"/etc/docker/certs.d/{REG}/ca.crt", "operator CA\n")
    original = snapshot(root)
    res = run(install, "--root", root, "--runtime", "dockerd", "--no-restart",
              "--registry", f"{REG}=https://10.0.0.9", "--registry", "docker.io",
              "--registry", "reg.local:5000", "--no-proxy", "10.96.0.0/12, 10.244.0.0/16")
    assert res.exit_code == 0, res.output
    assert under(root, DROP_IN).read_text() == (
        "# Written by `p2p-mirror install`; `p2p-mirror uninstall` removes it.\n"
        "# dockerd reaches registries through the node's p2p-mirror agent.\n"
        "[Service]\n"
        'Environment="HTTPS_PROXY=http://127.0.0.1:5003"\n'
        'Environment="HTTP_PROXY=http://127.0.0.1:5003"\n'
        'Environment="NO_PROXY=localhost,127.0.0.0/8,::1,10.96.0.0/12,10.244.0.0/16"\n'
    )
    key = under(root, f"{CA_DIR}/ca.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = under(root, f"{CA_DIR}/ca.crt").read_bytes()
    # The agent later loads the CA the installer made, with the same code.
    agent_ca = load_or_create_ca(under(root, "/var/lib/p2p-mirror/agent"))
    assert agent_ca.cert_pem == ca
    assert under(root, f"/etc/docker/certs.d/{REG}/ca.crt").read_bytes() == b"operator CA\n" + ca
    assert under(root, "/etc/docker/certs.d/reg.local:5000/ca.crt").read_bytes() == ca
    assert not under(root, "/etc/docker/certs.d/docker.io").exists()
    doc = json.loads(under(root, "/etc/docker/daemon.json").read_text())
    assert doc == {"log-driver": "json-file", "registry-mirrors": [MIRROR]}

    again = run(install, "--root", root, "--runtime", "dockerd", "--no-restart",
                "--registry", f"{REG}=https://10.0.0.9", "--registry", "docker.io",
                "--registry", "reg.local:5000", "--no-proxy", "10.96.0.0/12,10.244.0.0/16")
    assert "already installed" in again.output  # the existing CA is reused, not remade

    res = run(uninstall, "--root", root, "--no-restart")
    assert res.exit_code == 0, res.output
    assert snapshot(root) == original


def test_a_given_ca_and_an_agent_owner(tmp_path: Path) -> None:
    root = node(tmp_path)
    given = load_or_create_ca(tmp_path / "elsewhere")
    res = run(install, "--root", root, "--runtime", "dockerd", "--no-restart", "--registry", REG,
              "--ca-cert", tmp_path / "elsewhere/proxy-ca/ca.crt")
    assert res.exit_code == 0, res.output
    assert under(root, f"/etc/docker/certs.d/{REG}/ca.crt").read_bytes() == given.cert_pem
    assert not under(root, CA_DIR).exists()
    if os.geteuid() == 0:
        other = node(tmp_path / "2")
        res = run(install, "--root", other, "--runtime", "dockerd", "--no-restart",
                  "--registry", REG, "--agent-user", "10001:10002")
        assert res.exit_code == 0, res.output
        st = under(other, f"{CA_DIR}/ca.key").stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (10001, 10002, 0o600)


def test_hub_only_writes_no_proxy(tmp_path: Path) -> None:
    root = node(tmp_path)
    res = run(install, "--root", root, "--runtime", "dockerd", "--no-restart",
              "--registry", "docker.io")
    assert res.exit_code == 0, res.output
    assert not under(root, DROP_IN).exists() and not under(root, "/etc/docker/certs.d").exists()
    assert "proxy is not set up" in res.output


def test_another_proxy_drop_in_is_refused(tmp_path: Path) -> None:
    root = node(tmp_path)
    write(root, "/etc/systemd/system/docker.service.d/http-proxy.conf",
          '[Service]\nEnvironment="HTTPS_PROXY=http://corp:3128"\n')
    original = snapshot(root)
    res = run(install, "--root", root, "--runtime", "dockerd", "--no-restart", "--registry", REG)
    assert res.exit_code == 2 and "already uses a proxy" in res.output
    assert snapshot(root) == original


def test_no_proxy_entries_are_checked() -> None:
    assert parse_no_proxy(["a.svc,10.0.0.0/8", " .cluster.local "]) == [
        "a.svc", "10.0.0.0/8", ".cluster.local"]
    for bad in ('x" y', "a b", "x\nEnvironment=EVIL=1"):
        with pytest.raises(ValueError):
            parse_no_proxy([bad])


# -- restarting dockerd (issue 22 item 2) ----------------------------------------------------


class _Api(BaseHTTPRequestHandler):
    info: dict = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = b"OK" if self.path == "/_ping" else json.dumps(self.info).encode()
        self.send_response(200 if self.path in ("/_ping", "/info") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _UnixServer(HTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        self.socket.bind(self.server_address)

    def get_request(self):  # type: ignore[no-untyped-def]
        return self.socket.accept()[0], ("local", 0)


@pytest.fixture
def docker_api(tmp_path: Path) -> Iterator[tuple[Path, type[_Api]]]:
    """A stand-in dockerd API (/_ping, /info) on a unix socket; set ``.info`` to answer."""
    handler = type("Api", (_Api,), {"info": {}})
    path = tmp_path / "d.sock"
    server = _UnixServer(str(path), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield path, handler
    finally:
        server.shutdown()
        server.server_close()


def _running(proxy: str = "http://127.0.0.1:5003") -> dict:
    return {"RegistryConfig": {"Mirrors": [MIRROR + "/"]}, "HttpsProxy": proxy}


def test_without_live_restore_dockerd_is_not_restarted(tmp_path: Path, docker_api) -> None:
    sock, api = docker_api
    api.info = _running()
    root = node(tmp_path)
    write(root, "/etc/containerd/config.toml", "version = 2\n")  # a node with both runtimes
    original = snapshot(root)
    for runtime in ("auto", "dockerd"):
        res = run(install, "--root", root, "--runtime", runtime, "--registry", REG,
                  "--docker-socket", sock, "--restart-command", OK)
        assert res.exit_code == 2, res.output
        assert "live-restore" in res.output and "--allow-dockerd-restart" in res.output
        assert snapshot(root) == original  # containerd was not touched either
    dry = run(install, "--root", root, "--runtime", "dockerd", "--registry", REG, "--dry-run")
    assert dry.exit_code == 0 and "install would refuse" in dry.output
    assert f"+++ b{CA_DIR}/ca.key\n(a private key" in dry.output
    assert "PRIVATE KEY" not in dry.output
    res = run(install, "--root", root, "--runtime", "dockerd", "--registry", REG,
              "--docker-socket", sock, "--restart-command", OK, "--allow-dockerd-restart",
              "--health-timeout", "5")
    assert res.exit_code == 0, res.output
    assert "dockerd is healthy" in res.output
    installed = snapshot(root)
    api.info = {"RegistryConfig": {"Mirrors": []}, "HttpsProxy": ""}  # as restarted on originals
    res = run(uninstall, "--root", root, "--docker-socket", sock, "--restart-command", OK)
    assert res.exit_code == 2 and "live-restore" in res.output
    assert snapshot(root) == installed  # refused before any file was restored
    res = run(uninstall, "--root", root, "--docker-socket", sock, "--restart-command", OK,
              "--allow-dockerd-restart", "--health-timeout", "5")
    assert res.exit_code == 0, res.output
    assert snapshot(root) == original


def test_with_live_restore_systemd_is_reloaded_then_dockerd_restarted(
    tmp_path: Path, docker_api, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, api = docker_api
    api.info = _running()
    root = node(tmp_path, LIVE)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    res = run(install, "--root", root, "--runtime", "dockerd", "--registry", REG,
              "--docker-socket", sock)
    assert res.exit_code == 0, res.output
    assert calls.read_text().splitlines() == ["daemon-reload", "restart docker"]


def test_health_compares_the_running_dockerd_with_the_files(tmp_path: Path, docker_api) -> None:
    sock, api = docker_api
    root = node(tmp_path)
    rt = DockerdAdapter(root, MIRROR, sock, [REG])
    api.info = {"RegistryConfig": {"Mirrors": []}, "HttpsProxy": ""}
    assert rt.health() is None  # nothing installed, nothing expected
    api.info = _running()
    assert "not []" in (rt.health() or "")  # still runs the mirror the files no longer have
    write(root, "/etc/docker/daemon.json", json.dumps({"registry-mirrors": [MIRROR]}))
    assert "still runs with the agent's proxy" in (rt.health() or "")
    write(root, DROP_IN, '[Service]\nEnvironment="HTTPS_PROXY=http://127.0.0.1:5003"\n')
    assert rt.health() is None
    api.info = _running(proxy="")
    assert "was systemd reloaded" in (rt.health() or "")
    assert "none.sock" in (DockerdAdapter(root, MIRROR, tmp_path / "none.sock").health() or "")
