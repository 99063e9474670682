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
from support import snapshot
from support.installer import (
    CONFIG_V2,
    CONFIG_V3,
    DAEMON_JSON,
    EXISTING_HOSTS,
    MIRROR,
    RESTART,
    STATE,
    node,
    run,
    write,
)

from p2p_mirror.cli.install import install, uninstall
from p2p_mirror.core.config import Upstream
from p2p_mirror.installer import engine, hosts
from p2p_mirror.installer.backup import STATE_DIR, under
from p2p_mirror.installer.base import InstallError
from p2p_mirror.installer.containerd import ContainerdAdapter
from p2p_mirror.installer.dockerd import DockerdAdapter
from p2p_mirror.installer.failure import read_failure
from p2p_mirror.installer.lock import DirLock, LockBusy
from p2p_mirror.installer.tomledit import TomlEditError, set_key

NEW_ENOUGH = ("--containerd-version", "1.7.0")


def added_lines(old: str, new: str) -> list[str]:
    """The lines ``new`` adds to ``old``; fails if any line of ``old`` was dropped or moved."""
    import difflib

    ops = list(difflib.ndiff(old.splitlines(), new.splitlines()))
    assert not [op for op in ops if op.startswith("- ")], "\n".join(ops)
    return [op[2:] for op in ops if op.startswith("+ ")]

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
    assert added_lines(text, out) == ['      config_path = "/x"', ""]  # tomlkit adds a blank


def test_set_key_appends_missing_table_and_handles_single_quoted_headers() -> None:
    out = set_key(CONFIG_V3, ("plugins", "io.containerd.cri.v1.images"), "use_local_image_pull",
                  True, "cfg")
    assert added_lines(CONFIG_V3, out) == ["  use_local_image_pull = true"]
    assert "  # disable_snapshot_annotations = true\n  use_local_image_pull = true\n" in out
    out2 = set_key(out, ("plugins", "io.containerd.cri.v1.images", "registry"), "config_path",
                   "/etc/containerd/certs.d", "cfg")
    assert added_lines(out, out2) == [
        "[plugins.'io.containerd.cri.v1.images'.registry]",
        '  config_path = "/etc/containerd/certs.d"', "",
    ]
    doc = tomllib.loads(out2)["plugins"]["io.containerd.cri.v1.images"]
    assert doc["registry"]["config_path"] == "/etc/containerd/certs.d"
    assert doc["snapshotter"] == "overlayfs" and doc["use_local_image_pull"] is True


def test_set_key_edits_inline_and_dotted_tables_and_adds_missing_ones() -> None:
    table = ("plugins", "io.containerd.grpc.v1.cri", "registry")
    head = 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n'
    inline = head + '  registry = { config_path = "" }\n'
    assert set_key(inline, table, "config_path", "/x", "cfg") == inline.replace('""', '"/x"')
    dotted = head + '  registry.config_path = ""\n'
    assert set_key(dotted, table, "config_path", "/x", "cfg") == dotted.replace('""', '"/x"')
    fresh = set_key("version = 2\n", table, "config_path", "/x", "cfg")
    assert tomllib.loads(fresh) == {"version": 2, "plugins": {
        "io.containerd.grpc.v1.cri": {"registry": {"config_path": "/x"}}}}


def test_set_key_refuses_an_edit_it_cannot_prove(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TomlEditError, match="not valid TOML"):
        set_key("version = = 2\n", ("a",), "b", "c", "cfg")
    with pytest.raises(TomlEditError, match="by hand"):  # a key path through a non-table
        set_key('[plugins]\n  cri = "x"\n', ("plugins", "cri", "registry"), "k", "v", "cfg")
    from p2p_mirror.installer import tomledit

    # An edit that changes another setting too is caught by the tomllib proof, not written.
    monkeypatch.setattr(tomledit, "_edit",
                        lambda text, table, key, value: text + f'{key} = "{value}"\nz = 1\n')
    with pytest.raises(TomlEditError, match="would change other settings"):
        set_key("a = 1\n", (), "b", "c", "cfg")


# -- containerd planning ---------------------------------------------------------------------


def plan_texts(root: Path, registries: list[Upstream] | None = None,
               version: tuple[int, int, int] | None = (1, 7, 0)) -> dict[str, str]:
    rt = ContainerdAdapter(root, MIRROR, registries or [], version=version)
    return {c.path: c.new.decode() for c in rt.plan().changes}


