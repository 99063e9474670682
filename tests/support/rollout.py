"""Test helpers for the roll-out tests: a real containerd under a fake host root, and a fake
``systemctl`` that asks the test to restart it (this machine has no systemd).

Why a watcher instead of restarting from the fake ``systemctl`` itself: the DaemonSet's restart
command runs through ``nsenter -t 1`` inside a private PID namespace, where the containerd the
test started is not visible; the test, outside, restarts it and then lets ``systemctl`` return.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

SAMPLE_CONTAINERD_CONFIG = """\
version = 2
# The node's own containerd config: every byte of it must survive install and uninstall.
root = "/var/lib/containerd"
state = "/run/containerd"
oom_score = -999

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = true
"""

FAKE_SYSTEMCTL = """\
#!/bin/sh
# Stands in for the host's systemctl: logs the call, asks the test to act, waits for it.
echo "$*" >> "$P2P_TEST_SYSTEMD_DIR/calls"
echo "$*" > "$P2P_TEST_SYSTEMD_DIR/request.tmp"
mv "$P2P_TEST_SYSTEMD_DIR/request.tmp" "$P2P_TEST_SYSTEMD_DIR/request"
i=0
while [ -e "$P2P_TEST_SYSTEMD_DIR/request" ]; do
  i=$((i + 1))
  [ "$i" -gt 600 ] && { echo "fake systemctl: nobody answered" >&2; exit 1; }
  sleep 0.05
done
exit "$(cat "$P2P_TEST_SYSTEMD_DIR/result")"
"""


def need(tool: str) -> str:
    """Path of ``tool``; a missing tool skips the test locally but fails it in CI."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (CI must install it)")
        pytest.skip(f"{tool} is not installed")
    return path


def short_tmpdir(prefix: str) -> Path:
    """A short path: containerd's socket path must fit in 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def make_host_root(root: Path) -> None:
    """A node's filesystem as the installer and the playbook expect to find it."""
    for d in ("etc/containerd", "etc/systemd/system", "opt", "var/lib", "run/containerd"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/containerd/config.toml").write_text(SAMPLE_CONTAINERD_CONFIG)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` but run/ (sockets): file bytes, None for directories."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel == "run" or rel.startswith("run/"):
            continue
        out[rel] = None if p.is_dir() and not p.is_symlink() else p.read_bytes()
    return out


class HostContainerd:
    """A real containerd whose config is the fake host's config.toml, restartable on request.

    Its socket is where the installer looks for it: ROOT + the config's grpc.address.
    """

    def __init__(self, root: Path, workdir: Path) -> None:
        self.root = root
        self.workdir = workdir
        self.bin_dir = workdir / "bin"
        self.systemd_dir = workdir / "systemd"
        self.socket = root / "run/containerd/containerd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._log = None

    @property
    def systemctl(self) -> Path:
        return self.bin_dir / "systemctl"

    def env(self) -> dict[str, str]:
        """Environment under which ``systemctl`` is the fake one."""
        return dict(
            os.environ,
            PATH=f"{self.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            P2P_TEST_SYSTEMD_DIR=str(self.systemd_dir),
        )

    def calls(self) -> list[str]:
        path = self.systemd_dir / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def __enter__(self) -> HostContainerd:
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        self.systemd_dir.mkdir(parents=True, exist_ok=True)
        self.systemctl.write_text(FAKE_SYSTEMCTL)
        self.systemctl.chmod(0o755)
        self._log = open(self.workdir / "containerd.log", "ab")  # noqa: SIM115
        self._start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._terminate()
        if self._log is not None:
            self._log.close()

    def _start(self) -> None:
        argv = [
            "containerd",
            "--config", str(self.root / "etc/containerd/config.toml"),
            "--address", str(self.socket),
            "--root", str(self.workdir / "containerd-root"),
            "--state", str(self.workdir / "containerd-state"),
        ]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}: "
                                   f"see {self.workdir / 'containerd.log'}")
            ok = subprocess.run(["ctr", "-a", str(self.socket), "version"],
                                capture_output=True, timeout=10)
            if ok.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("containerd did not answer on its socket")

    def answers(self) -> bool:
        proc = subprocess.run(["ctr", "-a", str(self.socket), "version"],
                              capture_output=True, timeout=10)
        return proc.returncode == 0

    def _terminate(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def _watch(self) -> None:
        request = self.systemd_dir / "request"
        while not self._stop.is_set():
            if not request.exists():
                time.sleep(0.05)
                continue
            words = request.read_text().split()
            result = "0"
            if words[:1] == ["restart"] and words[1:2] == ["containerd"]:
                try:
                    self._terminate()
                    self._start()
                    self.restarts.append("containerd")
                except Exception:  # the installer must then see a failed restart
                    result = "1"
            else:
                result = "1"
            (self.systemd_dir / "result").write_text(result)
            with contextlib.suppress(FileNotFoundError):
                request.unlink()
