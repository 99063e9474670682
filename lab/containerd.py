"""A private containerd daemon for the lab: its own root, state, socket and config.toml.

It never touches the machine's own containerd (``/run/containerd``, ``/var/lib/containerd``):
every path lives under ``workdir`` (the socket under a short dir, as unix socket paths are
limited to 108 bytes). The config has ``version = 2`` and the CRI ``registry.config_path`` so
the installer can edit it like a node's ``/etc/containerd/config.toml`` and restart us.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from lab.procs import LabError, Proc, lab_python, netns_prefix, wait_for
from p2p_mirror.installer import hosts as hosts_toml

CONTAINERD_BIN = "containerd"
CTR_BIN = "ctr"
SOCKET_MAX = 100  # sun_path is 108 bytes; keep room for containerd's ".ttrpc" suffix
_SNAPSHOTTER_CACHE: dict[str, str] = {}


def overlay_works(probe_dir: Path) -> bool:
    """Can this kernel/FS mount overlayfs here? (Not on every CI filesystem.)"""
    base = Path(tempfile.mkdtemp(prefix="ovl-", dir=probe_dir))
    dirs = {name: base / name for name in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir()
    (dirs["lower"] / "f").write_text("x")
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    try:
        mount = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])],
            capture_output=True,
            timeout=10,
        )
        if mount.returncode != 0:
            return False
        ok = (dirs["merged"] / "f").read_text() == "x"
        subprocess.run(["umount", str(dirs["merged"])], capture_output=True, timeout=10)
        return ok
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(base, ignore_errors=True)


def pick_snapshotter(probe_dir: Path) -> str:
    """``overlayfs`` where it mounts, else ``native`` (copies, slower, works anywhere)."""
    key = str(probe_dir)
    if key not in _SNAPSHOTTER_CACHE:
        _SNAPSHOTTER_CACHE[key] = "overlayfs" if overlay_works(probe_dir) else "native"
    return _SNAPSHOTTER_CACHE[key]


def _short_socket_dir(workdir: Path) -> Path:
    """``workdir`` if a socket path there fits, else a short dir derived from it."""
    if len(str(workdir / "containerd.sock")) <= SOCKET_MAX:
        return workdir
    tag = hashlib.sha256(str(workdir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ctd-{tag}"


def render_config(
    root: Path,
    state: Path,
    socket: Path,
    certs_dir: Path,
    snapshotter: str,
    opt_dir: Path,
) -> str:
    """A minimal containerd 1.6 config (version 2) with every path private to this daemon."""
    return f"""\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "{snapshotter}"
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{certs_dir}"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{opt_dir}"
"""


def write_hosts_toml(
    certs_dir: Path,
    registry: str,
    server: str | None,
    hosts: Sequence[str] = (),
    capabilities: Sequence[str] = ("pull", "resolve"),
    skip_verify: bool = False,
) -> Path:
    """Write ``certs_dir/<registry>/hosts.toml`` (``_default`` for any registry).

    ``hosts`` are tried in order before ``server``; an ``http://`` URL needs no
    ``--plain-http``. For lab tests; the installer writes the node's own files.
    """
    tls = hosts_toml.Tls(skip_verify=skip_verify)
    text = hosts_toml.render(
        server, [hosts_toml.Host(h, tuple(capabilities), tls=tls) for h in hosts]
    )
    path = Path(certs_dir) / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _grpc_address(config_text: str) -> str | None:
    """The ``[grpc] address`` of a config, without needing a TOML parser on 3.10."""
    section = re.search(r"^\[grpc\]\s*$(.*?)(?=^\[|\Z)", config_text, re.M | re.S)
    if not section:
        return None
    m = re.search(r'^\s*address\s*=\s*"([^"]*)"', section.group(1), re.M)
    return m.group(1) if m else None


class Containerd:
    """A second containerd daemon, started via ``Proc`` (in ``netns`` through nsenter)."""

    def __init__(
        self,
        workdir: Path,
        netns: str | None = None,
        config_toml: str | None = None,
        *,
        namespace: str = "default",
        snapshotter: str | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.netns = netns
        self.namespace = namespace
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.certs_dir = self.workdir / "certs.d"
        self.config_path = Path(config_path) if config_path else self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.pidfile = self.workdir / "containerd.pid"
        self.snapshotter = snapshotter or pick_snapshotter(self.workdir)
        self._socket_dir = _short_socket_dir(self.workdir)
        self._own_socket_dir = self._socket_dir != self.workdir
        if config_toml is None:
            config_toml = render_config(
                root=self.root,
                state=self.state,
                socket=self._socket_dir / "containerd.sock",
                certs_dir=self.certs_dir,
                snapshotter=self.snapshotter,
                opt_dir=self.workdir / "opt",
            )
        address = _grpc_address(config_toml)
        self.socket = Path(address) if address else self._socket_dir / "containerd.sock"
        if len(str(self.socket)) > SOCKET_MAX:
            raise LabError(f"containerd socket path too long ({len(str(self.socket))} bytes)")
        self._initial_config = config_toml
        self.proc: Proc | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def argv(self) -> list[str]:
        return [CONTAINERD_BIN, "--config", str(self.config_path)]

    def start(self, timeout: float = 30.0) -> Containerd:
        """Start the daemon; the config file is written once and then left to its editors."""
        if shutil.which(CONTAINERD_BIN) is None or shutil.which(CTR_BIN) is None:
            raise LabError("containerd/ctr not found (apt-get install containerd)")
        if self.proc is not None and self.proc.alive():
            return self
        for d in (self.root, self.state, self.certs_dir, self.socket.parent):
            d.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            self.config_path.parent.mkdir(parents=True, exist_ok=True)
            self.config_path.write_text(self._initial_config)
        self._stop_adopted()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.proc = Proc(self.argv(), self.log_path, self.netns)
        self.pidfile.write_text(f"{self.proc.pid}\n")
        try:
            self.proc.wait_ready(self._answers, timeout, f"containerd on {self.socket}")
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        return self.ctr("version", check=False, timeout=5).returncode == 0

    def _stop_adopted(self) -> None:
        """Stop a daemon that ``restart_argv()`` started outside this object (by its PID)."""
        pid = _pid_from(self.pidfile, self.config_path)
        if pid is None or (self.proc is not None and pid == self.proc.pid):
            return
        _kill_and_wait(pid)

    def stop(self) -> None:
        """Stop our daemon (and one a restart command started), by PID; unmount leftovers."""
        if self.proc is not None:
            self.proc.stop()
        self._stop_adopted()
        self._unmount_under(self.workdir)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with contextlib.suppress(FileNotFoundError):
            Path(f"{self.socket}.ttrpc").unlink()
        if self._own_socket_dir:
            with contextlib.suppress(OSError):
                self._socket_dir.rmdir()

    def restart(self, timeout: float = 30.0) -> Containerd:
        """Stop and start again, re-reading ``config_path`` (as after an installer edit)."""
        self.stop()
        self.proc = None
        return self.start(timeout)

    def restart_argv(self) -> list[str]:
        """A command that restarts this daemon from outside (for the installer's restart hook).

        It stops the PID in the pidfile and starts a fresh daemon; ``stop()`` later stops that
        one by the PID it wrote.
        """
        _become_subreaper()
        return [
            *lab_python(),
            "lab.containerd",
            "restart",
            "--workdir",
            str(self.workdir),
            "--config",
            str(self.config_path),
            "--socket",
            str(self.socket),
            *(["--netns", self.netns] if self.netns else []),
        ]

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _unmount_under(base: Path) -> None:
        """Unmount anything a failed ``read_file`` left mounted below ``base``."""
        try:
            mounts = Path("/proc/self/mounts").read_text().splitlines()
        except OSError:
            return
        targets = [line.split()[1] for line in mounts if len(line.split()) > 1]
        for target in sorted(targets, key=len, reverse=True):
            if target.startswith(str(base) + "/"):
                subprocess.run(["umount", "-l", target], capture_output=True, timeout=10)

    # -- ctr -------------------------------------------------------------------------------

    def ctr_argv(self, *args: str, debug: bool = False) -> list[str]:
        """argv of ``ctr [--debug] -a SOCK -n NS ARGS``, in our netns (ctr itself does the
        fetching)."""
        flags = ["--debug"] if debug else []
        return [*netns_prefix(self.netns), CTR_BIN, *flags, "-a", str(self.socket),
                "-n", self.namespace, *args]  # fmt: skip

    def pull_args(self, ref: str, hosts_dir: Path | None = None, user: str | None = None
                  ) -> list[str]:
        """ctr arguments of ``pull`` (for wrapping, e.g. under strace)."""
        args = ["image", "pull", "--snapshotter", self.snapshotter]
        args += ["--hosts-dir", str(hosts_dir or self.certs_dir)]
        if user is not None:
            args += ["--user", user]
        return [*args, ref]

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120.0, debug: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr [--debug] -a SOCK -n NS ARGS`` (in the netns too, so pulls use its network)."""
        argv = self.ctr_argv(*args, debug=debug)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise LabError(
                f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr.strip()}"
            )
        return proc

    def pull(
        self,
        ref: str,
        hosts_dir: Path | None = None,
        user: str | None = None,
        timeout: float = 300.0,
        check: bool = True,
        extra: Sequence[str] = (),
        progress: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr image pull --hosts-dir DIR REF`` (unpacks into our snapshotter).

        ``user`` is ``"name:password"``. No ``--plain-http``: an ``http://`` host in
        hosts.toml is enough. ``progress=False`` pulls like a kubelet, without ctr's progress
        bars: they ask containerd for every download's status ten times a second, and ctr
        shows none only with ``--debug`` (which also logs to stderr). On one machine, many
        nodes polling at once take CPU from the transfers they time (measured, 16 MiB on 8
        nodes: containerd 2.7 -> 2.1 s of CPU, the ctr processes 1.6 -> 1.0 s).
        """
        args = self.pull_args(ref, hosts_dir, user)
        return self.ctr(*args[:-1], *extra, ref, check=check, timeout=timeout,
                        debug=not progress)  # fmt: skip

    def images(self) -> dict[str, str]:
        """``{ref: manifest digest}`` for images in our namespace."""
        out = self.ctr("image", "ls").stdout.splitlines()
        result: dict[str, str] = {}
        for line in out[1:]:
            cols = line.split()
            if len(cols) >= 3:
                result[cols[0]] = cols[2]
        return result

    def image_digest(self, ref: str) -> str:
        digest = self.images().get(ref)
        if digest is None:
            raise LabError(f"image {ref} not in containerd namespace {self.namespace}")
        return digest

    def content_digests(self) -> set[str]:
        """Digests of every blob in the content store (what a pull fetched)."""
        out = self.ctr("content", "ls", "-q").stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    def read_file(self, ref: str, path: str) -> bytes:
        """Read ``path`` from the image's unpacked rootfs (``ctr image mount``)."""
        target = Path(tempfile.mkdtemp(prefix="mnt-", dir=self.workdir))
        try:
            self.ctr("image", "mount", "--snapshotter", self.snapshotter, ref, str(target))
            try:
                return (target / path.lstrip("/")).read_bytes()
            finally:
                self.ctr("image", "unmount", "--rm", str(target), check=False)
        finally:
            with contextlib.suppress(OSError):
                target.rmdir()

    def remove_image(self, ref: str, timeout: float = 60.0) -> None:
        """Remove the image, its blobs and snapshots, so a new pull really refetches.

        ``image rm --sync`` waits for the garbage collector; content still left (leases, a
        shared blob) is removed explicitly and the store is checked empty of it.
        """
        digests: set[str] = set()
        with contextlib.suppress(LabError):
            digests = self._image_blobs(ref)
        self.ctr("image", "rm", "--sync", ref, check=False)
        leftover = digests & self.content_digests()
        if leftover:
            self.ctr("content", "rm", *sorted(leftover), check=False)
        wait_for(
            lambda: not (digests & self.content_digests()),
            timeout,
            f"content of {ref} to be removed",
        )

    def _image_blobs(self, ref: str) -> set[str]:
        """Manifest, config and layer digests of ``ref`` (from its manifest in the store)."""
        import json

        digest = self.image_digest(ref)
        manifest = json.loads(self.ctr("content", "get", digest).stdout)
        blobs = {digest}
        if "manifests" in manifest:  # an index: keep only what we have locally
            blobs |= {m["digest"] for m in manifest["manifests"]}
            return blobs & self.content_digests()
        blobs.add(manifest["config"]["digest"])
        blobs |= {layer["digest"] for layer in manifest.get("layers", [])}
        return blobs

    def config_dump(self) -> str:
        """``containerd --config PATH config dump``: the effective, merged configuration."""
        proc = subprocess.run(
            [CONTAINERD_BIN, "--config", str(self.config_path), "config", "dump"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise LabError(f"containerd config dump failed: {proc.stderr.strip()}")
        return proc.stdout


def _pid_from(pidfile: Path, config_path: Path) -> int | None:
    """The PID in ``pidfile`` if it is still a containerd running ``config_path``."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if str(config_path).encode() in cmdline and any(b"containerd" in a for a in cmdline):
        return pid
    return None


def _become_subreaper() -> None:
    """Adopt orphans: a daemon started by a restart command is reaped by us, not left a zombie
    under a PID 1 that never reaps (as in this sandbox)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _gone(pid: int) -> bool:
    """Exited; reaped if it is our child (a zombie whose parent is not us counts as exited).

    The state is read before reaping: a child that dies between a non-blocking ``waitpid``
    and the read would otherwise be seen as a zombie and left unreaped.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    if "\nState:\tZ" not in status:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # a zombie: returns at once
    return True


def _kill_and_wait(pid: int, timeout: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _gone(pid):
                return
            time.sleep(0.05)


def _restart_main(argv: Sequence[str] | None = None) -> int:
    """``python -m lab.containerd restart ...``: what the installer hook runs."""
    parser = argparse.ArgumentParser(prog="lab.containerd")
    parser.add_argument("action", choices=["restart"])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--netns", default=None)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    pidfile = args.workdir / "containerd.pid"
    pid = _pid_from(pidfile, args.config)
    if pid is not None:
        _kill_and_wait(pid)
    with contextlib.suppress(FileNotFoundError):
        args.socket.unlink()
    log = open(args.workdir / "containerd.log", "ab")  # noqa: SIM115 - handed to the child
    child = subprocess.Popen(
        [*netns_prefix(args.netns), CONTAINERD_BIN, "--config", str(args.config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    pidfile.write_text(f"{child.pid}\n")

    def ready() -> bool:
        if child.poll() is not None:
            raise LabError(f"containerd exited with {child.returncode}")
        check = subprocess.run(
            [CTR_BIN, "-a", str(args.socket), "version"], capture_output=True, timeout=5
        )
        return check.returncode == 0

    try:
        wait_for(ready, args.timeout, f"containerd on {args.socket}")
    except LabError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_restart_main())
