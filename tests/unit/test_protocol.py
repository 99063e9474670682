"""The seeder <-> agent protocol: what one side encodes, the other decodes unchanged, and
malformed messages are refused (or read as "nothing") instead of crashing a side."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from p2p_mirror.core import protocol
from p2p_mirror.core.protocol import (
    PIECES_HEADER,
    TORRENT_LENGTH_HEADER,
    BlobInfo,
    ProtocolError,
)
from p2p_mirror.seeder.ingest import IngestError

DIGEST = "sha256:" + "ab" * 32


def route_match(route: str, path: str) -> dict[str, str] | None:
    """The match info aiohttp's router gives ``path`` for ``route`` (None: no match)."""
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    resource = web.Application().router.add_get(route, handler).resource
    assert resource is not None
    return resource._match(path)  # noqa: SLF001 - the router's own matcher, no server needed


def test_paths_built_by_the_agent_match_the_seeders_routes() -> None:
    assert route_match(protocol.BLOB_INFO_ROUTE, protocol.blob_info_path(DIGEST)) == {
        "digest": DIGEST}  # fmt: skip
    assert route_match(protocol.TORRENT_ROUTE, protocol.torrent_path(DIGEST, 12)) == {
        "digest": DIGEST, "index": "12"}  # fmt: skip
    assert route_match(protocol.PIECES_ROUTE, protocol.pieces_path(DIGEST, 3, 40)) == {
        "digest": DIGEST, "index": "3", "piece": "40"}  # fmt: skip
    assert route_match(protocol.TORRENT_ROUTE, f"/v1/blobs/{DIGEST}/torrents/x") is None


def test_query_parameters_round_trip() -> None:
    assert protocol.blob_info_query("reg.test", "library/demo") == {
        "registry": "reg.test", "repo": "library/demo"}  # fmt: skip
    query = protocol.torrent_query(6881, 10.0)
    assert query == {"bt_port": "6881", "wait": "10", "pieces": "inline"}
    assert protocol.wants_inline(query) and protocol.parse_wait(query["wait"]) == 10.0
    assert protocol.agent_key("10.0.0.5", query) == "10.0.0.5:6881"
    plain = protocol.torrent_query(6881, 2.5, inline=False)
    assert not protocol.wants_inline(plain) and protocol.parse_wait(plain["wait"]) == 2.5
    assert protocol.parse_piece_count(protocol.pieces_query(7)["count"]) == 7


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(None, 30.0), ("0.5", 0.5), ("-3", 0.0), ("1e9", 300.0), ("nan", 30.0), ("inf", 30.0),
     ("x", 30.0)],
)  # fmt: skip
def test_a_wait_is_clamped_and_a_malformed_one_means_the_default(
    text: str | None, seconds: float
) -> None:
    assert protocol.parse_wait(text) == seconds


@pytest.mark.parametrize(("text", "count"), [(None, 1), ("4", 4), ("0", None), ("x", None)])
def test_a_piece_count_is_positive(text: str | None, count: int | None) -> None:
    assert protocol.parse_piece_count(text) == count


def test_blob_info_round_trips_through_json() -> None:
    info = BlobInfo(DIGEST, 5_000_000, 1_048_576, 5, 6881)
    assert BlobInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    assert "bt_host" not in info.to_json()  # older agents see what they always saw
    advertised = BlobInfo(DIGEST, 5_000_000, 1_048_576, 5, 6881, "2001:db8::7")
    assert BlobInfo.from_json(json.loads(json.dumps(advertised.to_json()))) == advertised


@pytest.mark.parametrize(
    "data",
    [
        [],
        "size",
        {"size": 1, "segment_size": 1, "segments": 1},  # no bt_port
        {"size": "1", "segment_size": 1, "segments": 1, "bt_port": 1},
        {"size": True, "segment_size": 1, "segments": 1, "bt_port": 1},
        {"size": 1, "segment_size": 1, "segments": 1, "bt_port": 1, "bt_host": "seeder-0"},
    ],
)
def test_malformed_blob_info_is_refused(data: object) -> None:
    with pytest.raises(ProtocolError):
        BlobInfo.from_json(data)


@pytest.mark.parametrize("pieces", [[], [3], [0, 5, 10], list(range(32))])
def test_piece_lists_round_trip(pieces: list[int]) -> None:
    assert protocol.parse_piece_list(protocol.format_piece_list(pieces)) == pieces


@pytest.mark.parametrize(
    ("header", "pieces"), [("", []), ("3", [3]), ("0,5,10", [0, 5, 10]), ("1,x", []), ("1;2", [])]
)
def test_dealt_pieces_header(header: str, pieces: list[int]) -> None:
    """A malformed list means no pieces: peers, or the seeder's swarm after a stall, cover it."""
    assert protocol.parse_piece_list(header) == pieces


def test_offer_headers_round_trip() -> None:
    inline = protocol.offer_headers([4, 5, 6], torrent_length=321)
    assert inline["Content-Type"] == protocol.BYTES_CONTENT_TYPE
    assert protocol.parse_offer_headers(inline) == ([4, 5, 6], 321)
    alone = protocol.offer_headers([])
    assert alone["Content-Type"] == protocol.TORRENT_CONTENT_TYPE
    assert TORRENT_LENGTH_HEADER not in alone
    assert protocol.parse_offer_headers(alone) == ([], None)


@pytest.mark.parametrize("length", ["x", "-1", ""])
def test_a_malformed_torrent_length_is_refused(length: str) -> None:
    with pytest.raises(ProtocolError, match=TORRENT_LENGTH_HEADER):
        protocol.parse_offer_headers({PIECES_HEADER: "0", TORRENT_LENGTH_HEADER: length})


def test_the_not_yet_body_round_trips_and_a_malformed_one_is_refused() -> None:
    assert protocol.parse_not_yet(json.loads(json.dumps(protocol.not_yet_body(1234)))) == 1234
    assert protocol.parse_not_yet({}) is None
    with pytest.raises(ProtocolError):
        protocol.parse_not_yet([1234])


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (IngestError(IngestError.ORIGIN_REFUSED, "origin answered 401", 401), 401, "UNAUTHORIZED"),
        (IngestError(IngestError.ORIGIN_REFUSED, "origin answered 404", 404), 404, "BLOB_UNKNOWN"),
        (IngestError(IngestError.DIGEST_MISMATCH, "bytes differ"), 400, "DIGEST_INVALID"),
        (IngestError(IngestError.ORIGIN_INCOMPLETE, "short"), 503, "UNAVAILABLE"),
        (IngestError(IngestError.ORIGIN_UNAVAILABLE, "refused"), 503, "UNAVAILABLE"),
        (IngestError(IngestError.FAILED, "disk full"), 503, "UNAVAILABLE"),
    ],
)
def test_ingest_failures_become_oci_errors_only_at_the_seeders_edge(
    error: IngestError, status: int, code: str
) -> None:
    from p2p_mirror.seeder.api import oci_error_for

    oci = oci_error_for(error)
    assert (oci.status, oci.code) == (status, code)
    assert not isinstance(error, type(oci))
