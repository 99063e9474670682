"""Issue 19's probes against real parts: Debian's docker-registry with htpasswd as the
private origin, a liar registry that answers every HEAD with 200, a seeder with its own
credentials, agents as processes. None of them may get a byte of the private blob."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from support import failed, require_binaries
from support.fakes import LiarRegistry, http_server

from lab.images import ImageLayout, build_image, push_image
from lab.registry import Registry
from lab.stack import LocalStack
from p2p_mirror.core.clusterauth import SEEDER_API, TOKEN_HEADER, ClusterAuth

REG = "registry.example.test"
EVIL = "evil.test"
MiB = 1024 * 1024
ALICE = {"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, bool]:
    """(status, body, complete): ``complete`` is False if the response was cut short."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            try:
                return resp.status, resp.read(), True
            except http.client.IncompleteRead as e:
                return resp.status, e.partial, False
    except urllib.error.HTTPError as e:
        return e.code, e.read(), True


@dataclass
class Private:
    registry: Registry
    layout: ImageLayout
    blob: bytes  # the private layer's bytes

    @property
    def digest(self) -> str:
        return self.layout.layers[1].digest


@pytest.fixture
def private(tmp_path: Path, registry_factory) -> Private:
    require_binaries("docker-registry", "skopeo")
    registry = registry_factory(users={"alice": "s3cret"})
    layout = build_image(tmp_path / "oci", [1 * MiB, 2 * MiB], seed=1919)
    push_image(layout, registry.hostport, "team/app", "v1", creds=("alice", "s3cret"))
    layer = layout.layers[1]
    blob = (layout.path / "blobs" / "sha256" / layer.digest[7:]).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == layer.digest[7:]
    return Private(registry, layout, blob)


@pytest.fixture
def liar(private: Private) -> Iterator[str]:
    class Liar(LiarRegistry):
        size = len(private.blob)
        seen: list = []

    with http_server(Liar) as url:
        yield url


def seeder_auth(tmp_path: Path, user: bytes = b"alice:s3cret") -> Path:
    path = tmp_path / "seeder-auth.json"
    path.write_text(json.dumps({"auths": {REG: {"auth": base64.b64encode(user).decode()}}}))
    return path


def cluster_secret(tmp_path: Path) -> Path:
    path = tmp_path / "cluster-secret"
    path.write_text("s" * 40)
    path.chmod(0o600)
    return path


def leaks(private: Private, body: bytes) -> bool:
    """Whether ``body`` holds any 4 KiB run of the private blob's random data (the tar's
    zero padding is no secret: a liar sends zeros)."""
    runs = (private.blob[i : i + 4096] for i in range(0, len(private.blob), 4096))
    return any(run in body for run in runs if len(set(run)) > 64)


@pytest.fixture
def stack(tmp_path: Path, private: Private, liar: str, request) -> Iterator[LocalStack]:
    """The seeder knows REG (with its own credentials) and the liar (a configured registry
    that lies), and needs the cluster token."""
    secret = cluster_secret(tmp_path)
    with LocalStack(tmp_path / "stack", {REG: private.registry.url, EVIL: liar},
                    segment_size="1MiB",
                    seeder_args=("--registry-auth", str(seeder_auth(tmp_path)),
                                 "--cluster-secret", str(secret))) as st:  # fmt: skip
        st.secret = secret  # type: ignore[attr-defined]
        yield st
        if failed(request):
            st.dump_logs()


