"""containerd: CRI ``registry.config_path`` in config.toml, plus one hosts.toml per registry.

Schemas (picked from the config's ``version``; with no config file, from ``containerd
--version``):

* version 1 (no ``version`` key): ``[plugins.cri.registry]``
* version 2 (containerd 1.x, also read by 2.x): ``[plugins."io.containerd.grpc.v1.cri".registry]``
* version 3 (containerd 2.x): ``[plugins."io.containerd.cri.v1.images".registry]`` and, from 2.1,
  ``use_local_image_pull = true`` so the CRI pull honours hosts.toml.

If ``config_path`` already names a directory, we write our hosts.toml files there instead of
changing it (the first one, if it is a ``:``-separated list): the user's layout wins.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from p2p_mirror.core.config import Upstream
from p2p_mirror.installer import hosts
from p2p_mirror.installer.backup import under
from p2p_mirror.installer.base import Change as FileChange
from p2p_mirror.installer.base import InstallError, Plan
from p2p_mirror.installer.tomledit import Key, TomlEditError, get_path, parse, set_key

DEFAULT_CONFIG = "/etc/containerd/config.toml"
DEFAULT_CERTS = "/etc/containerd/certs.d"
DEFAULT_SOCKET = "/run/containerd/containerd.sock"
SCHEMA_TABLES: dict[int, Key] = {
    1: ("plugins", "cri", "registry"),
    2: ("plugins", "io.containerd.grpc.v1.cri", "registry"),
    3: ("plugins", "io.containerd.cri.v1.images", "registry"),
}
IMAGES_PLUGIN: Key = ("plugins", "io.containerd.cri.v1.images")
CRI_PLUGIN_IDS = ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images")


def _find_binary(root: Path, name: str) -> str | None:
    if root == Path("/"):
        return shutil.which(name)
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        p = under(root, f"{d}/{name}")
        if p.exists():
            return str(p)
    return None


def binary_version(root: Path) -> tuple[int, int] | None:
    """(major, minor) from ``containerd --version``, or None if there is none to ask."""
    exe = _find_binary(root, "containerd")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, timeout=10).stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\s v?(\d+)\.(\d+)\.\d+", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def present(root: Path) -> bool:
    """Whether containerd looks installed under ``root`` (for ``--runtime auto``)."""
    marks = ("/etc/containerd", DEFAULT_SOCKET, "/usr/bin/containerd", "/usr/local/bin/containerd")
    return any(under(root, m).exists() for m in marks)


class Containerd:
    """The containerd adapter: plans edits, checks health through ``ctr`` or the socket."""

    name = "containerd"
    unit = "containerd"

    def __init__(
        self,
        root: Path,
        mirror: str,
        registries: list[Upstream],
        config: str = DEFAULT_CONFIG,
        socket_path: Path | None = None,
        version: tuple[int, int] | None = None,
    ) -> None:
        self.root = root
        self.mirror = mirror
        self.registries = registries
        self.config = config
        self.socket_path = socket_path
        self.version = version if version is not None else binary_version(root)
        self.cri_was_ok: bool | None = None

    # -- planning ---------------------------------------------------------------------------

    def _read_config(self) -> tuple[str, dict[str, Any]]:
        path = under(self.root, self.config)
        text = path.read_text() if path.exists() else ""
        try:
            return text, parse(text, str(path))
        except TomlEditError as e:
            raise InstallError(f"{e}; refusing to touch it (nothing was changed)") from None

    def schema(self, text: str, doc: dict[str, Any]) -> int:
        if "version" in doc:
            v = doc["version"]
            if v not in SCHEMA_TABLES:
                raise InstallError(f"{self.config}: unsupported config version {v!r}")
            return int(v)
        if not text.strip():
            return 3 if self.version is not None and self.version >= (2, 0) else 2
        return 1

    def plan(self) -> Plan:
        plan = Plan()
        text, doc = self._read_config()
        original = text
        schema = self.schema(text, doc)
        table = SCHEMA_TABLES[schema]
        where = f"{self.config}"
        if not text.strip():
            text = f"version = {schema}\n"
            doc = {"version": schema}
        mirrors = get_path(doc, (*table, "mirrors"))
        if mirrors:
            raise InstallError(
                f"{where}: {'.'.join(table)}.mirrors is set, and containerd refuses `mirrors` "
                "together with `config_path` (the CRI plugin would fail to load). Move those "
                "mirrors to certs.d/<registry>/hosts.toml first; nothing was changed."
            )
        current = get_path(doc, (*table, "config_path"))
        certs = DEFAULT_CERTS
        try:
            if isinstance(current, str) and current.strip():
                certs = current.split(":")[0]
                if certs != DEFAULT_CERTS:
                    plan.notes.append(
                        f"containerd: config_path is already {current!r}; writing hosts.toml "
                        f"files under {certs}"
                    )
                new_text = text
            else:
                new_text = set_key(text, table, "config_path", certs, where)
            if schema == 3 and self.version != (2, 0):
                new_text = set_key(new_text, IMAGES_PLUGIN, "use_local_image_pull", True, where)
        except TomlEditError as e:
            raise InstallError(f"{e} (nothing was changed)") from None
        if new_text != original:
            plan.changes.append(FileChange(self.config, new_text.encode()))
        plan.changes.extend(self._hosts_changes(certs, plan))
        return plan

    def _hosts_changes(self, certs: str, plan: Plan) -> list[FileChange]:
        targets: dict[str, str | None] = {}
        if self.registries:
            for up in self.registries:
                targets[up.name] = up.url
        else:
            targets[hosts.DEFAULT_DIR] = None
            certs_dir = under(self.root, certs)
            if certs_dir.is_dir():
                for d in sorted(certs_dir.iterdir()):
                    if not d.is_dir() or d.name == hosts.DEFAULT_DIR:
                        continue
                    if (d / "hosts.toml").exists():
                        targets[d.name] = None
                    else:
                        plan.notes.append(
                            f"containerd: {certs}/{d.name} has no hosts.toml, so containerd "
                            f"ignores _default for {d.name}: its pulls bypass the mirror"
                        )
        out: list[FileChange] = []
        for name, server in targets.items():
            host_path = f"{certs.rstrip('/')}/{name}/hosts.toml"
            path = under(self.root, host_path)
            try:
                if path.exists():
                    old = path.read_text()
                    new = hosts.merge(old, self.mirror, server, str(path))
                    if new == old:
                        continue
                    plan.notes.append(
                        f"containerd: merged the mirror into existing {host_path} (their hosts "
                        "kept after ours; the original is kept for uninstall)"
                    )
                else:
                    new = hosts.render_new(self.mirror, server)
            except TomlEditError as e:
                raise InstallError(f"{e}; nothing was changed") from None
            out.append(FileChange(host_path, new.encode()))
        return out

    # -- health -----------------------------------------------------------------------------

    def socket(self) -> Path:
        if self.socket_path is not None:
            return self.socket_path
        with contextlib.suppress(InstallError):
            _, doc = self._read_config()
            addr = get_path(doc, ("grpc", "address"))
            if isinstance(addr, str) and addr:
                return under(self.root, addr)
        return under(self.root, DEFAULT_SOCKET)

    def _ctr(self, *args: str) -> subprocess.CompletedProcess[bytes] | None:
        exe = shutil.which("ctr") or _find_binary(self.root, "ctr")
        if exe is None:
            return None
        return subprocess.run(
            [exe, "-a", str(self.socket()), *args], capture_output=True, timeout=10
        )

    def _cri_status(self) -> str | None:
        """The CRI plugin's status from ``ctr plugins ls`` (ok, error, skip), None if unknown."""
        if _socket_answers(self.socket()) is not None:
            return None
        try:
            proc = self._ctr("plugins", "ls")
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc is None or proc.returncode != 0:
            return None
        for line in proc.stdout.decode(errors="replace").splitlines():
            cols = line.split()
            if len(cols) >= 4 and f"{cols[0]}.{cols[1]}" in CRI_PLUGIN_IDS:
                return cols[-1]
        return None

    def baseline(self) -> None:
        self.cri_was_ok = self._cri_status() == "ok"

    def health(self) -> str | None:
        sock = self.socket()
        refused = _socket_answers(sock)  # fast: ctr would keep redialling a dead socket
        if refused is not None:
            return refused
        try:
            proc = self._ctr("version")
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"ctr version: {e}"
        if proc is None:
            return None
        if proc.returncode != 0:
            return f"{sock} does not answer: {proc.stderr.decode(errors='replace').strip()}"
        if self.cri_was_ok and self._cri_status() == "error":
            return "the CRI plugin failed to load the new config (see the containerd log)"
        return None


def _socket_answers(path: Path) -> str | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError as e:
            return f"{path}: {e.strerror or e}"
    return None
