"""Host paths under ``--root``, resolved as if ``--root`` were ``/``.

The installer may run in a pod with the node's filesystem at ``/host``: an absolute symlink
there (``/host/etc/containerd -> /etc/containerd``) means the node's ``/etc/containerd``,
i.e. ``/host/etc/containerd``, never the pod's own. ``..`` stops at the root, as it does at
``/``. So no path the installer reads or writes is ever outside ``--root``.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from p2p_mirror.installer.base import InstallError

MAX_LINKS = 40  # as the kernel's ELOOP limit


def under(root: Path, host_path: str | Path) -> Path:
    """``host_path`` as seen from the installer, every symlink resolved inside ``root``."""
    return _resolve(root, host_path, follow_last=True)


def under_nofollow(root: Path, host_path: str | Path) -> Path:
    """Like ``under`` but the last component stays as is (to see or replace a symlink)."""
    return _resolve(root, host_path, follow_last=False)


def _resolve(root: Path, host_path: str | Path, follow_last: bool) -> Path:
    todo = list(reversed(PurePosixPath("/", str(host_path)).parts[1:]))
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        if (todo or follow_last) and candidate.is_symlink():
            links += 1
            if links > MAX_LINKS:
                raise InstallError(f"{host_path}: too many levels of symbolic links under {root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            todo.extend(reversed(PurePosixPath(target).parts[1 if target.startswith("/") else 0:]))
            continue
        done.append(part)
    return root.joinpath(*done)


def read_text(root: Path, host_path: str) -> str | None:
    """A config file's text, None if it does not exist; bad input is an ``InstallError``."""
    path = under(root, host_path)
    if path.is_dir():
        raise InstallError(f"{host_path} is a directory; nothing was changed")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InstallError(f"{host_path}: cannot read it ({e.strerror or e}); "
                           "nothing was changed") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InstallError(
            f"{host_path}: not UTF-8 text (byte {e.start}); refusing to touch it "
            "(nothing was changed)"
        ) from None
