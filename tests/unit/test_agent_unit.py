"""Agent pieces without a network: Range parsing, request routing, torrent determinism."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from p2p_mirror.agent.server import Agent, parse_range
from p2p_mirror.core.config import DOCKER_HUB_ENDPOINT, AgentConfig, Upstream
from p2p_mirror.core.oci import OCIError
from p2p_mirror.core.swarm import Metainfo, SwarmError, make_torrent

HEX = hashlib.sha256(b"layer").hexdigest()
DIGEST = f"sha256:{HEX}"

# --- Range -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=0-0", 100, (0, 1)),
        ("bytes=5-", 100, (5, 100)),
        ("bytes=-3", 100, (97, 100)),
        ("bytes=-500", 100, (0, 100)),  # suffix longer than the blob: the whole blob
        ("bytes=90-500", 100, (90, 100)),  # end beyond size: clipped
        ("bytes=99-99", 100, (99, 100)),
        (" bytes=1-2 ", 100, (1, 3)),
        (None, 100, None),
        ("", 100, None),
        ("bytes=0-1,5-6", 100, None),  # multi-range: serve the whole blob instead
        ("bytes=0-1, 5-", 100, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=100-", 100),  # starts beyond the last byte
        ("bytes=100-200", 100),
        ("bytes=5-2", 100),  # start > end
        ("bytes=-0", 100),  # empty suffix
        ("bytes=0-", 0),  # nothing to range over in an empty blob
        ("bytes=-", 100),
        ("bytes=abc", 100),
        ("bytes=1-2-3", 100),
        ("bytes=0x10-", 100),
    ],
)
def test_parse_range_invalid(header: str, size: int) -> None:
    with pytest.raises(OCIError) as exc:
        parse_range(header, size)
    assert exc.value.code == "RANGE_INVALID"
    assert exc.value.status == 416


# --- routing -----------------------------------------------------------------------------


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    cfg = AgentConfig(
        data_dir=tmp_path / "data",
        default_registry="docker.io",
        registries={
            "registry.example.test": Upstream("registry.example.test", "http://127.0.0.1:5999"),
            "docker.io": Upstream.default_for("docker.io"),
            "ghcr.io": Upstream.default_for("ghcr.io"),
            **{n: Upstream(n, "http://127.0.0.1:5000") for n in ("localhost:5000", "localhost",
                                                                 "127.0.0.1:5000")},
        },
    )
    agent = Agent(cfg)
    assert agent.session is None and agent.seeders is None  # no seeder: no BitTorrent at all
    try:
        yield agent
    finally:
        await agent.close()


def target(agent: Agent, path: str):
    return agent.parse_target(make_mocked_request("GET", path))


async def test_ns_query_picks_the_registry(agent: Agent) -> None:
    t = target(agent, "/v2/team/app/manifests/v1?ns=registry.example.test")
    assert (t.upstream.name, t.upstream.url) == ("registry.example.test", "http://127.0.0.1:5999")
    assert (t.name, t.kind, t.ref) == ("team/app", "manifests", "v1")
    t = target(agent, f"/v2/team/app/blobs/{DIGEST}?ns=ghcr.io")
    assert (t.upstream.url, t.kind, t.ref) == ("https://ghcr.io", "blobs", DIGEST)
    t = target(agent, "/v2/library/alpine/manifests/latest?ns=docker.io")
    assert t.upstream.url == DOCKER_HUB_ENDPOINT


async def test_ns_wins_over_a_registry_looking_first_component(agent: Agent) -> None:
    t = target(agent, "/v2/ghcr.io/app/manifests/v1?ns=registry.example.test")
    assert t.upstream.name == "registry.example.test"
    assert t.name == "ghcr.io/app"


@pytest.mark.parametrize(
    ("path", "registry", "name"),
    [
        ("/v2/registry.example.test/team/app/manifests/v1", "registry.example.test", "team/app"),
        ("/v2/localhost:5000/app/manifests/v1", "localhost:5000", "app"),
        ("/v2/localhost/app/manifests/v1", "localhost", "app"),
        ("/v2/127.0.0.1:5000/a/b/manifests/v1", "127.0.0.1:5000", "a/b"),
        (f"/v2/ghcr.io/owner/img/blobs/{DIGEST}", "ghcr.io", "owner/img"),
    ],
)
async def test_registry_path_prefix(agent: Agent, path: str, registry: str, name: str) -> None:
    """skopeo/podman with ``location = "127.0.0.1:5004/<registry>"`` send no ``ns``."""
    t = target(agent, path)
    assert (t.upstream.name, t.name) == (registry, name)
    if registry == "registry.example.test":
        assert t.upstream.url == "http://127.0.0.1:5999"


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/v2/library/alpine/manifests/latest", "library/alpine"),
        ("/v2/alpine/manifests/latest", "alpine"),
        ("/v2/my-org/app/manifests/v1", "my-org/app"),
        ("/v2/ghcr.io/manifests/v1", "ghcr.io"),  # one component: a repo name, not a registry
    ],
)
async def test_default_registry(agent: Agent, path: str, name: str) -> None:
    t = target(agent, path)
    assert (t.upstream.name, t.upstream.url) == ("docker.io", DOCKER_HUB_ENDPOINT)
    assert t.name == name


async def test_configured_default_registry(tmp_path: Path) -> None:
    cfg = AgentConfig(
        data_dir=tmp_path,
        default_registry="registry.example.test",
        registries={"registry.example.test": Upstream("registry.example.test", "http://h:1")},
    )
    agent = Agent(cfg)
    try:
        t = target(agent, "/v2/app/manifests/v1")
        assert (t.upstream.url, t.name) == ("http://h:1", "app")
    finally:
        await agent.close()


@pytest.mark.parametrize(
    "path",
    [
        "/v2/team/app/manifests/v1?ns=evil.test",
        f"/v2/evil.test/team/app/blobs/{DIGEST}",
        f"/v2/127.0.0.1:8080/team/app/blobs/{DIGEST}",
    ],
)
async def test_unconfigured_registry_is_refused(agent: Agent, path: str) -> None:
    """Only configured registries are served: the runtime goes on to its fallback host."""
    with pytest.raises(OCIError) as exc:
        target(agent, path)
    assert (exc.value.code, exc.value.status) == ("NAME_UNKNOWN", 404)
    assert "evil" not in exc.value.message and "127.0.0.1" not in exc.value.message


async def test_default_registry_is_refused_unless_configured(tmp_path: Path) -> None:
    agent = Agent(AgentConfig(data_dir=tmp_path))
    try:
        with pytest.raises(OCIError) as exc:
            target(agent, "/v2/library/alpine/manifests/latest")
        assert exc.value.code == "NAME_UNKNOWN"
    finally:
        await agent.close()


@pytest.mark.parametrize(
    "path",
    [
        "/v2/app/manifests/v1?ns=bad/registry",
        "/v2/app/manifests/v1?ns=-bad.io",
        "/v2/app/manifests/v1?ns=",
        "/v2/app/manifests/v1?ns=a%0Ab",
        "/v2/Upper/manifests/v1",
        "/v2/registry.example.test/Upper/manifests/v1",
        "/v2/a//b/manifests/v1",
        "/v2/registry.example.test/%2e%2e/etc/manifests/v1",
        # a bad registry prefix
        "/v2/bad_.io/app/manifests/v1",
        "/v2/a..b/app/manifests/v1",
        "/v2/-x.io/app/manifests/v1",
        "/v2/x.io:99999/app/manifests/v1",
    ],
)
async def test_name_invalid(agent: Agent, path: str) -> None:
    with pytest.raises(OCIError) as exc:
        target(agent, path)
    assert exc.value.code == "NAME_INVALID"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/app%0A/manifests/v1",
        "/v2/app/manifests/v1%0A",
        f"/v2/app/blobs/{DIGEST}%0A",
        "/v2/registry.example.test%0A/app/manifests/v1",
        "/v2/app/manifests/v1?ns=registry.example.test%0A/x",
    ],
)
async def test_newlines_never_reach_a_target(agent: Agent, path: str) -> None:
    """A ``%0A`` anywhere must be refused, never forwarded to an upstream URL."""
    with pytest.raises(OCIError) as exc:
        target(agent, path)
    assert 400 <= exc.value.status < 500


@pytest.mark.parametrize(
    "ref",
    [
        "sha256:abc",
        f"sha256:{HEX.upper()}",
        f"md5:{hashlib.md5(b'x').hexdigest()}",
        "latest",  # a tag is not a blob reference
        f"{DIGEST}%0A",
        f"sha512:{HEX}",
    ],
)
async def test_blob_digest_invalid(agent: Agent, ref: str) -> None:
    with pytest.raises(OCIError) as exc:
        target(agent, f"/v2/library/alpine/blobs/{ref}")
    assert exc.value.code == "DIGEST_INVALID"


@pytest.mark.parametrize("ref", ["sha256:abc", "md5:0123"])
async def test_manifest_digest_invalid(agent: Agent, ref: str) -> None:
    with pytest.raises(OCIError) as exc:
        target(agent, f"/v2/library/alpine/manifests/{ref}")
    assert exc.value.code == "DIGEST_INVALID"


@pytest.mark.parametrize("ref", [".hidden", "latest%0A", "a" * 129])
async def test_manifest_bad_tag(agent: Agent, ref: str) -> None:
    with pytest.raises(OCIError) as exc:
        target(agent, f"/v2/library/alpine/manifests/{ref}")
    assert exc.value.code == "MANIFEST_UNKNOWN"


@pytest.mark.parametrize(
    "path", ["/v2/", "/v2/app/tags/list", "/v2/app/blobs/uploads/", "/v1/app/manifests/x"]
)
async def test_unsupported_paths(agent: Agent, path: str) -> None:
    with pytest.raises(OCIError) as exc:
        target(agent, path)
    assert exc.value.code == "NAME_UNKNOWN"


# --- torrents ----------------------------------------------------------------------------


def torrent_of(directory: Path, name: str, data: bytes, piece_size: int) -> Metainfo:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return Metainfo.parse(make_torrent(path, ["http://127.0.0.1:6969/announce"], piece_size))


def test_make_torrent_is_deterministic_across_directories(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000  # 256000 bytes: not a multiple of the piece size
    name = HEX
    a = torrent_of(tmp_path / "one", name, data, 16384)
    b = torrent_of(tmp_path / "two" / "deeper", name, data, 16384)
    assert a.info_hash == b.info_hash
    assert len(a.info_hash) == 40
    assert (a.name, a.size, a.piece_length) == (name, len(data), 16384)
    assert a.num_pieces == -(-len(data) // 16384)
    start, end = a.piece_range(a.num_pieces - 1)
    assert end == len(data) and a.piece_ok(a.num_pieces - 1, data[start:end])
    assert not a.piece_ok(0, b"\0" * 16384)


def test_make_torrent_info_hash_depends_on_piece_size_bytes_and_name(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    base = torrent_of(tmp_path / "a", HEX, data, 16384).info_hash
    assert torrent_of(tmp_path / "b", HEX, data, 32768).info_hash != base
    changed = bytearray(data)
    changed[-1] ^= 1
    assert torrent_of(tmp_path / "c", HEX, bytes(changed), 16384).info_hash != base
    assert torrent_of(tmp_path / "d", HEX + ".0000", data, 16384).info_hash != base
    # Trackers are outside the info dict: they do not change the info-hash.
    path = tmp_path / "a" / HEX
    other = Metainfo.parse(make_torrent(path, ["http://127.0.0.2:1/announce"], 16384))
    assert other.info_hash == base


@pytest.mark.parametrize("header", ["bytes 0-9", "garbage", "items=0-5", "bytes=0-1,5-9"])
def test_other_units_and_multi_ranges_get_the_whole_blob(header: str) -> None:
    """RFC 9110: a server may ignore a Range it does not support and answer 200."""
    assert parse_range(header, 100) is None


def test_a_torrent_from_known_piece_hashes_is_the_one_read_from_the_file(tmp_path: Path) -> None:
    """The seeder hashes pieces as it writes them; the torrent must not differ from one that
    libtorrent makes by reading the file (agents compare info-hashes)."""
    data = os.urandom(5 * 16384 + 100)
    path = tmp_path / "segment"
    path.write_bytes(data)
    hashes = [hashlib.sha1(data[i : i + 16384]).digest() for i in range(0, len(data), 16384)]
    trackers = ["http://127.0.0.1:6969/announce"]
    assert make_torrent(path, trackers, 16384, hashes) == make_torrent(path, trackers, 16384)
    with pytest.raises(SwarmError):
        make_torrent(path, trackers, 16384, hashes[:-1])
