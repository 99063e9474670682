"""The fault table of issue 20: pulls through real agents, seeder and tracker processes in
front of the real registry, with faults injected by a relay (``support.fakes.FaultRelay``)
or by killing and damaging the parts.

Each test adds a row: faults injected, pulls attempted and completed, bad bytes served (a
complete 200 whose bytes fail the digest: must be 0), corrupt cache entries (every entry of
every role re-hashed after the test: must be 0), and each role's peak RSS where measured.
The table goes to ``$FAULT_TABLE`` (default: the session's tmp dir), printed at the end;
``python -m bench.faults`` runs this module and prints it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from support import failed, require_binaries, require_root
from support.fakes import FaultRelay

from lab.images import PushedImage
from lab.procs import wait_for
from lab.registry import Registry
from lab.stack import AgentProc, LocalStack
from p2p_mirror.core.oci import Digest
from p2p_mirror.core.store import BlobStore

REG = "registry.example.test"
MiB = 1024 * 1024
FAST_FALLBACK = {"swarm_timeout": 5, "stall_timeout": 3, "swarm_min_rate": "1MiB"}


# --- the table -----------------------------------------------------------------------------


@dataclass
class Row:
    fault: str
    injected: str
    attempted: int = 0
    completed: int = 0
    bad_bytes: int = 0
    corrupt_entries: int = 0
    peak_rss: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def markdown(self) -> str:
        rss = ", ".join(f"{role} {mb // MiB} MiB" for role, mb in sorted(self.peak_rss.items()))
        return (f"| {self.fault} | {self.injected} | {self.attempted} | {self.completed} | "
                f"{self.bad_bytes} | {self.corrupt_entries} | {rss or '-'} | {self.note} |")


HEADER = ("| fault | injected | pulls attempted | pulls completed | bad bytes served | "
          "corrupt cache entries | peak RSS | note |\n|---|---|---|---|---|---|---|---|")


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Row]]:
    rows: list[Row] = []
    yield rows
    path = Path(os.environ.get("FAULT_TABLE") or tmp_path_factory.getbasetemp() / "faults.md")
    text = HEADER + "\n" + "\n".join(r.markdown() for r in rows) + "\n"
    path.write_text(text)
    print(f"\nfault table ({path}):\n{text}")


# --- pulling and checking ----------------------------------------------------------------


def blobs_of(image: PushedImage) -> list[tuple[str, int]]:
    layout = image.layout
    return [(layer.digest, layer.size) for layer in layout.layers] + [
        (layout.config_digest, layout.config_size)]  # fmt: skip


@dataclass
class PullResult:
    completed: bool
    bad_bytes: int
    errors: list[str]


MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.v2+json")


def fetch(url: str, timeout: float = 120) -> tuple[int, bytes | None]:
    """(status, body); body None when the response was cut (never a complete blob)."""
    request = urllib.request.Request(url, headers={"Accept": MANIFEST_TYPES})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            try:
                return resp.status, resp.read()
            except Exception:  # noqa: BLE001 - a cut body: the client saw an incomplete blob
                return resp.status, None
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception:  # noqa: BLE001 - connection refused or reset: nothing served
        return 0, None


def pull(agent: AgentProc, image: PushedImage) -> PullResult:
    """The image's manifest and every blob through ``agent``, blobs three at a time (as a
    runtime does); bad bytes are those of complete 200s that fail their digest."""
    status, body = fetch(f"{agent.url}/v2/{image.repo}/manifests/{image.tag}?ns={REG}")
    if status != 200:
        return PullResult(False, 0, [f"manifest: {status} {(body or b'')[:200]!r}"])

    def one(blob: tuple[str, int]) -> tuple[bool, int, str]:
        digest, _ = blob
        status, data = fetch(f"{agent.url}/v2/{image.repo}/blobs/{digest}?ns={REG}")
        if status != 200 or data is None:
            return False, 0, f"{digest[:19]}: {status} {'cut' if data is None else data[:100]}"
        good = hashlib.sha256(data).hexdigest() == digest.split(":")[1]
        return good, 0 if good else len(data), "" if good else f"{digest[:19]}: wrong bytes"

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, blobs_of(image)))
    return PullResult(all(ok for ok, _, _ in results), sum(bad for _, bad, _ in results),
                      [e for _, _, e in results if e])  # fmt: skip


def corrupt_entries(data_dirs: list[Path]) -> int:
    """Verified cache entries whose bytes fail their digest, over every role's store."""
    bad = 0
    for data_dir in data_dirs:
        if not (data_dir / "blobs").exists():
            continue
        store = BlobStore(data_dir)
        for entry in store.entries():
            layout = store.layout(entry.digest)
            assert layout is not None
            hasher = entry.digest.hasher()
            for offset in range(0, layout.size, 4 * MiB):
                hasher.update(layout.read(offset, min(4 * MiB, layout.size - offset)))
            bad += hasher.hexdigest() != entry.digest.hex
    return bad