def test_probe1_a_cached_private_blob_is_not_served_through_another_registry(
    stack: LocalStack, private: Private, liar: str
) -> None:
    allowed = stack.add_agent("allowlisted", registries={REG: private.registry.url},
                              cluster_secret=str(stack.secret))  # type: ignore[attr-defined]
    blob = f"/v2/team/app/blobs/{private.digest}"
    status, body, complete = get(f"{allowed.url}{blob}?ns={REG}", ALICE)
    assert (status, complete) == (200, True) and body == private.blob
    # evil.test is not configured at this agent: refused, the runtime goes elsewhere.
    for url in (f"{allowed.url}{blob}?ns={EVIL}", f"{allowed.url}/v2/{EVIL}/team/app/blobs/"
                f"{private.digest}"):  # fmt: skip
        status, body, _ = get(url)
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
        assert not leaks(private, body)

    # A liar that is configured (a compromised registry): its HEAD says yes, but the cached
    # bytes came from REG, and the liar cannot send them.
    both = stack.add_agent("both", cluster_secret=str(stack.secret))  # type: ignore[attr-defined]
    assert get(f"{both.url}{blob}?ns={REG}", ALICE)[0] == 200  # cached here now
    for url in (f"{both.url}{blob}?ns={EVIL}", f"{both.url}/v2/{EVIL}/team/app/blobs/"
                f"{private.digest}"):  # fmt: skip
        status, body, complete = get(url)
        assert not leaks(private, body), url
        assert status != 200 or not complete

    # A fresh agent that has nothing cached asks the swarm through the liar: the seeder has
    # the blob from REG, but gives it out for the liar only if the liar sends its bytes.
    fresh = stack.add_agent("fresh", cluster_secret=str(stack.secret))  # type: ignore[attr-defined]
    status, body, complete = get(f"{fresh.url}{blob}?ns={EVIL}")
    assert not leaks(private, body)
    assert status != 200 or not complete
    assert fresh.blob_sources().get("swarm", 0) == 0


def test_probe2_the_seeder_gives_nothing_without_the_cluster_token(
    stack: LocalStack, private: Private
) -> None:
    base = f"{stack.seeder_url}/v1/blobs/{private.digest}"
    token = {TOKEN_HEADER: ClusterAuth.from_file(stack.secret, "test").token(SEEDER_API)}  # type: ignore[attr-defined]
    for params in (f"registry={REG}&repo=team/app", "registry=nowhere.test&repo=team/app"):
        for headers in ({}, ALICE):
            status, body, _ = get(f"{base}?{params}", headers)
            assert status == 401, body
        for path in ("/torrents/0", "/segments/0/pieces/0?count=8"):
            status, body, _ = get(f"{base}{path}", ALICE)
            assert status == 401 and not leaks(private, body)
    # With the token, a registry the seeder does not know is refused before any request.
    status, body, _ = get(f"{base}?registry=nowhere.test&repo=team/app", token)
    assert status == 404 and b"nowhere" not in body


def test_probe5_client_credentials_never_reach_the_seeder(
    tmp_path: Path, private: Private
) -> None:
    """The agent's seeder is a recorder: it must see the cluster token, never a client's
    Authorization. The pull still succeeds (from the origin)."""
    seen: list[dict[str, str]] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(dict(self.headers))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    secret = cluster_secret(tmp_path)
    with http_server(Recorder) as recorder, LocalStack(
        tmp_path / "stack", {REG: private.registry.url}
    ) as stack:
        agent = stack.add_agent("agent", seeder=[recorder], cluster_secret=str(secret),
                                swarm_timeout=5)  # fmt: skip
        status, body, complete = get(f"{agent.url}/v2/team/app/blobs/{private.digest}?ns={REG}",
                                     ALICE)  # fmt: skip
        assert (status, complete) == (200, True) and body == private.blob
    assert seen, "the agent never asked its seeder"
    for headers in seen:
        assert "Authorization" not in headers and "alice" not in json.dumps(headers)
        assert headers[TOKEN_HEADER] == ClusterAuth.from_file(secret, "t").token(SEEDER_API)


def test_a_registry_the_seeder_has_no_credentials_for_still_pulls(
    tmp_path: Path, private: Private
) -> None:
    with LocalStack(tmp_path / "stack", {REG: private.registry.url},
                    seeder_args=("--registry-auth",
                                 str(seeder_auth(tmp_path, b"alice:wrong")))) as stack:  # fmt: skip
        agent = stack.add_agent("agent")
        status, body, complete = get(f"{agent.url}/v2/team/app/blobs/{private.digest}?ns={REG}",
                                     ALICE)  # fmt: skip
        assert (status, complete) == (200, True) and body == private.blob
        assert agent.blob_sources().get("origin") == len(private.blob)
        assert agent.metric("fallbacks_total", reason="seeder_refused") == 1
