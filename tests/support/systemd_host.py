"""A Debian host with a real systemd, booted in a systemd-nspawn container, for ansible tests.

The rootfs comes from Debian's packages (mmdebstrap) and is cached under /var/tmp as a tarball
keyed by suite, variant and package list, so only the first run downloads. Ansible reaches the
booted container through ``nsenter`` on its PID 1 (connection plugin in ``ansible_plugins``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "containerd")
CACHE_DIR = Path("/var/tmp")
PLUGINS = Path(__file__).resolve().parent / "ansible_plugins"


def rootfs_tarball() -> Path:
    """The cached rootfs tarball, built with mmdebstrap when missing (about a minute)."""
    key = hashlib.sha256(f"{SUITE} {VARIANT} {','.join(sorted(PACKAGES))}".encode()).hexdigest()
    tarball = CACHE_DIR / f"p2p-mirror-rootfs-{SUITE}-{key[:12]}.tar"
    if tarball.exists():
        return tarball
    partial = tarball.with_suffix(f".{os.getpid()}.partial.tar")
    try:
        subprocess.run(
            ["mmdebstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}", SUITE,
             str(partial)],
            check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=900,
        )
        partial.replace(tarball)
    finally:
        partial.unlink(missing_ok=True)
    return tarball


class SystemdHost:
    """A booted Debian host: the rootfs unpacked under ``root``, systemd as its PID 1.

    ``--private-network``: the host has loopback only, so nothing can reach a package index.
    Stopped (by PID) and its rootfs deleted on exit, whatever happened.
    """

    def __init__(self, tarball: Path, root: Path) -> None:
        self.tarball = tarball
        self.root = root
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None
        self._log = root.parent / "nspawn.log"

    def __enter__(self) -> SystemdHost:
        try:
            self.root.mkdir(parents=True)
            subprocess.run(["tar", "-C", str(self.root), "-xf", str(self.tarball)], check=True,
                           timeout=300)
            self.boot()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def boot(self, timeout: float = 90.0) -> None:
        with open(self._log, "ab") as log:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--boot", "-D", str(self.root), "--register=no",
                 "--keep-unit", "--private-network", "--quiet"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.nspawn.returncode}: "
                                   f"{self._log.read_text(errors='replace')[-2000:]}")
            if self.init_pid is None:
                self.init_pid = _first_child(self.nspawn.pid)
            if self.init_pid is not None:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.3)
        raise RuntimeError("the container's systemd did not finish booting")

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container (every namespace of its PID 1)."""
        assert self.init_pid is not None
        proc = subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-a", "--", "/usr/bin/env", "-i",
             "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *argv],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} exited with {proc.returncode}: {proc.stderr}")
        return proc

    def unit_property(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "--value", "-p", prop, unit).stdout.strip()

    def http_status(self, url: str) -> int:
        """The status of GET ``url`` from inside the container (0: no answer)."""
        code = ("import sys, urllib.request\n"
                "try:\n"
                "    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)\n"
                "except Exception:\n"
                "    print(0)\n")
        return int(self.run("python3", "-c", code, url).stdout.strip() or 0)

    def stop(self) -> None:
        """Power the container off (SIGTERM to nspawn), or kill its PID 1 if it hangs."""
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        self.nspawn.send_signal(signal.SIGTERM)
        try:
            self.nspawn.wait(timeout=20)
        except subprocess.TimeoutExpired:
            if self.init_pid is not None:  # SIGKILL to a PID namespace's init ends all of it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
            self.nspawn.kill()
            self.nspawn.wait(timeout=10)


def _first_child(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            if children:
                return int(children[0])
    return None


def snapshot_paths(root: Path, paths: tuple[str, ...]) -> dict[str, bytes | None]:
    """Bytes of every file under each of ``paths`` (None for directories; absent: missing)."""
    out: dict[str, bytes | None] = {}
    for rel in paths:
        top = root / rel
        for p in [top, *sorted(top.rglob("*"))] if top.is_dir() else [top]:
            if p.is_symlink() or p.is_file():
                out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else None
            elif p.is_dir():
                out[str(p.relative_to(root))] = None
    return out


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A work directory on disk (not tmpfs: the rootfs and virtualenv are hundreds of MB)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=CACHE_DIR))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