class RssSampler:
    """Peak RSS of processes (by role) while the block runs, sampled every 50 ms."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {role: psutil.Process(pid) for role, pid in pids.items()}
        self.peak = {role: 0 for role in pids}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            for role, proc in self.procs.items():
                try:
                    rss = proc.memory_info().rss + sum(
                        c.memory_info().rss for c in proc.children(recursive=True))
                except psutil.Error:
                    continue
                self.peak[role] = max(self.peak[role], rss)
            self._done.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5)


# --- fixtures ------------------------------------------------------------------------------


@dataclass
class Rig:
    stack: LocalStack
    relay: FaultRelay
    image: PushedImage

    def data_dirs(self) -> list[Path]:
        return [self.stack.workdir / "seeder", *(a.data_dir for a in self.stack.agents)]

    def row(self, table: list[Row], fault: str, results: list[PullResult], note: str = "",
            injected: str | None = None, **extra: object) -> Row:  # fmt: skip
        row = Row(fault, injected if injected is not None else f"{self.relay.faults} relay",
                  attempted=len(results), completed=sum(r.completed for r in results),
                  bad_bytes=sum(r.bad_bytes for r in results),
                  corrupt_entries=corrupt_entries(self.data_dirs()), note=note,
                  **extra)  # type: ignore[arg-type]  # fmt: skip
        table.append(row)
        return row


@pytest.fixture
def rig_factory(tmp_path: Path, registry: Registry, image: PushedImage,
                request: pytest.FixtureRequest) -> Iterator[Callable[..., Rig]]:  # fmt: skip
    require_binaries("docker-registry")
    made: list[Rig] = []

    def make(**relay: object) -> Rig:
        fault_relay = FaultRelay(registry.url, **relay).start()  # type: ignore[arg-type]
        stack = LocalStack(tmp_path / "stack", {REG: fault_relay.url}, segment_size="2MiB")
        rig = Rig(stack, fault_relay, image)
        made.append(rig)
        stack.start()
        return rig

    try:
        yield make
    finally:
        for rig in made:
            if failed(request):
                rig.stack.dump_logs(60)
            rig.stack.close()
            rig.relay.stop()


def the_largest(image: PushedImage) -> str:
    return max(image.layout.layers, key=lambda layer: layer.size).digest


def killed_after(proc, seconds: float) -> threading.Thread:
    """SIGKILL ``proc``'s process group after ``seconds``, from a thread."""

    def kill() -> None:
        time.sleep(seconds)
        os.killpg(proc.pid, 9)
        proc.popen.wait(10)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


# --- origin faults -------------------------------------------------------------------------


def test_a_slow_origin_body_holds_no_pull(rig_factory, table: list[Row]) -> None:
    """The seeder's body of the largest layer trickles at 16 KiB/s (below origin_min_rate):
    it yields its origin slot, the other layers go on, and the agent takes that layer from
    the origin once its segment deadline passes."""
    image_largest: list[str] = []
    rig = rig_factory(fault="slow", rate=16 * 1024,
                      matches=lambda d: d in image_largest)  # fmt: skip
    image_largest.append(the_largest(rig.image))
    agent = rig.stack.add_agent("agent1", **FAST_FALLBACK)
    start = time.monotonic()
    result = pull(agent, rig.image)
    took = time.monotonic() - start
    assert result.completed, result.errors
    assert took < 45, took
    assert agent.metric("fallbacks_total", reason="deadline") + agent.metric(
        "fallbacks_total", reason="seeder") >= 1
    rig.row(table, "slow origin body (16 KiB/s)", [result], f"pull took {took:.0f}s")


