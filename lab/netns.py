"""Nodes on one machine: network namespaces on a bridge, each link shaped with ``tc``.

Why: the benchmark and the cluster tests must be limited by bandwidth, not by the two CPU
cores, and their traffic must never leave the machine. Every node is a namespace with one
veth into a private bridge, an address from the RFC 2544 benchmarking range (198.18.0.0/15,
never routed anywhere) and no default route. Everything carries a per-run prefix
(``p2pm<pid><letter>``) so teardown and ``cleanup_stale`` touch only what this lab made.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import re
import signal
import string
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import FrameType

from lab.procs import LabError, netns_prefix

BASE_PREFIX = "p2pm"
BENCH_NET = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544: benchmarking, never routed
MAX_NODES = 99  # interface names: prefix (<=12) + role letter + index (<=2) <= 15 chars
IFNAMSIZ = 15
DEFAULT_RATE_MBIT = 100.0
# Ethernet's default. Jumbo frames (9000, as in AWS VPCs) cut TCP/IP headers from 4.6% to
# 0.7% of a shaped link, but 64 flows through one emulated link still stalled until the
# origin reset them (direct pulls, N=16), so they are an option, not the default.
DEFAULT_MTU = 1500
MTU_RANGE = (1280, 65535)  # IPv6's minimum .. the largest a veth takes

_run_counter = itertools.cycle(string.ascii_lowercase)
_NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")


def run_cmd(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip``/``tc`` with an argument list; raise ``LabError`` with stderr on failure."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class NodeSpec:
    """A node to create: its short name and link rates (Mbit/s; ``None`` = unshaped)."""

    name: str
    up_mbit: float | None = DEFAULT_RATE_MBIT
    down_mbit: float | None = DEFAULT_RATE_MBIT

    @classmethod
    def of(cls, spec: str | NodeSpec, rate_mbit: float | None) -> NodeSpec:
        return spec if isinstance(spec, NodeSpec) else cls(spec, rate_mbit, rate_mbit)


@dataclass(frozen=True)
class Node:
    """A created node: ``netns`` is the name under /run/netns, ``ip`` its only address."""

    name: str
    netns: str
    ip: str
    veth_ns: str
    veth_host: str
    up_mbit: float | None
    down_mbit: float | None

    def prefix(self) -> list[str]:
        """argv prefix that runs a command in this node's network namespace."""
        return netns_prefix(self.netns)


def tbf_args(rate_mbit: float, mtu: int = DEFAULT_MTU) -> list[str]:
    """A token bucket for ``rate_mbit``: burst >= one GSO super-packet; a queue of 50 ms but
    at least 100 full frames.

    TCP needs a few packets of queue per flow: 50 ms at 50 Mbit/s holds only 34 jumbo
    frames, and with 32 flows through the origin's link some stalled until the registry
    reset them (direct pulls, N=8; 100 frames fixed that). At MTU 1500 the 50 ms rule wins.
    """
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(int(rate_bytes / 250), 96 * 1024)  # 4 ms of tokens, at least 96 KiB
    limit = max(int(rate_bytes * 0.05), 2 * burst, 100 * mtu)
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "limit", str(limit)]


SMALL_PACKET = 128  # IP packets shorter than this (TCP ACKs, BitTorrent requests) go first


