"""Installer guards: bad input (exit 2, nothing changed), paths inside --root, symlinks kept,
a damaged journal, the failed-install record (exit 3), containerd's version, legacy TLS, and
restarts only for config.toml.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import tomllib
from support import snapshot
from support.installer import (
    CONFIG_V2,
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
from p2p_mirror.installer import hosts
from p2p_mirror.installer.backup import STATE_DIR
from p2p_mirror.installer.base import InstallError
from p2p_mirror.installer.containerd import ContainerdAdapter
from p2p_mirror.installer.containerd_version import parse_version, server_version
from p2p_mirror.installer.failure import FAILED_MARKER, read_failure, status_line
from p2p_mirror.installer.paths import under, under_nofollow

CONFIG = "/etc/containerd/config.toml"
CERTS = "/etc/containerd/certs.d"
NEW_ENOUGH = ("--containerd-version", "1.7.0")


def restart_counting(log: Path, action: str = "ok") -> tuple[str, str]:
    return ("--restart-command", f"{sys.executable} {RESTART} {action} {{unit}} --log {log}")


def restarts(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def healthy(monkeypatch: pytest.MonkeyPatch) -> None:
    """containerd "answers" after any restart: the restart policy is under test, not ctr."""
    monkeypatch.setattr(ContainerdAdapter, "health", lambda self: None)
    monkeypatch.setattr(ContainerdAdapter, "baseline", lambda self: None)


# -- bad input: exit 2, nothing changed ------------------------------------------------------


@pytest.mark.parametrize("host_path", [CONFIG, f"{CERTS}/registry.example.test/hosts.toml"])
def test_non_utf8_file_is_refused_with_exit_2(tmp_path: Path, host_path: str) -> None:
    root = node(tmp_path)
    under(root, host_path).write_bytes(b"version = 2\n# caf\xe9 \xff\n")
    before = snapshot(root)
    res = run(install, "--root", root, "--runtime", "containerd", "--no-restart", *NEW_ENOUGH)
    assert res.exit_code == 2, res.output
    assert f"{host_path}: not UTF-8" in res.output and "nothing was changed" in res.output
    assert "Traceback" not in res.output
    assert snapshot(root) == before


def test_a_directory_where_a_file_belongs_is_refused(tmp_path: Path) -> None:
    root = node(tmp_path)
    under(root, f"{CERTS}/_default/hosts.toml").mkdir(parents=True)
    before = snapshot(root)
    res = run(install, "--root", root, "--runtime", "containerd", "--no-restart", *NEW_ENOUGH)
    assert res.exit_code == 2 and "is a directory" in res.output, res.output
    assert snapshot(root) == before


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--containerd-version", "latest"), ("--health-timeout", "-1"), ("--mirror", "ftp://x"),
     ("--registry", "=http://x"), ("--runtime", "podman")],
)
def test_bad_flags_exit_2_and_change_nothing(tmp_path: Path, flag: str, value: str) -> None:
    root = node(tmp_path)
    before = snapshot(root)
    res = run(install, "--root", root, "--no-restart", flag, value)
    assert res.exit_code == 2, res.output
    assert "Invalid value" in res.output
    assert snapshot(root) == before


# -- a damaged journal -----------------------------------------------------------------------


def installed(tmp_path: Path) -> tuple[Path, dict]:
    root = node(tmp_path)
    original = snapshot(root)
    res = run(install, "--root", root, "--runtime", "containerd", "--no-restart", *NEW_ENOUGH)
    assert res.exit_code == 0, res.output
    return root, original


@pytest.mark.parametrize("damage", [b"{\"format\": 1, \"files\": [", b"\xff\xfe", b"[1, 2]",
                                    b'{"format": 1, "files": [{"nopath": 1}]}'])
def test_damaged_journal_install_refuses_and_uninstall_recovers(
    tmp_path: Path, damage: bytes
) -> None:
    root, original = installed(tmp_path)
    under(root, f"{STATE_DIR}/journal.json").write_bytes(damage)
    before = snapshot(root)
    res = run(install, "--root", root, "--runtime", "containerd", "--no-restart", *NEW_ENOUGH)
    assert res.exit_code == 2, res.output
    assert "journal.json is damaged" in res.output and "p2p-mirror uninstall" in res.output
    assert snapshot(root) == before
    res = run(uninstall, "--root", root, "--no-restart")
    assert res.exit_code == 0, res.output
    assert "restoring from the per-file records" in res.output
    assert snapshot(root) == original


def test_damaged_journal_without_records_says_what_to_do(tmp_path: Path) -> None:
    root, _ = installed(tmp_path)
    state = under(root, STATE_DIR)
    (state / "journal.json").write_text("garbage")
    for rec in (state / "originals").glob("*.json"):
        rec.unlink()
    before = snapshot(root)
    res = run(uninstall, "--root", root, "--no-restart")
    assert res.exit_code == 2, res.output
    assert "copy those back by hand" in res.output and str(state) in res.output
    assert snapshot(root) == before


# -- paths stay inside --root, symlinks stay symlinks ----------------------------------------


def test_absolute_symlinks_resolve_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "host"
    outside = tmp_path / "outside" / "containerd"  # exists on the machine running the installer
    write(outside, "/config.toml", CONFIG_V2)
    inside = root / str(outside).lstrip("/")  # the same absolute path, on the node
    write(inside, "/config.toml", CONFIG_V2)
    under(root, "/etc").mkdir(parents=True)
    os.symlink(str(outside), root / "etc/containerd")
    os.symlink("../../../../../../../../../../srv", root / "srv-up")
    assert under(root, CONFIG) == inside / "config.toml"
    assert under(root, "/srv-up/x") == root / "srv/x"  # .. stops at the root
    assert under_nofollow(root, "/etc/containerd") == root / "etc/containerd"
    before_outside = snapshot(outside)
    original = snapshot(root)
    res = run(install, "--root", root, "--runtime", "containerd", "--no-restart", *NEW_ENOUGH,
              "--registry", "internal.example:5000")
    assert res.exit_code == 0, res.output
    assert 'config_path = "/etc/containerd/certs.d"' in (inside / "config.toml").read_text()
    assert (inside / "certs.d/internal.example:5000/hosts.toml").is_file()
    assert snapshot(outside) == before_outside  # the installer's own machine: untouched
    assert run(uninstall, "--root", root, "--no-restart").exit_code == 0
    assert snapshot(root) == original and snapshot(outside) == before_outside


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    os.symlink("/etc/containerd", root / "etc/containerd")
    with pytest.raises(InstallError, match="too many levels"):
        under(root, CONFIG)


def test_symlinked_hosts_toml_is_a_symlink_again_after_uninstall(tmp_path: Path) -> None:
    root = node(tmp_path)
    reg = under(root, f"{CERTS}/registry.example.test/hosts.toml")
    shared = write(root, "/etc/containerd/shared/hosts.toml", EXISTING_HOSTS)
    reg.unlink()
    os.symlink("../../shared/hosts.toml", reg)
    original = snapshot(root)
    res = run(install, "--root", root, "--runtime", "containerd", *NEW_ENOUGH,
              *restart_counting(tmp_path / "restarts", "fail"))
    assert res.exit_code == 1, res.output
    assert snapshot(root, skip=STATE) == original  # rolled back: a symlink again
    res = run(install, "--root", root, "--runtime", "containerd", "--no-restart", *NEW_ENOUGH,
              "--force")
    assert res.exit_code == 0, res.output
    assert "it was a symlink to ../../shared/hosts.toml" in res.output
    assert not reg.is_symlink()  # replaced, never written through: the shared file is theirs
    assert list(tomllib.loads(reg.read_text())["host"]) == [MIRROR,
                                                          "https://cache.internal.example"]
    assert shared.read_text() == EXISTING_HOSTS
    res = run(uninstall, "--root", root, "--no-restart")
    assert res.exit_code == 0, res.output
    assert reg.is_symlink() and os.readlink(reg) == "../../shared/hosts.toml"
    assert snapshot(root) == original


# -- a rolled-back install is recorded and not retried ---------------------------------------


def test_failed_install_is_not_retried_until_forced_or_changed(tmp_path: Path) -> None:
    root = node(tmp_path)
    original = snapshot(root)
    log = tmp_path / "restarts"
    args = ("--root", root, "--runtime", "containerd", *NEW_ENOUGH)
    res = run(install, *args, *restart_counting(log, "fail"))
    assert res.exit_code == 1, res.output
    assert restarts(log) == ["containerd", "containerd"]  # the change, then the rollback
    failed = read_failure(root)
    assert failed is not None and failed.runtimes == ["containerd"]
    assert "simulated restart failure" in failed.summary()
    assert under(root, FAILED_MARKER).is_file()
    line = status_line(root)
    assert line is not None and "simulated restart failure" in line and "--force" in line

    res = run(install, *args, *restart_counting(log, "fail"))  # the DaemonSet's next try
    assert res.exit_code == 3, res.output
    assert "not retrying" in res.output and "--force" in res.output
    assert restarts(log) == ["containerd"] * 2  # no restart at all
    assert snapshot(root, skip=STATE) == original

    res = run(install, *args, "--skipped-exit-code", "0", *restart_counting(log, "fail"))
    assert res.exit_code == 0 and "not retrying" in res.output, res.output  # DaemonSet style
    assert len(restarts(log)) == 2

    res = run(install, *args, "--force", *restart_counting(log, "fail"))
    assert res.exit_code == 1 and len(restarts(log)) == 4, res.output
    res = run(install, *args, "--mirror", "http://127.0.0.1:5999", *restart_counting(log, "fail"))
    assert res.exit_code == 1 and len(restarts(log)) == 6, res.output  # new inputs: tried

    res = run(uninstall, "--root", root, "--no-restart")
    assert res.exit_code == 0 and read_failure(root) is None, res.output
    assert status_line(root) is None
    assert snapshot(root) == original


def test_a_successful_install_clears_the_failure_record(tmp_path: Path, healthy: None) -> None:
    root = node(tmp_path)
    original = snapshot(root)
    log = tmp_path / "restarts"
    args = ("--root", root, "--runtime", "containerd", *NEW_ENOUGH)
    assert run(install, *args, *restart_counting(log, "fail")).exit_code == 1
    res = run(install, *args, "--force", *restart_counting(log))
    assert res.exit_code == 0, res.output
    assert read_failure(root) is None
    assert run(uninstall, "--root", root, *restart_counting(log)).exit_code == 0
    assert snapshot(root) == original  # the state dirs the failed run made are gone too


def test_damaged_failure_record_still_reads_as_a_failure(tmp_path: Path) -> None:
    write(tmp_path, FAILED_MARKER, "{")
    failed = read_failure(tmp_path)
    assert failed is not None and "damaged" in failed.summary()
    assert read_failure(tmp_path / "nothing") is None


# -- containerd's version --------------------------------------------------------------------


def test_versions_are_read_from_containerd_and_ctr_output() -> None:
    assert parse_version("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1"
                         ) == (1, 6, 20)
    assert parse_version("containerd github.com/containerd/containerd/v2 v2.0.4 1a43cb6") == (
        2, 0, 4)
    ctr = ("Client:\n  Version:  1.7.1\n  Revision: x\n\nServer:\n  Version:  1.6.9\n"
           "  Revision: y\n  UUID: z\n")
    assert server_version(ctr) == (1, 6, 9)


def test_containerd_before_1_6_17_without_registry_is_refused(tmp_path: Path) -> None:
    root = node(tmp_path)
    before = snapshot(root)
    res = run(install, "--root", root, "--runtime", "containerd", "--no-restart",
              "--containerd-version", "1.6.16")
    assert res.exit_code == 2, res.output
    assert "1.6.16 does not read certs.d/_default" in res.output and "--registry" in res.output
    assert snapshot(root) == before


def test_unknown_containerd_version_without_registry_is_refused(tmp_path: Path) -> None:
    root = node(tmp_path)
    res = run(install, "--root", root, "--runtime", "containerd", "--no-restart")
    assert res.exit_code == 2 and "cannot tell containerd's version" in res.output, res.output


@pytest.mark.parametrize(("version", "default"), [((1, 6, 16), False), ((1, 6, 17), True),
                                                  ((1, 7, 0), True), ((2, 1, 0), True)])
def test_old_containerd_gets_one_directory_per_registry(
    tmp_path: Path, version: tuple[int, int, int], default: bool
) -> None:
    write(tmp_path, CONFIG, "version = 2\n")
    rt = ContainerdAdapter(tmp_path, MIRROR, [], version=version)
    if not default:
        with pytest.raises(InstallError, match="does not read certs.d/_default"):
            rt.plan()
    else:
        assert f"{CERTS}/_default/hosts.toml" in {c.path for c in rt.plan().changes}
    ups = [Upstream.default_for("docker.io"), Upstream("quay.io", "https://quay.io")]
    paths = {c.path for c in ContainerdAdapter(tmp_path, MIRROR, ups, version=version)
             .plan().changes}
    assert paths == {CONFIG, f"{CERTS}/docker.io/hosts.toml", f"{CERTS}/quay.io/hosts.toml"}


# -- legacy registry.configs TLS -------------------------------------------------------------

LEGACY_TLS = """\
version = 2
[plugins."io.containerd.grpc.v1.cri".registry.configs."reg.internal:5000".tls]
  ca_file = "/etc/pki/reg-ca.pem"
  cert_file = "/etc/pki/node.pem"
  key_file = "/etc/pki/node.key"
