"""Installer: TOML/JSON edits, journal round trips, dry run, lock, rollback (no runtime needed).

The real-containerd tests are in test_installer_containerd.py.
"""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner
from support import SUPPORT, snapshot

from p2p_mirror.cli.install import install, uninstall
from p2p_mirror.core.config import Upstream
from p2p_mirror.installer import engine, hosts
from p2p_mirror.installer.backup import STATE_DIR, under
from p2p_mirror.installer.base import InstallError
from p2p_mirror.installer.containerd import Containerd
from p2p_mirror.installer.dockerd import DockerdAdapter as Dockerd
from p2p_mirror.installer.lock import DirLock, LockBusy
from p2p_mirror.installer.tomledit import TomlEditError, set_key

MIRROR = "http://127.0.0.1:5004"
RESTART = SUPPORT / "installer_restart.py"

CONFIG_V2 = """\
# Node containerd config, hand-tuned: keep these comments.
version = 2
oom_score = -999

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"   # pinned
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/opt/cni/bin"
    [plugins."io.containerd.grpc.v1.cri".registry]
      # filled in by the node bootstrap
      config_path = ""
    [plugins."io.containerd.grpc.v1.cri".registry.configs."internal.example:5000".tls]
      insecure_skip_verify = true
  [plugins."io.containerd.internal.v1.opt"]
    path = "/opt/containerd"
"""

CONFIG_V3 = """\
version = 3
root = '/var/lib/containerd'

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  # disable_snapshot_annotations = true

[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
"""

EXISTING_HOSTS = """\
# the team's pull-through cache
server = "https://registry.example.test"

[host."https://cache.internal.example"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
"""

DAEMON_JSON = """\
{
    "log-driver": "json-file",
    "log-opts": {"max-size": "10m"},
    "registry-mirrors": ["https://mirror.gcr.example"],
    "insecure-registries": ["10.0.0.0/8"]
}
"""


# -- helpers ---------------------------------------------------------------------------------


