"""Install and uninstall: plan, journal, write, restart, check, and roll back on failure.

Exit codes: 0 done (or nothing to do), 1 rolled back, 2 refused (bad input; nothing changed),
3 not retried (this exact install was rolled back before; ``--force`` retries it).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from p2p_mirror.core.config import Upstream
from p2p_mirror.installer import containerd, dockerd
from p2p_mirror.installer.backup import (
    STATE_DIR,
    FileRecord,
    Journal,
    JournalError,
    atomic_write,
    make_dirs,
    record_of,
    restore,
    under,
)
from p2p_mirror.installer.base import Change, InstallError, Plan, Runtime
from p2p_mirror.installer.failure import (
    SKIPPED,
    clear_failure,
    plan_hash,
    read_failure,
    record_failure,
)
from p2p_mirror.installer.lock import DirLock
from p2p_mirror.installer.paths import under_nofollow
from p2p_mirror.installer.restart import Restarter, RestartError, wait_healthy

Out = Callable[[str], None]
ROLLED_BACK = 1
REFUSED = 2
__all__ = ["ROLLED_BACK", "REFUSED", "SKIPPED", "Options", "dry_run", "install", "uninstall"]


@dataclass
class Options:
    """Everything the CLI passes in; paths are host paths, applied under ``root``."""

    root: Path = Path("/")
    runtime: str = "auto"
    mirror: str = "http://127.0.0.1:5004"
    registries: list[Upstream] = field(default_factory=list)
    restart_command: str | None = None
    restart: bool = True
    health_timeout: float = 60.0
    containerd_config: str = containerd.DEFAULT_CONFIG
    containerd_socket: Path | None = None
    docker_socket: Path | None = None
    containerd_version: tuple[int, int, int] | None = None
    lock_timeout: float = 60.0
    proxy: str = dockerd.DEFAULT_PROXY
    no_proxy: list[str] = field(default_factory=list)
    agent_data_dir: str = dockerd.DEFAULT_AGENT_DATA_DIR
    ca_cert: Path | None = None
    agent_owner: tuple[int, int] | None = None
    allow_dockerd_restart: bool = False
    force: bool = False


def make_runtime(name: str, opts: Options) -> Runtime:
    if name == "containerd":
        return containerd.ContainerdAdapter(
            opts.root, opts.mirror, opts.registries, opts.containerd_config,
            opts.containerd_socket, opts.containerd_version,
        )
    if name == "dockerd":
        return dockerd.DockerdAdapter(
            opts.root, opts.mirror, opts.docker_socket, [r.name for r in opts.registries],
            proxy=opts.proxy, no_proxy=opts.no_proxy, agent_data_dir=opts.agent_data_dir,
            ca_cert=opts.ca_cert, agent_owner=opts.agent_owner,
            guard_restart=opts.restart and not opts.allow_dockerd_restart,
        )
    raise InstallError(f"unknown runtime {name!r}")


def select_runtimes(opts: Options) -> list[Runtime]:
    """``auto``: every runtime found under the root (containerd first)."""
    if opts.runtime != "auto":
        return [make_runtime(opts.runtime, opts)]
    names = [n for n, mod in (("containerd", containerd), ("dockerd", dockerd))
             if mod.present(opts.root)]
    if not names:
        raise InstallError(
            f"no container runtime found under {opts.root} (looked for containerd and dockerd); "
            "pass --runtime"
        )
    return [make_runtime(n, opts) for n in names]


def _current(root: Path, host_path: str) -> bytes | None:
    """The bytes at ``host_path`` now (through a symlink inside the root), None if absent."""
    p = under(root, host_path)
    if p.is_dir():
        raise InstallError(f"{host_path} is a directory; nothing was changed")
    try:
        return p.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InstallError(f"{host_path}: cannot read it ({e.strerror or e}); "
                           "nothing was changed") from None


def diff(root: Path, change: Change) -> str:
    old = _current(root, change.path)
    if change.secret:
        src = f"a{change.path}" if old is not None else "/dev/null"
        return f"--- {src}\n+++ b{change.path}\n(a private key, {len(change.new)} bytes, not shown)"
    a = (old or b"").decode(errors="replace").splitlines(keepends=True)
    b = change.new.decode(errors="replace").splitlines(keepends=True)
    src = f"a{change.path}" if old is not None else "/dev/null"
    return "".join(difflib.unified_diff(a, b, src, f"b{change.path}"))


def _plan_all(runtimes: list[Runtime], root: Path) -> list[tuple[Runtime, Plan]]:
    plans = []
    for rt in runtimes:
        plan = rt.plan()
        plan.changes = [c for c in plan.changes if _current(root, c.path) != c.new]
        for c in plan.changes:
            record_of(root, c.path)  # refuses a directory or a device before anything changes
        plans.append((rt, plan))
    return plans


def install(opts: Options, out: Out) -> int:
    """Point the runtime(s) at the mirror. Returns the exit code (see the module doc)."""
    runtimes = select_runtimes(opts)
    journal = Journal(opts.root)
    made_state = make_dirs(opts.root, STATE_DIR)
    try:
        with DirLock(journal.dir, opts.lock_timeout):
            journal.load()
            plans = _plan_all(runtimes, opts.root)
            for _, plan in plans:
                for note in plan.notes:
                    out(note)
            changes = [c for _, plan in plans for c in plan.changes]
            failed = read_failure(opts.root)
            if not changes:
                if failed is not None and clear_failure(opts.root):
                    out("cleared the record of an earlier failed install")
                out("already installed: nothing to change")
                return 0
            if failed is not None and failed.plan_hash == plan_hash(changes):
                if not opts.force:
                    out(f"error: not retrying: {failed.summary()}")
                    out("fix the cause, then run again with --force (or `p2p-mirror "
                        "uninstall`, which clears this record); nothing was changed")
                    return SKIPPED
                out("--force: retrying an install that failed before")
            if opts.restart:
                for refusal in _restart_refusals(plans):
                    raise InstallError(refusal)
            made = [*(failed.made_dirs if failed else []), *made_state]
            for d in made:  # ours to remove on uninstall, even if an earlier run made them
                if d not in journal.data.state_dirs:
                    journal.data.state_dirs.append(d)
            return _apply(opts, journal, plans, out, made)
    finally:
        if not journal.exists() and read_failure(opts.root) is None:
            _remove_dirs(opts.root, made_state)  # refused or nothing to do: leave no trace


def dry_run(opts: Options, out: Out) -> int:
    """Print the unified diff ``install`` would apply; change nothing (not even the state dir)."""
    plans = _plan_all(select_runtimes(opts), opts.root)
    for _, plan in plans:
        for note in plan.notes:
            out(note)
    changes = [c for _, plan in plans for c in plan.changes]
    if opts.restart:
        for refusal in _restart_refusals(plans):
            out(f"install would refuse: {refusal}")
    for c in changes:
        out(diff(opts.root, c).rstrip("\n"))
    out(f"dry run: {len(changes)} file(s) would change" if changes else
        "dry run: already installed, nothing would change")
    return 0


def _restart_refusals(plans: list[tuple[Runtime, Plan]]) -> list[str]:
    """Why restarting a runtime that would change is unsafe (dockerd without live-restore)."""
    found = []
    for rt, plan in plans:
        needs_restart = any(c.restart for c in plan.changes)
        refusal = getattr(rt, "restart_refusal", lambda: None)() if needs_restart else None
        if refusal:
            found.append(refusal)
    return found


def _original(root: Path, host_path: str) -> tuple[FileRecord, bytes | None]:
    rec = record_of(root, host_path)
    data = None
    if rec.existed and rec.link is None:
        data = under_nofollow(root, host_path).read_bytes()
    return rec, data


def _apply(opts: Options, journal: Journal, plans: list[tuple[Runtime, Plan]], out: Out,
           made_state: list[str]) -> int:
    root = opts.root
    before = journal.snapshot()
    changes = [c for _, plan in plans for c in plan.changes]
    prior = {c.path: _original(root, c.path) for c in changes}
    affected = [rt for rt, plan in plans if plan.changes]
    to_restart = [rt for rt, plan in plans if any(c.restart for c in plan.changes)]
    journal.ensure_state_dir()
    for c in changes:
        journal.keep_original(c.path, c.restart)
    new_dirs = _missing_dirs(root, [str(Path(c.path).parent) for c in changes])
    journal.data.dirs.extend(d for d in new_dirs if d not in journal.data.dirs)
    for rt in affected:
        if rt.name not in journal.data.runtimes:
            journal.data.runtimes.append(rt.name)
        if rt.name == "containerd":
            journal.data.containerd_config = opts.containerd_config
    journal.save()
    if opts.restart:
        for rt in to_restart:
            with contextlib.suppress(Exception):
                rt.baseline()
    for d in new_dirs:
        with contextlib.suppress(FileExistsError):
            under(root, d).mkdir(mode=0o755)
    for c in changes:
        rec, _ = prior[c.path]
        keep = rec.existed and rec.link is None
        mode = c.mode if c.mode is not None else (rec.mode if keep else 0o644)
        owner = c.owner or ((rec.uid, rec.gid) if keep else None)
        atomic_write(under_nofollow(root, c.path), c.new, mode, owner)
        out(f"wrote {c.path}" + (f" (it was a symlink to {rec.link})" if rec.link else ""))
    if not to_restart:
        clear_failure(root)
        out("no restart needed: containerd reads hosts.toml on every pull")
        out("installed: pulls now go through " + opts.mirror)
        return 0
    if not opts.restart:
        clear_failure(root)
        out("--no-restart: restart " + ", ".join(rt.unit for rt in to_restart) +
            " yourself for the change to take effect")
        return 0
    try:
        _restart_all(opts, to_restart, out)
    except RestartError as e:
        out(f"error: {e}")
        out("rolling back: restoring the previous files")
        for c in changes:
            restore(root, *prior[c.path])
        _remove_dirs(root, new_dirs)
        journal.data = before
        if journal.data.files:
            journal.save()
        else:
            journal.discard()
        try:
            _restart_all(opts, to_restart, out)
            out("rolled back: the previous configuration is running again")
        except RestartError as e2:
            out(f"error: after the rollback: {e2}")
        record_failure(root, changes, [rt.name for rt in to_restart], str(e), made_state)
        out(f"recorded the failure in {under(root, STATE_DIR)}: the same install will not be "
            "retried (exit code 3) until its inputs change or it is run with --force")
        return ROLLED_BACK
    clear_failure(root)
    out("installed: pulls now go through " + opts.mirror)
    return 0


def _runtimes_of(files: list[FileRecord]) -> list[str]:
    """Which runtimes a damaged journal's files belong to (daemon.json is dockerd's)."""
    names = []
    if any(f.path != dockerd.DAEMON_JSON for f in files):
        names.append("containerd")
    if any(f.path == dockerd.DAEMON_JSON for f in files):
        names.append("dockerd")
    return names


def uninstall(opts: Options, out: Out) -> int:
    """Restore every file byte for byte, remove what install added, restart if needed."""
    journal = Journal(opts.root)
    if not journal.dir.is_dir():
        out("not installed: nothing to uninstall")
        return 0
    with DirLock(journal.dir, opts.lock_timeout):
        failed = read_failure(opts.root)
        recovered = False
        try:
            journal.load()
        except JournalError:
            problems = journal.recover()
            if problems or not journal.data.files:
                raise JournalError(
                    f"{journal.path} is damaged, and the per-file records cannot restore "
                    f"everything ({'; '.join(problems) or 'there are none'}). Nothing was "
                    f"changed. Each {journal.dir}/originals/NNNN.json names a file and NNNN "
                    "holds its original bytes: copy those back by hand, then delete "
                    f"{journal.dir}"
                ) from None
            out(f"warning: {journal.path} is damaged; restoring from the per-file records")
            if not journal.data.runtimes:
                journal.data.runtimes = _runtimes_of(journal.data.files)
            if not journal.data.state_dirs:
                journal.data.state_dirs = [STATE_DIR]
            recovered = True
        if failed is not None and clear_failure(opts.root):
            out("cleared the record of a failed install")
            _remove_dirs(opts.root, failed.made_dirs)
        if not journal.exists() and not recovered:
            out("not installed: nothing to uninstall")
            return 0
        if opts.restart and any(rec.restart for rec in journal.data.files):
            for name in journal.data.runtimes:  # refuse before any file changes, not after
                refusal = getattr(make_runtime(name, opts), "restart_refusal", lambda: None)()
                if refusal:
                    raise InstallError(refusal)
        for rec in reversed(journal.data.files):
            if restore(opts.root, rec, journal.original_bytes(rec)):
                out(f"{'removed' if not rec.existed else 'restored'} {rec.path}")
        for d in _remove_dirs(opts.root, journal.data.dirs):
            out(f"kept {d}: it is not empty")
        needs_restart = any(rec.restart for rec in journal.data.files)
        names = list(journal.data.runtimes)
        if journal.data.containerd_config:
            opts.containerd_config = journal.data.containerd_config
        journal.discard()
    if not needs_restart:
        out("uninstalled: only hosts.toml files changed, so no restart is needed")
        return 0
    if not opts.restart:
        out("--no-restart: restart the runtime yourself for the change to take effect")
        return 0
    runtimes = [make_runtime(n, opts) for n in names]
    try:
        _restart_all(opts, runtimes, out)
    except RestartError as e:
        out(f"error: the original files are back, but {e}")
        return ROLLED_BACK
    out("uninstalled: the original configuration is running again")
    return 0


def _restart_all(opts: Options, runtimes: list[Runtime], out: Out) -> None:
    restarter = Restarter(opts.restart_command, opts.health_timeout)
    for rt in runtimes:
        refusal = getattr(rt, "restart_refusal", lambda: None)()
        if refusal:
            raise RestartError(refusal)
        if getattr(rt, "reload_systemd", False) and opts.restart_command is None:
            out("reloading systemd units: systemctl daemon-reload")
            Restarter("systemctl daemon-reload", opts.health_timeout).restart(rt.unit)
        out(f"restarting {rt.unit}: {' '.join(restarter.argv(rt.unit))}")
        restarter.restart(rt.unit)
        wait_healthy(rt.health, opts.health_timeout, rt.name)
        out(f"{rt.name} is healthy")


def _missing_dirs(root: Path, host_dirs: list[str]) -> list[str]:
    """Dirs (host paths) that do not exist yet, parents first, no duplicates."""
    out: list[str] = []
    for d in host_dirs:
        current = Path("/")
        for part in Path(d).parts[1:]:
            current = current / part
            s = str(current)
            if s not in out and not under(root, s).is_dir():
                out.append(s)
    return out


def _remove_dirs(root: Path, host_dirs: list[str]) -> list[str]:
    """rmdir the given dirs, deepest first; returns those left because they are not empty."""
    kept = []
    for d in sorted(host_dirs, key=lambda s: s.count("/"), reverse=True):
        try:
            under(root, d).rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            kept.append(d)
    return kept


