"""The multi-node lab: namespaces reach each other, links are shaped, nothing is left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import REPO

from lab.cluster import Progress
from lab.netns import Network, NodeSpec, cleanup_stale, list_links, list_netns, run_cmd
from lab.procs import LabError, ProcGroup, port_open, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

PORT = 7001
MiB = 1024 * 1024

# Reads everything a client sends, then answers with the byte count.
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        n += len(b)
    c.sendall(str(n).encode()); c.close()
"""

# Sends N bytes, waits for the server's count, prints "count seconds".
CLIENT = """
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.monotonic()
c = socket.create_connection((host, port), timeout=30)
buf = b"x" * (1 << 16); left = size
while left:
    left -= c.send(buf[: min(left, len(buf))])
c.shutdown(socket.SHUT_WR)
print(c.recv(64).decode(), time.monotonic() - t)
"""

# Tries to connect outside the lab (TEST-NET-2); prints the errno.
ESCAPE = """
import socket
try:
    socket.create_connection(("198.51.100.1", 80), timeout=2)
    print("connected")
except OSError as e:
    print(e.errno)
"""


def _leftovers(prefix: str) -> list[str]:
    return [n for n in [*list_netns(), *list_links()] if n.startswith(prefix)]


def _send(net: Network, src: str, dst: str, size: int) -> tuple[int, float]:
    out = net.run(src, [sys.executable, "-c", CLIENT, net.node(dst).ip, PORT, size], timeout=60)
    count, seconds = out.stdout.split()
    return int(count), float(seconds)


def _serve(net: Network, procs: ProcGroup, name: str, tmp_path: Path) -> None:
    ip = net.node(name).ip
    argv = [sys.executable, "-c", SERVER, ip, PORT]
    proc = procs.start(argv, tmp_path / f"{name}.log", netns=net.node(name).netns)
    proc.wait_ready(lambda: port_open(ip, PORT), 10, f"test server in {name}")


def test_three_nodes_connect_and_stay_inside(tmp_path: Path) -> None:
    with Network(["a", "b", "c"], rate_mbit=200) as net, ProcGroup() as procs:
        net.verify()
        assert len({n.ip for n in net.nodes.values()}) == 3
        for n in net.nodes.values():
            assert n.ip.startswith("198.1")  # RFC 2544 range, never 10/172/192.168
        _serve(net, procs, "a", tmp_path)
        assert _send(net, "b", "a", 100_000)[0] == 100_000
        assert _send(net, "c", "a", 1234)[0] == 1234
        # Leaving the lab is impossible: no default route, so the kernel refuses at once.
        out = net.run("b", [sys.executable, "-c", ESCAPE]).stdout.strip()
        assert out == str(errno.ENETUNREACH)


@pytest.mark.parametrize(
    ("server", "client", "direction"),
    [
        # the receiver's download (bridge-side qdisc) is the bottleneck
        (NodeSpec("srv", up_mbit=200, down_mbit=20), NodeSpec("cli", 200, 200), "down"),
        # the sender's upload (qdisc inside its namespace) is the bottleneck
        (NodeSpec("srv", up_mbit=200, down_mbit=200), NodeSpec("cli", 20, 200), "up"),
    ],
)
def test_shaping_limits_throughput(
    tmp_path: Path, server: NodeSpec, client: NodeSpec, direction: str
) -> None:
    size = 4 * MiB
    with Network([server, client]) as net, ProcGroup() as procs:
        net.verify()
        _serve(net, procs, "srv", tmp_path)
        count, seconds = _send(net, "cli", "srv", size)
        assert count == size
        ideal = size * 8 / 20e6  # 1.68 s of payload at 20 Mbit/s
        # Headers add ~5%, the token bucket lets the first burst through at once.
        assert 0.85 * ideal < seconds < 1.6 * ideal, (direction, seconds, ideal)
        stats = net.qdisc_stats("srv" if direction == "down" else "cli")[direction]
        assert stats["kind"] == "tbf" and int(stats["bytes"]) >= size


def test_uploading_node_still_acks_its_downloads_first(tmp_path: Path) -> None:
    """A node's full upload must not queue the ACKs of its own download behind it: small
    packets take the uplink's priority band, data the bulk FIFO, and both directions run
    near the link rate at once."""
    size = 4 * MiB
    with Network(["a", "b"], rate_mbit=20) as net, ProcGroup() as procs:
        _serve(net, procs, "a", tmp_path)
        _serve(net, procs, "b", tmp_path)
        with ThreadPoolExecutor(2) as pool:
            upload = pool.submit(_send, net, "a", "b", 2 * size)  # fills a's uplink throughout
            download = pool.submit(_send, net, "b", "a", size)  # a's ACKs share that uplink
            (got, seconds), (sent, _) = download.result(), upload.result()
        assert got == size and sent == 2 * size
        assert seconds < 1.25 * size * 8 / 20e6, seconds  # ~1.05x: headers only
        bands = net.uplink_bands("a")
        small, bulk = bands["small"], bands["bulk"]
        # veth passes GSO super-packets, so there is about one ACK per 64 KiB received
        assert small["packets"] > size / (128 * 1024) and small["bytes"] / small["packets"] < 128
        assert bulk["bytes"] >= 2 * size