@pytest.mark.parametrize(
    ("fault", "label"),
    [("5xx", "origin 503 (first 2 GETs of each blob)"),
     ("reset", "origin reset after 256 KiB"),
     ("stall", "origin stalls after 256 KiB")],
)  # fmt: skip
def test_origin_errors_cost_no_pull(rig_factory, table: list[Row], fault: str,
                                    label: str) -> None:  # fmt: skip
    rig = rig_factory(fault=fault, times=2 if fault == "5xx" else 1)
    agent = rig.stack.add_agent("agent1", **FAST_FALLBACK)
    start = time.monotonic()
    result = pull(agent, rig.image)
    took = time.monotonic() - start
    assert result.completed, result.errors
    assert rig.relay.faults >= 1
    rig.row(table, label, [result], f"pull took {took:.0f}s")


def test_a_lying_origin_never_gets_its_bytes_served(rig_factory, table: list[Row]) -> None:
    """Every GET of the largest layer has flipped bytes: that blob cannot be pulled, but no
    client ever receives a complete response with them, and nothing wrong is cached."""
    largest: list[str] = []
    rig = rig_factory(fault="lie", times=0, matches=lambda d: d in largest)
    largest.append(the_largest(rig.image))
    agent = rig.stack.add_agent("agent1", **FAST_FALLBACK)
    results = [pull(agent, rig.image), pull(agent, rig.image)]
    assert not any(r.completed for r in results)
    assert all(r.bad_bytes == 0 for r in results)
    assert BlobStore(agent.data_dir).layout(Digest.parse(largest[0])) is None
    rig.row(table, "lying origin (every GET of one layer)", results,
            "expected: 0 completed (the origin never sends the right bytes)")


# --- parts killed or lying ---------------------------------------------------------------


def test_the_seeder_killed_mid_pull(rig_factory, table: list[Row]) -> None:
    rig = rig_factory(fault="slow", rate=1 * MiB)  # the seeder's bodies take a few seconds
    agent = rig.stack.add_agent("agent1", **FAST_FALLBACK)
    assert rig.stack.seeder is not None
    killer = killed_after(rig.stack.seeder, 1.5)
    result = pull(agent, rig.image)
    killer.join()
    assert result.completed, result.errors
    rig.row(table, "seeder killed mid-pull", [result], injected="SIGKILL at 1.5 s")


def test_the_tracker_killed(rig_factory, table: list[Row]) -> None:
    rig = rig_factory()
    agents = [rig.stack.add_agent(f"agent{i}", **FAST_FALLBACK) for i in (1, 2)]
    assert rig.stack.tracker is not None
    rig.stack.tracker.stop()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda a: pull(a, rig.image), agents))
    assert all(r.completed for r in results), [r.errors for r in results]
    rig.row(table, "tracker killed before the pulls (2 agents)", results, injected="SIGTERM")


def test_a_peer_killed_mid_pull(rig_factory, table: list[Row]) -> None:
    """Two agents pull at once; one dies half way: the other completes."""
    rig = rig_factory(fault="slow", rate=1 * MiB)
    victim, survivor = (rig.stack.add_agent(f"agent{i}", **FAST_FALLBACK) for i in (1, 2))
    with ThreadPoolExecutor(2) as pool:
        pending = pool.submit(pull, survivor, rig.image)
        killed = pool.submit(pull, victim, rig.image)
        killed_after(victim.proc, 2.0).join()
        results = [pending.result(), killed.result()]
    assert results[0].completed, results[0].errors
    assert results[0].bad_bytes == results[1].bad_bytes == 0
    rig.row(table, "peer (agent) killed mid-pull", results, injected="SIGKILL at 2 s",
            note="the killed agent's own pull is cut")


def test_the_agent_killed_mid_pull_and_restarted(rig_factory, table: list[Row]) -> None:
    rig = rig_factory(fault="slow", rate=1 * MiB)
    agent = rig.stack.add_agent("agent1", **FAST_FALLBACK)
    with ThreadPoolExecutor(1) as pool:
        cut = pool.submit(pull, agent, rig.image)
        killed_after(agent.proc, 1.5).join()
        first = cut.result()
    rig.stack.agents.remove(agent)
    again = rig.stack.add_agent("agent1", **FAST_FALLBACK)  # same data dir
    assert again.data_dir == agent.data_dir
    second = pull(again, rig.image)
    assert second.completed, second.errors
    rig.row(table, "agent killed mid-pull, restarted", [first, second],
            injected="SIGKILL at 1.5 s", note="the first pull is cut; the restarted one "
            "completes on the same cache")  # fmt: skip