[plugins."io.containerd.grpc.v1.cri".registry.configs."lab.internal".tls]
  insecure_skip_verify = true
[plugins."io.containerd.grpc.v1.cri".registry.configs."lab.internal".auth]
  username = "u"
"""


def test_legacy_tls_is_carried_into_each_hosts_toml(tmp_path: Path) -> None:
    write(tmp_path, CONFIG, LEGACY_TLS)
    plan = ContainerdAdapter(tmp_path, MIRROR, [], version=(1, 7, 0)).plan()
    texts = {c.path: tomllib.loads(c.new.decode()) for c in plan.changes}
    reg = texts[f"{CERTS}/reg.internal:5000/hosts.toml"]
    assert reg["server"] == "https://reg.internal:5000"
    assert reg["ca"] == "/etc/pki/reg-ca.pem"
    assert reg["client"] == [["/etc/pki/node.pem", "/etc/pki/node.key"]]
    assert list(reg["host"]) == [MIRROR]
    lab = texts[f"{CERTS}/lab.internal/hosts.toml"]
    assert lab["skip_verify"] is True and "ca" not in lab
    assert f"{CERTS}/_default/hosts.toml" in texts
    assert any("moved the TLS settings" in n for n in plan.notes)
    # --registry for the host: the TLS goes with its fallback server.
    ups = [Upstream("reg.internal:5000", "https://reg.internal:5000"),
           Upstream("lab", "https://lab.internal")]
    plan = ContainerdAdapter(tmp_path, MIRROR, ups, version=(1, 6, 9)).plan()
    texts = {c.path: tomllib.loads(c.new.decode()) for c in plan.changes}
    assert texts[f"{CERTS}/reg.internal:5000/hosts.toml"]["ca"] == "/etc/pki/reg-ca.pem"
    assert texts[f"{CERTS}/lab/hosts.toml"]["skip_verify"] is True


def test_legacy_tls_for_a_registry_not_configured_is_refused(tmp_path: Path) -> None:
    write(tmp_path, CONFIG, LEGACY_TLS)
    before = snapshot(tmp_path)
    res = run(install, "--root", tmp_path, "--runtime", "containerd", "--no-restart",
              "--registry", "docker.io")
    assert res.exit_code == 2, res.output
    assert "TLS settings for lab.internal, reg.internal:5000" in res.output
    assert snapshot(tmp_path) == before


def test_legacy_tls_host_that_is_not_a_registry_name_is_refused(tmp_path: Path) -> None:
    write(tmp_path, CONFIG, 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry.'
                            'configs."../../../etc/x".tls]\n  insecure_skip_verify = true\n')
    with pytest.raises(InstallError, match=r"configs\.'\.\./\.\./\.\./etc/x'"):
        ContainerdAdapter(tmp_path, MIRROR, [], version=(1, 7, 0)).plan()


def test_legacy_tls_is_left_alone_when_config_path_was_already_set(tmp_path: Path) -> None:
    text = LEGACY_TLS.replace('version = 2\n', 'version = 2\n[plugins."io.containerd.grpc.v1.cri"'
                              '.registry]\n  config_path = "/etc/containerd/certs.d"\n')
    write(tmp_path, CONFIG, text)
    plan = ContainerdAdapter(tmp_path, MIRROR, [], version=(1, 7, 0)).plan()
    assert [c.path for c in plan.changes] == [f"{CERTS}/_default/hosts.toml"]


def test_merge_adds_tls_only_where_the_file_has_none(tmp_path: Path) -> None:
    tls = hosts.Tls(ca="/ca.pem", skip_verify=True)
    merged = tomllib.loads(hosts.merge(EXISTING_HOSTS, MIRROR, None, "h", server_tls=tls))
    assert merged["ca"] == "/ca.pem" and merged["skip_verify"] is True
    own = 'ca = "/theirs.pem"\n' + EXISTING_HOSTS
    merged = tomllib.loads(hosts.merge(own, MIRROR, None, "h", server_tls=tls))
    assert merged["ca"] == "/theirs.pem" and "skip_verify" not in merged


def test_merge_is_not_fooled_by_a_multiline_array(tmp_path: Path) -> None:
    text = 'server = "https://r.example"\nclient = [\n  ["/c.pem", "/k.pem"],\n]\n' \
        '[host."https://cache.example"]\n  capabilities = ["pull"]\n'
    doc = tomllib.loads(hosts.merge(text, MIRROR, None, "h"))
    assert list(doc["host"]) == [MIRROR, "https://cache.example"]
    assert doc["client"] == [["/c.pem", "/k.pem"]]


# -- restart only when config.toml changed ---------------------------------------------------


def test_hosts_toml_changes_alone_do_not_restart(tmp_path: Path, healthy: None) -> None:
    root = node(tmp_path)
    original = snapshot(root)
    log = tmp_path / "restarts"
    base = ("--root", root, "--runtime", "containerd", *restart_counting(log))
    res = run(install, *base, "--registry", "docker.io", "--registry", "internal.example:5000")
    assert res.exit_code == 0 and restarts(log) == ["containerd"], res.output
    res = run(install, *base, "--registry", "quay.io", "--registry", "internal.example:5000")
    assert res.exit_code == 0, res.output
    assert "no restart needed" in res.output and restarts(log) == ["containerd"]
    assert under(root, f"{CERTS}/quay.io/hosts.toml").is_file()
    res = run(uninstall, "--root", root, *restart_counting(log))
    assert res.exit_code == 0 and restarts(log) == ["containerd"] * 2, res.output
    assert snapshot(root) == original


def test_uninstall_of_hosts_toml_only_does_not_restart(tmp_path: Path, healthy: None) -> None:
    root = tmp_path / "host"
    write(root, CONFIG, CONFIG_V2.replace('config_path = ""', f'config_path = "{CERTS}"'))
    original = snapshot(root)
    log = tmp_path / "restarts"
    res = run(install, "--root", root, "--runtime", "containerd", *NEW_ENOUGH,
              *restart_counting(log))
    assert res.exit_code == 0 and restarts(log) == [], res.output
    journal = json.loads(under(root, f"{STATE_DIR}/journal.json").read_text())
    assert [f["restart"] for f in journal["files"]] == [False]
    res = run(uninstall, "--root", root, *restart_counting(log))
    assert res.exit_code == 0 and restarts(log) == [], res.output
    assert "no restart is needed" in res.output
    assert snapshot(root) == original
