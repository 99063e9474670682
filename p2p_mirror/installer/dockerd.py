"""dockerd: the Docker Hub mirror in ``daemon.json``, the agent's proxy for every other registry.

- ``/etc/docker/daemon.json``: ``registry-mirrors`` gets the agent first (Docker Hub only);
  every other key is kept.
- ``/etc/systemd/system/docker.service.d/p2p-mirror.conf``: ``HTTPS_PROXY``/``HTTP_PROXY``
  point at the agent's proxy, ``NO_PROXY`` keeps loopback and the cluster's ranges direct.
- ``/etc/docker/certs.d/<registry>/ca.crt`` for each configured registry: the agent's CA
  (appended to a ``ca.crt`` already there, so the operator's own CA stays trusted).

The CA is the agent's (``<agent data dir>/proxy-ca``); when the agent has not made it yet
the installer makes it there with the same code, so the init container can run first.

dockerd is restarted only when ``live-restore`` is on (its containers, the installer's own
included, keep running through the restart), unless the operator explicitly allows it.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
from pathlib import Path
from typing import Any

from p2p_mirror.core.config import DOCKER_HUB
from p2p_mirror.core.tls import CA_CERT, CA_KEY, TLSError, ca_paths, new_ca, read_ca_cert
from p2p_mirror.installer.backup import under
from p2p_mirror.installer.base import Change, InstallError, Plan

DAEMON_JSON = "/etc/docker/daemon.json"
DEFAULT_SOCKET = "/var/run/docker.sock"
DROP_IN = "/etc/systemd/system/docker.service.d/p2p-mirror.conf"
CERTS_D = "/etc/docker/certs.d"
DEFAULT_PROXY = "http://127.0.0.1:5003"
DEFAULT_AGENT_DATA_DIR = "/var/lib/p2p-mirror/agent"
ALWAYS_DIRECT = ["localhost", "127.0.0.0/8", "::1"]
PROXY_VARS = re.compile(r"\b(https?_proxy|HTTPS?_PROXY|all_proxy|ALL_PROXY)=")
HUB_ONLY = (
    "dockerd: registry-mirrors applies to Docker Hub (docker.io) images only; other "
    "registries given with --registry go through the agent's proxy (HTTPS_PROXY)."
)


def present(root: Path) -> bool:
    """Whether dockerd looks installed under ``root`` (for ``--runtime auto``)."""
    marks = (DAEMON_JSON, DEFAULT_SOCKET, "/usr/bin/dockerd", "/usr/local/bin/dockerd")
    return any(under(root, m).exists() for m in marks)


def _indent(text: str) -> int | str | None:
    """Keep the file's style: one line stays one line, else its tabs or N-space indent."""
    if text.strip() and "\n" not in text.strip():
        return None
    m = re.search(r"\n([ \t]+)\S", text)
    if not m:
        return 2
    return "\t" if m.group(1).startswith("\t") else len(m.group(1))


def render_drop_in(proxy: str, no_proxy: list[str]) -> str:
    direct = ",".join(dict.fromkeys([*ALWAYS_DIRECT, *no_proxy]))
    return (
        "# Written by `p2p-mirror install`; `p2p-mirror uninstall` removes it.\n"
        "# dockerd reaches registries through the node's p2p-mirror agent.\n"
        "[Service]\n"
        f'Environment="HTTPS_PROXY={proxy}"\n'
        f'Environment="HTTP_PROXY={proxy}"\n'
        f'Environment="NO_PROXY={direct}"\n'
    )


def parse_no_proxy(items: list[str]) -> list[str]:
    """Hosts, domains and CIDRs for NO_PROXY (comma-separated or repeated); no spaces, quotes."""
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if not re.fullmatch(r"[A-Za-z0-9.:/*\[\]_-]+", part):
                raise ValueError(f"invalid NO_PROXY entry {part!r}")
            out.append(part)
    return out