def write(root: Path, host_path: str, text: str, mode: int = 0o644) -> Path:
    p = under(root, host_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(mode)
    return p


def node(tmp_path: Path) -> Path:
    """A host root with containerd (comments, other plugins, an existing hosts.toml) + dockerd."""
    root = tmp_path / "host"
    write(root, "/etc/containerd/config.toml", CONFIG_V2, 0o600)
    write(root, "/etc/containerd/certs.d/registry.example.test/hosts.toml", EXISTING_HOSTS)
    write(root, "/etc/docker/daemon.json", DAEMON_JSON)
    return root


def run(cmd, *args: str):
    result = CliRunner().invoke(cmd, [str(a) for a in args], catch_exceptions=False)
    return result


# -- TOML surgery ----------------------------------------------------------------------------


def test_set_key_replaces_value_in_place_keeping_every_other_byte() -> None:
    table = ("plugins", "io.containerd.grpc.v1.cri", "registry")
    out = set_key(CONFIG_V2, table, "config_path", "/etc/containerd/certs.d", "cfg")
    assert out == CONFIG_V2.replace('config_path = ""', 'config_path = "/etc/containerd/certs.d"')


def test_set_key_inserts_under_existing_header_with_its_indent() -> None:
    bootstrap = '      # filled in by the node bootstrap\n      config_path = ""\n'
    text = CONFIG_V2.replace(bootstrap, "")
    table = ("plugins", "io.containerd.grpc.v1.cri", "registry")
    out = set_key(text, table, "config_path", "/x", "cfg")
    assert '    [plugins."io.containerd.grpc.v1.cri".registry]\n      config_path = "/x"\n' in out
    assert out.replace('      config_path = "/x"\n', "") == text


def test_set_key_appends_missing_table_and_handles_single_quoted_headers() -> None:
    out = set_key(CONFIG_V3, ("plugins", "io.containerd.cri.v1.images"), "use_local_image_pull",
                  True, "cfg")
    assert out == CONFIG_V3.replace(
        "images']\n", "images']\n  use_local_image_pull = true\n"
    )
    out2 = set_key(out, ("plugins", "io.containerd.cri.v1.images", "registry"), "config_path",
                   "/etc/containerd/certs.d", "cfg")
    assert out2.startswith(out)
    assert out2.endswith(
        '\n[plugins."io.containerd.cri.v1.images".registry]\n'
        '  config_path = "/etc/containerd/certs.d"\n'
    )
    doc = tomllib.loads(out2)["plugins"]["io.containerd.cri.v1.images"]
    assert doc["registry"]["config_path"] == "/etc/containerd/certs.d"
    assert doc["snapshotter"] == "overlayfs" and doc["use_local_image_pull"] is True


def test_set_key_refuses_an_edit_it_cannot_prove() -> None:
    text = 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  registry = { config_path = "" }\n'
    with pytest.raises(TomlEditError, match="by hand"):
        set_key(text, ("plugins", "io.containerd.grpc.v1.cri", "registry"), "config_path", "/x",
                "cfg")
    with pytest.raises(TomlEditError, match="not valid TOML"):
        set_key("version = = 2\n", ("a",), "b", "c", "cfg")


# -- containerd planning ---------------------------------------------------------------------


def plan_texts(root: Path, registries: list[Upstream] | None = None,
               version: tuple[int, int] | None = (1, 6)) -> dict[str, str]:
    rt = Containerd(root, MIRROR, registries or [], version=version)
    return {c.path: c.new.decode() for c in rt.plan().changes}


@pytest.mark.parametrize(
    ("config", "version", "table"),
    [
        ("", (1, 6), ("plugins", "io.containerd.grpc.v1.cri", "registry")),
        ("", (2, 1), ("plugins", "io.containerd.cri.v1.images", "registry")),
        ("[plugins.cri]\n  systemd_cgroup = true\n", (1, 6), ("plugins", "cri", "registry")),
        (CONFIG_V2, (1, 7), ("plugins", "io.containerd.grpc.v1.cri", "registry")),
        (CONFIG_V3, (2, 1), ("plugins", "io.containerd.cri.v1.images", "registry")),
    ],
)
def test_config_path_lands_in_the_schema_of_the_config_version(
    tmp_path: Path, config: str, version: tuple[int, int], table: tuple[str, ...]
) -> None:
    if config:
        write(tmp_path, "/etc/containerd/config.toml", config)
    texts = plan_texts(tmp_path, version=version)
    doc = tomllib.loads(texts["/etc/containerd/config.toml"])
    node_ = doc
    for part in table:
        node_ = node_[part]
    assert node_["config_path"] == "/etc/containerd/certs.d"
    images = doc["plugins"].get("io.containerd.cri.v1.images", {})
    assert images.get("use_local_image_pull") is (True if "images" in table[1] else None)
    assert "/etc/containerd/certs.d/_default/hosts.toml" in texts


def test_containerd_2_0_gets_no_use_local_image_pull(tmp_path: Path) -> None:
    write(tmp_path, "/etc/containerd/config.toml", CONFIG_V3)
    doc = tomllib.loads(plan_texts(tmp_path, version=(2, 0))["/etc/containerd/config.toml"])
    assert "use_local_image_pull" not in doc["plugins"]["io.containerd.cri.v1.images"]


def test_existing_config_path_is_respected(tmp_path: Path) -> None:
    cfg = CONFIG_V2.replace('config_path = ""', 'config_path = "/srv/certs:/etc/docker/certs.d"')
    write(tmp_path, "/etc/containerd/config.toml", cfg)
    rt = Containerd(tmp_path, MIRROR, [], version=(1, 6))
    plan = rt.plan()
    assert [c.path for c in plan.changes] == ["/srv/certs/_default/hosts.toml"]
    assert any("already" in n for n in plan.notes)


def test_cri_registry_mirrors_are_refused(tmp_path: Path) -> None:
    cfg = CONFIG_V2 + (
        '    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
        '      endpoint = ["https://mirror.example"]\n'
    )
    write(tmp_path, "/etc/containerd/config.toml", cfg)
    with pytest.raises(InstallError, match="mirrors"):
        Containerd(tmp_path, MIRROR, [], version=(1, 6)).plan()


def test_hosts_toml_per_registry_has_mirror_first_and_upstream_server(tmp_path: Path) -> None:
    ups = [Upstream("registry.example.test", "http://127.0.0.1:5000"),
           Upstream.default_for("docker.io")]
    texts = plan_texts(tmp_path, ups)
    reg = tomllib.loads(texts["/etc/containerd/certs.d/registry.example.test/hosts.toml"])
    assert reg["server"] == "http://127.0.0.1:5000"
    assert reg["host"] == {MIRROR: {"capabilities": ["pull", "resolve"],
                                    "dial_timeout": hosts.DIAL_TIMEOUT}}
    hub = tomllib.loads(texts["/etc/containerd/certs.d/docker.io/hosts.toml"])
    assert hub["server"] == "https://registry-1.docker.io"
    assert "/etc/containerd/certs.d/_default/hosts.toml" not in texts


def test_default_hosts_toml_has_no_server_so_each_registry_keeps_its_own(tmp_path: Path) -> None:
    texts = plan_texts(tmp_path)
    doc = tomllib.loads(texts["/etc/containerd/certs.d/_default/hosts.toml"])
    assert "server" not in doc and list(doc["host"]) == [MIRROR]


def test_existing_hosts_toml_is_merged_mirror_first_their_bytes_kept(tmp_path: Path) -> None:
    merged = hosts.merge(EXISTING_HOSTS, MIRROR, "https://other.example", "h")
    doc = tomllib.loads(merged)
    assert list(doc["host"]) == [MIRROR, "https://cache.internal.example"]
    assert doc["server"] == "https://registry.example.test"  # theirs wins
    head, _, tail = EXISTING_HOSTS.partition("[host.")
    assert merged.startswith(head) and merged.endswith("[host." + tail)
    assert hosts.merge(merged, MIRROR, None, "h") == merged  # idempotent


def test_default_mode_also_routes_registries_that_have_their_own_hosts_toml(
    tmp_path: Path,
) -> None:
    root = node(tmp_path)
    (under(root, "/etc/containerd/certs.d/ca-only.example")).mkdir()
    rt = Containerd(root, MIRROR, [], version=(1, 6))
    plan = rt.plan()
    paths = {c.path for c in plan.changes}
    assert "/etc/containerd/certs.d/registry.example.test/hosts.toml" in paths
    assert any("ca-only.example" in n for n in plan.notes)


# -- dockerd ---------------------------------------------------------------------------------


def test_daemon_json_merge_keeps_other_keys_and_mirrors(tmp_path: Path) -> None:
    write(tmp_path, "/etc/docker/daemon.json", DAEMON_JSON)
    plan = Dockerd(tmp_path, MIRROR, other_registries=["quay.io"]).plan()
    import json

    doc = json.loads(plan.changes[0].new)
    assert doc["registry-mirrors"] == [MIRROR, "https://mirror.gcr.example"]
    assert {k: v for k, v in doc.items() if k != "registry-mirrors"} == {
        k: v for k, v in json.loads(DAEMON_JSON).items() if k != "registry-mirrors"}
    assert plan.changes[0].new.decode().startswith('{\n    "log-driver"')  # its indent kept
    assert any("Docker Hub" in n for n in plan.notes) and any("quay.io" in n for n in plan.notes)


def test_bad_daemon_json_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "/etc/docker/daemon.json", "{not json")
    with pytest.raises(InstallError, match="not valid JSON"):
        Dockerd(tmp_path, MIRROR).plan()


