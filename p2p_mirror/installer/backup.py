"""The state journal: every file the installer changed, with its original bytes.

Lives in ``<root>/var/lib/p2p-mirror/installer/``: ``journal.json`` and ``originals/<n>``,
each original with its record beside it (``originals/<n>.json``), so uninstall can still
restore every file if ``journal.json`` is damaged. Paths in the journal are host paths
(``/etc/...``), so the same journal works whether the installer ran on the host or in a pod
with the host mounted at ``/host``. The journal is written (and fsynced) *before* any runtime
file changes, so a crash never loses an original. A symlink is recorded as a symlink (its
target text) and comes back as one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from p2p_mirror.core.durable import fsync_path
from p2p_mirror.installer.base import InstallError
from p2p_mirror.installer.paths import under, under_nofollow

STATE_DIR = "/var/lib/p2p-mirror/installer"
JOURNAL = "journal.json"
ORIGINALS = "originals"
META = "meta.json"
FORMAT = 1

__all__ = ["STATE_DIR", "FileRecord", "Journal", "JournalError", "atomic_write", "make_dirs",
           "under", "under_nofollow"]


class JournalError(InstallError):
    """journal.json cannot be read; the message says what to do."""


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
    fsync_path(path.parent)


def symlink(path: Path, target: str) -> None:
    """Make ``path`` a symlink to ``target``, replacing what is there in one rename."""
    tmp = path.parent / f".{path.name}.p2p-link"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


@dataclass
class FileRecord:
    """One changed file: did it exist, where its original bytes are kept, its mode/owner.

    ``link`` is the target text of a file that was a symlink (we replaced the link, never
    wrote through it). ``restart``: changing it needs a runtime restart (config.toml does,
    hosts.toml does not).
    """

    path: str
    existed: bool
    backup: str | None = None
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str | None = None
    restart: bool = True

    @classmethod
    def from_json(cls, raw: Any) -> FileRecord:
        if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
            raise ValueError(f"not a file record: {raw!r:.200}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass
class JournalData:
    format: int = FORMAT
    runtimes: list[str] = field(default_factory=list)
    files: list[FileRecord] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # created by us, parents first
    state_dirs: list[str] = field(default_factory=list)  # our own state dirs we created
    containerd_config: str | None = None  # so uninstall finds the socket the same way


def _str_list(raw: dict[str, Any], key: str) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} is not a list of strings")
    return list(value)


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
        """Read journal.json; a damaged one is a ``JournalError`` that says what to do."""
        if not self.path.exists():
            return self
        try:
            raw = json.loads(self.path.read_bytes())
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            if raw.get("format") != FORMAT:
                raise ValueError(f"unknown journal format {raw.get('format')!r}")
            config = raw.get("containerd_config")
            if config is not None and not isinstance(config, str):
                raise ValueError("containerd_config is not a string")
            self.data = JournalData(
                format=FORMAT,
                runtimes=_str_list(raw, "runtimes"),
                files=[FileRecord.from_json(f) for f in raw.get("files", [])],
                dirs=_str_list(raw, "dirs"),
                state_dirs=_str_list(raw, "state_dirs"),
                containerd_config=config,
            )
        except (ValueError, TypeError, OSError) as e:
            raise JournalError(
                f"{self.path} is damaged ({e}). `p2p-mirror uninstall` restores the original "
                f"files from the per-file records in {self.dir / ORIGINALS}; nothing was changed"
            ) from None
        return self

    def recover(self) -> list[str]:
        """Rebuild the journal from ``originals/``: the per-file records and ``meta.json``
        (the directories we created, the runtimes), after journal.json was damaged.

        Returns what could not be recovered, to tell the user.
        """
        self.data = JournalData()
        problems: list[str] = []
        originals = self.dir / ORIGINALS
        with contextlib.suppress(OSError, ValueError, TypeError):
            meta = json.loads((originals / META).read_bytes())
            self.data.runtimes = _str_list(meta, "runtimes")
            self.data.dirs = _str_list(meta, "dirs")
            self.data.state_dirs = _str_list(meta, "state_dirs")
            if isinstance(meta.get("containerd_config"), str):
                self.data.containerd_config = meta["containerd_config"]
        for rec_path in sorted(originals.glob("[0-9]*.json")) if originals.is_dir() else []:
            try:
                rec = FileRecord.from_json(json.loads(rec_path.read_bytes()))
            except (ValueError, TypeError, OSError) as e:
                problems.append(f"{rec_path}: {e}")
                continue
            if rec.backup and not (self.dir / rec.backup).is_file():
                problems.append(f"{rec.path}: its original {self.dir / rec.backup} is missing")
                continue
            self.data.files.append(rec)
        return problems

    def snapshot(self) -> JournalData:
        """A copy to go back to if this run is rolled back."""
        return copy.deepcopy(self.data)

    def known(self, host_path: str) -> FileRecord | None:
        return next((f for f in self.data.files if f.path == host_path), None)

    def ensure_state_dir(self) -> None:
        """Create the state dirs (remembering which we made, so uninstall removes them)."""
        made = make_dirs(self.root, STATE_DIR)
        for d in made:
            if d not in self.data.state_dirs:
                self.data.state_dirs.append(d)
        (self.dir / ORIGINALS).mkdir(mode=0o700, exist_ok=True)

    def keep_original(self, host_path: str, restart: bool = True) -> FileRecord:
        """Keep a file's current bytes (or symlink) in ``originals/`` and journal it."""
        rec = self.known(host_path)
        if rec is not None:
            rec.restart = rec.restart or restart
            return rec
        name = f"{ORIGINALS}/{len(self.data.files):04d}"
        rec = record_of(self.root, host_path)
        rec.restart = restart
        if rec.existed and rec.link is None:
            rec.backup = name
            atomic_write(self.dir / name, under_nofollow(self.root, host_path).read_bytes(), 0o600)
        atomic_write(self.dir / f"{name}.json", json.dumps(asdict(rec)).encode(), 0o600)
        self.data.files.append(rec)
        return rec

    def original_bytes(self, rec: FileRecord) -> bytes | None:
        return (self.dir / rec.backup).read_bytes() if rec.backup else None

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(asdict(self.data), indent=2, sort_keys=True) + "\n"
        atomic_write(self.path, text.encode(), 0o600)
        if (self.dir / ORIGINALS).is_dir():  # all but the file list, for recover()
            meta = {k: v for k, v in asdict(self.data).items() if k != "files"}
            atomic_write(self.dir / ORIGINALS / META, json.dumps(meta).encode(), 0o600)

    def discard(self) -> None:
        """Delete the journal, kept originals, and the state dirs we created (if empty)."""
        shutil.rmtree(self.dir / ORIGINALS, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for d in sorted(self.data.state_dirs, key=len, reverse=True):
            with contextlib.suppress(OSError):
                under(self.root, d).rmdir()


def record_of(root: Path, host_path: str) -> FileRecord:
    """What is at ``host_path`` now: nothing, a symlink (its target), or a file (mode, owner)."""
    path = under_nofollow(root, host_path)
    if path.is_symlink():
        return FileRecord(host_path, True, link=os.readlink(path))
    if not path.exists():
        return FileRecord(host_path, False)
    if not path.is_file():
        raise InstallError(f"{host_path} is not a regular file; nothing was changed")
    st = path.stat()
    return FileRecord(host_path, True, None, st.st_mode & 0o7777, st.st_uid, st.st_gid)


def restore(root: Path, rec: FileRecord, original: bytes | None) -> bool:
    """Put back what ``rec`` recorded; returns whether anything had to change."""
    target = under_nofollow(root, rec.path)
    if rec.link is not None:
        if target.is_symlink() and os.readlink(target) == rec.link:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        symlink(target, rec.link)
        return True
    if not rec.existed:
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        return True
    assert original is not None
    if not target.is_symlink() and target.is_file() and target.read_bytes() == original:
        st = target.stat()
        if st.st_mode & 0o7777 == rec.mode:
            return False
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, original, rec.mode, (rec.uid, rec.gid))
    return True


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
