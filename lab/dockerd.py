"""A private dockerd for the lab (Debian's docker.io, dockerd 20.10), started the way an
installed node would run it: its daemon.json, its systemd drop-in's environment, its certs.d.

dockerd reads ``/etc/docker/certs.d`` from a fixed path, so it runs in its own mount
namespace with the node root's ``etc/docker/certs.d`` bind-mounted there (on a tmpfs
``/etc/docker``): the real host's files are never touched, and every mount dockerd makes dies
with the namespace.
Paths are short (``/tmp/dk-*``): unix socket paths are limited to 108 bytes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from lab.procs import LabError, Proc


def drop_in_environment(text: str) -> dict[str, str]:
    """The ``Environment="K=V"`` settings of a systemd unit drop-in."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        m = re.fullmatch(r'\s*Environment=(.*)', line)
        if not m:
            continue
        for item in re.findall(r'"([^"]*)"|(\S+)', m.group(1)):
            key, sep, value = (item[0] or item[1]).partition("=")
            if sep:
                env[key] = value
    return env


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Dockerd:
    """``dockerd`` with its own data root, exec root and socket; ``node_root`` is a root the
    installer wrote into (its ``etc/docker`` becomes ``/etc/docker`` for this dockerd)."""

    def __init__(self, node_root: Path, env: dict[str, str] | None = None,
                 workdir: Path | None = None) -> None:
        self.node_root = node_root
        self.env = dict(env or {})
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))
        self.socket = self.dir / "d.sock"
        self.pidfile = self.dir / "pid"
        self.proc: Proc | None = None

    def restart_command(self) -> str:
        """What ``--restart-command`` runs for this dockerd: stop it, start it again with the
        node root's current daemon.json and drop-in, as ``systemctl restart docker`` would."""
        return shlex.join([sys.executable, "-m", "lab.dockerd", "restart",
                           str(self.node_root), str(self.dir)])

    @property
    def etc_docker(self) -> Path:
        return self.node_root / "etc" / "docker"

    def start(self, timeout: float = 60.0) -> Dockerd:
        self.spawn()
        try:
            self.proc.wait_ready(lambda: self.ping(), timeout,  # type: ignore[union-attr]
                                 f"dockerd on {self.socket}")
        except BaseException:
            self.stop()
            raise
        return self

    def spawn(self) -> Proc:
        """Start dockerd (in its own session, so it outlives a restart command)."""
        if shutil.which("dockerd") is None:
            raise LabError("dockerd not found (apt-get install docker.io)")
        daemon_json = self.etc_docker / "daemon.json"
        argv = [
            "dockerd", "--data-root", self.dir / "data", "--exec-root", self.dir / "x",
            "-H", f"unix://{self.socket}", "--storage-driver=vfs", "--iptables=false",
            "--bridge=none", "--pidfile", self.pidfile,
        ]  # fmt: skip
        if daemon_json.exists():
            argv += ["--config-file", daemon_json]
        # A tmpfs /etc/docker with the node's certs.d bound in: dockerd's own key.json lands
        # in the tmpfs, not in the node root the test compares byte for byte.
        script = ('mount -t tmpfs -o mode=0755 p2p-mirror-lab /etc/docker && '
                  'mkdir /etc/docker/certs.d && '
                  'if [ -d "$1" ]; then mount --bind "$1" /etc/docker/certs.d; fi && '
                  'shift && exec "$@"')
        # The proxy settings come from the drop-in only, never from the test's own environment.
        clean = {k: "" for k in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy",
                                 "http_proxy", "no_proxy", "ALL_PROXY", "all_proxy")}
        self.proc = Proc(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
             self.etc_docker / "certs.d", *argv],
            self.dir / "dockerd.log", env={**clean, **self.env},
        )
        return self.proc

    def api(self, method: str, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        conn = _Unix(self.socket, timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def ping(self) -> bool:
        try:
            return self.api("GET", "/_ping", 2)[0] == 200
        except OSError:
            return False

    def info(self) -> dict:
        return json.loads(self.api("GET", "/info")[1])

    def pull(self, ref: str, timeout: float = 300.0) -> None:
        """``docker pull ref`` through the API; raises LabError with dockerd's message."""
        name, _, tag = ref.rpartition(":")
        if "/" in tag or not name:
            name, tag = ref, "latest"
        query = urllib.parse.urlencode({"fromImage": name, "tag": tag})
        status, body = self.api("POST", f"/images/create?{query}", timeout)
        errors = [m.get("error") for m in _json_lines(body) if m.get("error")]
        if status != 200 or errors:
            raise LabError(f"docker pull {ref}: {status} {errors or body[-500:]!r}")

    def image_ids(self) -> list[str]:
        return [i["Id"] for i in json.loads(self.api("GET", "/images/json")[1])]

    def image(self, ref: str) -> dict | None:
        status, body = self.api("GET", f"/images/{urllib.parse.quote(ref, safe='')}/json")
        return json.loads(body) if status == 200 else None

    def remove_image(self, ref: str) -> None:
        self.api("DELETE", f"/images/{urllib.parse.quote(ref, safe='')}?force=1")

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc else ""

    def stop(self) -> None:
        """SIGTERM dockerd (it stops its containerd), kill leftovers by PID, remove the dir."""
        containerd_pid = self.dir / "x" / "containerd" / "containerd.pid"
        if self.proc is not None:
            self.proc.stop(timeout=20)
        self.kill_by_pidfile()  # a dockerd a restart command started
        if containerd_pid.exists():
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
                pid = int(containerd_pid.read_text().strip())
                if _is_process(pid, "containerd"):
                    os.kill(pid, signal.SIGKILL)
        # dockerd's mounts were made in its own namespace, gone with it; be sure anyway.
        data = self.dir / "data"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if data.exists() and str(data) in Path("/proc/self/mounts").read_text():
                subprocess.run(["umount", "-R", str(data)], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill_by_pidfile(self, timeout: float = 20.0) -> None:
        """SIGTERM the dockerd named in the pidfile and wait until it is gone."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if not _is_process(pid, "dockerd"):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _is_process(pid, "dockerd") and time.monotonic() < deadline:
            time.sleep(0.1)
        if _is_process(pid, "dockerd"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Dockerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_process(pid: int, name: str) -> bool:
    """Alive (not a zombie) and named ``name``."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return f"Name:\t{name}" in status and "\nState:\tZ" not in status


def _json_lines(body: bytes) -> list[dict]:
    out = []
    for line in body.splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict):
                out.append(item)
    return out


def dockerd_available() -> bool:
    return shutil.which("dockerd") is not None and shutil.which("unshare") is not None


def _restart(node_root: Path, workdir: Path) -> int:
    """``systemctl restart docker`` for a lab dockerd: stop it, start it with the node root's
    current drop-in environment; return at once (the installer's health check waits)."""
    drop_in = node_root / "etc/systemd/system/docker.service.d/p2p-mirror.conf"
    env = drop_in_environment(drop_in.read_text()) if drop_in.exists() else {}
    d = Dockerd(node_root, env, workdir)
    d.kill_by_pidfile()
    d.spawn()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "restart":
        raise SystemExit("usage: python -m lab.dockerd restart NODE_ROOT WORKDIR")
    raise SystemExit(_restart(Path(sys.argv[2]), Path(sys.argv[3])))

