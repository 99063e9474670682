"""Installer test helpers: sample node files, a host root, tree snapshots, the CLI runner."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from click.testing import CliRunner, Result

from lab.containerd import Containerd, pick_snapshotter, render_config
from p2p_mirror.installer.backup import STATE_DIR, under
from support import SUPPORT

MIRROR = "http://127.0.0.1:5004"
RESTART = SUPPORT / "installer_restart.py"
STATE = STATE_DIR.lstrip("/")  # snapshot(root, skip=STATE): all but the installer's state

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


def run(cmd, *args: str | Path) -> Result:
    return CliRunner().invoke(cmd, [str(a) for a in args], catch_exceptions=False)


def node_config(workdir: Path, socket: Path) -> str:
    """The lab's config minus the registry section, plus comments: a node's own config.toml."""
    text = render_config(
        root=workdir / "root", state=workdir / "state", socket=socket,
        certs_dir=workdir / "unused", snapshotter=pick_snapshotter(workdir),
        opt_dir=workdir / "opt",
    )
    text = text.replace(
        '    [plugins."io.containerd.grpc.v1.cri".registry]\n'
        f'      config_path = "{workdir / "unused"}"\n', ""
    )
    assert "registry" not in text
    return "# node config: keep this comment\n" + text.replace(
        "[metrics]", "# metrics stay off on this node\n[metrics]"
    )


@contextlib.contextmanager
def running_node(
    tmp_path: Path, make: Callable[[Path, Path, str], Containerd]
) -> Iterator[tuple[Path, Containerd]]:
    """A host root under ``tmp_path`` whose /etc/containerd/config.toml is the config of a
    running containerd; ``make(workdir, config_path, config_text)`` builds the daemon."""
    root = tmp_path / "host"
    config = under(root, "/etc/containerd/config.toml")
    config.parent.mkdir(parents=True)
    sockdir = Path(tempfile.mkdtemp(prefix="nodectd-", dir="/tmp"))  # short socket paths
    workdir = tmp_path / "ctd"
    workdir.mkdir()
    ctd = make(workdir, config, node_config(workdir, sockdir / "c.sock"))
    ctd.start()
    try:
        yield root, ctd
    finally:
        ctd.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
