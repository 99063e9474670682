"""containerd: CRI ``registry.config_path`` in config.toml, plus one hosts.toml per registry.

Schemas (picked from the config's ``version``; with no config file, from ``containerd
--version``):

* version 1 (no ``version`` key): ``[plugins.cri.registry]``
* version 2 (containerd 1.x, also read by 2.x): ``[plugins."io.containerd.grpc.v1.cri".registry]``
* version 3 (containerd 2.x): ``[plugins."io.containerd.cri.v1.images".registry]`` and, from 2.1,
  ``use_local_image_pull = true`` so the CRI pull honours hosts.toml.

If ``config_path`` already names a directory, we write our hosts.toml files there instead of
changing it (the first one, if it is a ``:``-separated list): the user's layout wins.

containerd reads ``certs.d/_default`` only from 1.6.17 (and 1.7.0): older ones need one
directory per registry (``--registry``). Once ``config_path`` is set, containerd ignores the
legacy ``registry.configs."<host>".tls``, so we carry those settings into that host's hosts.toml.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from p2p_mirror.core.config import Upstream, parse_registry_name
from p2p_mirror.installer import hosts
from p2p_mirror.installer.base import Change, InstallError, Plan
from p2p_mirror.installer.containerd_version import (
    DEFAULT_DIR_SINCE,
    Version,
    binary_version,
    find_binary,
    server_version,
)
from p2p_mirror.installer.paths import read_text, under
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
def present(root: Path) -> bool:
    """Whether containerd looks installed under ``root`` (for ``--runtime auto``)."""
    marks = ("/etc/containerd", DEFAULT_SOCKET, "/usr/bin/containerd", "/usr/local/bin/containerd")
    return any(under(root, m).exists() for m in marks)


def legacy_tls(configs: Any, where: str) -> dict[str, hosts.Tls]:
    """``registry.configs."<host>".tls`` as hosts.toml TLS settings, by host."""
    out: dict[str, hosts.Tls] = {}
    if not isinstance(configs, dict):
        return out
    for host, conf in configs.items():
        tls = conf.get("tls") if isinstance(conf, dict) else None
        if not isinstance(tls, dict) or not tls:
            continue
        try:  # it becomes a directory name under certs.d
            parse_registry_name(host)
        except ValueError as e:
            raise InstallError(f"{where}: registry.configs.{host!r}: {e}; nothing was "
                               "changed") from None
        ca, cert, key = tls.get("ca_file"), tls.get("cert_file"), tls.get("key_file")
        skip = tls.get("insecure_skip_verify", False)
        if not all(isinstance(v, str) or v is None for v in (ca, cert, key)) or \
                not isinstance(skip, bool):
            raise InstallError(f"{where}: registry.configs.{host!r}.tls has a value of the "
                               "wrong type; nothing was changed")
        if key and not cert:
            raise InstallError(f"{where}: registry.configs.{host!r}.tls has key_file but no "
                               "cert_file; fix it first (nothing was changed)")
        client: str | tuple[str, str] | None = (cert, key) if cert and key else cert or None
        found = hosts.Tls(ca or None, client, skip)
        if found.keys():
            out[host] = found
    return out


class ContainerdAdapter:
    """The installer's containerd adapter: plans edits, checks health through ``ctr``."""

    name = "containerd"
    unit = "containerd"

    def __init__(
        self,
        root: Path,
        mirror: str,
        registries: list[Upstream],
        config: str = DEFAULT_CONFIG,
        socket_path: Path | None = None,
        version: Version | None = None,
    ) -> None:
        self.root = root
        self.mirror = mirror
        self.registries = registries
        self.config = config
        self.socket_path = socket_path
        self._version = version
        self.cri_was_ok: bool | None = None

    @property
    def version(self) -> Version | None:
        """The given version, else the binary's, else the running daemon's (once asked)."""
        if self._version is None:
            self._version = binary_version(self.root) or self._daemon_version()
        return self._version

    def _daemon_version(self) -> Version | None:
        if _socket_answers(self.socket()) is not None:
            return None
        try:
            proc = self._ctr("version")
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc is None or proc.returncode != 0:
            return None
        return server_version(proc.stdout.decode(errors="replace"))

    # -- planning ---------------------------------------------------------------------------

    def _read_config(self) -> tuple[str, dict[str, Any]]:
        text = read_text(self.root, self.config) or ""
        try:
            return text, parse(text, self.config)
        except TomlEditError as e:
            raise InstallError(f"{e}; refusing to touch it (nothing was changed)") from None

    def schema(self, text: str, doc: dict[str, Any]) -> int:
        if "version" in doc:
            v = doc["version"]
            if v not in SCHEMA_TABLES:
                raise InstallError(f"{self.config}: unsupported config version {v!r}")
            return int(v)
        if not text.strip():
            return 3 if self.version is not None and self.version >= (2, 0, 0) else 2
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
        tls: dict[str, hosts.Tls] = {}
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
                tls = legacy_tls(get_path(doc, (*table, "configs")), where)
                new_text = set_key(text, table, "config_path", certs, where)
            if schema == 3 and (self.version is None or self.version[:2] != (2, 0)):
                new_text = set_key(new_text, IMAGES_PLUGIN, "use_local_image_pull", True, where)
        except TomlEditError as e:
            raise InstallError(f"{e} (nothing was changed)") from None
        if new_text != original:
            plan.changes.append(Change(self.config, new_text.encode()))
        plan.changes.extend(self._hosts_changes(certs, plan, tls))
        return plan

    def _targets(self, certs: str, plan: Plan, tls: dict[str, hosts.Tls]
                 ) -> dict[str, tuple[str | None, hosts.Tls | None]]:
        """Registry dir name -> (fallback server, its TLS) for every hosts.toml to write."""
        targets: dict[str, tuple[str | None, hosts.Tls | None]] = {}
        if self.registries:
            for up in self.registries:
                host = urlsplit(up.url).netloc
                found = tls.pop(up.name, None) or tls.pop(host, None)
                targets[up.name] = (up.url, found)
            if tls:
                raise InstallError(
                    f"{self.config}: registry.configs has TLS settings for "
                    f"{', '.join(sorted(tls))}, which containerd ignores once config_path is "
                    "set. Add --registry for each (their TLS moves into its hosts.toml), or "
                    "move them to certs.d/<host>/hosts.toml yourself; nothing was changed."
                )
            return targets
        version = self.version
        if version is None:
            raise InstallError(
                "cannot tell containerd's version (no containerd binary under "
                f"{self.root} and {self.socket()} does not answer), and certs.d/_default works "
                "only from containerd 1.6.17: pass --containerd-version, or --registry for each "
                "registry to mirror; nothing was changed"
            )
        if version < DEFAULT_DIR_SINCE:
            raise InstallError(
                f"containerd {'.'.join(map(str, version))} does not read certs.d/_default "
                "(it does from 1.6.17 and 1.7.0), so without --registry no pull would use the "
                "mirror: pass --registry NAME[=URL] for each registry to mirror; nothing was "
                "changed"
            )
        targets[hosts.DEFAULT_DIR] = (None, None)
        certs_dir = under(self.root, certs)
        if certs_dir.is_dir():
            for d in sorted(certs_dir.iterdir()):
                if not d.is_dir() or d.name == hosts.DEFAULT_DIR:
                    continue
                if under(self.root, f"{certs}/{d.name}/hosts.toml").exists():
                    targets[d.name] = (None, tls.pop(d.name, None))
                else:
                    plan.notes.append(
                        f"containerd: {certs}/{d.name} has no hosts.toml, so containerd "
                        f"ignores _default for {d.name}: its pulls bypass the mirror"
                    )
        for host, found in tls.items():  # their own dir, or containerd would drop the TLS
            targets[host] = (f"https://{host}", found)
        return targets

    def _hosts_changes(self, certs: str, plan: Plan, tls: dict[str, hosts.Tls]
                       ) -> list[Change]:
        out: list[Change] = []
        for name, (server, found) in self._targets(certs, plan, dict(tls)).items():
            host_path = f"{certs.rstrip('/')}/{name}/hosts.toml"
            if found is not None:
                plan.notes.append(
                    f"containerd: moved the TLS settings of registry.configs.{name!r} into "
                    f"{host_path} (containerd ignores them once config_path is set)"
                )
            try:
                old = read_text(self.root, host_path)
                if old is not None:
                    new = hosts.merge(old, self.mirror, server, host_path, server_tls=found)
                    if new == old:
                        continue
                    plan.notes.append(
                        f"containerd: merged the mirror into existing {host_path} (their hosts "
                        "kept after ours; the original is kept for uninstall)"
                    )
                else:
                    new = hosts.render_new(self.mirror, server, server_tls=found)
            except TomlEditError as e:
                raise InstallError(f"{e}; nothing was changed") from None
            out.append(Change(host_path, new.encode(), restart=False))
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
        exe = shutil.which("ctr") or find_binary(self.root, "ctr")
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
