"""The seeder <-> agent HTTP protocol: paths, parameters, headers and encodings both sides use.

Every request carries the cluster token (``clusterauth.TOKEN_HEADER``); never a client's
credentials: the seeder fetches with its own.

- ``GET /v1/blobs/<digest>?registry=R&repo=NAME``: the blob's ``BlobInfo`` as JSON, once its
  size is known and registry R (configured at the seeder) confirmed that NAME has it. R
  refused the seeder's credentials: 401/403 with ``REFUSED_HEADER``. ``bt_host`` (if
  present) is the address its BitTorrent port is reached on (its ``announce_ip``), else
  the URL's host.
- ``GET /v1/blobs/<digest>/torrents/<i>?bt_port=P&wait=S[&pieces=inline]``: segment ``i``'s
  torrent, with the agent's dealt run of pieces in ``PIECES_HEADER``; with ``pieces=inline``
  the run's bytes follow the torrent in the body (``TORRENT_LENGTH_HEADER`` says where the
  torrent ends). Not published within ``wait`` seconds: 202 with ``not_yet_body``.
- ``GET /v1/blobs/<digest>/segments/<i>/pieces/<p>?count=K``: K consecutive pieces.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from p2p_mirror.core.config import parse_count

PIECES_HEADER = "X-P2P-Mirror-Pieces"  # the pieces this agent takes from the seeder itself
TORRENT_LENGTH_HEADER = "X-P2P-Mirror-Torrent-Length"  # inline: the body's torrent, then pieces
REFUSED_HEADER = "X-P2P-Mirror-Origin-Refused"  # the origin refused the seeder's credentials
TORRENT_CONTENT_TYPE = "application/x-bittorrent"
BYTES_CONTENT_TYPE = "application/octet-stream"

# aiohttp route patterns of the seeder's endpoints (``digest``, ``index``, ``piece``)
BLOB_INFO_ROUTE = "/v1/blobs/{digest}"
TORRENT_ROUTE = r"/v1/blobs/{digest}/torrents/{index:\d+}"
PIECES_ROUTE = r"/v1/blobs/{digest}/segments/{index:\d+}/pieces/{piece:\d+}"

REGISTRY_PARAM = "registry"
REPO_PARAM = "repo"
BT_PORT_PARAM = "bt_port"
WAIT_PARAM = "wait"
PIECES_PARAM = "pieces"
INLINE = "inline"  # the value of PIECES_PARAM asking for the run after the torrent
COUNT_PARAM = "count"

DEFAULT_WAIT = 30.0  # seconds a torrent request waits for its segment without ``wait``
LONGEST_WAIT = 300.0


class ProtocolError(ValueError):
    """A message of the other side that does not follow this protocol."""


def blob_info_path(digest: object) -> str:
    return f"/v1/blobs/{digest}"


def torrent_path(digest: object, index: int) -> str:
    return f"/v1/blobs/{digest}/torrents/{index}"


def pieces_path(digest: object, index: int, first: int) -> str:
    return f"/v1/blobs/{digest}/segments/{index}/pieces/{first}"


def blob_info_query(registry: str, repo: str) -> dict[str, str]:
    return {REGISTRY_PARAM: registry, REPO_PARAM: repo}


def torrent_query(bt_port: int, wait: float, inline: bool = True) -> dict[str, str]:
    query = {BT_PORT_PARAM: str(bt_port), WAIT_PARAM: f"{wait:g}"}
    if inline:
        query[PIECES_PARAM] = INLINE
    return query


def pieces_query(count: int) -> dict[str, str]:
    return {COUNT_PARAM: str(count)}


def wants_inline(query: Mapping[str, str]) -> bool:
    return query.get(PIECES_PARAM) == INLINE


def parse_wait(text: str | None) -> float:
    """``?wait=``: how long a torrent request may wait for its segment (clamped; a malformed
    or absent value means the default)."""
    try:
        wait = float(text) if text is not None else DEFAULT_WAIT
    except ValueError:
        return DEFAULT_WAIT
    return min(max(wait, 0.0), LONGEST_WAIT) if math.isfinite(wait) else DEFAULT_WAIT


def parse_piece_count(text: str | None) -> int | None:
    """``?count=`` of a piece request: a positive integer, 1 if absent, else None."""
    if text is None:
        return 1
    try:
        return parse_count(text)
    except ValueError:
        return None


def agent_key(remote: str | None, query: Mapping[str, str]) -> str:
    """An agent is its address and BitTorrent port: several may share a host."""
    return f"{remote}:{query.get(BT_PORT_PARAM, '')}"


@dataclass(frozen=True)
class BlobInfo:
    """What the seeder tells an agent about a blob: its layout and where to find its swarm."""

    digest: str
    size: int
    segment_size: int
    segments: int
    bt_port: int
    bt_host: str = ""  # the seeder's advertised address; empty: its URL's host

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "digest": self.digest,
            "size": self.size,
            "segment_size": self.segment_size,
            "segments": self.segments,
            "bt_port": self.bt_port,
        }
        if self.bt_host:
            data["bt_host"] = self.bt_host
        return data

    @classmethod
    def from_json(cls, data: object) -> BlobInfo:
        if not isinstance(data, dict):
            raise ProtocolError(f"blob info is not an object: {str(data)[:200]}")
        try:
            fields = {name: data[name] for name in ("size", "segment_size", "segments", "bt_port")}
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields.values()):
                raise TypeError
            bt_host = data.get("bt_host", "")
            if bt_host:
                bt_host = str(ipaddress.ip_address(bt_host))
            return cls(digest=str(data.get("digest", "")), bt_host=bt_host, **fields)
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"malformed blob info: {str(data)[:200]}") from None


def format_piece_list(pieces: Iterable[int]) -> str:
    """[0, 3, 6] -> ``"0,3,6"``."""
    return ",".join(map(str, pieces))


def parse_piece_list(text: str) -> list[int]:
    """``"0,3,6"`` -> [0, 3, 6]; anything malformed means none (peers or a stall cover it)."""
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        return []


def offer_headers(run: list[int], torrent_length: int | None = None) -> dict[str, str]:
    """Headers of a torrent response: the dealt run, and where an inline body's torrent ends
    (``torrent_length``; None: the body is the torrent alone)."""
    headers = {PIECES_HEADER: format_piece_list(run)}
    if torrent_length is None:
        headers["Content-Type"] = TORRENT_CONTENT_TYPE
    else:
        headers[TORRENT_LENGTH_HEADER] = str(torrent_length)
        headers["Content-Type"] = BYTES_CONTENT_TYPE
    return headers


def parse_offer_headers(headers: Mapping[str, str]) -> tuple[list[int], int | None]:
    """(dealt pieces, torrent length or None for a body that is the torrent alone)."""
    dealt = parse_piece_list(headers.get(PIECES_HEADER, ""))
    length = headers.get(TORRENT_LENGTH_HEADER)
    if length is None:
        return dealt, None
    try:
        value = int(length)
    except ValueError:
        raise ProtocolError(f"invalid {TORRENT_LENGTH_HEADER}: {length[:50]!r}") from None
    if value < 0:
        raise ProtocolError(f"invalid {TORRENT_LENGTH_HEADER}: {value}")
    return dealt, value


def not_yet_body(origin_bytes: int) -> dict[str, int]:
    """The 202 body: the seeder's origin byte count, a sign of life while a segment waits."""
    return {"origin_bytes": origin_bytes}


def parse_not_yet(data: object) -> object:
    """The origin byte count of a 202 body (compared only for change; None if absent)."""
    if not isinstance(data, dict):
        raise ProtocolError(f"202 body is not an object: {str(data)[:200]}")
    return data.get("origin_bytes")
