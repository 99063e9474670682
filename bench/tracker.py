"""Our tracker against Debian's opentracker, driven by one load generator in the same run.

Each tracker runs pinned to one core (``taskset``), the generator to another. For each side:
load 100,000 peers in 1,000 torrents (one announce each), read its RSS growth per peer, then
announce those peers again for ``--seconds`` and count answers per second and the tracker's
CPU (psutil). ``announces/s per core`` is answers per CPU-second of the tracker, so a side
that is not saturated is not flattered or penalised by the generator; the generator's own CPU
is reported too (near 100% means it, not the tracker, was the limit of the raw rate).

Two connection modes: ``close`` opens a connection per announce, as BitTorrent clients do
(opentracker answers one request per connection and closes it), and ``keepalive`` sends
pipelined announces on long-lived connections (ours only: opentracker does not keep alive).
Peers come from 127.1.0.0/16 source addresses (one per peer index), so trackers that record
the source address see distinct peers and TIME_WAIT never runs out of ports.

    python -m bench.tracker --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from hashlib import sha1
from pathlib import Path
from urllib.parse import quote_from_bytes

import psutil

from lab.procs import free_port, port_open

RESULTS = Path(__file__).resolve().parent / "results"
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the source port at connect, per 4-tuple


def info_hash(t: int) -> bytes:
    return sha1(b"bench-torrent-%d" % t).digest()


def source_ip(p: int) -> str:
    return f"127.1.{p // 250}.{p % 250 + 1}"


def announce_request(t: int, p: int, keepalive: bool, event: str = "") -> bytes:
    """Peer ``p`` of torrent ``t``: one in ten is a seed."""
    q = (f"info_hash={quote_from_bytes(info_hash(t), safe='')}&peer_id=-BENCH-{t:06d}{p:07d}"
         f"&port={10000 + p}&uploaded=0&downloaded=0&left={0 if p % 10 == 0 else 1000}"
         f"&compact=1&numwant=50" + (f"&event={event}" if event else ""))  # fmt: skip
    conn = b"" if keepalive else b"Connection: close\r\n"
    return b"GET /announce?%s HTTP/1.1\r\nHost: tracker\r\n%s\r\n" % (q.encode(), conn)


class Conn:
    __slots__ = ("sock", "peer", "pending", "buf", "sent_at")

    def __init__(self, sock: socket.socket, peer: int) -> None:
        self.sock, self.peer, self.pending, self.buf = sock, peer, 0, bytearray()


def _complete(buf: bytearray) -> int:
    """Whole responses at the start of ``buf`` (consumed); framed by Content-Length."""
    done = 0
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return done
        i = buf.find(b"Content-Length: ", 0, end)
        if i < 0:
            i = buf.find(b"content-length: ", 0, end)
        j = buf.find(b"\r\n", i)
        length = int(buf[i + 16 : j])
        if len(buf) < end + 4 + length:
            return done
        del buf[: end + 4 + length]
        done += 1


def drive(port: int, requests: list[list[bytes]], seconds: float | None, keepalive: bool,
          conns: int, depth: int) -> tuple[int, float]:  # fmt: skip
    """Announce ``requests[p][i]`` (peer p's announces) until every one was answered once
    (``seconds`` None) or for ``seconds``; returns (answers, elapsed)."""
    sel = selectors.EpollSelector()
    npeers = len(requests)
    cursor = [0] * npeers
    total = sum(len(r) for r in requests)
    sent = answered = 0
    next_peer = 0
    start = time.monotonic()
    deadline = start + seconds if seconds else float("inf")

    def take(p: int) -> bytes | None:
        nonlocal sent
        if seconds is None and sent >= total:
            return None
        reqs = requests[p]
        i = cursor[p]
        if seconds is None and i >= len(reqs):
            return None
        cursor[p] = i + 1
        sent += 1
        return reqs[i % len(reqs)]

    def open_conn() -> None:
        nonlocal next_peer
        for _ in range(npeers):
            p = next_peer
            next_peer = (next_peer + 1) % npeers
            if seconds is not None or cursor[p] < len(requests[p]):
                break
        else:
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((source_ip(p), 0))
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # in progress: finished when writable
            s.connect(("127.0.0.1", port))
        c = Conn(s, p)
        batch = [r for r in (take(p) for _ in range(depth if keepalive else 1)) if r]
        if not batch:
            s.close()
            return
        c.pending = len(batch)
        c.buf = bytearray(b"".join(batch))  # written once connected
        sel.register(s, selectors.EVENT_WRITE, c)

    for _ in range(conns):
        open_conn()
    while sel.get_map() and time.monotonic() < deadline:
        for key, ev in sel.select(timeout=1.0):
            c: Conn = key.data
            s = c.sock
            if ev & selectors.EVENT_WRITE:
                try:
                    s.send(c.buf)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EINPROGRESS):
                        continue
                    raise
                c.buf = bytearray()
                sel.modify(s, selectors.EVENT_READ, c)
                continue
            data = s.recv(262144)
            if data:
                c.buf += data
                n = _complete(c.buf)
                answered += n
                c.pending -= n
                if c.pending or not keepalive:
                    continue
                batch = [r for r in (take(c.peer) for _ in range(depth)) if r]
                if batch:
                    c.pending = len(batch)
                    s.send(b"".join(batch))
                    continue
            sel.unregister(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
            open_conn()
    elapsed = time.monotonic() - start
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return answered, elapsed


UDP_PROTOCOL_ID = 0x41727101980
UDP_CONNECT, UDP_ANNOUNCE = 0, 1
UDP_EVENTS = {"": 0, "completed": 1, "started": 2, "stopped": 3}
UDP_STALL = 0.2  # a socket with nothing back for this long resends (UDP may drop)


def udp_announce_body(t: int, p: int, event: str = "") -> bytes:
    """Peer ``p`` of torrent ``t`` as a BEP 15 announce, less the 8-byte connection ID."""
    return struct.pack(">II20s20sqqqiIIiH", UDP_ANNOUNCE, p, info_hash(t),
                       b"-BENCH-%06d%07d" % (t, p), 0, 0 if p % 10 == 0 else 1000, 0,
                       UDP_EVENTS[event], 0, p, 50, 10000 + p)  # fmt: skip


def udp_connect(sock: socket.socket, port: int) -> bytes:
    """The connection ID for ``sock``'s address: one handshake, reused as clients do."""
    sock.settimeout(2)
    for _ in range(10):
        sock.sendto(struct.pack(">QII", UDP_PROTOCOL_ID, UDP_CONNECT, 7), ("127.0.0.1", port))
        try:
            reply = sock.recv(64)
        except TimeoutError:
            continue
        if len(reply) == 16 and struct.unpack(">II", reply[:8]) == (UDP_CONNECT, 7):
            return reply[8:]
    raise RuntimeError("no UDP connect answer")


def drive_udp(port: int, requests: list[list[bytes]], seconds: float | None,
              depth: int) -> tuple[int, float]:  # fmt: skip
    """``drive`` over UDP: one socket per peer (its own source address), ``depth``
    announces in flight on each; a socket whose answers stop (a datagram dropped) resends.
    Loading (``seconds`` None) keeps one in flight per socket, so a resend is exactly the
    announce that was lost."""
    if seconds is None:
        depth = 1
    sel = selectors.EpollSelector()
    socks: list[socket.socket] = []
    datagrams: list[list[bytes]] = []
    for p, bodies in enumerate(requests):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((source_ip(p), 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        cid = udp_connect(s, port)
        s.setblocking(False)
        s.connect(("127.0.0.1", port))
        socks.append(s)
        datagrams.append([cid + b for b in bodies])
        sel.register(s, selectors.EVENT_READ, p)
    npeers = len(requests)
    cursor = [0] * npeers
    outstanding = [0] * npeers
    last_reply = [0.0] * npeers
    total = sum(len(r) for r in requests)
    answered = 0
    start = time.monotonic()
    deadline = start + seconds if seconds else float("inf")

    def send(p: int, n: int) -> None:
        s, reqs = socks[p], datagrams[p]
        for _ in range(n):
            i = cursor[p]
            if seconds is None and i >= len(reqs):
                return
            cursor[p] = i + 1
            try:
                s.send(reqs[i % len(reqs)])
            except BlockingIOError:
                cursor[p] = i
                return
            outstanding[p] += 1

    for p in range(npeers):
        last_reply[p] = start
        send(p, depth)
    while time.monotonic() < deadline:
        now = time.monotonic()
        for key, _ in sel.select(timeout=UDP_STALL):
            p = key.data
            s = socks[p]
            got = 0
            while True:
                try:
                    s.recv(2048)
                except BlockingIOError:
                    break
                got += 1
            answered += got
            outstanding[p] = max(0, outstanding[p] - got)
            last_reply[p] = now
            send(p, got)
        if seconds is None and answered >= total and not any(outstanding):
            break
        for p in range(npeers):
            if now - last_reply[p] > UDP_STALL:  # lost datagrams: resend what was in flight
                last_reply[p] = now
                if seconds is None:
                    cursor[p] = max(0, cursor[p] - outstanding[p])
                outstanding[p] = 0
                send(p, depth)
    elapsed = time.monotonic() - start
    for s in socks:
        s.close()
    return answered, elapsed


def peers_held(port: int, torrents: int) -> int:
    """Peers the tracker reports (scrape, 64 torrents at a time): proves the load stuck."""
    import libtorrent as lt

    held = 0
    for first in range(0, torrents, 64):
        hashes = [info_hash(t) for t in range(first, min(torrents, first + 64))]
        q = "&".join(f"info_hash={quote_from_bytes(h, safe='')}" for h in hashes)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/scrape?{q}", timeout=30) as r:
            files = lt.bdecode(r.read())[b"files"]
        held += sum(f[b"complete"] + f[b"incomplete"] for f in files.values())
    return held


@dataclass
class SideResult:
    tracker: str
    mode: str
    peers_loaded: int
    rss_before_mib: float
    rss_after_mib: float
    bytes_per_peer: float
    announces: int
    seconds: float
    announces_per_s: float
    tracker_cpu: float  # fraction of one core during the timed run
    generator_cpu: float
    announces_per_core_s: float


def start_ours(port: int, core: int, log: Path) -> subprocess.Popen[bytes]:
    argv = ["taskset", "-c", str(core), sys.executable, "-m", "p2p_mirror", "tracker",
            "--listen", f"127.0.0.1:{port}", "--announce-rate", "1e9",
            "--announce-burst", "1000000000", "--peer-ttl", "3600", "--log-level", "warning",
            ]  # fmt: skip  # the TTL outlasts loading on a busy machine, as opentracker's does
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def start_opentracker(port: int, core: int, work: Path, torrents: int) -> subprocess.Popen[bytes]:
    (work / "whitelist").write_text("".join(f"{info_hash(t).hex()}\n" for t in range(torrents)))
    argv = ["taskset", "-c", str(core), "opentracker", "-i", "127.0.0.1", "-p", str(port),
            "-P", str(port), "-w", str(work / "whitelist")]  # fmt: skip
    return subprocess.Popen(argv, cwd=work, stdout=(work / "ot.log").open("wb"),
                            stderr=subprocess.STDOUT)  # fmt: skip


def run_side(name: str, proc: subprocess.Popen[bytes], port: int, args: argparse.Namespace,
             mode: str) -> SideResult:  # fmt: skip
    deadline = time.monotonic() + 30
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.1)
    ps = psutil.Process(proc.pid)
    time.sleep(0.5)
    keepalive = mode == "keepalive"
    peers_per_torrent = args.peers // args.torrents

    def requests(event: str) -> list[list[bytes]]:
        make = udp_announce_body if mode == "udp" else (
            lambda t, p, e: announce_request(t, p, keepalive, e))  # fmt: skip
        return [[make(t, p, event) for t in range(args.torrents)]
                for p in range(peers_per_torrent)]  # fmt: skip

    def run(reqs: list[list[bytes]], seconds: float | None) -> tuple[int, float]:
        if mode == "udp":
            return drive_udp(port, reqs, seconds, args.udp_depth)
        return drive(port, reqs, seconds, keepalive, args.conns, args.depth)

    rss_before = ps.memory_info().rss
    loaded, _ = run(requests("started"), None)
    loaded = min(loaded, peers_per_torrent * args.torrents)  # UDP resends what was dropped
    time.sleep(0.5)
    rss_after = ps.memory_info().rss
    held = peers_held(port, args.torrents)
    if held != peers_per_torrent * args.torrents:
        raise RuntimeError(f"{name} holds {held} peers after loading {loaded}")
    steady = requests("")
    me = psutil.Process()
    cpu0, gen0 = ps.cpu_times(), me.cpu_times()
    answered, elapsed = run(steady, args.seconds)
    cpu1, gen1 = ps.cpu_times(), me.cpu_times()
    tracker_cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed
    gen_cpu = (gen1.user + gen1.system - gen0.user - gen0.system) / elapsed
    rate = answered / elapsed
    return SideResult(
        tracker=name, mode=mode, peers_loaded=loaded,
        rss_before_mib=rss_before / 2**20, rss_after_mib=rss_after / 2**20,
        bytes_per_peer=(rss_after - rss_before) / max(1, loaded),
        announces=answered, seconds=elapsed, announces_per_s=rate,
        tracker_cpu=tracker_cpu, generator_cpu=gen_cpu,
        announces_per_core_s=rate / max(tracker_cpu, 1e-9),
    )  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def markdown(results: list[SideResult], command: str) -> str:
    lines = [
        f"Tracker load, {results[0].peers_loaded:,} peers in torrents of 100 peers, "
        f"loopback, command: `{command}`",
        "",
        "| tracker | connections | announces/s | tracker CPU | announces/s per core "
        "| generator CPU | RSS before/after load (MiB) | bytes per peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.tracker} | {r.mode} | {r.announces_per_s:,.0f} | {r.tracker_cpu:.0%} "
            f"| {r.announces_per_core_s:,.0f} | {r.generator_cpu:.0%} "
            f"| {r.rss_before_mib:.1f} / {r.rss_after_mib:.1f} | {r.bytes_per_peer:,.0f} |"
        )
    by = {(r.tracker, r.mode): r for r in results}
    for mode, what in (("close", "connection per announce"), ("udp", "UDP")):
        ours, theirs = by.get(("ours", mode)), by.get(("opentracker", mode))
        if ours and theirs:
            lines += ["", f"Ratio ours/opentracker, {what}: "
                      f"{ours.announces_per_core_s / theirs.announces_per_core_s:.2f} per core, "
                      f"{ours.bytes_per_peer / max(theirs.bytes_per_peer, 1):.1f}x bytes per peer."]
    return "\n".join(lines) + "\n"


def plot(results: list[SideResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r.tracker}\n{r.mode}" for r in results]
    a.bar(labels, [r.announces_per_core_s for r in results], color="tab:blue")
    a.set_ylabel("announces/s per tracker core")
    a.axhline(15000, color="tab:red", linestyle="--", label="target 15,000")
    a.legend()
    b.bar(labels, [r.bytes_per_peer for r in results], color="tab:green")
    b.set_ylabel("RSS bytes per peer held")
    b.axhline(25 * 2**20 / 100_000, color="tab:red", linestyle="--", label="target (25 MiB/100k)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=100_000)
    parser.add_argument("--torrents", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--conns", type=int, default=400, help="concurrent connections")
    parser.add_argument("--depth", type=int, default=32, help="pipelined requests (keepalive)")
    parser.add_argument("--udp-depth", type=int, default=2,
                        help="announces in flight per UDP socket (one socket per peer)")
    parser.add_argument("--modes", default="close,udp,keepalive",
                        help="comma-separated: close, udp, keepalive (ours only)")
    parser.add_argument("--tracker-core", type=int, default=0)
    parser.add_argument("--generator-core", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not shutil.which("opentracker"):
        sys.exit("opentracker not installed: bash scripts/install-deps.sh")
    os.sched_setaffinity(0, {args.generator_core})
    results: list[SideResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-tracker-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # opentracker drops to user nobody
        modes = args.modes.split(",")
        sides = [(name, mode) for mode in modes for name in ("ours", "opentracker")
                 if name == "ours" or mode != "keepalive"]  # fmt: skip
        for name, mode in sides:
            port = free_port()
            if name == "ours":
                proc = start_ours(port, args.tracker_core, work / f"{name}.log")
            else:
                proc = start_opentracker(port, args.tracker_core, work, args.torrents)
            try:
                r = run_side(name, proc, port, args, mode)
            finally:
                stop(proc)
            print(f"{name} {mode}: {r.announces_per_s:,.0f}/s at {r.tracker_cpu:.0%} CPU, "
                  f"{r.bytes_per_peer:.0f} B/peer", flush=True)
            results.append(r)
    command = "python -m bench.tracker " + " ".join(sys.argv[1:])
    text = markdown(results, command.strip())
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracker.md").write_text(text)
    (args.out / "tracker.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    plot(results, args.out / "tracker.png")


if __name__ == "__main__":
    main()