# -- CLI round trips -------------------------------------------------------------------------


def test_install_twice_then_uninstall_gives_back_the_original_tree(tmp_path: Path) -> None:
    root = node(tmp_path)
    original = snapshot(root)
    res = run(install, "--root", root, "--no-restart", "--registry",
              "registry.example.test=http://127.0.0.1:5000", "--registry", "docker.io")
    assert res.exit_code == 0, res.output
    assert "Docker Hub" in res.output
    installed = snapshot(root)
    assert installed != original
    cfg = under(root, "/etc/containerd/config.toml")
    assert cfg.stat().st_mode & 0o777 == 0o600  # mode kept
    assert "# Node containerd config, hand-tuned" in cfg.read_text()
    again = run(install, "--root", root, "--no-restart", "--registry",
                "registry.example.test=http://127.0.0.1:5000", "--registry", "docker.io")
    assert again.exit_code == 0 and "nothing to change" in again.output
    assert snapshot(root) == installed
    res = run(uninstall, "--root", root, "--no-restart")
    assert res.exit_code == 0, res.output
    assert snapshot(root) == original  # bytes, modes, and no leftover files or dirs


def test_dry_run_prints_the_diff_and_changes_nothing(tmp_path: Path) -> None:
    root = node(tmp_path)
    original = snapshot(root)
    res = run(install, "--root", root, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "+++ b/etc/containerd/config.toml" in res.output
    assert '+      config_path = "/etc/containerd/certs.d"' in res.output
    assert "--- /dev/null\n+++ b/etc/containerd/certs.d/_default/hosts.toml" in res.output
    assert "+++ b/etc/docker/daemon.json" in res.output
    assert snapshot(root) == original


def test_broken_config_toml_is_refused_with_no_change(tmp_path: Path) -> None:
    root = node(tmp_path)
    write(root, "/etc/containerd/config.toml", CONFIG_V2 + "[plugins\n")
    original = snapshot(root)
    res = CliRunner().invoke(install, ["--root", str(root), "--no-restart"])
    assert res.exit_code == 2
    assert "not valid TOML" in res.output and "nothing was changed" in res.output
    assert snapshot(root) == original


def test_no_runtime_under_root_is_an_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(install, ["--root", str(tmp_path), "--no-restart"])
    assert res.exit_code == 2 and "no container runtime found" in res.output


def test_uninstall_when_not_installed_is_a_no_op(tmp_path: Path) -> None:
    root = node(tmp_path)
    original = snapshot(root)
    res = run(uninstall, "--root", root, "--no-restart")
    assert res.exit_code == 0 and "not installed" in res.output
    assert snapshot(root) == original


def test_second_installer_waits_for_the_lock(tmp_path: Path) -> None:
    root = node(tmp_path)
    state = under(root, STATE_DIR)
    state.mkdir(parents=True)
    with DirLock(state):
        opts = engine.Options(root=root, restart=False, lock_timeout=0.5)
        with pytest.raises(LockBusy):
            engine.install(opts, lambda _: None)
    assert engine.install(engine.Options(root=root, restart=False), lambda _: None) == 0


# -- restart and rollback with dockerd (a fake /_ping socket) --------------------------------


class _Ping(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = b"OK"
        self.send_response(200 if self.path == "/_ping" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _UnixHTTPServer(HTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        self.socket.bind(self.server_address)

    def get_request(self):  # type: ignore[no-untyped-def]
        conn, _ = self.socket.accept()
        return conn, ("local", 0)


@pytest.fixture
def docker_ping(tmp_path: Path):
    """A stand-in dockerd API socket answering GET /_ping (the real dockerd is not here)."""
    path = tmp_path / "docker.sock"
    server = _UnixHTTPServer(str(path), _Ping)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.shutdown()
        server.server_close()


def test_dockerd_restart_and_health_check(tmp_path: Path, docker_ping: Path) -> None:
    root = node(tmp_path)
    res = run(install, "--root", root, "--runtime", "dockerd", "--docker-socket", docker_ping,
              "--allow-dockerd-restart", "--restart-command",
              f"{sys.executable} -c 'import sys; sys.exit(0)' {{unit}}")
    assert res.exit_code == 0, res.output
    assert "restarting docker" in res.output and "dockerd is healthy" in res.output
    assert "Docker Hub" in res.output


def test_failing_restart_restores_files_and_exits_non_zero(tmp_path: Path) -> None:
    root = node(tmp_path)
    original = snapshot(root)
    res = run(install, "--root", root, "--runtime", "dockerd", "--docker-socket",
              tmp_path / "nothing.sock", "--allow-dockerd-restart", "--restart-command",
              f"{sys.executable} {RESTART} fail")
    assert res.exit_code == 1, res.output
    assert "simulated restart failure" in res.output and "rolling back" in res.output
    assert snapshot(root) == original


def test_runtime_that_never_answers_restores_files(tmp_path: Path) -> None:
    root = node(tmp_path)
    original = snapshot(root)
    res = run(install, "--root", root, "--runtime", "dockerd", "--health-timeout", "1",
              "--allow-dockerd-restart", "--docker-socket", tmp_path / "nothing.sock",
              "--restart-command", "true")
    assert res.exit_code == 1, res.output
    assert "did not become healthy" in res.output
    assert snapshot(root) == original


def test_rollback_keeps_an_earlier_install(tmp_path: Path) -> None:
    """A failed re-install rolls back to the previous install, and uninstall still works."""
    root = node(tmp_path)
    original = snapshot(root)
    assert run(install, "--root", root, "--no-restart", "--registry", "docker.io").exit_code == 0
    first = snapshot(root)
    res = run(install, "--root", root, "--runtime", "containerd", "--health-timeout", "1",
              "--registry", "quay.io", "--restart-command", "true",
              "--containerd-socket", tmp_path / "nothing.sock")
    assert res.exit_code == 1, res.output
    assert snapshot(root) == first
    assert run(uninstall, "--root", root, "--no-restart").exit_code == 0
    assert snapshot(root) == original
