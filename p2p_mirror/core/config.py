"""Typed configuration for every role, loaded from YAML (and CLI flags) in one place.

Each role has a dataclass; every field carries a parser in its metadata, so a bad value
is reported with the key that holds it (``agent config: cache_max_bytes: ...``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "https://registry-1.docker.io"
MiB = 1024 * 1024
GiB = 1024 * MiB


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> HostPort:
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", str(text).strip())
        if not m:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4))
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        if m.group(1):
            ipaddress.IPv6Address(host)
        return cls(host, port)


@dataclass(frozen=True)
class Upstream:
    """Where a registry name really lives: ``registry.example.test`` -> ``http://127.0.0.1:5000``."""

    name: str
    url: str
    verify_tls: bool = True  # False only where configured (``insecure: true``)
    ca_file: Path | None = None  # this registry's CA bundle instead of the system roots

    @classmethod
    def default_for(cls, name: str) -> Upstream:
        if name == DOCKER_HUB:
            return cls(name, DOCKER_HUB_ENDPOINT)
        return cls(name, f"https://{name}")


_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
REGISTRY_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*(?::\d+)?$")


def parse_url(text: str) -> str:
    parts = urlsplit(str(text).strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"URL must not have a query or fragment: {text!r}")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def parse_registry_name(text: str) -> str:
    name = str(text).strip()
    if len(name) > 255 or not REGISTRY_NAME.fullmatch(name):
        raise ValueError(f"invalid registry name {text!r}")
    host, _, port = name.partition(":")
    if port and not 0 < int(port) <= 65535:
        raise ValueError(f"invalid registry name {text!r}: port out of range")
    return name


def parse_registry_flag(text: str) -> Upstream:
    """``NAME=URL`` (or just ``NAME``, reached at ``https://NAME``)."""
    name, sep, url = str(text).partition("=")
    name = parse_registry_name(name)
    return Upstream(name, parse_url(url)) if sep else Upstream.default_for(name)


def parse_registries(value: Any) -> dict[str, Upstream]:
    """YAML mapping ``name: url`` / ``name: {url:, ca_file:, insecure:}``, or ``NAME=URL``s.

    ``verify_tls: false`` is the same as ``insecure: true``.
    """
    out: dict[str, Upstream] = {}
    if value is None:
        return out
    if isinstance(value, (list, tuple)):
        for item in value:
            up = item if isinstance(item, Upstream) else parse_registry_flag(item)
            out[up.name] = up
        return out
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping of registry name to URL")
    for raw_name, spec in value.items():
        name = parse_registry_name(raw_name)
        if isinstance(spec, Upstream):
            out[name] = spec
        elif isinstance(spec, str):
            out[name] = Upstream(name, parse_url(spec))
        elif isinstance(spec, Mapping):
            out[name] = _parse_upstream_spec(name, spec)
        else:
            raise ValueError(f"{name}: expected a URL or a mapping")
    return out


