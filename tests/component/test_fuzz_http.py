"""Property-based fuzzing of the agent's registry API and the seeder's API (hypothesis).

Both run in-process on loopback in front of an in-process origin stand-in. Whatever the
request (malformed names, digests, ranges, headers and query strings, path traversal with
encoded slashes, huge values), the answer must be a well-formed error or a correct answer:
never a 500 or a traceback, never a hang (each request has a deadline), and nothing may be
written outside the role's data directory. The example counts keep both under ~60 s.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support import snapshot
from support.fakes import StaticOrigin
from yarl import URL

from p2p_mirror.agent.server import Agent
from p2p_mirror.core.config import AgentConfig, SeederConfig, load_config
from p2p_mirror.core.oci import OCIError
from p2p_mirror.seeder.server import Seeder

REG = "reg.test"
BLOB = os.urandom(300_000)
BLOB_DIGEST = f"sha256:{hashlib.sha256(BLOB).hexdigest()}"
REQUEST_DEADLINE = 15.0  # seconds: a request that takes longer is a hang
# No shrinking unless asked for (FUZZ_SHRINK=1): it can take minutes, and CI must not.
PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("FUZZ_SHRINK")
                                             else [])  # fmt: skip
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None, derandomize=True,
    database=None, phases=PHASES,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Served:
    loop: asyncio.AbstractEventLoop
    url: str
    session: aiohttp.ClientSession
    root: Path  # the test's directory: nothing may change in it outside data_dir
    data_dir: Path
    origin: StaticOrigin

    def ask(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        # a valid request target (ASCII, no fragment) with every trick inside it left as is
        path = quote(path, safe="/%:@?&=+;,~!$'()*")

        async def go() -> tuple[int, bytes]:
            async with self.session.request(
                method, URL(self.url + path, encoded=True), headers=headers,
                allow_redirects=False,
            ) as resp:
                return resp.status, await resp.read()

        return self.loop.run_until_complete(asyncio.wait_for(go(), REQUEST_DEADLINE))

    def outside_data_dir(self) -> dict[str, object]:
        return {k: v for k, v in snapshot(self.root).items()
                if not k.startswith(self.data_dir.name)}  # fmt: skip


def _serve(tmp_path: Path, make_app) -> Iterator[Served]:
    """Run the origin and the role built by ``make_app(origin_url, data_dir)`` on a private
    loop for the whole test (hypothesis calls the test body many times)."""
    loop = asyncio.new_event_loop()
    origin = StaticOrigin([BLOB])
    origin_server = TestServer(origin.app(), host="127.0.0.1", loop=loop)
    loop.run_until_complete(origin_server.start_server())
    data_dir = tmp_path / "data"
    app, close = loop.run_until_complete(make_app(str(origin_server.make_url("")), data_dir))
    server = TestServer(app, host="127.0.0.1", loop=loop)
    loop.run_until_complete(server.start_server())
    session = loop.run_until_complete(_session())
    try:
        yield Served(loop, str(server.make_url("")).rstrip("/"), session, tmp_path, data_dir,
                     origin)  # fmt: skip
    finally:
        loop.run_until_complete(session.close())
        loop.run_until_complete(server.close())
        loop.run_until_complete(close())
        loop.run_until_complete(origin_server.close())
        loop.close()


async def _session() -> aiohttp.ClientSession:
    # a connection per request: one example's answer cannot leak into the next
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Served]:
    async def make(origin_url: str, data_dir: Path):
        cfg = load_config(AgentConfig, None, {
            "data_dir": str(data_dir), "registries": {REG: origin_url},
            "default_registry": REG,
        })  # fmt: skip
        role = Agent(cfg)
        await role.start()
        return role.app(), role.close

    yield from _serve(tmp_path, make)


@pytest.fixture
def seeder(tmp_path: Path) -> Iterator[Served]:
    async def make(origin_url: str, data_dir: Path):
        cfg = load_config(SeederConfig, None, {
            "data_dir": str(data_dir), "tracker": ["http://127.0.0.1:9/announce"],
            "bt_listen": "127.0.0.1:0", "registries": {REG: origin_url},
        })  # fmt: skip
        role = Seeder(cfg)
        await role.start()
        return role.app(), role.close

    yield from _serve(tmp_path, make)


# --- strategies ----------------------------------------------------------------------------

NASTY = ["..", "%2e%2e", "%2E%2E", "%2F", "%2f", "/", "%00", "%5C", "\\", ".", "~", "%25",
         "A", "a", "-", "_", "__", ":", "@", "?", "#", "%", "%zz", "%C0%AE", "\u2024"]  # fmt: skip


def _encoded(text: str) -> str:
    return quote(text, safe="/%:@")


components = st.one_of(
    st.sampled_from(["library", "demo", "a", "ubuntu", "etc", "passwd", REG, "localhost:5000"]),
    st.lists(st.sampled_from(NASTY), min_size=1, max_size=6).map("".join),
    st.text(min_size=0, max_size=40).map(_encoded),
    st.just("a" * 300),
)
names = st.lists(components, min_size=1, max_size=6).map("/".join)
hexes = st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=140)
digests = st.one_of(
    st.just(BLOB_DIGEST),
    st.just("sha256:" + "e" * 64),  # the origin claims 2^45 bytes for this one
    st.builds(lambda alg, h: f"{alg}:{h}", st.sampled_from(["sha256", "sha512", "md5", "SHA256",
                                                           "", "sha256+x"]), hexes),
    st.text(max_size=80).map(_encoded),
)
refs = st.one_of(digests, st.sampled_from(["v1", "latest", "", "-x", "a" * 200]), components)
numbers = st.one_of(st.integers(-(2**70), 2**70).map(str), st.sampled_from(
    ["", "nan", "inf", "-0", "1e308", "0x10", "1_000", " 1", "\u0661", "9" * 6000]))
ranges = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", numbers, numbers),
    st.sampled_from(["bytes=0-", "bytes=-1", "bytes=-", "bytes=5-1", "bytes=0-0,1-1",
                     "items=0-1", "bytes=99999999999999999999-"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
)
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200)
headers = st.fixed_dictionaries({}, optional={
    "Range": ranges, "Accept": header_text, "Authorization": header_text,
    "If-None-Match": header_text, "X-P2P-Mirror-Token": header_text,
    "Host": header_text.filter(bool),
})  # fmt: skip
methods = st.sampled_from(["GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])


def _query(params: dict[str, str]) -> str:
    return "&".join(f"{quote(k)}={quote(v, safe='%')}" for k, v in params.items())


agent_paths = st.one_of(
    st.builds(lambda n, k, r, q: f"/v2/{n}/{k}/{r}" + (f"?{_query(q)}" if q else ""),
              names, st.sampled_from(["manifests", "blobs", "tags", "Blobs"]), refs,
              st.dictionaries(st.sampled_from(["ns", "n", "last", "ns "]),
                              st.one_of(st.just(REG), components, st.just("x" * 400)),
                              max_size=2)),
    st.lists(components, max_size=8).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(["/v2", "/v2/", "/healthz", "/metrics", "//v2//", "/v2/../../etc/passwd",
                     "/v2/%2e%2e/%2e%2e/etc/passwd/blobs/x"]),
)


# --- the agent -----------------------------------------------------------------------------


MAX_FIELD = 8190  # aiohttp's own limit on a header line: refused (400) before any handler


def _http_layer_refuses(sent: dict[str, str]) -> bool:
    return any(len(k) + len(v) + 2 > MAX_FIELD for k, v in sent.items())


def _is_oci_error(body: bytes) -> bool:
    errors = json.loads(body)["errors"]
    return bool(errors) and all(e["code"] in OCIError.STATUS and e["message"] for e in errors)


AGENT_SHAPES = {
    # the real blob (cached after the first GET) with fuzzed headers: ranges above all
    "blob": st.builds(lambda ns: f"/v2/library/demo/blobs/{BLOB_DIGEST}?ns={ns}",
                      st.sampled_from([REG, REG, "", "x" * 300, "reg.test:0", "a/b"])),
    "manifest": st.builds(lambda ref: f"/v2/library/demo/manifests/{ref}?ns={REG}", refs),
    "name": st.builds(lambda name: f"/v2/{name}/blobs/{BLOB_DIGEST}?ns={REG}", names),
    "any path": agent_paths,
}



def _assert_well_formed(method: str, sent: dict[str, str], status: int, body: bytes) -> bool:
    """No 5xx but 503, a 400 where the HTTP layer must refuse, an OCI error body on any
    other error with a body; True if the answer is neither refused nor an error."""
    assert status < 500 or status == 503, (status, body[:300])
    if _http_layer_refuses(sent):
        assert status == 400
        return False
    if status >= 400:
        if method != "HEAD":
            assert _is_oci_error(body), (status, body[:300])
        return False
    return True


@pytest.mark.parametrize("shape", sorted(AGENT_SHAPES))
def test_the_agent_answers_any_request_with_a_well_formed_answer(
    agent: Served, shape: str
) -> None:
    before = agent.outside_data_dir()
    method = methods if shape == "any path" else st.sampled_from(["GET", "GET", "HEAD"])

    @settings(FUZZ, max_examples=FUZZ.max_examples // 2)
    @given(method=method, path=AGENT_SHAPES[shape], sent=headers)
    def check(method: str, path: str, sent: dict[str, str]) -> None:
        status, body = agent.ask(method, path, sent)
        answered = _assert_well_formed(method, sent, status, body)
        if answered and method == "GET" and status in (200, 206) and "/blobs/" in path:
            assert body in BLOB, "served bytes that are not the blob's"

    check()
    assert agent.outside_data_dir() == before


def test_the_agent_refuses_a_huge_blob_before_allocating_it(agent: Served) -> None:
    status, body = agent.ask("GET", f"/v2/library/demo/blobs/{agent.origin.huge_digest}", {})
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "SIZE_INVALID"
    assert b"max_blob_size" in body
    assert not list((agent.data_dir / "blobs").rglob("*.*"))  # no segment file was made


# --- the seeder ----------------------------------------------------------------------------

VALID_SEEDER_PARAMS = {"registry": REG, "repo": "library/demo", "bt_port": "6881",
                       "wait": "0.1", "pieces": "inline", "count": "1"}  # fmt: skip
bad_values = st.one_of(numbers, components, st.sampled_from(["inline", "all", "0", "65536"]))


@st.composite
def seeder_params(draw) -> dict[str, str]:
    """Valid parameters with one or two dropped or replaced, so that each bad one meets the
    code past the others' checks."""
    params = dict(VALID_SEEDER_PARAMS)
    for key in draw(st.lists(st.sampled_from([*VALID_SEEDER_PARAMS, "x"]), min_size=1,
                             max_size=2)):  # fmt: skip
        if draw(st.booleans()):
            params[key] = draw(bad_values)
        else:
            params.pop(key, None)
    return params


