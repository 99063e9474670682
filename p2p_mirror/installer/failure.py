"""The record of an install that was rolled back, so the same install is not retried.

A DaemonSet's init container that exits non-zero is started again and again; each try would
restart the runtime twice (the change, the rollback). So a rolled-back install leaves
``<root>/var/lib/p2p-mirror/installer/failed.json``, keyed by the hash of the files it would
write; the next run with the same inputs stops before touching anything (exit code
``SKIPPED``). Changed inputs (another image, a fixed config) give another hash and are tried;
``--force`` retries anyway; a successful install or an uninstall removes the record.

The file is also the marker the node agent checks to stay idle, and what ``status`` shows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from p2p_mirror.installer.backup import STATE_DIR, atomic_write
from p2p_mirror.installer.base import Change
from p2p_mirror.installer.paths import under

FAILED = "failed.json"
FAILED_MARKER = f"{STATE_DIR}/{FAILED}"  # host path
SKIPPED = 3  # exit code: this exact install failed before and was not retried


@dataclass
class FailedInstall:
    """One rolled-back install: what it would have written (hash), when, and why it failed."""

    plan_hash: str
    error: str
    runtimes: list[str]
    files: list[str]
    at: float
    made_dirs: list[str] = field(default_factory=list)  # state dirs to remove on uninstall

    def summary(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.at))
        return (f"install of {', '.join(self.runtimes)} failed and was rolled back at {when}: "
                f"{self.error}")


def plan_hash(changes: list[Change]) -> str:
    """sha256 over every (path, new bytes) the install would write, in a fixed order."""
    h = hashlib.sha256()
    for c in sorted(changes, key=lambda c: c.path):
        h.update(c.path.encode() + b"\0" + str(len(c.new)).encode() + b"\0" + c.new)
    return h.hexdigest()


def marker(root: Path) -> Path:
    return under(root, FAILED_MARKER)


def read_failure(root: Path = Path("/")) -> FailedInstall | None:
    """The recorded failure under ``root``, None if there is none (or it cannot be read)."""
    try:
        raw = json.loads(marker(root).read_bytes())
        return FailedInstall(
            plan_hash=str(raw["plan_hash"]), error=str(raw["error"]),
            runtimes=[str(r) for r in raw["runtimes"]], files=[str(f) for f in raw["files"]],
            at=float(raw["at"]), made_dirs=[str(d) for d in raw.get("made_dirs", [])],
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError):
        # A damaged record still means an install failed here: keep the agent idle.
        return FailedInstall("", f"{marker(root)} is damaged", [], [], 0.0)


def record_failure(root: Path, changes: list[Change], runtimes: list[str], error: str,
                   made_dirs: list[str]) -> None:
    failed = FailedInstall(plan_hash(changes), error[-2000:], runtimes,
                           sorted(c.path for c in changes), time.time(), made_dirs)
    path = marker(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(asdict(failed), indent=2) + "\n").encode(), 0o644)


def clear_failure(root: Path) -> bool:
    with contextlib.suppress(FileNotFoundError):
        marker(root).unlink()
        return True
    return False


def status_line(root: Path = Path("/")) -> str | None:
    """One line for ``p2p-mirror status`` when an install failed on this node, else None."""
    failed = read_failure(root)
    if failed is None:
        return None
    return (f"installer: {failed.summary()}; the agent stays idle on this node. Fix the cause, "
            "then `p2p-mirror install --force` (or `p2p-mirror uninstall`)")
