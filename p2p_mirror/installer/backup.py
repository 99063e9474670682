"""The state journal: every file the installer changed, with its original bytes.

Lives in ``<root>/var/lib/p2p-mirror/installer/``: ``journal.json`` and ``originals/<n>``.
Paths in the journal are host paths (``/etc/...``), so the same journal works whether the
installer ran on the host or in a pod with the host mounted at ``/host``. The journal is
written (and fsynced) *before* any runtime file changes, so a crash never loses an original.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_DIR = "/var/lib/p2p-mirror/installer"
JOURNAL = "journal.json"
FORMAT = 1


def under(root: Path, host_path: str | Path) -> Path:
    """``host_path`` as seen from the installer: ``/etc/x`` under ``--root /host``."""
    return root / str(host_path).lstrip("/")


def atomic_write(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] | None = None):
    """Write via a temp file in the same directory and rename, so readers never see half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if owner is not None:
            with contextlib.suppress(PermissionError):
                os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class FileRecord:
    """One changed file: did it exist, where its original bytes are kept, its mode/owner."""

    path: str
    existed: bool
    backup: str | None = None
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass
class JournalData:
    format: int = FORMAT
    runtimes: list[str] = field(default_factory=list)
    files: list[FileRecord] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # created by us, parents first
    state_dirs: list[str] = field(default_factory=list)  # our own state dirs we created
    containerd_config: str | None = None  # so uninstall finds the socket the same way


class Journal:
    """Load, extend and save the journal under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = under(root, STATE_DIR)
        self.path = self.dir / JOURNAL
        self.data = JournalData()

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> Journal:
        if self.path.exists():
            raw = json.loads(self.path.read_text())
            if raw.get("format") != FORMAT:
                raise ValueError(f"{self.path}: unknown journal format {raw.get('format')!r}")
            self.data = JournalData(
                format=FORMAT,
                runtimes=list(raw.get("runtimes", [])),
                files=[FileRecord(**f) for f in raw.get("files", [])],
                dirs=list(raw.get("dirs", [])),
                state_dirs=list(raw.get("state_dirs", [])),
                containerd_config=raw.get("containerd_config"),
            )
        return self

    def snapshot(self) -> JournalData:
        """A copy to go back to if this run is rolled back."""
        return copy.deepcopy(self.data)

    def record(self, rec: FileRecord) -> None:
        self.data.files.append(rec)

    def known(self, host_path: str) -> FileRecord | None:
        return next((f for f in self.data.files if f.path == host_path), None)

    def ensure_state_dir(self) -> None:
        """Create the state dirs (remembering which we made, so uninstall removes them)."""
        made = make_dirs(self.root, STATE_DIR)
        for d in made:
            if d not in self.data.state_dirs:
                self.data.state_dirs.append(d)
        (self.dir / "originals").mkdir(mode=0o700, exist_ok=True)

    def keep_original(self, host_path: str) -> FileRecord:
        """Copy a file's current bytes into ``originals/`` and journal it (if not yet)."""
        rec = self.known(host_path)
        if rec is not None:
            return rec
        target = under(self.root, host_path)
        if target.exists():
            st = target.stat()
            name = f"originals/{len(self.data.files):04d}"
            atomic_write(self.dir / name, target.read_bytes(), 0o600)
            rec = FileRecord(host_path, True, name, st.st_mode & 0o7777, st.st_uid, st.st_gid)
        else:
            rec = FileRecord(host_path, False)
        self.record(rec)
        return rec

    def original_bytes(self, rec: FileRecord) -> bytes | None:
        return (self.dir / rec.backup).read_bytes() if rec.backup else None

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(asdict(self.data), indent=2, sort_keys=True) + "\n"
        atomic_write(self.path, text.encode(), 0o600)

    def discard(self) -> None:
        """Delete the journal, kept originals, and the state dirs we created (if empty)."""
        shutil.rmtree(self.dir / "originals", ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for d in sorted(self.data.state_dirs, key=len, reverse=True):
            with contextlib.suppress(OSError):
                under(self.root, d).rmdir()


def make_dirs(root: Path, host_dir: str | Path) -> list[str]:
    """``mkdir -p`` under root; returns the host paths of the dirs it created, parents first."""
    created: list[str] = []
    parts = Path(str(host_dir)).parts[1:]
    current = Path("/")
    for part in parts:
        current = current / part
        target = under(root, current)
        if target.is_dir():
            continue
        try:
            target.mkdir(mode=0o755)
        except FileExistsError:
            if not target.is_dir():
                raise
            continue
        created.append(str(current))
    return created