def test_a_corrupt_peer(rig_factory, table: list[Row]) -> None:
    """The seeder's segment files are damaged after it made the torrents: pieces fail their
    hash, and the agent gets the bytes from the origin."""
    rig = rig_factory()
    layer = the_largest(rig.image)
    info = json.loads(fetch(f"{rig.stack.seeder_url}/v1/blobs/{layer}?registry={REG}"
                            f"&repo={rig.image.repo}")[1] or b"{}")  # fmt: skip
    last = info["segments"] - 1
    assert fetch(f"{rig.stack.seeder_url}/v1/blobs/{layer}/torrents/{last}?bt_port=1")[0] == 200
    blob_dir = rig.stack.workdir / "seeder" / "blobs" / "sha256" / layer[7:]
    segments = [p for p in blob_dir.glob(f"*/{layer[7:]}*") if p.suffix != ".torrent"]
    for segment in segments:
        with open(segment, "r+b") as f:
            f.write(b"\0" * 4096)
    agent = rig.stack.add_agent("agent1", **FAST_FALLBACK)
    result = pull(agent, rig.image)
    assert result.completed, result.errors
    # the seeder's own damaged entry is the injected fault, not one the roles made
    damaged = corrupt_entries([rig.stack.workdir / "seeder"])
    row = rig.row(table, "corrupt peer (seeder's files damaged)", [result],
                  injected=f"{len(segments)} segment files", note=f"{damaged} entry damaged "
                  "by the test itself, not counted")  # fmt: skip
    row.corrupt_entries -= damaged


# --- disk, sizes and floods ---------------------------------------------------------------