@pytest.mark.parametrize(("mtu", "overhead"), [(1500, (0.03, 0.06)), (9000, (0.0, 0.015))])
def test_mtu_sets_the_header_overhead(
    tmp_path: Path, mtu: int, overhead: tuple[float, float]
) -> None:
    """Both ends of every link get the MTU; the shaped bytes show what headers cost."""
    size = 4 * MiB
    with Network(["srv", "cli"], rate_mbit=200, mtu=mtu) as net, ProcGroup() as procs:
        for node in net.nodes.values():
            inside = run_cmd(["ip", "-j", "-n", node.netns, "link", "show", node.veth_ns])
            outside = run_cmd(["ip", "-j", "link", "show", node.veth_host])
            assert json.loads(inside.stdout)[0]["mtu"] == mtu
            assert json.loads(outside.stdout)[0]["mtu"] == mtu
        _serve(net, procs, "srv", tmp_path)
        assert _send(net, "cli", "srv", size)[0] == size
        shaped = int(net.qdisc_stats("srv")["down"]["bytes"])  # everything cli sent to srv
        assert overhead[0] < shaped / size - 1 < overhead[1], shaped / size


def test_mtu_is_validated() -> None:
    with pytest.raises(ValueError, match="mtu"):
        Network(["a"], mtu=500)


def test_unshaped_is_much_faster(tmp_path: Path) -> None:
    """Control for the shaping test: the same transfer without tc is not link-bound."""
    with Network(["srv", "cli"], rate_mbit=None) as net, ProcGroup() as procs:
        net.verify()
        _serve(net, procs, "srv", tmp_path)
        _, seconds = _send(net, "cli", "srv", 4 * MiB)
        assert seconds < 0.5 * (4 * MiB * 8 / 20e6)


def test_verify_refuses_a_default_route() -> None:
    with Network(["a"]) as net:
        net.verify()
        ns = net.node("a").netns
        run_cmd(["ip", "-n", ns, "route", "add", "default", "via", net.host_ip])
        with pytest.raises(LabError, match="default route"):
            net.verify()


def test_teardown_on_exception_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), Network(["a", "b", "c"]) as net:
        prefix = net.prefix
        net.verify()
        assert len(_leftovers(prefix)) >= 3 + 1 + 3  # namespaces, bridge, host veths
        # a process still running in a namespace must not keep it alive
        subprocess.Popen([*net.node("a").prefix(), "sleep", "60"], start_new_session=True)
        wait_for(lambda: run_cmd(["ip", "netns", "pids", net.node("a").netns]).stdout.strip()
                 != "", 5, "sleep in namespace")  # fmt: skip
        raise RuntimeError("boom")
    assert _leftovers(prefix) == []
    assert run_cmd(["ip", "-br", "link"]).stdout.count(prefix) == 0


def test_partial_setup_is_torn_down() -> None:
    """A setup that fails half way (an interface name already taken) removes what it made."""
    net = Network(["a", "b", "c"])
    run_cmd(["ip", "link", "add", f"{net.prefix}h2", "type", "bridge"])  # node b's veth name
    with pytest.raises(LabError, match="exists"), net:
        pass
    assert _leftovers(net.prefix) == []


def test_rates_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rate"):
        Network([NodeSpec("a", up_mbit=-5)])


def test_cleanup_stale_removes_dead_runs_only() -> None:
    dead_pid = 4_194_304 + 1 + os.getpid() % 1000  # above any possible pid_max
    assert not os.path.exists(f"/proc/{dead_pid}")
    with Network(["x"], prefix=f"p2pm{dead_pid}z") as stale, Network(["y"]) as live:
        removed = cleanup_stale()
        assert stale.nodes["x"].netns in removed
        assert _leftovers(stale.prefix) == []
        assert live.node("y").netns in list_netns()  # this process's run is untouched
        live.verify()


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["direct", "cache"])
def test_cluster_pulls_on_every_node(tmp_path: Path, mode: str) -> None:
    """Real registry + one containerd per namespace; the origin's log shows who fetched what."""
    for binary in ("docker-registry", "containerd", "ctr", "skopeo"):
        if not shutil.which(binary):
            pytest.skip(f"{binary} not installed")
    from lab.cluster import Cluster
    from lab.images import build_image

    layout = build_image(tmp_path / "img", [2 * MiB, 1 * MiB], seed=7)
    samples: list[list[Progress]] = []
    with Cluster(tmp_path / "c", 2, mode=mode, rate_mbit=100) as cluster:
        prefix = cluster.net.prefix
        ref = cluster.push(layout, "lab/img", "v1")
        mark = cluster.origin_mark()
        results = cluster.pull_all(ref, layout.manifest_digest, layout.total_size,
                                   progress=samples.append, interval=0.1)  # fmt: skip
        egress = cluster.origin_egress(mark)
        pids = [p.pid for p in cluster.procs.procs] + [
            pc.containerd.proc.pid for pc in cluster.parts.values() if pc.containerd.proc
        ]
    assert [r.node for r in results] == ["node1", "node2"]
    for r in results:
        assert r.ok, r.error
        assert r.digest == layout.manifest_digest
        assert layout.total_size <= r.rx_bytes < 1.2 * layout.total_size  # over its own link
        assert 0 < r.seconds < 30
    assert samples and {p.node for p in samples[-1]} == {"node1", "node2"}
    if mode == "direct":  # each node fetched every blob from the origin itself
        assert 2 * layout.total_size <= egress < 2.2 * layout.total_size
    else:  # every node fetched from the cache; the cache fetched from the origin
        assert egress >= layout.total_size
    assert _leftovers(prefix) == []
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


# Sets up a network, says its prefix, then waits to be interrupted.
HOLDER = """
import time
from lab.netns import Network, exit_on_signals
exit_on_signals()
with Network(["a", "b"]) as net:
    net.verify()
    print(net.prefix, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_tears_down(sig: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        prefix = proc.stdout.readline().strip()
        assert prefix.startswith("p2pm") and _leftovers(prefix), proc.stderr.read()
        proc.send_signal(sig)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert _leftovers(prefix) == []
