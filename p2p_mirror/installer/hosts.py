"""containerd ``certs.d/<registry>/hosts.toml``: the agent first, the upstream as fallback.

containerd tries each ``[host]`` in file order and then ``server``; a dead agent refuses the
connection at once (and ``dial_timeout`` bounds a hung dial on containerd >= 2.1; older
releases ignore the key), so a pull never depends on the agent being up.
"""

from __future__ import annotations

import re

from p2p_mirror.installer.tomledit import TomlEditError, literal, parse

DEFAULT_DIR = "_default"
DIAL_TIMEOUT = "500ms"
HEADER = "# p2p-mirror: pulls try the node agent first; `p2p-mirror uninstall` reverts this.\n"


def host_block(mirror: str, dial_timeout: str = DIAL_TIMEOUT) -> str:
    """Our ``[host]`` table: pull and resolve only (never push) through the agent."""
    return (
        f"[host.{literal(mirror)}]\n"
        '  capabilities = ["pull", "resolve"]\n'
        f"  dial_timeout = {literal(dial_timeout)}\n"
    )


def render_new(mirror: str, server: str | None, dial_timeout: str = DIAL_TIMEOUT) -> str:
    """A fresh hosts.toml. ``server`` None (for ``_default``) keeps each registry's own host."""
    server_line = f"server = {literal(server)}\n\n" if server else ""
    return f"{HEADER}{server_line}{host_block(mirror, dial_timeout)}"


_TABLE_START = re.compile(r"^\s*\[", re.MULTILINE)


def merge(existing: str, mirror: str, server: str | None, what: str,
          dial_timeout: str = DIAL_TIMEOUT) -> str:
    """Put our host ahead of the file's own hosts; keep every byte the user wrote.

    Their ``server`` (the fallback) stays as is; if they had none we add ours. Our block goes
    right before their first table, because top-level keys must precede all tables.
    """
    doc = parse(existing, what)
    hosts = doc.get("host")
    if isinstance(hosts, dict) and mirror in hosts:
        return existing
    add_server = server is not None and "server" not in doc
    m = _TABLE_START.search(existing)
    cut = m.start() if m else len(existing)
    head, tail = existing[:cut], existing[cut:]
    if head and not head.endswith("\n"):
        head += "\n"
    block = ""
    if add_server:
        block += f"server = {literal(server or '')}\n"
    block += "\n" + HEADER + host_block(mirror, dial_timeout)
    if tail:
        block += "\n"
    new = head + block + tail
    after = parse(new, what)
    if list(after.get("host", {}))[:1] != [mirror]:
        raise TomlEditError(f"{what}: could not put the mirror first; edit it by hand")
    return new