def test_a_full_cache_streams_from_the_origin(rig_factory, table: list[Row]) -> None:
    """A tiny cache_max_bytes (2 MiB, below the 3 MiB layer; a stand-in for a full disk,
    which needs no mount): that layer is streamed uncached, the pull completes, and the
    cache never exceeds its cap."""
    rig = rig_factory()
    agent = rig.stack.add_agent("agent1", cache_max_bytes="2MiB", **FAST_FALLBACK)
    results = [pull(agent, rig.image), pull(agent, rig.image)]
    assert all(r.completed for r in results), [r.errors for r in results]
    assert agent.metric("uncached_blobs_total") >= 1
    assert BlobStore(agent.data_dir).usage() <= 2 * MiB
    rig.row(table, "cache full (cache_max_bytes 2 MiB < layer)", results,
            injected="tiny cache cap", note="largest layer streamed uncached")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 5 MiB tmpfs, mounted for the test and unmounted after it (needs root)."""
    require_root()
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_streams_from_the_origin(rig_factory, table: list[Row],
                                             small_disk: Path) -> None:  # fmt: skip
    """The agent's cache on a real 5 MiB filesystem: the image (~6 MiB) cannot all fit, so
    what finds no room after eviction is streamed uncached; no write fails, no pull fails,
    and the filesystem never fills past min_free_disk."""
    rig = rig_factory()
    agent = rig.stack.add_agent("agent1", data_dir=str(small_disk / "agent"),
                                cache_max_bytes=0, min_free_disk="10%",
                                **FAST_FALLBACK)  # fmt: skip
    agent.data_dir = small_disk / "agent"
    results = [pull(agent, rig.image) for _ in range(3)]
    assert all(r.completed for r in results), [r.errors for r in results]
    assert agent.metric("uncached_blobs_total") >= 1
    usage = shutil.disk_usage(small_disk)
    assert usage.free >= 0.1 * usage.total - 64 * 1024, usage
    rig.row(table, "disk full (agent cache on a 5 MiB tmpfs, image ~6 MiB)", results,
            injected="real small filesystem",
            note=f"{int(agent.metric('uncached_blobs_total'))} blobs streamed uncached")


def test_huge_sizes_are_refused_without_memory(rig_factory, table: list[Row]) -> None:
    huge = "sha256:" + "e" * 64
    rig = rig_factory(huge=(huge,))
    agent = rig.stack.add_agent("agent1", **FAST_FALLBACK)
    assert rig.stack.seeder is not None
    pids = {"agent": agent.proc.pid, "seeder": rig.stack.seeder.pid}
    with RssSampler(pids) as rss:
        for _ in range(20):
            status, body = fetch(f"{agent.url}/v2/{rig.image.repo}/blobs/{huge}?ns={REG}")
            assert status == 400 and body and b"SIZE_INVALID" in body, (status, body)
            status, body = fetch(f"{rig.stack.seeder_url}/v1/blobs/{huge}?registry={REG}"
                                 f"&repo={rig.image.repo}")  # fmt: skip
            assert status == 400 and body and b"SIZE_INVALID" in body, (status, body)
    result = pull(agent, rig.image)
    assert result.completed
    assert max(rss.peak.values()) < 400 * MiB, rss.peak
    rig.row(table, "huge sizes (HEAD says 2^45 bytes)", [result], injected="40 requests",
            peak_rss=rss.peak, note="refused with SIZE_INVALID before allocating")


def test_floods_of_requests_and_announces(rig_factory, table: list[Row]) -> None:
    """Thousands of malformed, huge and valid requests at the agent, the seeder and the
    tracker at once; then a pull still completes, and each role's memory stays bounded."""
    rig = rig_factory()
    agent = rig.stack.add_agent("agent1", **FAST_FALLBACK)
    assert pull(agent, rig.image).completed  # warm: the flood also hits cached blobs
    stack = rig.stack
    assert stack.seeder is not None and stack.tracker is not None
    rng = random.Random(20)
    big = "9" * 6000
    layer = the_largest(rig.image)
    agent_urls = [
        f"{agent.url}/v2/{rig.image.repo}/blobs/{layer}?ns={REG}",
        f"{agent.url}/v2/{rig.image.repo}/manifests/{rig.image.tag}?ns={REG}",
        f"{agent.url}/v2/..%2F..%2Fetc/blobs/{layer}?ns={REG}",
        f"{agent.url}/v2/{rig.image.repo}/blobs/sha256:{'0' * 64}?ns={'x' * 4000}",
    ]
    seeder_urls = [
        f"{stack.seeder_url}/v1/blobs/{layer}/torrents/0?bt_port={big}&wait=0",
        f"{stack.seeder_url}/v1/blobs/{layer}/torrents/0?bt_port=1&wait={big}",
        f"{stack.seeder_url}/v1/blobs/{layer}/segments/0/pieces/0?count={big}",
    ]

    def announce() -> str:
        info_hash = "".join(f"%{rng.randrange(256):02X}" for _ in range(20))
        peer = "".join(f"%{rng.randrange(256):02X}" for _ in range(20))
        return (f"http://127.0.0.1:{stack.tracker_port}/announce?info_hash={info_hash}"
                f"&peer_id={peer}&port={rng.randrange(1, 65535)}&uploaded=0&downloaded=0"
                f"&left=0&compact=1")

    requests = ([rng.choice(agent_urls) for _ in range(1500)]
                + [rng.choice(seeder_urls) for _ in range(1500)]
                + [announce() for _ in range(1500)])  # fmt: skip
    rng.shuffle(requests)
    pids = {"agent": agent.proc.pid, "seeder": stack.seeder.pid, "tracker": stack.tracker.pid}
    statuses: dict[int, int] = {}
    with RssSampler(pids) as rss:
        with ThreadPoolExecutor(32) as pool:
            for status, _ in pool.map(lambda u: fetch(u, timeout=30), requests):
                statuses[status] = statuses.get(status, 0) + 1
        result = pull(agent, rig.image)
    assert result.completed, result.errors
    assert statuses.get(500, 0) == 0, statuses
    assert rss.peak["agent"] < 300 * MiB and rss.peak["seeder"] < 300 * MiB, rss.peak
    wait_for(lambda: agent.proc.alive() and stack.seeder.alive(), 5, "roles alive")
    rig.row(table, "flood: 1500 requests each at agent, seeder, tracker (32 at once)",
            [result], injected=f"{len(requests)} requests", peak_rss=rss.peak,
            note="statuses " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))


def bt_ports(pid: int, http_ports: set[int]) -> list[int]:
    """The TCP ports the process (and its children) listens on besides ``http_ports``: its
    BitTorrent port (``bt_listen`` 127.0.0.1:0 picks one)."""
    proc = psutil.Process(pid)
    ports = {c.laddr.port for p in (proc, *proc.children(recursive=True))
             for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}  # fmt: skip
    return sorted(ports - http_ports)