def _parse_upstream_spec(name: str, spec: Mapping[str, Any]) -> Upstream:
    unknown = set(spec) - {"url", "verify_tls", "insecure", "ca_file"}
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)} (known: url, ca_file, insecure)")
    url = parse_url(spec["url"]) if "url" in spec else Upstream.default_for(name).url
    verify = parse_bool(spec.get("verify_tls", True))
    if "insecure" in spec:
        insecure = parse_bool(spec["insecure"])
        if "verify_tls" in spec and insecure == verify:
            raise ValueError(f"{name}: insecure and verify_tls contradict each other")
        verify = not insecure
    ca_file = None
    if spec.get("ca_file") not in (None, ""):
        ca_file = parse_path(spec["ca_file"])
        if not ca_file.is_file():
            raise ValueError(f"{name}: ca_file {ca_file} is not a readable file")
        if not url.startswith("https://"):
            raise ValueError(f"{name}: ca_file needs an https:// url, got {url}")
    return Upstream(name, url, verify, ca_file)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*(?:/s)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(value: Any) -> int:
    """Bytes from ``1048576``, ``64MiB``, ``10GB``, ``50MB/s`` (rates are bytes per second)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size like 512MiB or 10GB, got {value!r}")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    base = unit.rstrip("b").rstrip("i")
    if "i" in unit:
        if not base:
            raise ValueError(f"expected a size like 512MiB or 10GB, got {value!r}")
        return int(number * 1024 ** ("kmgt".index(base) + 1))
    return int(number * _UNITS[base])


def parse_seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected seconds, got {value!r}")
    try:
        seconds = float(str(value).rstrip("s")) if isinstance(value, str) else float(value)
    except ValueError:
        raise ValueError(f"expected seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive number of seconds, got {value!r}")
    return seconds


def parse_rate(value: Any) -> float:
    """A positive number of events per second."""
    try:
        rate = float(value) if not isinstance(value, bool) else math.nan
    except ValueError:
        raise ValueError(f"expected a rate per second, got {value!r}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"must be a positive rate per second, got {value!r}")
    return rate


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_log_level(value: Any) -> str:
    level = str(value).strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"expected debug, info, warning or error, got {value!r}")
    return level


def parse_urls(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    return [parse_url(v) for v in items]


def parse_tracker_urls(value: Any) -> list[str]:
    """Tracker announce URLs: http(s):// or udp://HOST:PORT (BEP 15), no query."""
    items = [value] if isinstance(value, str) else list(value or [])
    out = []
    for text in items:
        parts = urlsplit(str(text).strip())
        if parts.scheme == "udp":
            if not parts.hostname or parts.port is None or parts.query or parts.fragment:
                raise ValueError(f"expected udp://HOST:PORT/PATH without a query, got {text!r}")
            out.append(f"udp://{parts.netloc}{parts.path.rstrip('/')}")
            continue
        try:
            out.append(parse_url(text))
        except ValueError:
            raise ValueError(
                f"expected an http://, https:// or udp:// tracker URL, got {text!r}"
            ) from None
    return out


def parse_path(value: Any) -> Path:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return Path(text).expanduser().absolute()


def parse_count(value: Any) -> int:
    """A whole number of at least 1."""
    if isinstance(value, bool) or not re.fullmatch(r"\s*\d+\s*", str(value)) or int(value) < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


MAX_SEGMENT_PARTS = 64  # each segment is a torrent on every node: a bound on swarms per blob


def parse_segment_parts(value: Any) -> int:
    """Segments per blob, at least: 1 to ``MAX_SEGMENT_PARTS``."""
    parts = parse_count(value)
    if parts > MAX_SEGMENT_PARTS:
        raise ValueError(f"expected at most {MAX_SEGMENT_PARTS}, got {parts}")
    return parts


def parse_ip(value: Any) -> str:
    """An IPv4 or IPv6 address, normalised."""
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise ValueError(f"expected an IP address, got {value!r}") from None


def parse_optional_hostport(value: Any) -> HostPort | None:
    """``HOST:PORT``, or empty/None to turn the listener off."""
    if value is None or str(value).strip() == "":
        return None
    return value if isinstance(value, HostPort) else HostPort.parse(str(value))


def parse_fraction(value: Any) -> float:
    text = str(value).strip()
    frac = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= frac < 1:
        raise ValueError(f"expected a fraction in [0, 1) or a percentage, got {value!r}")
    return frac


def _opt(default: Any, parse: Callable[[Any], Any], doc: str) -> Any:
    kw: dict[str, Any] = {"metadata": {"parse": parse, "doc": doc}}
    if callable(default):  # list, dict: a fresh one per instance
        kw["default_factory"] = default
    else:
        kw["default"] = default
    return field(**kw)


def _required(parse: Callable[[Any], Any], doc: str) -> Any:
    return field(metadata={"parse": parse, "doc": doc, "required": True}, default=None)


def _cluster_secret() -> Any:
    return _opt(None, parse_path, "file with the cluster secret (none: an open cluster, lab only)")


