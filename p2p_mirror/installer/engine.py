"""Install and uninstall: plan, journal, write, restart, check, and roll back on failure."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from p2p_mirror.core.config import Upstream
from p2p_mirror.installer import containerd, dockerd
from p2p_mirror.installer.backup import STATE_DIR, Journal, atomic_write, make_dirs, under
from p2p_mirror.installer.base import Change, InstallError, Plan, Runtime
from p2p_mirror.installer.lock import DirLock
from p2p_mirror.installer.restart import Restarter, RestartError, wait_healthy

Out = Callable[[str], None]


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
    containerd_version: tuple[int, int] | None = None
    lock_timeout: float = 60.0
    proxy: str = dockerd.DEFAULT_PROXY
    no_proxy: list[str] = field(default_factory=list)
    agent_data_dir: str = dockerd.DEFAULT_AGENT_DATA_DIR
    ca_cert: Path | None = None
    agent_owner: tuple[int, int] | None = None
    allow_dockerd_restart: bool = False


def make_runtime(name: str, opts: Options) -> Runtime:
    if name == "containerd":
        return containerd.Containerd(
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
    p = under(root, host_path)
    return p.read_bytes() if p.exists() else None


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
        plans.append((rt, plan))
    return plans


def install(opts: Options, out: Out) -> int:
    """Point the runtime(s) at the mirror. Returns the exit code (0 ok, 1 rolled back)."""
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
            if not any(plan.changes for _, plan in plans):
                out("already installed: nothing to change")
                return 0
            if opts.restart:
                for refusal in _restart_refusals(plans):
                    raise InstallError(refusal)
            for d in made_state:
                if d not in journal.data.state_dirs:
                    journal.data.state_dirs.append(d)
            return _apply(opts, journal, plans, out)
    finally:
        if not journal.exists():  # refused, nothing to do, or rolled back: leave no trace
            _remove_dirs(opts.root, made_state)


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
        refusal = getattr(rt, "restart_refusal", lambda: None)() if plan.changes else None
        if refusal:
            found.append(refusal)
    return found


def _apply(opts: Options, journal: Journal, plans: list[tuple[Runtime, Plan]], out: Out) -> int:
    root = opts.root
    before = journal.snapshot()
    changes = [c for _, plan in plans for c in plan.changes]
    prior = {c.path: _stat_bytes(root, c.path) for c in changes}
    affected = [rt for rt, plan in plans if plan.changes]
    journal.ensure_state_dir()
    for c in changes:
        journal.keep_original(c.path)
    new_dirs = _missing_dirs(root, [str(Path(c.path).parent) for c in changes])
    journal.data.dirs.extend(d for d in new_dirs if d not in journal.data.dirs)
    for rt in affected:
        if rt.name not in journal.data.runtimes:
            journal.data.runtimes.append(rt.name)
        if rt.name == "containerd":
            journal.data.containerd_config = opts.containerd_config
    journal.save()
    if opts.restart:
        for rt in affected:
            with contextlib.suppress(Exception):
                rt.baseline()
    for d in new_dirs:
        with contextlib.suppress(FileExistsError):
            under(root, d).mkdir(mode=0o755)
    for c in changes:
        old = prior[c.path]
        mode = c.mode if c.mode is not None else (old[1] if old else 0o644)
        atomic_write(under(root, c.path), c.new, mode, c.owner or (old[2] if old else None))
        out(f"wrote {c.path}")
    if not opts.restart:
        out("--no-restart: restart " + ", ".join(rt.unit for rt in affected) +
            " yourself for the change to take effect")
        return 0
    try:
        _restart_all(opts, affected, out)
    except RestartError as e:
        out(f"error: {e}")
        out("rolling back: restoring the previous files")
        for c in changes:
            _restore(root, c.path, prior[c.path])
        _remove_dirs(root, new_dirs)
        journal.data = before
        if journal.data.files:
            journal.save()
        else:
            journal.discard()
        try:
            _restart_all(opts, affected, out)
            out("rolled back: the previous configuration is running again")
        except RestartError as e2:
            out(f"error: after the rollback: {e2}")
        return 1
    out("installed: pulls now go through " + opts.mirror)
    return 0


def uninstall(opts: Options, out: Out) -> int:
    """Restore every file byte for byte, remove what install added, restart."""
    journal = Journal(opts.root)
    if not journal.dir.is_dir():
        out("not installed: nothing to uninstall")
        return 0
    with DirLock(journal.dir, opts.lock_timeout):
        journal.load()
        if not journal.exists():
            out("not installed: nothing to uninstall")
            return 0
        if opts.restart:  # refuse before any file changes, not after
            for name in journal.data.runtimes:
                refusal = getattr(make_runtime(name, opts), "restart_refusal", lambda: None)()
                if refusal:
                    raise InstallError(refusal)
        for rec in reversed(journal.data.files):
            original = journal.original_bytes(rec)
            target = under(opts.root, rec.path)
            if original is None:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
                    out(f"removed {rec.path}")
            elif not target.exists() or target.read_bytes() != original:
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(target, original, rec.mode, (rec.uid, rec.gid))
                out(f"restored {rec.path}")
        for d in _remove_dirs(opts.root, journal.data.dirs):
            out(f"kept {d}: it is not empty")
        names = list(journal.data.runtimes)
        if journal.data.containerd_config:
            opts.containerd_config = journal.data.containerd_config
        journal.discard()
    if not opts.restart:
        out("--no-restart: restart the runtime yourself for the change to take effect")
        return 0
    runtimes = [make_runtime(n, opts) for n in names]
    try:
        _restart_all(opts, runtimes, out)
    except RestartError as e:
        out(f"error: the original files are back, but {e}")
        return 1
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


def _stat_bytes(root: Path, host_path: str) -> tuple[bytes, int, tuple[int, int]] | None:
    p = under(root, host_path)
    if not p.exists():
        return None
    st = p.stat()
    return p.read_bytes(), st.st_mode & 0o7777, (st.st_uid, st.st_gid)


def _restore(root: Path, host_path: str, old: tuple[bytes, int, tuple[int, int]] | None) -> None:
    target = under(root, host_path)
    if old is None:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
    else:
        atomic_write(target, old[0], old[1], old[2])


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