def _with_query(path: str, params: dict[str, str]) -> str:
    return f"{path}?{_query(params)}" if params else path


indexes = st.one_of(st.just("0"), st.just("1"), numbers)
SEEDER_SHAPES = {
    # each endpoint of the real (ingested) blob with fuzzed parameters...
    "blob info": st.builds(_with_query, st.just(f"/v1/blobs/{BLOB_DIGEST}"), seeder_params()),
    "torrent": st.builds(_with_query, st.just(f"/v1/blobs/{BLOB_DIGEST}/torrents/0"),
                         seeder_params()),
    "pieces": st.builds(_with_query, st.just(f"/v1/blobs/{BLOB_DIGEST}/segments/0/pieces/0"),
                        seeder_params()),
    # ...and anything at all in the path
    "any path": st.builds(
        lambda digest, tail, params: _with_query(f"/v1/blobs/{digest}{tail}", params),
        digests,
        st.one_of(st.just(""), st.builds("/torrents/{}".format, indexes),
                  st.builds("/segments/{}/pieces/{}".format, indexes, indexes),
                  st.lists(components, max_size=3).map(lambda p: "/" + "/".join(p))),
        seeder_params(),
    ),
}


@pytest.mark.parametrize("shape", sorted(SEEDER_SHAPES))
def test_the_seeder_answers_any_request_with_a_well_formed_answer(
    seeder: Served, shape: str
) -> None:
    # the real blob first, so torrent and piece requests reach published segments
    info = f"/v1/blobs/{BLOB_DIGEST}?registry={REG}&repo=library/demo"
    status, body = seeder.ask("GET", info, {})
    assert status == 200, body
    before = seeder.outside_data_dir()
    method = methods if shape == "any path" else st.just("GET")

    @settings(FUZZ, max_examples=FUZZ.max_examples // 2)
    @given(method=method, path=SEEDER_SHAPES[shape], sent=headers)
    def check(method: str, path: str, sent: dict[str, str]) -> None:
        status, body = seeder.ask(method, path, sent)
        _assert_well_formed(method, sent, status, body)

    check()
    assert seeder.outside_data_dir() == before
