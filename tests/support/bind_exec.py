"""Run a command in its own mount namespace, with one directory bind-mounted over another.

``bind_exec.py SRC DST -- CMD ARGS...``: CMD sees SRC at DST; no other process does, and the
mount goes away with the namespace. The end-to-end tests use it to start a containerd that
sees a fake host root's ``/etc/containerd`` at the real path, as a node's containerd sees the
files the installer (in a pod, with the host at ``--root``) wrote.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    src, dst, command = argv[0], argv[1], argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.unshare(CLONE_NEWNS), "unshare")
    # Private first, so the bind mount never propagates back to the machine's namespace.
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    _check(libc.mount(src.encode(), dst.encode(), None, MS_BIND, None), f"bind {src} {dst}")
    os.execvp(command[0], command)
    return 127


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