@pytest.mark.parametrize(
    ("config", "version", "table"),
    [
        ("", (1, 6, 20), ("plugins", "io.containerd.grpc.v1.cri", "registry")),
        ("", (2, 1, 0), ("plugins", "io.containerd.cri.v1.images", "registry")),
        ("[plugins.cri]\n  systemd_cgroup = true\n", (1, 6, 17), ("plugins", "cri", "registry")),
        (CONFIG_V2, (1, 7, 0), ("plugins", "io.containerd.grpc.v1.cri", "registry")),
        (CONFIG_V3, (2, 1, 3), ("plugins", "io.containerd.cri.v1.images", "registry")),
    ],
)
def test_config_path_lands_in_the_schema_of_the_config_version(
    tmp_path: Path, config: str, version: tuple[int, int, int], table: tuple[str, ...]
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
    doc = tomllib.loads(plan_texts(tmp_path, version=(2, 0, 4))["/etc/containerd/config.toml"])
    assert "use_local_image_pull" not in doc["plugins"]["io.containerd.cri.v1.images"]


def test_existing_config_path_is_respected(tmp_path: Path) -> None:
    cfg = CONFIG_V2.replace('config_path = ""', 'config_path = "/srv/certs:/etc/docker/certs.d"')
    write(tmp_path, "/etc/containerd/config.toml", cfg)
    rt = ContainerdAdapter(tmp_path, MIRROR, [], version=(1, 7, 0))
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
        ContainerdAdapter(tmp_path, MIRROR, [], version=(1, 7, 0)).plan()


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
    rt = ContainerdAdapter(root, MIRROR, [], version=(1, 7, 0))
    plan = rt.plan()
    paths = {c.path for c in plan.changes}
    assert "/etc/containerd/certs.d/registry.example.test/hosts.toml" in paths
    assert any("ca-only.example" in n for n in plan.notes)


# -- dockerd ---------------------------------------------------------------------------------


def test_daemon_json_merge_keeps_other_keys_and_mirrors(tmp_path: Path) -> None:
    write(tmp_path, "/etc/docker/daemon.json", DAEMON_JSON)
    plan = DockerdAdapter(tmp_path, MIRROR, other_registries=["quay.io"]).plan()
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
        DockerdAdapter(tmp_path, MIRROR).plan()


# -- CLI round trips -------------------------------------------------------------------------


def test_install_twice_then_uninstall_gives_back_the_original_tree(tmp_path: Path) -> None:
    root = node(tmp_path)
    original = snapshot(root)
    args = ("--root", root, "--no-restart", "--registry",
            "registry.example.test=http://127.0.0.1:5000", "--registry", "docker.io",
            "--registry", "internal.example:5000")
    res = run(install, *args)
    assert res.exit_code == 0, res.output
    assert "Docker Hub" in res.output
    installed = snapshot(root)
    assert installed != original
    cfg = under(root, "/etc/containerd/config.toml")
    assert cfg.stat().st_mode & 0o777 == 0o600  # mode kept
    assert "# Node containerd config, hand-tuned" in cfg.read_text()
    internal = tomllib.loads(
        under(root, "/etc/containerd/certs.d/internal.example:5000/hosts.toml").read_text())
    assert internal["skip_verify"] is True  # the legacy TLS setting, carried
    again = run(install, *args)
    assert again.exit_code == 0 and "nothing to change" in again.output
    assert snapshot(root) == installed
    res = run(uninstall, "--root", root, "--no-restart")
    assert res.exit_code == 0, res.output
    assert snapshot(root) == original  # bytes, modes, and no leftover files or dirs


def test_dry_run_prints_the_diff_and_changes_nothing(tmp_path: Path) -> None:
    root = node(tmp_path)
    original = snapshot(root)
    res = run(install, "--root", root, "--dry-run", *NEW_ENOUGH)
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
        opts = engine.Options(root=root, restart=False, lock_timeout=0.5,
                              containerd_version=(1, 7, 0))
        with pytest.raises(LockBusy):
            engine.install(opts, lambda _: None)
    opts.lock_timeout = 60
    assert engine.install(opts, lambda _: None) == 0


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
    assert snapshot(root, skip=STATE) == original
    failed = read_failure(root)
    assert failed is not None and "simulated restart failure" in failed.error
    assert failed.files == ["/etc/docker/daemon.json"]


def test_runtime_that_never_answers_restores_files(tmp_path: Path) -> None:
    root = node(tmp_path)
    original = snapshot(root)
    res = run(install, "--root", root, "--runtime", "dockerd", "--health-timeout", "1",
              "--allow-dockerd-restart", "--docker-socket", tmp_path / "nothing.sock",
              "--restart-command", "true")
    assert res.exit_code == 1, res.output
    assert "did not become healthy" in res.output
    assert snapshot(root, skip=STATE) == original


def test_rollback_keeps_an_earlier_install(tmp_path: Path) -> None:
    """A failed install of another runtime rolls back to the earlier install, and uninstall
    still restores the original tree (and clears the failure record)."""
    root = node(tmp_path)
    original = snapshot(root)
    first = run(install, "--root", root, "--runtime", "containerd", "--no-restart",
                "--registry", "docker.io", "--registry", "internal.example:5000")
    assert first.exit_code == 0, first.output
    installed = snapshot(root, skip=STATE)
    res = run(install, "--root", root, "--runtime", "dockerd", "--health-timeout", "1",
              "--allow-dockerd-restart", "--restart-command", "true",
              "--docker-socket", tmp_path / "nothing.sock")
    assert res.exit_code == 1, res.output
    assert snapshot(root, skip=STATE) == installed
    assert read_failure(root) is not None
    res = run(uninstall, "--root", root, "--no-restart")
    assert res.exit_code == 0, res.output
    assert "cleared the record of a failed install" in res.output
    assert snapshot(root) == original
