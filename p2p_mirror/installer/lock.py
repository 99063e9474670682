"""One installer at a time per host: an exclusive ``flock`` on the state directory."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path


class LockBusy(RuntimeError):
    """Another installer holds the lock and did not release it in time."""


class DirLock:
    """``flock`` the directory itself (no lock file to clean up, so uninstall can rmdir it).

    If the directory is removed and recreated while we wait (an uninstall finished), the lock
    we got is on a dead inode: check and retry, the classic lock-file race.
    """

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout
        self.fd: int | None = None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() > deadline:
                            raise LockBusy(
                                f"another p2p-mirror installer is running (lock {self.path})"
                            ) from None
                        time.sleep(0.1)
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self.fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            self.path.mkdir(parents=True, exist_ok=True)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
