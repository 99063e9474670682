"""Which containerd a node runs: ``containerd --version``, else the daemon's own answer.

It decides the config schema for a node with no config.toml, ``use_local_image_pull`` (2.1+)
and whether ``certs.d/_default`` is read at all (1.6.17+ and 1.7+).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from p2p_mirror.installer.paths import under

DEFAULT_DIR_SINCE = (1, 6, 17)  # first release that reads certs.d/_default
Version = tuple[int, int, int]
_VERSION = re.compile(r"(?:^|\s)v?(\d+)\.(\d+)\.(\d+)")


def parse_version(text: str) -> Version | None:
    """(major, minor, patch) of the first ``X.Y.Z`` word (``containerd --version`` output)."""
    m = _VERSION.search(text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


BIN_DIRS = ("/usr/local/bin", "/usr/bin", "/bin", "/opt/bin")


def find_binary(root: Path, name: str) -> str | None:
    if root == Path("/"):
        return shutil.which(name)
    for d in BIN_DIRS:
        p = under(root, f"{d}/{name}")
        if p.is_file():
            return str(p)
    return None


def _version_argvs(root: Path) -> list[list[str]]:
    """Ways to run ``containerd --version``: in a pod, chroot into the host root first, as the
    host binary may need the host's libraries."""
    argvs = []
    if root != Path("/") and os.geteuid() == 0 and shutil.which("chroot"):
        for d in BIN_DIRS:
            if under(root, f"{d}/containerd").is_file():
                argvs.append(["chroot", str(root), f"{d}/containerd", "--version"])
                break
    exe = find_binary(root, "containerd")
    if exe is not None:
        argvs.append([exe, "--version"])
    return argvs


def binary_version(root: Path) -> Version | None:
    """From ``containerd --version`` (what runs after the restart), None if there is none."""
    for argv in _version_argvs(root):
        try:
            out = subprocess.run(argv, capture_output=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = parse_version(out.decode(errors="replace"))
        if version is not None:
            return version
    return None


def server_version(ctr_version_output: str) -> Version | None:
    """The daemon's version from ``ctr version`` (its ``Server:`` section)."""
    _, _, server = ctr_version_output.partition("Server:")
    m = re.search(r"Version:\s*(\S+)", server)
    return parse_version(" " + m.group(1)) if m else None
