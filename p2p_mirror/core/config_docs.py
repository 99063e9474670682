"""docs/configuration.md, rendered from the config dataclasses' own field metadata.

``python -m p2p_mirror.core.config_docs --write docs/configuration.md`` regenerates it (or
without ``--write``, to stdout); a unit test fails when the file and ``render()`` differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2p_mirror.core import config as c

REGENERATE = "python -m p2p_mirror.core.config_docs --write docs/configuration.md"

INTRO = f"""\
# Configuration

<!-- Generated from the field metadata in p2p_mirror/core/config.py by
     {REGENERATE}
     Do not edit by hand: change the code, then regenerate. -->

Every role reads one YAML file, `--config FILE`, with the keys below (`-` and `_` alike:
`data-dir` is `data_dir`). Command-line flags override the file; `p2p-mirror ROLE --help`
lists them (many keys have a flag named after the key, `--cache-max-bytes`). Each role checks
every value at start: an unknown key, a missing required key or a bad value ends it with exit
status 2 and a message naming the key (`agent config: cache_max_bytes: ...`). A role that
started logs one `... ready on` line.

    p2p-mirror tracker --listen HOST:PORT [--interval S] [--peer-ttl S] [--max-numwant N]
    p2p-mirror seeder  --listen HOST:PORT --data-dir DIR --tracker URL [--bt-listen HOST:PORT]
                       [--registry NAME=URL ...] [--segment-size SIZE] [--upload-rate-limit RATE]
                       [--registry-auth FILE] [--announce-ip ADDR] [--cluster-secret FILE]
    p2p-mirror agent   --listen HOST:PORT --data-dir DIR --seeder URL [--bt-listen HOST:PORT]
                       [--registry NAME=URL ...] [--default-registry NAME]
                       [--cache-max-bytes SIZE] [--download-rate-limit RATE]
                       [--upload-rate-limit RATE] [--announce-ip ADDR]
                       [--proxy-listen HOST:PORT] [--metrics-listen HOST:PORT]
                       [--cluster-secret FILE]
    p2p-mirror status [--agent URL]    health and counters of a running role

The node installer (`p2p-mirror install` / `uninstall`) takes flags only: see
[installing.md](installing.md).

Value formats:

- sizes: `1048576`, `512MiB`, `10GB` (`KiB`/`MiB`/`GiB` are powers of 1024, `kB`/`MB`/`GB`
  powers of 1000); rates are sizes per second (`50MB` or `50MB/s`), `0` is unlimited;
