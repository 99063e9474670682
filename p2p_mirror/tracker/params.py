"""Announce and scrape query parsing: raw percent-encoded bytes in, validated values out.

``info_hash`` and ``peer_id`` are arbitrary bytes percent-encoded in the query string, so they
are decoded from the raw query with ``unquote_to_bytes``, never through a str-decoding parser
(which would mangle bytes that are not UTF-8). Every problem raises ``RequestError`` whose
message goes back to the client as the bencoded ``failure reason``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

V1_HASH_LEN = 20
V2_HASH_LEN = 32
PEER_ID_LEN = 20
EVENTS = ("started", "completed", "stopped", "paused", "")
MAX_SCRAPE_HASHES = 128

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RequestError(ValueError):
    """The request is malformed; the message is sent as the ``failure reason``."""


class Refusal(Exception):
    """An announce or scrape refused or malformed: ``message`` goes back to the client
    (HTTP: a bencoded failure reason; UDP: an error datagram)."""

    def __init__(self, message: str, retry_in: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_in = retry_in


@dataclass(frozen=True)
class Announce:
    """One validated announce (BEP 3, with BEP 7/23/52 extras)."""

    info_hash: bytes  # swarm key: always 20 bytes (a 32-byte v2 hash is truncated, BEP 52)
    peer_id: bytes
    ip: IPAddress  # where the request came from, until an authenticated ip= replaces it
    port: int
    left: int
    uploaded: int
    downloaded: int
    event: str
    numwant: int | None  # None: the tracker's default
    compact: bool
    no_peer_id: bool
    claimed_ip: IPAddress | None = None  # the ip= parameter, trusted only if authenticated
    token: str | None = None

    @property
    def seeder(self) -> bool:
        return self.left == 0


def parse_query(raw_query: str) -> dict[str, list[bytes]]:
    """Split a raw (still percent-encoded) query string into name -> list of byte values.

    ``+`` is kept literally: BitTorrent clients percent-encode every reserved byte, so a bare
    ``+`` inside ``info_hash`` is the byte 0x2B, not a space.
    """
    out: dict[str, list[bytes]] = {}
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        # most names and numbers carry no escape: skip the decoder for them (hot path)
        key = unquote_to_bytes(name).decode("latin-1") if "%" in name else name
        raw = unquote_to_bytes(value) if "%" in value else value.encode("latin-1", "replace")
        out.setdefault(key, []).append(raw)
    return out


def swarm_key(info_hash: bytes) -> bytes:
    """The swarm a hash names: v1 hashes as is, v2 hashes truncated to 20 bytes (BEP 52)."""
    return info_hash[:V1_HASH_LEN]


def check_info_hash(value: bytes) -> bytes:
    if len(value) not in (V1_HASH_LEN, V2_HASH_LEN):
        raise RequestError(
            f"invalid info_hash: expected 20 (v1) or 32 (v2) bytes, got {len(value)}"
        )
    return value


def _single(query: dict[str, list[bytes]], name: str, required: bool = True) -> bytes | None:
    values = query.get(name)
    if not values:
        if required:
            raise RequestError(f"missing {name}")
        return None
    if len(values) > 1:
        raise RequestError(f"{name} given more than once")
    return values[0]


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("ascii").strip()
    except UnicodeDecodeError:
        raise RequestError(f"invalid {name}: not ASCII") from None


def _int(query: dict[str, list[bytes]], name: str, default: int | None) -> int | None:
    raw = _single(query, name, required=default is None)
    if raw is None:
        return default
    text = _text(raw, name)
    if not text.lstrip("-").isdigit() or len(text) > 20:
        raise RequestError(f"invalid {name}: expected an integer, got {text[:32]!r}")
    return int(text)


def _flag(query: dict[str, list[bytes]], name: str, default: bool) -> bool:
    raw = _single(query, name, required=False)
    if raw is None:
        return default
    text = _text(raw, name)
    if text not in ("0", "1"):
        raise RequestError(f"invalid {name}: expected 0 or 1")
    return text == "1"


def parse_ip(text: str) -> IPAddress:
    """An IP literal (never a hostname: the tracker does no DNS), IPv4-mapped unwrapped."""
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        raise RequestError(
            f"invalid ip: expected an IP address literal, got {text[:64]!r}"
        ) from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified or addr.is_multicast:
        raise RequestError(f"invalid ip: {addr} is not a unicast address")
    return addr


def parse_announce(raw_query: str, source_ip: IPAddress | None) -> Announce:
    """Validate an announce. Its address is the source address; ``ip=`` is parsed into
    ``claimed_ip`` for the caller to honour only from an authenticated peer."""
    query = parse_query(raw_query)
    info_hash = check_info_hash(_single(query, "info_hash") or b"")
    peer_id = _single(query, "peer_id") or b""
    port = _int(query, "port", None)
    assert port is not None
    event = _text(_single(query, "event", required=False) or b"", "event")
    numwant = _int(query, "numwant", -1)
    ip_param = _single(query, "ip", required=False)
    claimed = parse_ip(_text(ip_param, "ip")) if ip_param is not None else None
    return make_announce(
        info_hash=info_hash,
        peer_id=peer_id,
        source_ip=source_ip,
        claimed_ip=claimed,
        port=port,
        left=_int(query, "left", None),  # type: ignore[arg-type]  # required: never None
        uploaded=_int(query, "uploaded", 0),  # type: ignore[arg-type]
        downloaded=_int(query, "downloaded", 0),  # type: ignore[arg-type]
        event=event,
        numwant=numwant,
        compact=_flag(query, "compact", True),
        no_peer_id=_flag(query, "no_peer_id", False),
        token=_token(query),
    )


def make_announce(
    *,
    info_hash: bytes,
    peer_id: bytes,
    source_ip: IPAddress | None,
    claimed_ip: IPAddress | None,
    port: int,
    left: int,
    uploaded: int,
    downloaded: int,
    event: str,
    numwant: int | None,
    compact: bool = True,
    no_peer_id: bool = False,
    token: str | None = None,
) -> Announce:
    """The checks every announce passes, whatever protocol carried it (HTTP query or UDP
    datagram): fields already decoded, values checked here."""
    if len(peer_id) != PEER_ID_LEN:
        raise RequestError(f"invalid peer_id: expected 20 bytes, got {len(peer_id)}")
    if not 1 <= port <= 65535:
        raise RequestError(f"invalid port: {port} is not in 1-65535")
    if event == "empty":
        event = ""
    if event not in EVENTS:
        raise RequestError(f"invalid event {event[:32]!r}: expected started, completed or stopped")
    for name, value in (("left", left), ("uploaded", uploaded), ("downloaded", downloaded)):
        if value < 0:
            raise RequestError(f"invalid {name}: must not be negative")
    if source_ip is None and claimed_ip is None:
        raise RequestError("cannot tell the peer's address")
    return Announce(
        info_hash=swarm_key(info_hash),
        peer_id=peer_id,
        ip=source_ip or claimed_ip,  # type: ignore[arg-type]  # one of them is set
        port=port,
        left=left,
        uploaded=uploaded,
        downloaded=downloaded,
        event=event,
        numwant=None if numwant is None or numwant < 0 else numwant,
        compact=compact,
        no_peer_id=no_peer_id,
        claimed_ip=claimed_ip,
        token=token,
    )


@dataclass(frozen=True)
class Scrape:
    info_hashes: list[bytes]  # each 20 or 32 bytes, in order, duplicates dropped
    token: str | None


def parse_scrape(raw_query: str) -> Scrape:
    """The requested info-hashes; at least one (there is no full scrape), at most
    ``MAX_SCRAPE_HASHES``."""
    query = parse_query(raw_query)
    values = query.get("info_hash", [])
    if not values:
        raise RequestError("scrape needs info_hash: this tracker lists no swarms")
    if len(values) > MAX_SCRAPE_HASHES:
        raise RequestError(f"too many info_hash: at most {MAX_SCRAPE_HASHES} per scrape")
    hashes = [check_info_hash(v) for v in values]
    return Scrape(list(dict.fromkeys(hashes)), _token(query))


def _token(query: dict[str, list[bytes]]) -> str | None:
    raw = _single(query, "token", required=False)
    return None if raw is None else raw.decode("latin-1")


def url_data_token(url_data: bytes) -> str | None:
    """The ``token=`` of a UDP announce's BEP 41 URL data (the tracker URL's path and query,
    e.g. ``/announce?token=...``), by the same query rules as HTTP."""
    _, _, query = url_data.partition(b"?")
    return _token(parse_query(query.decode("latin-1")))