def uplink_tc(dev: str, rate_mbit: float, mtu: int = DEFAULT_MTU) -> list[list[str]]:
    """``tc`` argv tails that shape a node's upload: the token bucket of ``tbf_args`` with,
    inside it, a strict-priority band for small packets ahead of a FIFO for the rest.

    A host's own egress queue does not make ACKs wait behind its uploads: Linux's default
    qdisc, fq_codel, serves sparse flows first. This lab's kernels may lack fq_codel, so an
    htb with two classes stands in for that part of it (the classes' rates are far above the
    link's: only the priority matters). With a plain FIFO, a node uploading at full rate
    delayed the ACKs of its own downloads by the whole queue (measured: the seeder's intake
    from the origin ran at 85-95% of its link while it uploaded; 95-97% with the band).
    The download side (a switch port feeding the node) stays a plain tail-drop FIFO.
    """
    tbf = tbf_args(rate_mbit, mtu)
    bulk_limit = tbf[tbf.index("limit") + 1]
    on = ["dev", dev]
    fast = ["htb", "rate", "5gbit", "ceil", "10gbit", "quantum", "200000"]
    return [
        ["qdisc", "replace", *on, "root", "handle", "1:", *tbf],
        ["qdisc", "add", *on, "parent", "1:1", "handle", "2:", "htb", "default", "20"],
        ["class", "add", *on, "parent", "2:", "classid", "2:1", "htb", "rate", "10gbit",
         "quantum", "200000"],
        ["class", "add", *on, "parent", "2:1", "classid", "2:10", *fast, "prio", "0"],
        ["class", "add", *on, "parent", "2:1", "classid", "2:20", *fast, "prio", "1"],
        ["qdisc", "add", *on, "parent", "2:10", "pfifo", "limit", "1000"],
        ["qdisc", "add", *on, "parent", "2:20", "bfifo", "limit", bulk_limit],
        # IPv4 total length (bytes 2-3 of the header) < SMALL_PACKET
        ["filter", "add", *on, "parent", "2:", "protocol", "ip", "prio", "1", "u32",
         "match", "u16", "0", f"{0xFFFF ^ (SMALL_PACKET - 1):#06x}", "at", "2",
         "flowid", "2:10"],
    ]  # fmt: skip


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_netns() -> list[str]:
    out = run_cmd(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    return [e["name"] for e in json.loads(out)] if out else []


def list_links() -> list[str]:
    out = run_cmd(["ip", "-j", "link", "show"], check=False).stdout.strip()
    return [e["ifname"] for e in json.loads(out)] if out else []


def _kill_netns_pids(netns: str) -> None:
    """SIGKILL whatever still runs in a namespace this lab created (a crashed test's leftovers)."""
    out = run_cmd(["ip", "netns", "pids", netns], check=False).stdout.split()
    for pid in out:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def delete_everything(prefix: str) -> list[str]:
    """Delete namespaces, then links (veths, bridge) whose names start with ``prefix``."""
    removed: list[str] = []
    for ns in list_netns():
        if ns.startswith(prefix):
            _kill_netns_pids(ns)
            run_cmd(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
    # Deleting a namespace destroys its veth ends and so their peers; what remains is the
    # bridge and veths of a setup that failed before moving them.
    for link in sorted(list_links(), key=lambda n: n.endswith("br")):
        if link.startswith(prefix):
            run_cmd(["ip", "link", "del", link], check=False)
            removed.append(link)
    return removed


def cleanup_stale(prefix: str = BASE_PREFIX, include_live: bool = False) -> list[str]:
    """Remove leftovers of crashed runs: names ``<prefix><pid><letter>...`` whose PID is dead.

    Only this lab's own names are touched. Runs of live processes are kept unless
    ``include_live`` (never this process's own runs, those are torn down by their owner).
    """
    pat = re.compile(rf"^{re.escape(BASE_PREFIX)}(\d+)([a-z])")
    runs: set[str] = set()
    for name in [*list_netns(), *list_links()]:
        m = pat.match(name)
        if not m or not name.startswith(prefix):
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or (_pid_alive(pid) and not include_live):
            continue
        runs.add(m.group(0))
    removed: list[str] = []
    for run_prefix in sorted(runs):
        removed += delete_everything(run_prefix)
    return removed


def _no_ipv6(ifname: str) -> None:
    """The lab is IPv4 only: no link-local IPv6 chatter on the bridge and its ports."""
    path = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write("1")


def _pick_subnet() -> ipaddress.IPv4Network:
    """A /24 of 198.18.0.0/15 that no interface or route on this machine uses yet."""
    used: set[ipaddress.IPv4Network] = set()
    out = run_cmd(["ip", "-j", "-4", "route", "show", "table", "all"], check=False).stdout
    for route in json.loads(out or "[]"):
        dst = route.get("dst", "")
        with contextlib.suppress(ValueError):
            if dst and dst != "default":
                net = ipaddress.ip_network(dst, strict=False)
                if net.overlaps(BENCH_NET):
                    used.add(ipaddress.ip_network(f"{net.network_address}/24", strict=False))
    subnets = list(BENCH_NET.subnets(new_prefix=24))
    start = os.getpid() % len(subnets)
    for sub in subnets[start:] + subnets[:start]:
        if sub not in used:
            return sub
    raise LabError("no free /24 left in 198.18.0.0/15")


class Network:
    """A bridge plus one shaped namespace per node; a context manager that always tears down.

    ``rate_mbit`` shapes every node both ways unless a ``NodeSpec`` says otherwise; every
    link has the same ``mtu``. The root namespace gets ``host_ip`` on the bridge so the
    harness itself (pushing images, reading metrics) can reach the nodes; that path is
    shaped by the node's own link.
    """

    def __init__(
        self,
        nodes: Iterable[str | NodeSpec],
        rate_mbit: float | None = DEFAULT_RATE_MBIT,
        subnet: str | None = None,
        prefix: str | None = None,
        mtu: int = DEFAULT_MTU,
    ) -> None:
        self.specs = [NodeSpec.of(n, rate_mbit) for n in nodes]
        if not MTU_RANGE[0] <= mtu <= MTU_RANGE[1]:
            raise ValueError(f"mtu must be {MTU_RANGE[0]}..{MTU_RANGE[1]} bytes, got {mtu}")
        self.mtu = mtu
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate node names: {names}")
        if len(names) > MAX_NODES:
            raise ValueError(f"at most {MAX_NODES} nodes")
        for spec in self.specs:
            if not _NAME.match(spec.name):
                raise ValueError(f"node name {spec.name!r}: lowercase letters/digits, <= 16 chars")
            for rate in (spec.up_mbit, spec.down_mbit):
                if rate is not None and not rate > 0:
                    raise ValueError(f"node {spec.name}: rate must be > 0 Mbit/s, got {rate}")
        self.prefix = prefix or f"{BASE_PREFIX}{os.getpid()}{next(_run_counter)}"
        if len(self.prefix) + 3 > IFNAMSIZ:
            raise ValueError(f"prefix {self.prefix!r} too long for interface names")
        self._subnet_arg = subnet
        self.subnet: ipaddress.IPv4Network | None = None
        self.bridge = f"{self.prefix}br"
        self.host_ip = ""
        self.nodes: dict[str, Node] = {}
        self._active = False

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Network:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        """Create bridge, namespaces, veths, addresses and qdiscs (partial state is torn down)."""
        self._active = True
        atexit.register(self.teardown)
        self.subnet = (
            ipaddress.ip_network(self._subnet_arg) if self._subnet_arg else _pick_subnet()
        )
        if not self.subnet.subnet_of(BENCH_NET):  # type: ignore[arg-type]
            raise ValueError(f"subnet {self.subnet} is not inside {BENCH_NET}")
        hosts = list(self.subnet.hosts())
        if len(hosts) < len(self.specs) + 1:
            raise ValueError(f"subnet {self.subnet} too small for {len(self.specs)} nodes")
        plen = self.subnet.prefixlen
        self.host_ip = str(hosts[-1])
        run_cmd(["ip", "link", "add", self.bridge, "type", "bridge", "stp_state", "0"])
        _no_ipv6(self.bridge)
        run_cmd(["ip", "addr", "add", f"{self.host_ip}/{plen}", "dev", self.bridge])
        run_cmd(["ip", "link", "set", self.bridge, "up"])
        for i, spec in enumerate(self.specs, start=1):
            node = Node(
                name=spec.name,
                netns=f"{self.prefix}-{spec.name}",
                ip=str(hosts[i - 1]),
                veth_ns=f"{self.prefix}n{i}",
                veth_host=f"{self.prefix}h{i}",
                up_mbit=spec.up_mbit,
                down_mbit=spec.down_mbit,
            )
            self.nodes[spec.name] = node
            self._add_node(node, plen)

    def _add_node(self, node: Node, plen: int) -> None:
        ns = node.netns
        run_cmd(["ip", "netns", "add", ns])
        mtu = str(self.mtu)
        run_cmd(["ip", "link", "add", node.veth_host, "mtu", mtu, "type", "veth",
                 "peer", "name", node.veth_ns, "mtu", mtu])  # fmt: skip
        run_cmd(["ip", "link", "set", node.veth_ns, "netns", ns])
        run_cmd(["ip", "link", "set", node.veth_host, "master", self.bridge])
        _no_ipv6(node.veth_host)
        run_cmd(["ip", "link", "set", node.veth_host, "up"])
        run_cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
        run_cmd(["ip", "-n", ns, "addr", "add", f"{node.ip}/{plen}", "dev", node.veth_ns])
        run_cmd(["ip", "-n", ns, "link", "set", node.veth_ns, "up"])
        # IPv4 only: no link-local IPv6 chatter, no second address family to verify.
        run_cmd([*node.prefix(), "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])
        if node.up_mbit:  # upload: the node's own egress, inside the namespace
            for argv in uplink_tc(node.veth_ns, node.up_mbit, self.mtu):
                run_cmd(["tc", "-n", ns, *argv])
        if node.down_mbit:  # download: what the bridge sends into the node
            run_cmd(["tc", "qdisc", "replace", "dev", node.veth_host, "root",
                     *tbf_args(node.down_mbit, self.mtu)])  # fmt: skip

    def teardown(self) -> None:
        """Delete every namespace and link with this run's prefix; safe to call twice."""
        if not self._active:
            return
        self._active = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.teardown)
        delete_everything(self.prefix)

    # -- checks and use ----------------------------------------------------------------------

    def verify(self) -> None:
        """Before any traffic: namespaces, addresses and subnet routes exist, no default route.

        Without a default route a node can reach only the lab subnet and its own loopback.
        """
        if not self._active or self.subnet is None:
            raise LabError("network is not set up")
        present = set(list_netns())
        links = set(list_links())
        if self.bridge not in links:
            raise LabError(f"bridge {self.bridge} missing")
        for node in self.nodes.values():
            ns = node.netns
            if ns not in present:
                raise LabError(f"namespace {ns} missing")
            addrs = json.loads(run_cmd(["ip", "-j", "-n", ns, "addr", "show"]).stdout or "[]")
            by_if = {a["ifname"]: a for a in addrs}
            veth = by_if.get(node.veth_ns)
            if not veth or "UP" not in veth.get("flags", []):
                raise LabError(f"{ns}: {node.veth_ns} missing or down")
            if node.ip not in {ai["local"] for ai in veth.get("addr_info", [])}:
                raise LabError(f"{ns}: address {node.ip} not on {node.veth_ns}")
            if "UP" not in by_if.get("lo", {}).get("flags", []):
                raise LabError(f"{ns}: loopback down")
            for family in ("-4", "-6"):
                routes = json.loads(
                    run_cmd(["ip", "-j", family, "-n", ns, "route", "show", "table", "all"],
                            check=False).stdout or "[]"
                )  # fmt: skip
                for r in routes:
                    if r.get("dst") in ("default", "0.0.0.0/0", "::/0"):
                        raise LabError(f"{ns}: has a default route {r}; traffic could leak")
                    if r.get("dst") not in (None, "default") and family == "-4":
                        self._check_route(ns, r)
                if family == "-4":
                    main = [r for r in routes if r.get("table", "main") == "main"]
                    if not any(r.get("dst") == str(self.subnet) for r in main):
                        raise LabError(f"{ns}: no route to {self.subnet}")

    def _check_route(self, ns: str, route: dict[str, object]) -> None:
        """Every IPv4 route in a node must stay on loopback or the lab subnet."""
        dst = str(route.get("dst"))
        with contextlib.suppress(ValueError):
            net = ipaddress.ip_network(dst, strict=False)
            if net.is_loopback or net.subnet_of(self.subnet):  # type: ignore[arg-type]
                return
            if route.get("type") in ("local", "broadcast") or route.get("table") == "local":
                return
            raise LabError(f"{ns}: route to {dst} leaves the lab subnet")

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def run(
        self, name: str, argv: Sequence[str], timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command in a node's namespace (via nsenter) and capture its output."""
        full = [*self.nodes[name].prefix(), *map(str, argv)]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise LabError(f"{name}: {' '.join(full)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def uplink_bands(self, name: str) -> dict[str, dict[str, object]]:
        """tc -s statistics of the two queues of a node's upload (``small``, ``bulk``)."""
        node = self.nodes[name]
        out = run_cmd(["tc", "-j", "-s", "-n", node.netns, "qdisc", "show", "dev", node.veth_ns])
        parents = {"2:10": "small", "2:20": "bulk"}
        return {parents[q["parent"]]: q for q in json.loads(out.stdout)
                if q.get("parent") in parents}  # fmt: skip

    def qdisc_stats(self, name: str) -> dict[str, dict[str, object]]:
        """tc -s statistics of a node's two qdiscs (``up``, ``down``), e.g. sent bytes, drops."""
        node = self.nodes[name]
        up = run_cmd(["tc", "-j", "-s", "-n", node.netns, "qdisc", "show", "dev", node.veth_ns])
        down = run_cmd(["tc", "-j", "-s", "qdisc", "show", "dev", node.veth_host])
        return {"up": json.loads(up.stdout)[0], "down": json.loads(down.stdout)[0]}


def exit_on_signals() -> None:
    """Turn SIGTERM/SIGHUP into ``SystemExit`` so ``with Network(...)`` blocks unwind.

    SIGINT already raises ``KeyboardInterrupt``. Call this in demo/bench entry points.
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