@dataclass
class TrackerConfig:
    listen: HostPort = _opt(HostPort("0.0.0.0", 6969), HostPort.parse,
                            "announce/scrape address, HTTP (TCP) and UDP (BEP 15)")
    interval: float = _opt(30.0, parse_seconds, "announce interval told to leechers")
    peer_ttl: float = _opt(0.0, float, "forget a leecher after this many seconds (0: 3 x interval)")
    seed_interval: float = _opt(1800.0, parse_seconds, "announce interval told to seeds (left=0)")
    seed_peer_ttl: float = _opt(
        0.0, float, "forget a seed after this many seconds (0: 3 x seed_interval)"
    )
    max_numwant: int = _opt(200, int, "most peers returned per announce")
    max_torrents: int = _opt(100_000, parse_count, "most swarms held; announces for more refused")
    max_peers_per_torrent: int = _opt(
        20_000, parse_count, "most peers held in one swarm; new peers beyond it refused"
    )
    max_peers: int = _opt(2_000_000, parse_count, "most peers held over all swarms")
    announce_rate: float = _opt(
        200.0, parse_rate, "announces+scrapes per second allowed from one source address"
    )
    announce_burst: int = _opt(
        3000, parse_count, "requests one source address may send at once before the rate applies"
    )
    cluster_secret: Path | None = _cluster_secret()
    log_level: str = _opt("INFO", parse_log_level, "log level")


@dataclass
class SeederConfig:
    data_dir: Path = _required(parse_path, "blob store and torrent state")
    tracker: list[str] = _required(
        parse_tracker_urls,
        "tracker announce URLs (udp:// or http://); each torrent names 2 of them (rendezvous hash)",
    )
    listen: HostPort = _opt(HostPort("0.0.0.0", 5005), HostPort.parse, "HTTP metainfo API")
    bt_listen: HostPort = _opt(HostPort("0.0.0.0", 6882), HostPort.parse, "BitTorrent listen")
    registries: dict[str, Upstream] = _opt(
        dict, parse_registries, "registry name -> endpoint; the only ones fetched"
    )
    segment_size: int = _opt(16 * MiB, parse_size, "largest blob segment (one torrent each)")
    segment_parts: int = _opt(
        8,
        parse_segment_parts,
        "cut every blob into at least this many segments (1-64): more start peers sooner and"
        " shorten the tail on slow links, fewer cost nodes less CPU per pull (docs/design.md)",
    )
    piece_size: int = _opt(128 * 1024, parse_size, "largest torrent piece")
    unchoke_slots: int = _opt(64, int, "peer connections the seeder uploads to at once")
    origin_streams: int = _opt(1, parse_count, "blobs downloaded from the origin at once")
    piece_sends: int = _opt(4, parse_count, "dealt pieces sent to agents at once")
    cache_max_bytes: int = _opt(0, parse_size, "evict LRU blobs above this (0: no cap)")
    min_free_disk: float = _opt(0.05, parse_fraction, "evict below this free-disk fraction")
    upload_rate_limit: int = _opt(0, parse_size, "bytes/s, 0 unlimited")
    download_rate_limit: int = _opt(0, parse_size, "bytes/s, 0 unlimited")
    drain_timeout: float = _opt(10.0, parse_seconds, "on SIGTERM, finish transfers this long")
    origin_timeout: float = _opt(300.0, parse_seconds, "origin request timeout")
    # One origin body at a time: a trickling one must not hold the queue for the others.
    origin_min_rate: int = _opt(
        64 * 1024, parse_size, "an origin body slower than this (bytes/s) lets the next one start"
    )
    max_blob_size: int = _opt(64 * GiB, parse_size, "refuse blobs larger than this (0: no cap)")
    registry_auth: Path | None = _opt(
        None, parse_path, "Docker config.json with the seeder's own registry credentials"
    )
    announce_ip: str | None = _opt(None, parse_ip, "address peers reach this seeder on")
    cluster_secret: Path | None = _cluster_secret()
    log_level: str = _opt("INFO", parse_log_level, "log level")


