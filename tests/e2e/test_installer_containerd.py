"""The installer against a real containerd 1.6 with its own root, state, socket and config.

The config.toml lives at ``<root>/etc/containerd/config.toml`` (``--root`` as the DaemonSet
uses it); the restart hook is the lab's ``restart_argv()`` (stop by PID, start, wait). Pulls
use ``ctr image pull --hosts-dir <root>/etc/containerd/certs.d`` of the original image name
``registry.example.test/library/demo:v1``; the name never resolves (``.test``), so only the
hosts.toml written by the installer can make the pull work, over loopback.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import SUPPORT, require_binaries, require_root, snapshot
from support.installer import STATE, node_config, running_node

from lab.containerd import Containerd
from lab.images import PushedImage
from lab.procs import Proc, free_port
from lab.registry import Registry
from p2p_mirror.cli.install import install, uninstall
from p2p_mirror.installer.backup import under
from p2p_mirror.installer.containerd import ContainerdAdapter

pytestmark = pytest.mark.integration

NAME = "registry.example.test"
RESTART = SUPPORT / "installer_restart.py"
CONFIG_PATH_LINE = 'config_path = "/etc/containerd/certs.d"'


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Path, Containerd]]:
    """A host root whose /etc/containerd/config.toml is the config of a running containerd."""
    require_root()
    require_binaries("containerd", "ctr")
    with running_node(tmp_path, lambda workdir, config, text: Containerd(
            workdir, config_toml=text, config_path=config)) as node:  # fmt: skip
        yield node


def cli(cmd, root: Path, ctd: Containerd, *args: str | Path, restart: list[str] | None = None):
    argv = ["--root", root, "--containerd-socket", ctd.socket,
            "--restart-command", shlex.join(restart or ctd.restart_argv()), *args]
    if cmd is install:
        argv += ["--runtime", "containerd"]
    return CliRunner().invoke(cmd, [str(a) for a in argv], catch_exceptions=False)


def pull(ctd: Containerd, root: Path, image: PushedImage, check: bool = True):
    ref = f"{NAME}/{image.name}"
    with_hosts = under(root, "/etc/containerd/certs.d")
    return ctd.pull(ref, hosts_dir=with_hosts, check=check, timeout=120)


def test_install_restart_pull_through_mirror_then_uninstall(
    node: tuple[Path, Containerd], registry: Registry, image: PushedImage
) -> None:
    root, ctd = node
    original = snapshot(root)
    assert CONFIG_PATH_LINE not in ctd.config_dump()
    # The registry plays the mirror and the fallback server is a dead port: the pull can
    # only succeed through the mirror host the installer wrote.
    args = ("--mirror", registry.url, "--registry", f"{NAME}=http://127.0.0.1:{free_port()}")
    res = cli(install, root, ctd, *args)
    assert res.exit_code == 0, res.output
    assert "containerd is healthy" in res.output
    assert CONFIG_PATH_LINE in ctd.config_dump()
    config = under(root, "/etc/containerd/config.toml").read_text()
    assert "# node config: keep this comment" in config
    pull(ctd, root, image)
    assert ctd.image_digest(f"{NAME}/{image.name}") == image.layout.manifest_digest
    again = cli(install, root, ctd, *args)
    assert again.exit_code == 0 and "nothing to change" in again.output
    res = cli(uninstall, root, ctd)
    assert res.exit_code == 0, res.output
    assert snapshot(root) == original
    assert CONFIG_PATH_LINE not in ctd.config_dump()
    assert ctd.ctr("version").returncode == 0


def test_dead_mirror_falls_back_to_the_server(
    node: tuple[Path, Containerd], registry: Registry, image: PushedImage
) -> None:
    root, ctd = node
    dead = f"http://127.0.0.1:{free_port()}"
    res = cli(install, root, ctd, "--mirror", dead, "--registry", f"{NAME}={registry.url}")
    assert res.exit_code == 0, res.output
    pull(ctd, root, image)  # the only live endpoint is the server
    assert ctd.image_digest(f"{NAME}/{image.name}") == image.layout.manifest_digest


def test_failing_restart_restores_files_and_the_running_config(
    node: tuple[Path, Containerd], registry: Registry, tmp_path: Path
) -> None:
    root, ctd = node
    original = snapshot(root)
    log = tmp_path / "restarts"
    restart = [sys.executable, str(RESTART), "fail-once", "containerd", "--log", str(log),
               "--marker", str(tmp_path / "failed"), "--", *ctd.restart_argv()]
    res = cli(install, root, ctd, "--registry", f"{NAME}={registry.url}", restart=restart)
    assert res.exit_code == 1, res.output
    assert "simulated restart failure" in res.output
    assert "the previous configuration is running again" in res.output
    assert snapshot(root, skip=STATE) == original
    assert ctd.ctr("version").returncode == 0
    assert CONFIG_PATH_LINE not in ctd.config_dump()
    assert len(log.read_text().splitlines()) == 2  # the change, the rollback
    # The DaemonSet starts the init container again: same inputs, so no restart at all.
    res = cli(install, root, ctd, "--registry", f"{NAME}={registry.url}", restart=restart)
    assert res.exit_code == 3 and "not retrying" in res.output, res.output
    assert len(log.read_text().splitlines()) == 2
    assert snapshot(root, skip=STATE) == original
    res = cli(uninstall, root, ctd)
    assert res.exit_code == 0, res.output
    assert snapshot(root) == original


def test_runtime_that_never_comes_back_restores_files(
    node: tuple[Path, Containerd], registry: Registry
) -> None:
    root, ctd = node
    original = snapshot(root)
    stop = [sys.executable, str(RESTART), "stop", "--pidfile", str(ctd.pidfile)]
    res = cli(install, root, ctd, "--registry", f"{NAME}={registry.url}",
              "--health-timeout", "3", restart=stop)
    assert res.exit_code == 1, res.output
    assert "did not become healthy" in res.output and "rolling back" in res.output
    assert snapshot(root, skip=STATE) == original


def test_health_check_sees_a_cri_plugin_that_failed_to_load(tmp_path: Path) -> None:
    """containerd keeps running when CRI rejects its config: the socket alone is not enough."""
    require_root()
    require_binaries("containerd", "ctr")
    sockdir = Path(tempfile.mkdtemp(prefix="ictd-", dir="/tmp"))
    workdir = tmp_path / "ctd"
    workdir.mkdir()
    text = node_config(workdir, sockdir / "c.sock") + (
        '[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/nonexistent"\n'
        '[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
        '  endpoint = ["https://mirror.invalid"]\n'
    )
    try:
        with Containerd(workdir, config_toml=text) as ctd:
            adapter = ContainerdAdapter(tmp_path, "http://127.0.0.1:5004", [],
                                        socket_path=ctd.socket)
            adapter.cri_was_ok = True
            assert "CRI plugin failed" in (adapter.health() or "")
            adapter.baseline()
            assert adapter.cri_was_ok is False and adapter.health() is None
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_pull_goes_through_the_running_agent_and_falls_back_when_it_stops(
    node: tuple[Path, Containerd], registry: Registry, image: PushedImage, tmp_path: Path
) -> None:
    root, ctd = node
    port = free_port()
    agent = Proc(
        [sys.executable, "-c", "from p2p_mirror.cli import main; main()", "agent",
         "--listen", f"127.0.0.1:{port}", "--bt-listen", f"127.0.0.1:{free_port()}",
         "--data-dir", str(tmp_path / "agent"), "--registry", f"{NAME}={registry.url}"],
        tmp_path / "agent.log",
    )
    try:
        agent.wait_ready(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status
            == 200, 30, "agent /healthz")
        res = cli(install, root, ctd, "--mirror", f"http://127.0.0.1:{port}",
                  "--registry", f"{NAME}={registry.url}")
        assert res.exit_code == 0, res.output
        mark = registry.mark()
        pull(ctd, root, image)
        assert ctd.image_digest(f"{NAME}/{image.name}") == image.layout.manifest_digest
        registry.settle()
        agents = {r.user_agent for r in registry.requests(since=mark)}
        assert agents and not any("containerd" in a for a in agents), agents  # all via agent
    finally:
        agent.stop()
    ctd.remove_image(f"{NAME}/{image.name}")
    mark = registry.mark()
    pull(ctd, root, image)  # agent down: containerd falls back to the server
    assert ctd.image_digest(f"{NAME}/{image.name}") == image.layout.manifest_digest
    registry.settle()
    assert any("containerd" in r.user_agent for r in registry.requests(since=mark))
