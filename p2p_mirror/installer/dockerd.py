"""dockerd: ``registry-mirrors`` in ``/etc/docker/daemon.json``, every other key kept.

dockerd only sends Docker Hub pulls to ``registry-mirrors``; images from any other registry
are pulled from that registry directly, whatever ``--registry`` says.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
from pathlib import Path
from typing import Any

from p2p_mirror.installer.backup import under
from p2p_mirror.installer.base import Change, InstallError, Plan

DAEMON_JSON = "/etc/docker/daemon.json"
DEFAULT_SOCKET = "/var/run/docker.sock"
HUB_ONLY = (
    "dockerd: registry-mirrors applies to Docker Hub (docker.io) images only; "
    "pulls from other registries go to those registries directly."
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


class Dockerd:
    """The dockerd adapter: merge the mirror into daemon.json, ping /_ping to check health."""

    name = "dockerd"
    unit = "docker"

    def __init__(self, root: Path, mirror: str, socket_path: Path | None = None,
                 other_registries: list[str] | None = None) -> None:
        self.root = root
        self.mirror = mirror
        self.socket_path = socket_path or under(root, DEFAULT_SOCKET)
        self.other_registries = [r for r in other_registries or [] if r != "docker.io"]

    def plan(self) -> Plan:
        plan = Plan(notes=[HUB_ONLY])
        if self.other_registries:
            plan.notes.append(
                f"dockerd: {', '.join(self.other_registries)} cannot be mirrored by dockerd"
            )
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
        mirrors = doc.get("registry-mirrors", [])
        if not isinstance(mirrors, list):
            raise InstallError(f"{path}: registry-mirrors is not a list; nothing was changed")
        if any(isinstance(m, str) and m.rstrip("/") == self.mirror for m in mirrors):
            return plan
        doc["registry-mirrors"] = [self.mirror, *mirrors]
        new = json.dumps(doc, indent=_indent(text)) + "\n"
        plan.changes.append(Change(DAEMON_JSON, new.encode()))
        return plan

    def baseline(self) -> None:
        """Nothing to note: /_ping either answers or not."""

    def health(self) -> str | None:
        try:
            conn = _UnixHTTPConnection(self.socket_path)
            conn.request("GET", "/_ping")
            resp = conn.getresponse()
            body = resp.read(64)
            conn.close()
        except OSError as e:
            return f"{self.socket_path}: {e.strerror or e}"
        if resp.status != 200:
            return f"GET /_ping answered {resp.status} {body!r}"
        return None


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the docker unix socket (stdlib only)."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=5)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)