def bt_handshake(info_hash: bytes, peer_id: bytes) -> bytes:
    return b"\x13BitTorrent protocol" + bytes(8) + info_hash + peer_id


def bt_flood(ports: list[int], seconds: float, at_once: int) -> Counter[str]:
    """``at_once`` connections at a time to ``ports`` for ``seconds``: each sends random
    garbage, a handshake for an unknown info-hash, or such a handshake followed by a message
    claiming 4 GiB, then waits up to 1 s for an answer. Counts connections by kind."""
    stop = time.monotonic() + seconds

    def worker(seed: int) -> Counter[str]:
        rng, counts = random.Random(seed), Counter[str]()
        while time.monotonic() < stop:
            kind = rng.choice(("garbage", "handshake", "handshake + 4 GiB message"))
            try:
                with socket.create_connection(("127.0.0.1", rng.choice(ports)), timeout=2) as s:
                    if kind == "garbage":
                        s.sendall(rng.randbytes(rng.randrange(1, 64 * 1024)))
                    else:
                        s.sendall(bt_handshake(rng.randbytes(20), rng.randbytes(20)))
                        if kind != "handshake":
                            s.sendall(b"\xff\xff\xff\xff\x05" + rng.randbytes(16 * 1024))
                    s.settimeout(1)
                    s.recv(4096)
                counts[kind] += 1
            except TimeoutError:
                counts[kind] += 1  # connected, sent, no answer: still a connection of the flood
            except OSError:
                counts["refused or reset"] += 1
        return counts

    with ThreadPoolExecutor(at_once) as pool:
        return sum(pool.map(worker, range(at_once)), Counter())


def test_floods_of_bittorrent_connections(rig_factory, table: list[Row]) -> None:
    """For 20 s, 48 connections at a time at the agent's and the seeder's BitTorrent ports,
    sending garbage or handshakes for unknown info-hashes: a pull through that agent during
    the flood and one through a second agent after it (its peers: the flooded two, from which
    it must get bytes) complete, nothing crashes, and each role's memory stays bounded."""
    rig = rig_factory()
    stack = rig.stack
    assert stack.seeder is not None
    agent = rig.stack.add_agent("agent1", **FAST_FALLBACK)
    targets = {
        "agent": bt_ports(agent.proc.pid, {agent.port, agent.proxy_port}),
        "seeder": bt_ports(stack.seeder.pid, {stack.seeder_port}),
    }
    assert all(len(ports) == 1 for ports in targets.values()), targets
    pids = {"agent": agent.proc.pid, "seeder": stack.seeder.pid}
    with RssSampler(pids) as rss, ThreadPoolExecutor(1) as pool:
        flood = pool.submit(bt_flood, [p for ports in targets.values() for p in ports], 20, 48)
        time.sleep(2)
        start = time.monotonic()
        during = pull(agent, rig.image)
        took = time.monotonic() - start
        flooding = not flood.done()
        connections = flood.result()
    assert during.completed, during.errors
    assert sum(v for k, v in connections.items() if k != "refused or reset") >= 1000, connections
    wait_for(lambda: agent.proc.alive() and stack.seeder.alive(), 5, "roles alive")
    after_agent = rig.stack.add_agent("agent2", **FAST_FALLBACK)
    after = pull(after_agent, rig.image)
    assert after.completed, after.errors
    assert rss.peak["agent"] < 300 * MiB and rss.peak["seeder"] < 300 * MiB, rss.peak
    # the flooded BitTorrent ports still serve peers: the second agent's bytes came that way
    swarm = {a.name: a.blob_sources().get("swarm", 0) for a in (agent, after_agent)}
    assert swarm["agent2"] > 0, after_agent.blob_sources()
    total = sum(connections.values())
    rig.row(table, "flood: BitTorrent ports of agent and seeder (48 connections at once, 20 s)",
            [during, after], injected=f"{total} connections", peak_rss=rss.peak,
            note=", ".join(f"{k}: {v}" for k, v in sorted(connections.items()))
            + f"; pull during the flood took {took:.1f}s"
            + ("" if flooding else " (outlasted it)")
            + f", {swarm['agent1'] / MiB:.1f} MiB from the swarm; pull after it: "
            f"{swarm['agent2'] / MiB:.1f} MiB from the swarm")