- seconds: `30` or `30s`, always more than 0;
- fractions: `0.05` or `5%`;
- `registries`: a mapping `name: url` or `name: {{url: ..., verify_tls: false}}`, or on the
  command line `--registry NAME=URL` (repeatable; flags are added to the file's mapping).
  It is an allowlist: the agent serves, and the seeder fetches, only the registries named
  here; any other name gets `404 NAME_UNKNOWN` and the runtime uses its fallback host
  ([security.md](security.md), rule 1). `--registry NAME` alone stands for
  `https://NAME` (`docker.io`: `https://registry-1.docker.io`).
- `registry_auth` (seeder): a Docker `config.json`, e.g. a Kubernetes `dockerconfigjson`
  Secret: `{{"auths": {{"registry.example.test": {{"auth": "<base64 user:password>"}}}}}}`
  (or `username` and `password`); the seeder pulls with these, never with a client's.

Rate limits apply to peers on the LAN too (libtorrent exempts them by default; the roles
turn that off).
"""

# Longer explanations than a field's one-line doc, keyed by role and key. A unit test fails
# when one names a key its role no longer has.
NOTES: dict[str, dict[str, str]] = {
    "agent": {
        "listen": "loopback by default: only the node's own runtime needs the mirror.",
        "seeder": "with no seeder the agent is still a caching mirror of the origin.",
        "default_registry": "dockerd names no registry in its mirror requests (Docker Hub).",
        "swarm_timeout": (
            "how long to wait for the seeder's answer; a segment torrent is waited for as "
            "long as the seeder's origin download advances, and given up after this long "
            "without progress."
        ),
        "stall_timeout": (
            "with no new piece for this long (a dead or lying peer), the agent continues "
            "from the same offset from the origin."
        ),
        "seeder_grace": (
            "counted once the agent's own dealt run of pieces is in; then, with no byte "
            "from peers for this long, the agent asks the seeder's swarm for the segment too."
        ),
        "swarm_peers": (
            "more connections per torrent waste more payload in BitTorrent's end game "
            "(figures in [design.md](design.md))."
        ),
        "drain_timeout": (
            "on SIGTERM the agent stops accepting, lets running blob responses finish for "
            "this long, then cuts them (the runtime retries a cut blob from its next host, "
            "the origin) and leaves the swarm. Keep it under the pod's "
            "`terminationGracePeriodSeconds` (30 in deploy/daemonset)."
        ),
    },
    "seeder": {
        "segment_size": (
            "every blob is cut into at least `segment_parts` segments (8) of whole pieces, "
            "at most this size each; one torrent per segment."
        ),
        "piece_size": (
            "a segment under 4 MiB gets 64 KiB pieces, under 2 MiB 32 KiB, so it still has "
            "about 32 pieces to deal out and pass on."
        ),
        "origin_streams": (
            "blob bodies are fetched from the origin in request order; a blob of one piece "
            "(an image config) never waits. The next body is requested while the current "
            "one's last 512 KiB arrive, and a body that stops for 5 s lets the next one "
            "start. Raise it when one connection to the origin is much slower than the "
            "seeder's link."
        ),
        "piece_sends": (
            "runs of dealt pieces sent to agents at once, in request order; a run that does "
            "not drain for 1 s lets the next one go."
        ),
    },
    "tracker": {},
}

ROLES: tuple[tuple[str, type], ...] = (
    ("agent", c.AgentConfig),
    ("seeder", c.SeederConfig),
    ("tracker", c.TrackerConfig),
)

ROLE_INTRO = {
    "agent": "Every node: the registry mirror the runtime pulls through.",
    "seeder": "A few nodes: pulls each blob from the origin once and feeds the swarm.",
    "tracker": "The BitTorrent tracker agents and seeders announce to.",
}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def format_size(value: int) -> str:
    """``16777216`` -> ``16MiB``; sizes that are no whole binary unit stay in bytes."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value and value % scale == 0:
            return f"{value // scale}{unit}"
    return str(value)


def format_seconds(value: float) -> str:
    return f"{_number(value)}s"


def format_fraction(value: float) -> str:
    return f"{_number(round(value * 100, 6))}%"


def format_value(value: Any) -> str:
    """Any default, as a user would write it in the YAML file."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


# What each parser accepts, and how its defaults read; other parsers fall back on the value.
FORMATS: dict[Callable[[Any], Any], tuple[str, Callable[[Any], str]]] = {
    c.HostPort.parse: ("HOST:PORT", format_value),
    c.parse_optional_hostport: ("HOST:PORT, empty: off", format_value),
    c.parse_size: ("size", format_size),
    c.parse_seconds: ("seconds", format_seconds),
    c.parse_fraction: ("fraction or %", format_fraction),
    c.parse_urls: ("URL list", format_value),
    c.parse_tracker_urls: ("URL list (udp://, http://)", format_value),
    c.parse_path: ("path", format_value),
    c.parse_registries: ("mapping", format_value),
    c.parse_registry_name: ("registry name", format_value),
    c.parse_count: ("integer >= 1", format_value),
    c.parse_ip: ("IP address", format_value),
    c.parse_log_level: ("debug/info/warning/error", lambda v: str(v).lower()),
    c.parse_bool: ("true/false", format_value),
    int: ("integer", format_value),
    float: ("number", format_value),
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def default_of(f: dataclasses.Field) -> str:
    if f.metadata.get("required"):
        return "**required**"
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "**required**"
    _, fmt = FORMATS.get(f.metadata["parse"], ("", format_value))
    return f"`{fmt(value)}`"


def format_of(f: dataclasses.Field) -> str:
    parse = f.metadata["parse"]
    kind, _ = FORMATS.get(parse, (getattr(parse, "__name__", "value"), format_value))
    return kind


def role_section(role: str, cls: type) -> str:
    lines = [
        f"## {role}",
        "",
        f"{ROLE_INTRO.get(role, '')} `p2p-mirror {role} --config FILE`; class "
        f"`{cls.__module__}.{cls.__name__}`.".lstrip(),
        "",
        "| key | default | value | meaning |",
        "|---|---|---|---|",
    ]
    fields = dataclasses.fields(cls)
    for f in fields:
        doc = f.metadata.get("doc", "")
        lines.append(f"| `{f.name}` | {default_of(f)} | {format_of(f)} | {_cell(doc)} |")
    names = {f.name for f in fields}
    notes = [(key, text) for key, text in NOTES.get(role, {}).items() if key in names]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- `{key}`: {text}" for key, text in notes]
    return "\n".join(lines) + "\n"


def render() -> str:
    """The whole of docs/configuration.md."""
    return "\n".join([INTRO] + [role_section(role, cls) for role, cls in ROLES])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m p2p_mirror.core.config_docs",
        description="Render docs/configuration.md from the config dataclasses.",
    )
    parser.add_argument("--write", type=Path, metavar="FILE",
                        help="write FILE (atomically) instead of printing")  # fmt: skip
    args = parser.parse_args(argv)
    text = render()
    if args.write is None:
        sys.stdout.write(text)
        return 0
    tmp = args.write.with_name(args.write.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