@dataclass
class AgentConfig:
    data_dir: Path = _required(parse_path, "blob cache and torrent state")
    seeder: list[str] = _opt(
        list, parse_urls,
        "seeder URLs (a host name stands for all its addresses); empty: origin only",
    )
    listen: HostPort = _opt(HostPort("127.0.0.1", 5004), HostPort.parse, "registry mirror address")
    bt_listen: HostPort = _opt(HostPort("0.0.0.0", 6881), HostPort.parse, "BitTorrent listen")
    registries: dict[str, Upstream] = _opt(
        dict, parse_registries, "registry name -> endpoint; the only ones served"
    )
    default_registry: str = _opt(DOCKER_HUB, parse_registry_name, "upstream when no ns= given")
    cache_max_bytes: int = _opt(20 * GiB, parse_size, "evict LRU blobs above this (0: no cap)")
    min_free_disk: float = _opt(0.05, parse_fraction, "evict below this free-disk fraction")
    upload_rate_limit: int = _opt(0, parse_size, "bytes/s, 0 unlimited")
    download_rate_limit: int = _opt(0, parse_size, "bytes/s, 0 unlimited")
    swarm_timeout: float = _opt(30.0, parse_seconds, "give up on seeder/swarm start after this")
    stall_timeout: float = _opt(15.0, parse_seconds, "fall back to origin after no progress")
    # Too short a grace lets congested (not broken) peers pile onto the seeder.
    seeder_grace: float = _opt(5.0, parse_seconds, "ask the seeder itself after no peer progress")
    # Few peers per announce: payload wasted in torrent end games grows with connections.
    swarm_peers: int = _opt(2, parse_count, "peers to ask the tracker for per announce")
    auth_cache_ttl: float = _opt(30.0, parse_seconds, "cache origin access checks this long")
    swarm_min_rate: int = _opt(
        256 * 1024, parse_size, "each segment must arrive by swarm_timeout + its end offset at "
        "this rate (bytes/s), else the rest comes from the origin (0: no deadline)",
    )
    origin_min_rate: int = _opt(
        64 * 1024, parse_size, "the origin's part of a blob must arrive by stall_timeout + its "
        "bytes at this rate (bytes/s), else the download fails and the runtime retries from its "
        "next host (0: no deadline)",
    )
    max_blob_size: int = _opt(64 * GiB, parse_size, "refuse blobs larger than this (0: no cap)")
    # Kubernetes kills a pod 30 s after SIGTERM by default (deploy/daemonset sets 30): drain
    # well inside that, so the swarm still says goodbye to the tracker and its peers.
    drain_timeout: float = _opt(10.0, parse_seconds, "on SIGTERM, finish transfers this long")
    origin_timeout: float = _opt(300.0, parse_seconds, "origin request timeout")
    announce_ip: str | None = _opt(
        None, parse_ip, "node address announced to the tracker (Kubernetes: status.hostIP)"
    )
    proxy_listen: HostPort | None = _opt(
        HostPort("127.0.0.1", 5003), parse_optional_hostport,
        "HTTPS proxy for dockerd (CONNECT); empty: off",
    )
    metrics_listen: HostPort | None = _opt(
        None, parse_optional_hostport, "extra /metrics and /healthz address for Prometheus"
    )
    cluster_secret: Path | None = _cluster_secret()
    log_level: str = _opt("INFO", parse_log_level, "log level")

    def upstream(self, name: str) -> Upstream | None:
        return upstream_for(self.registries, name)


def upstream_for(registries: Mapping[str, Upstream], name: str) -> Upstream | None:
    """The configured endpoint of ``name``, or None: only configured registries are served
    (an allowlist; an image name must not pick the host a role connects to)."""
    return registries.get(name)


def load_config(cls: type, path: Path | str | None, overrides: Mapping[str, Any] | None = None):
    """Build ``cls`` from a YAML file and flag overrides (``None`` values are ignored)."""
    role = cls.__name__.removesuffix("Config").lower()
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"{role} config {path}: cannot read: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{role} config {path}: not valid YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{role} config {path}: expected a mapping of keys")
        raw.update({str(k).replace("-", "_"): v for k, v in data.items()})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{role} config: unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})"
        )
    for key, value in (overrides or {}).items():
        if value is None or value == () or value == []:
            continue
        if key == "registries" and key in raw:
            merged = parse_registries(raw[key])
            merged.update(parse_registries(value))
            value = merged
        raw[key] = value
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            if f.metadata.get("required"):
                raise ConfigError(f"{role} config: {name} is required ({f.metadata['doc']})")
            continue
        try:
            kwargs[name] = f.metadata["parse"](raw[name])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{role} config: {name}: {e}") from None
    return cls(**kwargs)