class DockerdAdapter:
    """Plan daemon.json, the proxy drop-in and certs.d; ping /_ping and read /info for health."""

    name = "dockerd"
    unit = "docker"
    reload_systemd = True  # the drop-in is read only after `systemctl daemon-reload`

    def __init__(self, root: Path, mirror: str, socket_path: Path | None = None,
                 other_registries: list[str] | None = None, *, proxy: str = DEFAULT_PROXY,
                 no_proxy: list[str] | None = None,
                 agent_data_dir: str = DEFAULT_AGENT_DATA_DIR, ca_cert: Path | None = None,
                 agent_owner: tuple[int, int] | None = None,
                 guard_restart: bool = False) -> None:
        self.root = root
        self.mirror = mirror
        self.socket_path = socket_path or under(root, DEFAULT_SOCKET)
        self.other_registries = list(dict.fromkeys(
            r for r in other_registries or [] if r != DOCKER_HUB))
        self.proxy = proxy
        self.no_proxy = list(no_proxy or [])
        self.agent_data_dir = agent_data_dir
        self.ca_cert = ca_cert
        self.agent_owner = agent_owner
        self.guard_restart = guard_restart

    # --- plan ----------------------------------------------------------------------------

    def _daemon_json(self) -> tuple[Path, str, dict[str, Any]]:
        path = under(self.root, DAEMON_JSON)
        text = path.read_text() if path.exists() else ""
        doc: Any = {}
        if text.strip():
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                raise InstallError(f"{path}: not valid JSON ({e}); nothing was changed") from None
            if not isinstance(doc, dict):
                raise InstallError(f"{path}: expected a JSON object; nothing was changed")
        return path, text, doc

    def live_restore(self) -> bool:
        return self._daemon_json()[2].get("live-restore") is True

    def restart_refusal(self) -> str | None:
        """Why restarting dockerd would be unsafe (None: it is safe, or the operator said so)."""
        if not self.guard_restart or self.live_restore():
            return None
        return (
            f"dockerd: not restarting it, because {DAEMON_JSON} does not set "
            '"live-restore": true, so the restart would stop every container on this node '
            "(the installer's own too); nothing was changed. Set live-restore (and restart "
            "dockerd once yourself), pass --allow-dockerd-restart, pass --no-restart and "
            "restart it yourself, or pass --runtime containerd to leave dockerd alone"
        )

    def plan(self) -> Plan:
        plan = Plan(notes=[HUB_ONLY])
        path, text, doc = self._daemon_json()
        mirrors = doc.get("registry-mirrors", [])
        if not isinstance(mirrors, list):
            raise InstallError(f"{path}: registry-mirrors is not a list; nothing was changed")
        if not any(isinstance(m, str) and m.rstrip("/") == self.mirror for m in mirrors):
            doc["registry-mirrors"] = [self.mirror, *mirrors]
            new = json.dumps(doc, indent=_indent(text)) + "\n"
            plan.changes.append(Change(DAEMON_JSON, new.encode()))
        if self.other_registries:
            self._plan_proxy(plan)
        else:
            plan.notes.append("dockerd: no --registry besides docker.io: the proxy is not set up")
        return plan

    def _plan_proxy(self, plan: Plan) -> None:
        self._refuse_other_proxy()
        plan.changes.append(Change(DROP_IN, render_drop_in(self.proxy, self.no_proxy).encode()))
        ca_pem = self._ca(plan)
        for registry in self.other_registries:
            host_path = f"{CERTS_D}/{registry}/ca.crt"
            current = under(self.root, host_path)
            old = current.read_bytes() if current.exists() else b""
            if ca_pem in old:
                continue
            sep = b"" if not old or old.endswith(b"\n") else b"\n"
            plan.changes.append(Change(host_path, old + sep + ca_pem))
        plan.notes.append(
            "dockerd: " + ", ".join(self.other_registries) + " go through the agent's proxy "
            f"({self.proxy}); dockerd trusts the agent's CA for these registries only"
        )

    def _refuse_other_proxy(self) -> None:
        """A proxy dockerd already uses would be silently replaced: refuse instead."""
        d = under(self.root, str(Path(DROP_IN).parent))
        if not d.is_dir():
            return
        for f in sorted(d.glob("*.conf")):
            if f.name == Path(DROP_IN).name:
                continue
            if PROXY_VARS.search(f.read_text(errors="replace")):
                raise InstallError(
                    f"{f}: dockerd already uses a proxy; the agent's proxy would replace it "
                    "(chaining proxies is not supported); nothing was changed"
                )

    def _ca(self, plan: Plan) -> bytes:
        """The agent's CA certificate; made (as two planned files) if the agent has none."""
        try:
            if self.ca_cert is not None:
                return read_ca_cert(self.ca_cert)
            cert_path, key_path = ca_paths(under(self.root, self.agent_data_dir))
            if key_path.exists():
                return read_ca_cert(cert_path)
        except TLSError as e:
            raise InstallError(f"{e}; nothing was changed") from None
        ca = new_ca()
        ca_dir = f"{self.agent_data_dir.rstrip('/')}/proxy-ca"
        # The key last, as the agent writes them: its presence means both are complete.
        plan.changes.append(Change(f"{ca_dir}/{CA_CERT}", ca.cert_pem, 0o644, self.agent_owner))
        plan.changes.append(Change(f"{ca_dir}/{CA_KEY}", ca.key_pem, 0o600, self.agent_owner,
                                   secret=True))
        plan.notes.append(f"dockerd: made the agent's proxy CA in {ca_dir}")
        return ca.cert_pem

    # --- health --------------------------------------------------------------------------

    def baseline(self) -> None:
        """Nothing to note: /_ping either answers or not."""

    def health(self) -> str | None:
        status, body = self._get("/_ping")
        if status is None:
            return body.decode()
        if status != 200:
            return f"GET /_ping answered {status} {body[:64]!r}"
        status, body = self._get("/info")
        if status != 200:
            return None  # an API without /info (a stand-in): /_ping is all we can check
        try:
            info = json.loads(body)
        except ValueError:
            return "GET /info did not answer JSON"
        return self._loaded_from_disk(info)

    def _loaded_from_disk(self, info: dict[str, Any]) -> str | None:
        """Whether the running dockerd uses the files on disk now: after install, after a
        rollback and after uninstall alike (its mirrors, and our proxy only with our drop-in)."""
        try:
            wanted = self._daemon_json()[2].get("registry-mirrors") or []
        except InstallError as e:
            return str(e)
        wanted = [m.rstrip("/") for m in wanted if isinstance(m, str)]
        running = [m.rstrip("/") for m in (info.get("RegistryConfig") or {}).get("Mirrors") or []]
        if running != wanted:
            return f"dockerd runs with registry-mirrors {running}, not {wanted} from {DAEMON_JSON}"
        proxy = str(info.get("HttpsProxy") or "").rstrip("/")
        drop_in = under(self.root, DROP_IN)
        if drop_in.exists():
            m = re.search(r'"HTTPS_PROXY=([^"]*)"', drop_in.read_text())
            expected = m.group(1).rstrip("/") if m else ""
            if proxy != expected:
                return (f"dockerd runs with HTTPS_PROXY={proxy!r}, not {expected!r} from "
                        f"{DROP_IN} (was systemd reloaded?)")
        elif proxy and proxy == self.proxy:
            return f"dockerd still runs with the agent's proxy {proxy} (was systemd reloaded?)"
        return None

    def _get(self, path: str) -> tuple[int | None, bytes]:
        try:
            conn = _UnixHTTPConnection(self.socket_path)
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read(1 << 20)
            conn.close()
        except OSError as e:
            return None, f"{self.socket_path}: {e.strerror or e}".encode()
        return resp.status, body


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the docker unix socket (stdlib only)."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=5)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)
