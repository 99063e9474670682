"""containerd ``certs.d/<registry>/hosts.toml``: the agent first, the upstream as fallback.

containerd tries each ``[host]`` in file order and then ``server``; a dead agent refuses the
connection at once (and ``dial_timeout`` bounds a hung dial on containerd >= 2.1; older
releases ignore the key), so a pull never depends on the agent being up.

The one hosts.toml renderer of the project: the lab writes its nodes' files with it too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import tomlkit

from p2p_mirror.installer.tomledit import TomlEditError, parse

DEFAULT_DIR = "_default"
DIAL_TIMEOUT = "500ms"
CAPABILITIES = ("pull", "resolve")
TLS_KEYS = ("ca", "client", "skip_verify")
HEADER = "# p2p-mirror: pulls try the node agent first; `p2p-mirror uninstall` reverts this.\n"


@dataclass(frozen=True)
class Tls:
    """TLS settings of one host: a CA file, a client cert (and key), or no verification."""

    ca: str | None = None
    client: str | tuple[str, str] | None = None
    skip_verify: bool = False

    def keys(self) -> dict[str, Any]:
        """The hosts.toml keys (``ca``, ``client``, ``skip_verify``) that are set."""
        out: dict[str, Any] = {}
        if self.ca:
            out["ca"] = self.ca
        if isinstance(self.client, tuple):
            out["client"] = [list(self.client)]
        elif self.client:
            out["client"] = self.client
        if self.skip_verify:
            out["skip_verify"] = True
        return out


@dataclass(frozen=True)
class Host:
    """One ``[host."<url>"]`` table."""

    url: str
    capabilities: tuple[str, ...] = CAPABILITIES
    dial_timeout: str | None = None
    tls: Tls = field(default_factory=Tls)


def mirror_host(mirror: str, dial_timeout: str = DIAL_TIMEOUT) -> Host:
    """Our ``[host]``: pull and resolve only (never push) through the agent."""
    return Host(mirror, CAPABILITIES, dial_timeout)


def _lines(keys: dict[str, Any], indent: str = "") -> str:
    return "".join(f"{indent}{k} = {tomlkit.item(v).as_string()}\n" for k, v in keys.items())


def host_block(host: Host) -> str:
    keys: dict[str, Any] = {"capabilities": list(host.capabilities)}
    if host.dial_timeout:
        keys["dial_timeout"] = host.dial_timeout
    keys.update(host.tls.keys())
    return f"[host.{tomlkit.item(host.url).as_string()}]\n{_lines(keys, '  ')}"


def _top(server: str | None, server_tls: Tls | None) -> str:
    keys: dict[str, Any] = {"server": server} if server else {}
    keys.update(server_tls.keys() if server_tls else {})
    return _lines(keys)


def render(server: str | None, hosts: Sequence[Host], server_tls: Tls | None = None,
           header: str = "") -> str:
    """A hosts.toml: ``server`` (the fallback, with its TLS), then each host in order."""
    top = _top(server, server_tls)
    parts = [header + top] if header or top else []
    parts += [host_block(h) for h in hosts]
    return "\n".join(parts)


def render_new(mirror: str, server: str | None, dial_timeout: str = DIAL_TIMEOUT,
               server_tls: Tls | None = None) -> str:
    """A fresh hosts.toml. ``server`` None (for ``_default``) keeps each registry's own host."""
    return render(server, [mirror_host(mirror, dial_timeout)], server_tls, HEADER)


_TABLE_START = re.compile(r"^[ \t]*\[", re.MULTILINE)


def _first_table(text: str, what: str) -> int:
    """Offset of the first table header: the first ``[`` line before which the text parses
    (a ``[`` line inside a multi-line array is not one)."""
    for m in _TABLE_START.finditer(text):
        try:
            parse(text[: m.start()], what)
        except TomlEditError:
            continue
        return m.start()
    return len(text)


def merge(existing: str, mirror: str, server: str | None, what: str,
          dial_timeout: str = DIAL_TIMEOUT, server_tls: Tls | None = None) -> str:
    """Put our host ahead of the file's own hosts; keep every byte the user wrote.

    Their ``server`` (the fallback) and TLS keys stay as they are; the ones they lack we add.
    Our block goes right before their first table, as top-level keys must precede all tables.
    """
    before = parse(existing, what)
    theirs = before.get("host")
    if isinstance(theirs, dict) and mirror in theirs:
        return existing
    add: dict[str, Any] = {}
    if server is not None and "server" not in before:
        add["server"] = server
    if server_tls is not None and not any(k in before for k in TLS_KEYS):
        add.update(server_tls.keys())
    cut = _first_table(existing, what)
    head, tail = existing[:cut], existing[cut:]
    if head and not head.endswith("\n"):
        head += "\n"
    block = _lines(add) + "\n" + HEADER + host_block(mirror_host(mirror, dial_timeout))
    if tail:
        block += "\n"
    new = head + block + tail
    ours = parse(host_block(mirror_host(mirror, dial_timeout)), what)["host"]
    expected = {**before, **add, "host": {**ours, **(theirs if isinstance(theirs, dict) else {})}}
    after = parse(new, what)
    if after != expected or list(after.get("host", {}))[:1] != [mirror]:
        raise TomlEditError(f"{what}: could not put the mirror first; edit it by hand")
    return new
